"""``metakd cost``: device-hours from the event files, by phase, method and trial, the share served
from the cache, utilisation, and the meta-teacher against K single-domain teachers; numbers
checked against hand sums over the event files written here."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from metakd.cli import main
from metakd.jobs.events import STUDENT, TEACHER, read_events, write_event
from metakd.report import results
from metakd.report.cost import format_cost, sweep_cost
from metakd.storage import Store

H = 3600.0


def _teacher(key, kind, domain, start, hours, run, world_size=1, share=1.0, seed=0):
    return {"type": "teacher", "key": key, "kind": kind, "domain": domain, "seed": seed, "start": start,
            "end": start + hours * H, "run": run, "world_size": world_size, "gpu_share": share}


def _student(key, method, domain, teacher_key, start, hours, trial, share=0.25, seed=0):
    return {"type": "student", "key": key, "method": method, "domain": domain, "seed": seed,
            "teacher_key": teacher_key, "start": start, "end": start + hours * H, "run": f"{trial}-students-0",
            "trial_id": trial, "world_size": 1, "gpu_share": share}


@pytest.fixture
def sweep(tmp_path):
    """Two trials (t1, t2) of metakd + kd_single on 2 domains; t2 needed one more teacher that came
    from the cache (no event here) and reused t1's kd_single students."""
    store = Store(str(tmp_path))
    teachers = [_teacher("meta", "meta", None, 0.0, 2.0, "t1-teachers-0", world_size=4),  # 8 device-hours
                _teacher("sa", "single", "a", 0.0, 1.0, "t1-teachers-1", world_size=4),  # 4
                _teacher("sb", "single", "b", 1.0 * H, 1.0, "t2-both-0")]  # 1
    students = [_student("m1a", "metakd", "a", "meta", 2 * H, 2.0, "t1"),  # 0.5 each
                _student("m1b", "metakd", "b", "meta", 2 * H, 2.0, "t1"),
                _student("ka", "kd_single", "a", "sa", 2 * H, 1.0, "t1"),  # 0.25
                _student("m2a", "metakd", "a", "meta", 3 * H, 2.0, "t2", share=1.0)]  # 2
    for e in teachers:
        write_event(store, TEACHER, e)
    for e in students:
        write_event(store, STUDENT, e)
    rows = [{"trial_id": t, "method": m, "domain": d, "seed": 0, "split": "test", "status": "ok", "accuracy": 0.8,
             "student_key": k, "teacher_key": tk}
            for t, m, d, k, tk in (("t1", "metakd", "a", "m1a", "meta"), ("t1", "metakd", "b", "m1b", "meta"),
                                   ("t1", "kd_single", "a", "ka", "sa"), ("t2", "metakd", "a", "m2a", "meta"),
                                   ("t2", "metakd", "b", "m2b", "cached"))]
    results.write_part(str(tmp_path), rows, "cfg-x")
    return tmp_path, teachers + students


def _cost(root, slots=None):
    store = Store(str(root))
    return sweep_cost(read_events(store, TEACHER), read_events(store, STUDENT), results.load(str(root)), slots)


def _direct(events) -> float:
    return sum((e["end"] - e["start"]) * e["world_size"] * e["gpu_share"] for e in events) / H


def test_totals_equal_a_direct_sum_over_the_event_files(sweep):
    root, events = sweep
    on_disk = [json.loads(p.read_text()) for p in (root / "events").rglob("*.json")]
    cost = _cost(root)
    phase = cost.tables["by phase"].set_index("phase")
    assert phase.loc["total", "device_hours"] == pytest.approx(_direct(on_disk)) == pytest.approx(8 + 4 + 1 + 1.25 + 2)
    assert phase.loc["teachers", "device_hours"] == pytest.approx(13) and phase.loc["teachers", "trainings"] == 3
    assert phase.loc["students", "device_hours"] == pytest.approx(3.25)
    method = cost.tables["by method (device-hours)"].set_index("method")
    assert method.loc["metakd", "teachers"] == pytest.approx(8) and method.loc["metakd", "students"] == pytest.approx(3)
    assert method.loc["kd_single", "total"] == pytest.approx(5 + 0.25)
    trial = cost.tables["by trial (device-hours)"].set_index("trial")
    assert trial.loc["t1", "total"] == pytest.approx(12 + 1.25) and trial.loc["t2", "total"] == pytest.approx(1 + 2)


def test_cache_share_utilisation_and_the_meta_teacher_against_single_domain_teachers(sweep):
    root, _ = sweep
    cost = _cost(root, slots=8)
    served = cost.tables["served from the cache"].set_index("phase")
    assert served.loc["teachers", ["needed", "trained_here", "from_cache"]].tolist() == [4, 3, 1]
    assert served.loc["students", "share_from_cache"] == pytest.approx(1 / 5)  # m2b came from the cache
    util = cost.tables["utilisation"].iloc[0]
    assert util["span_hours"] == pytest.approx(5.0) and util["peak_devices_busy"] == pytest.approx(8)  # both 4-worker teachers, first hour
    assert util["utilisation"] == pytest.approx(16.25 / (8 * 5.0))
    meta = cost.tables["meta-teacher vs single-domain teachers"].iloc[0]
    assert meta["K"] == 2 and meta["meta_device_hours"] == pytest.approx(8)
    assert meta["meta_per_target_domain"] == pytest.approx(4) and meta["single_device_hours"] == pytest.approx(5)
    assert meta["meta_over_single"] == pytest.approx(8 / 5) and meta["students_served"] == 3


def test_cli_formats(sweep, capsys):
    root, events = sweep
    assert main(["cost", str(root), "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    total = table[(table["section"] == "by phase") & (table["phase"] == "total")]["device_hours"].item()
    assert total == pytest.approx(_direct(events), rel=1e-5)
    assert main(["cost", str(root)]) == 0
    out = capsys.readouterr().out
    assert "### by phase" in out and "| total |" in out and "### meta-teacher vs single-domain teachers" in out
    assert format_cost(_cost(root), "markdown") == out


def test_a_directory_without_events_is_an_error(tmp_path, capsys):
    assert main(["cost", str(tmp_path)]) == 2
    assert "no training events" in capsys.readouterr().err


def test_during_a_sweep_without_rows_yet_the_cache_share_counts_the_trainings_so_far(sweep, capsys):
    root, _ = sweep
    for part in (root / "results").iterdir():
        part.unlink()
    assert main(["cost", str(root), "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    served = table[table["section"] == "served from the cache"].set_index("phase")
    assert served.loc["teachers", "needed"] == 3 and served.loc["teachers", "from_cache"] == 0
