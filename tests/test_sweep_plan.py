"""``metakd plan``: runs on every file in sweeps/ without Ray; counts trials, distinct teachers and
student jobs as a run then trains them (and finds them in the cache afterwards); FLOPs and hours
follow the FLOP model. The smoke sweep itself, planned then run on Ray: tests/test_sweep_cache.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from metakd import flops
from metakd.cli import main
from metakd.config import load_sweep
from metakd.jobs.events import STUDENT, TEACHER, read_events
from metakd.storage import Store
from metakd.sweep.plan import lpt_makespan, make_plan, trials

SWEEPS = sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml"))


def counts(out: str) -> dict[str, tuple[int, int, int]]:
    """{"teachers": (distinct, in cache, to train), "student jobs": ..., "prepared data": ...} of plan's table."""
    found = {}
    for name in ("prepared data", "teachers", "student jobs"):
        m = re.search(rf"^{name}\s+(\d+)\s+(\d+)\s+(\d+)", out, re.M)
        found[name] = tuple(int(x) for x in m.groups())
    return found


@pytest.fixture
def no_ray(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("metakd plan started Ray"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_plan_runs_on_every_sweep_file_without_ray(path, tmp_path, capsys, no_ray):
    assert main(["plan", str(path), "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    c = counts(out)
    assert c["teachers"][0] >= 1 and c["student jobs"][0] >= 1 and "GPU-hours" in out and "wall time" in out
    assert not (tmp_path / "cache").exists()  # it looked, it wrote nothing


def test_fig4_needs_one_meta_teacher_per_seed_for_all_seven_gamma2_values(capsys, no_ray):
    assert main(["plan", "sweeps/fig4_gamma2.yaml"]) == 0
    out = capsys.readouterr().out
    assert "trials: 7" in out and counts(out)["teachers"] == (3, 0, 3)
    assert counts(out)["student jobs"] == (7 * 3 * 4, 0, 84)  # gamma2 x seeds x target domains
    assert "the paper's amazon sizes" in out and "books 1620" in out


def test_grid_trials_and_optuna_draws():
    cfg = load_sweep("sweeps/main_mnli.yaml")
    assert [t["meta_teacher.prototype"] for t in trials(cfg)[0]] == ["class", "domain"]
    optuna_cfg = load_sweep("sweeps/optuna_joint.yaml")
    drawn, n = trials(optuna_cfg)
    assert n == len(drawn) == 48 and all(0 <= t["gamma1"] <= 1 for t in drawn)
    assert all(("distill.temperature" in t) == (t["distill.pred_loss"] == "kl") for t in drawn)


def test_flops_and_hours_follow_the_flop_model(tmp_path):
    cfg = load_sweep("sweeps/fig4_gamma2.yaml")
    plan = make_plan(cfg, None, None)
    meta = [i for i in plan.items.values() if i.kind == "teacher"]
    n, seq, bert = 1620 * 4, 128, (12, 768, 12, 3072)
    # 3 epochs of training and one forward for the stored outputs each; one more for the prototype features
    # of the initial encoder (bert-base-uncased) on the data, which the three seeds share at sample_rate 1
    trained = flops.teacher_step(bert, n * 3, seq) + flops.encoder_forward(bert, n, seq)
    assert [m.flops for m in meta] == pytest.approx([trained + flops.encoder_forward(bert, n, seq), trained, trained])
    assert sum(i.kind == "data" for i in plan.items.values()) == 1
    assert lpt_makespan([3, 3, 2, 2, 2], 2) == 7 and lpt_makespan([], 4) == 0


RUN = {"name": "tiny", "methods": ["metakd", "kd_single"], "seeds": [0], "device": "cpu",
       "data": {"max_length": 16, "vocab_size": 200,
                "synthetic": {"num_domains": 2, "examples_per_domain": 60, "words_per_example": 8}},
       "teacher": {"preset": "tiny-teacher", "epochs": 1, "batch_size": 32}, "student": "tiny-student",
       "distill": {"stage1_epochs": 0, "stage2_epochs": 1, "batch_size": 32}, "students": {"keep": "none"}}


@pytest.mark.slow  # trains a run in-process (about 10 s)
@pytest.mark.usefixtures("single_thread_torch")
def test_plan_counts_what_a_run_then_trains_and_then_finds_it_cached(tmp_path, capsys, no_ray):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**RUN, "output_dir": str(tmp_path / "runs")}))
    assert main(["plan", str(path)]) == 0
    before = counts(capsys.readouterr().out)
    assert before == {"prepared data": (1, 0, 1), "teachers": (3, 0, 3), "student jobs": (4, 0, 4)}
    assert main(["run", str(path)]) == 0
    root = Store(str(tmp_path / "runs" / "tiny"))
    assert len(read_events(root, TEACHER)) == before["teachers"][2]
    assert len(read_events(root, STUDENT)) == before["student jobs"][2]
    capsys.readouterr()
    assert main(["plan", str(path)]) == 0
    after = counts(capsys.readouterr().out)
    assert after == {"prepared data": (1, 1, 0), "teachers": (3, 3, 0), "student jobs": (4, 4, 0)}
