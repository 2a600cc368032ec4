"""Bad input is refused before any work, by ``metakd validate``, ``run`` and ``sweep`` alike.

Each case is a small YAML file (or a command-line mistake); the test runs the CLI in-process and
asserts the exit code (2), a one-line ``metakd: error:`` naming the field or file, and that no
work started: ``metakd run``'s experiment and the sweep's Ray start are patched to fail the test,
and nothing is written under the output directory or the sweep's storage.
The data rules (labels, domains, splits) are tested with the data package.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metakd.cli import main
from metakd.config import load_sweep

TINY = "data: {max_length: 16, vocab_size: 300, synthetic: {num_domains: 2, examples_per_domain: 40}}\n"
GRID = "  algorithm: grid\n  params:\n    gamma2: {type: grid, values: [0.1, 0.2]}\n"


class WorkStarted(BaseException):
    """Raised by the patched entry points of real work; BaseException, so main() does not report it."""


@pytest.fixture
def no_work(monkeypatch):
    def started(*_a, **_k):
        raise WorkStarted

    monkeypatch.setattr("metakd.jobs.run.run_experiment", started)
    monkeypatch.setattr("metakd.sweep.tuner.connect", started)  # Ray starts here, after every check


def _base(tmp_path: Path, command: str) -> dict[str, str]:
    """Top-level YAML lines that make a valid file for ``command`` (a case overrides any of them)."""
    base = {"name": "name: bad\n", "device": "device: cpu\n", "output_dir": f"output_dir: {tmp_path / 'out'}\n",
            "data": TINY}
    if command == "sweep":
        base["search"] = f"search:\n  storage: {tmp_path / 'storage'}\n" + GRID
    return base


def _write(tmp_path: Path, command: str, text: str | bytes) -> Path:
    p = tmp_path / "case.yaml"
    if isinstance(text, bytes):
        p.write_bytes(text)
        return p
    given = set(re.findall(r"^(\w+):", text, flags=re.M))
    p.write_text(text + "".join(v for k, v in _base(tmp_path, command).items() if k not in given))
    return p


def _cli(command: str, path: Path, *extra: str) -> list[str]:
    return [command, str(path), *extra]


def _assert_refused(code: int, err: str, fragments: list[str], tmp_path: Path) -> None:
    assert code == 2, err
    assert err.startswith("metakd: error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in err, (f, err)
    assert not (tmp_path / "out" / "bad").exists()  # metakd run wrote nothing
    storage = tmp_path / "storage"
    assert not storage.exists() or not any(storage.rglob("*.parquet"))


def _checkpoint_dir(tmp_path: Path, weights: bool) -> str:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    if weights:
        (d / "model.safetensors").write_bytes(b"")
    return str(d)


# case -> (YAML text, or a function of tmp_path giving it; fragments the error must contain)
EVERY_COMMAND = {
    "float_inf": ("meta_teacher: {gamma1: .inf}\n", ["meta_teacher.gamma1", "inf", "finite number"]),
    "float_string_inf": ("meta_teacher: {gamma1: 'inf'}\n", ["meta_teacher.gamma1", "'inf'", "finite number"]),
    "float_string_nan": ("teacher: {lr: 'nan'}\n", ["teacher.lr", "'nan'", "finite number"]),
    "float_nan": ("distill: {gamma2: .nan}\n", ["distill.gamma2", "finite number"]),
    "duplicate_seeds": ("seeds: [0, 0]\n", ["seeds", "[0, 0]", "distinct"]),
    "duplicate_key": ("distill: {gamma2: 0.1}\nseeds: [0]\ndistill: {gamma2: 0.2}\n",
                      ["case.yaml", "line 3", "duplicate key 'distill'", "first at line 1"]),
    "utf16": (lambda tmp: "name: bad\n".encode("utf-16"), ["case.yaml", "UTF-16", "UTF-8"]),
    "latin1": (lambda tmp: "name: bad\n# r\xe9sum\xe9\n".encode("latin-1"), ["case.yaml", "line 2", "not UTF-8"]),
    "bare_scalar": (lambda tmp: b"just some text\n", ["case.yaml", "expected a YAML mapping", "str"]),
    "bare_list": (lambda tmp: b"- name\n- data\n", ["case.yaml", "expected a YAML mapping", "list"]),
    "student_preset_typo": ("student: tiny-studnet\n", ["student.checkpoint", "'tiny-studnet'", "'tiny-student'"]),
    "teacher_preset_typo": ("teacher: {checkpoint: tiny-teachr, epochs: 1}\n",
                            ["teacher.checkpoint", "'tiny-teachr'", "'tiny-teacher'"]),
    "words_per_example_zero": ("data: {synthetic: {words_per_example: 0}}\n",
                               ["data.synthetic.words_per_example", "0", ">= 1"]),
    "name_with_path": ("name: ../x\n", ["name", "'../x'", "letters, digits"]),
    "checkpoint_without_weights": (lambda tmp: f"teacher: {{checkpoint: {_checkpoint_dir(tmp, False)}}}\n",
                                   ["teacher.checkpoint", "model", "no weights"]),
}
SWEEP_ONLY = {
    "when_circular": ("search:\n  algorithm: optuna\n  params:\n"
                      "    gamma1: {type: choice, values: [0.1, 0.2], when: {gamma2: 0.1}}\n"
                      "    gamma2: {type: choice, values: [0.1, 0.2], when: {gamma1: 0.1}}\n",
                      ["search.params.gamma1.when", "circular", "gamma1 -> gamma2 -> gamma1"]),
    "when_unknown_param": ("search:\n  algorithm: optuna\n  params:\n    gamma1: {type: choice, values: [0.1]}\n"
                           "    gamma2: {type: choice, values: [0.1], when: {gama1: 0.1}}\n",
                           ["search.params.gamma2.when", "'gama1'", "not another searched parameter"]),
    "when_value_never_drawn": ("search:\n  algorithm: optuna\n  params:\n"
                               "    distill.pred_loss: {type: choice, values: [kl, js]}\n"
                               "    gamma2: {type: choice, values: [0.1], when: {distill.pred_loss: kll}}\n",
                               ["search.params.gamma2.when", "'kll'", "never drawn", "['kl', 'js']"]),
    "uniform_over_integer_field": ("search:\n  algorithm: optuna\n  params:\n"
                                   "    distill.stage1_epochs: {type: uniform, low: 1, high: 4}\n",
                                   ["search.params.distill.stage1_epochs.type", "'uniform'", "integer", "type: int"]),
    "grid_value_outside_choice_field": ("search:\n  algorithm: grid\n  params:\n"
                                        "    distill.pred_loss: {type: grid, values: [kl, mse]}\n",
                                        ["search.params.distill.pred_loss", "'mse'", "one of kl, rkl, js, tvd"]),
    "searched_non_finite": ("search:\n  algorithm: grid\n  params:\n    gamma2: {type: grid, values: [0.1, .inf]}\n",
                            ["search.params.gamma2", "inf", "finite number"]),
    "searched_preset_typo": ("search:\n  algorithm: grid\n  params:\n    student: {type: grid, values: [bert-mni]}\n",
                             ["search.params.student", "'bert-mni'", "'bert-mini'"]),
    "storage_is_a_file": (lambda tmp: (tmp / "st").write_text("x") and f"search:\n  storage: {tmp / 'st'}\n" + GRID,
                          ["search.storage", "is a file"]),
}
RUN_ONLY = {
    "output_dir_is_a_file": (lambda tmp: (tmp / "f").write_text("x") and f"output_dir: {tmp / 'f'}\n",
                             ["output_dir", "is a file"]),
}

CASES = ([(c, cmd) for c in EVERY_COMMAND for cmd in ("validate", "run", "sweep")]
         + [(c, cmd) for c in SWEEP_ONLY for cmd in ("validate", "sweep")]
         + [(c, cmd) for c in RUN_ONLY for cmd in ("validate", "run")])


@pytest.mark.parametrize("case, command", CASES, ids=[f"{c}-{cmd}" for c, cmd in CASES])
def test_bad_input_is_refused_before_work(case, command, tmp_path, capsys, no_work):
    text, fragments = {**EVERY_COMMAND, **SWEEP_ONLY, **RUN_ONLY}[case]
    text = text(tmp_path) if callable(text) else text
    code = main(_cli(command, _write(tmp_path, command, text)))
    _assert_refused(code, capsys.readouterr().err, fragments, tmp_path)


# ----------------------------------------------------------------------------- the command line


def test_run_refuses_a_sweep_file(tmp_path, capsys, no_work):
    code = main(_cli("run", _write(tmp_path, "sweep", "")))
    _assert_refused(code, capsys.readouterr().err, ["case.yaml", "search section", "metakd sweep"], tmp_path)


def test_sweep_name_outside_the_storage_root_is_refused(tmp_path, capsys, no_work):
    code = main(_cli("sweep", _write(tmp_path, "sweep", ""), "--name", "../x"))
    _assert_refused(code, capsys.readouterr().err, ["--name", "'../x'"], tmp_path)
    assert not (tmp_path / "x").exists()


def test_sweep_storage_override_that_is_a_file_is_refused(tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("x")
    code = main(_cli("sweep", _write(tmp_path, "sweep", ""), "--storage", str(tmp_path / "file")))
    _assert_refused(code, capsys.readouterr().err, ["--storage", "is a file"], tmp_path)


@pytest.mark.parametrize("command", ["validate", "run", "sweep"])
def test_device_cuda_without_cuda_is_refused_where_training_runs_here(command, tmp_path, capsys, monkeypatch,
                                                                     no_work):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(_cli(command, _write(tmp_path, command, "device: cuda\n")))
    _assert_refused(code, capsys.readouterr().err, ["device", "'cuda'", "not available"], tmp_path)


def test_device_cuda_is_left_to_the_cluster(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(_cli("validate", _write(tmp_path, "sweep", "device: cuda\n"), "--remote")) == 0
    assert "device 'cuda': checked where the trials train" in capsys.readouterr().out


def test_unwritable_output_dir_is_refused(tmp_path, capsys, no_work):
    if os.geteuid() == 0:
        pytest.skip("root can write into a read-only directory")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code = main(_cli("run", _write(tmp_path, "run", f"output_dir: {locked / 'runs'}\n")))
    _assert_refused(code, capsys.readouterr().err, ["output_dir", "not writable"], tmp_path)


def test_debug_shows_the_traceback(tmp_path, capsys):
    path = _write(tmp_path, "validate", "seeds: [0, 0]\n")
    assert main(["validate", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["--debug", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err and err.rstrip().endswith("distinct seeds (each runs once)")


def test_no_traceback_from_a_subprocess(tmp_path):
    """The installed entry point: one line on stderr, exit code 2."""
    path = _write(tmp_path, "validate", "meta_teacher: {gamma1: .inf}\n")
    proc = subprocess.run([sys.executable, "-m", "metakd.cli", "validate", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "meta_teacher.gamma1" in proc.stderr


# ----------------------------------------------------------------------------- handled, not refused


def test_utf8_bom_is_read(tmp_path, capsys):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + f"name: bom\ndevice: cpu\n{TINY}".encode())
    assert main(["validate", str(path)]) == 0
    assert "ok - experiment 'bom'" in capsys.readouterr().out


def test_merge_keys_are_not_duplicates(tmp_path):
    from metakd.config import load_yaml

    path = tmp_path / "merge.yaml"
    path.write_text("a: &b {x: 1, y: 2}\nc: {<<: *b, x: 3}\n")  # YAML's way to extend a mapping
    assert load_yaml(path)["c"] == {"x": 3, "y": 2}


def test_grid_runs_every_point_once_unless_told(tmp_path, capsys):
    path = _write(tmp_path, "sweep", "")
    assert load_sweep(path).search.num_samples == 1
    assert main(["validate", str(path)]) == 0
    assert "grid of 2 points x search.num_samples 1 = 2 trials" in capsys.readouterr().out
    optuna = _write(tmp_path, "sweep", f"search:\n  storage: {tmp_path}\n  algorithm: optuna\n  params:\n"
                                       "    gamma2: {type: uniform, low: 0, high: 1}\n")
    assert load_sweep(optuna).search.num_samples == 8


def test_home_in_paths_is_expanded_once_for_every_reader(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = _write(tmp_path, "sweep", "data: {source: files, path: ~/rows.jsonl}\noutput_dir: ~/runs\n"
                                     "teacher: {checkpoint: ~/model}\n"
                                     "search:\n  storage: ~/sweeps\n" + GRID)
    cfg = load_sweep(path)
    assert cfg.data.path == str(tmp_path / "rows.jsonl") and cfg.output_dir == str(tmp_path / "runs")
    assert cfg.teacher.checkpoint == str(tmp_path / "model") and cfg.search.storage == str(tmp_path / "sweeps")


# ----------------------------------------------------------------------------- the hub, offline


def _fake_hub_cache(root: Path, repo: str) -> None:
    snapshot = root / f"models--{repo}" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (root / f"models--{repo}" / "refs").mkdir()
    (root / f"models--{repo}" / "refs" / "main").write_text("abc")


@pytest.mark.parametrize("command", ["validate", "run", "sweep"])
def test_hub_id_offline_and_not_cached_is_refused_at_once(command, tmp_path, capsys, monkeypatch, no_work):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    code = main(_cli(command, _write(tmp_path, command, "teacher: {checkpoint: bert-base-uncased}\n"
                                                      "student: bert-mini\ndistill: {layer_map: round}\n")))
    _assert_refused(code, capsys.readouterr().err, ["teacher.checkpoint", "'bert-base-uncased'", "HF_HUB_OFFLINE",
                                                    "not in the local cache"], tmp_path)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("command", ["validate", "sweep"])
def test_a_searched_hub_id_offline_and_not_cached_is_refused_at_once(command, tmp_path, capsys, monkeypatch, no_work):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    search = ("search:\n  algorithm: grid\n  params:\n    student: {type: grid, values: [tiny-student, "
              "{checkpoint: prajjwal1/bert-tiny}]}\n")
    code = main(_cli(command, _write(tmp_path, command, search)))
    _assert_refused(code, capsys.readouterr().err, ["search.params.student.values[1]", "'prajjwal1/bert-tiny'",
                                                    "HF_HUB_OFFLINE", "not in the local cache"], tmp_path)
    # cached: a note, not a refusal
    _fake_hub_cache(tmp_path / "hub", "prajjwal1--bert-tiny")
    from metakd.config import load_sweep
    from metakd.preflight import searched_checkpoints

    notes = searched_checkpoints(load_sweep(_write(tmp_path, command, search)))
    assert len(notes) == 1 and "search.params.student.values[1]" in notes[0] and "local cache" in notes[0]


def test_hub_id_offline_but_cached_is_noted(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    _fake_hub_cache(tmp_path / "hub", "bert-base-uncased")
    path = _write(tmp_path, "validate", "teacher: {checkpoint: bert-base-uncased}\nstudent: bert-mini\n"
                                        "distill: {layer_map: round}\n")
    assert main(["validate", str(path)]) == 0
    assert "loaded from the local cache" in capsys.readouterr().out


def test_hub_dataset_offline_is_refused(tmp_path, capsys, monkeypatch, no_work):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    code = main(_cli("validate", _write(tmp_path, "validate", "data: {source: hf, path: someone/some_data}\n")))
    _assert_refused(code, capsys.readouterr().err, ["data.path", "'someone/some_data'", "HF_HUB_OFFLINE"], tmp_path)


def test_unreachable_hub_is_asked_once_with_a_short_timeout(monkeypatch):
    import urllib.request

    from metakd import preflight

    calls = []

    def urlopen(request, timeout):
        calls.append(timeout)
        raise urllib.error.URLError("no route")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    preflight._probe.cache_clear()
    try:
        assert "no route" in preflight.hub_unreachable() and "no route" in preflight.hub_unreachable()
    finally:
        preflight._probe.cache_clear()
    assert calls == [preflight.HUB_PROBE_TIMEOUT_S] and preflight.HUB_PROBE_TIMEOUT_S <= 5


# ----------------------------------------------------------------------------- metakd run: one part per config


def _fake_experiment(cfg, *_a, **_k) -> dict:
    students = [{"seed": seed, "method": m, "domain": d, "dev_accuracy": 0.9, "test_accuracy": 0.8,
                 "student_key": f"{m}-{d}-{seed}-{cfg.distill.gamma2}"}
                for seed in cfg.seeds for m in cfg.methods for d in ("alpha", "beta")]
    return {"students": students, "teachers_trained": []}


def test_run_never_overwrites_another_seed_or_configuration(tmp_path, monkeypatch, capsys):
    from metakd.report import results

    monkeypatch.setattr("metakd.jobs.run.run_experiment", _fake_experiment)
    for extra in ("seeds: [0]\n", "seeds: [1]\n", "seeds: [0]\ndistill: {gamma2: 0.7}\n", "seeds: [0]\n"):
        assert main(["run", str(_write(tmp_path, "run", extra))]) == 0
    df = results.load(tmp_path / "out" / "bad")
    capsys.readouterr()
    # 3 distinct (configuration, seed) runs x 2 domains x 2 splits; the 4th run replaced its own part
    assert len(df) == 3 * 2 * 2
    assert sorted(set(zip(df["gamma2"], df["seed"]))) == [(0.5, 0), (0.5, 1), (0.7, 0)]
    assert df.groupby("gamma2")["trial_id"].nunique().tolist() == [1, 1] and df["trial_id"].nunique() == 2


# ----------------------------------------------------------------------------- readers: a corrupt part


def _rows(seed: int) -> list[dict]:
    from metakd.config import ExperimentConfig
    from metakd.report.rows import result_rows

    return result_rows(ExperimentConfig(), "s", f"t{seed}", [
        {"seed": seed, "method": "metakd", "domain": d, "dev_accuracy": 0.9, "test_accuracy": 0.8,
         "student_key": f"k{seed}{d}"} for d in ("alpha", "beta")])


def test_corrupt_results_part_is_named_and_skipped(tmp_path, capsys):
    import warnings

    from metakd.report import results

    results.write_part(str(tmp_path), _rows(0), "cfg-a")
    results.write_part(str(tmp_path), _rows(1), "cfg-b")
    (tmp_path / "results" / "cfg-c.parquet").write_bytes(b"PAR1 cut short")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = results.load(tmp_path)
    assert sorted(set(df["seed"])) == [0, 1]  # the rest is read
    assert [str(w.message) for w in caught if issubclass(w.category, results.CorruptPartWarning)][0].startswith(
        f"skipped corrupt results part {tmp_path / 'results' / 'cfg-c.parquet'}")
    assert [p for p, _ in df.attrs["skipped_parts"]] == [str(tmp_path / "results" / "cfg-c.parquet")]
    with pytest.raises(ValueError, match="cfg-c.parquet: cannot read"):
        results.load(tmp_path, strict=True)

    assert main(["results", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "warning: skipped corrupt results part" in captured.err and "cfg-c.parquet" in captured.err
    assert "metakd" in captured.out
    assert main(["results", str(tmp_path), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metakd: error: ") and "cfg-c.parquet" in err


def test_plot_honours_the_suffix(tmp_path):
    from matplotlib.figure import Figure

    from metakd.report import plots

    assert [p.name for p in plots.output_paths(tmp_path / "fig.svg")] == ["fig.svg"]
    assert [p.name for p in plots.output_paths("fig.png")] == ["fig.png", "fig.pdf"]
    fig = Figure()
    fig.add_subplot().plot([0, 1], [0, 1])
    plots._save(fig, tmp_path / "fig.svg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.svg"]
    assert b"<svg" in (tmp_path / "fig.svg").read_bytes()[:500]


# ----------------------------------------------------------------------------- a sweep's identity and lock


def _sweep(tmp_path: Path, values: str = "[0.1, 0.2]") -> Path:
    return _write(tmp_path, "sweep", f"search:\n  storage: {tmp_path / 'storage'}\n  algorithm: grid\n"
                                     f"  params:\n    gamma2: {{type: grid, values: {values}}}\n")


def _start(path: Path, *extra: str) -> None:
    """Run `metakd sweep` until Ray would start (every check passed)."""
    with pytest.raises(WorkStarted):
        main(["sweep", str(path), *extra])


def test_rerun_with_another_config_is_refused_with_the_differences(tmp_path, capsys, no_work):
    root = tmp_path / "storage" / "bad"
    _start(_sweep(tmp_path))
    stored = json.loads((root / "sweep_config.json").read_text())["config"]
    assert stored["search"]["params"]["gamma2"]["values"] == [0.1, 0.2] and "storage" not in stored["search"]
    assert not (root / "_running.json").exists()  # released when the driver ends
    capsys.readouterr()

    code = main(["sweep", str(_sweep(tmp_path, "[0.1, 0.3]"))])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("metakd: error: ") and "--restart" in err
    assert "search.params.gamma2.values: [0.1, 0.2] -> [0.1, 0.3]" in err

    _start(_sweep(tmp_path))  # the same configuration resumes (here: reaches Ray)


def test_restart_moves_the_old_run_aside(tmp_path, capsys, no_work):
    from metakd.report import results

    root = tmp_path / "storage" / "bad"
    _start(_sweep(tmp_path))
    results.write_part(str(root), _rows(0), "cfg-old")
    _start(_sweep(tmp_path, "[0.3]"), "--restart")
    (previous,) = (root / "previous").iterdir()
    assert (previous / "results" / "cfg-old.parquet").is_file() and (previous / "sweep_config.json").is_file()
    assert not (root / "results").exists()
    assert json.loads((root / "sweep_config.json").read_text())["config"]["search"]["params"]["gamma2"][
        "values"] == [0.3]
    assert f"restart: the previous run moved to {previous}" in capsys.readouterr().out


def _lock(root: Path, pid: int, age_s: float = 0.0) -> None:
    import socket

    root.mkdir(parents=True, exist_ok=True)
    now = time.time()
    (root / "_running.json").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": pid, "token": "other", "started": now - age_s, "heartbeat": now - age_s}))


def test_second_driver_of_a_running_sweep_is_refused(tmp_path, capsys, no_work):
    root = tmp_path / "storage" / "bad"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(root, other.pid)
        code = main(["sweep", str(_sweep(tmp_path))])
        err = capsys.readouterr().err
        assert code == 2 and "already running" in err and f":{other.pid}" in err
        assert (root / "_running.json").exists() and not (root / "sweep_config.json").exists()
    finally:
        other.kill()
        other.wait()
    _start(_sweep(tmp_path))  # its process is gone: the lock is taken over


def test_stale_lock_is_taken_over(tmp_path, no_work):
    from metakd.sweep.identity import STALE_S

    _lock(tmp_path / "storage" / "bad", pid=1, age_s=STALE_S + 1)  # another host's would look the same
    _start(_sweep(tmp_path))
