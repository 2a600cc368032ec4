"""sweeps/prune_smoke.yaml end to end (cap-pruning spec §5 item 5): the sweep as a user runs it, its
pruned students' columns, and a rerun that trains nothing. Rankings are printed by the sweep, not asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from metakd.jobs.events import STUDENT, TEACHER, read_events
from metakd.report import analysis, results
from metakd.storage import Store

ROOT = Path(__file__).resolve().parents[1]


def _sweep(storage: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "metakd.cli", "sweep", str(ROOT / "sweeps" / "prune_smoke.yaml"),
                           "--storage", str(storage)], capture_output=True, text=True, timeout=1200, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_prune_smoke_sweep_end_to_end(tmp_path):
    _sweep(tmp_path)
    store = Store(str(tmp_path / "prune_smoke"))
    trained = len(read_events(store, TEACHER)), len(read_events(store, STUDENT))
    assert trained == (3, 12)  # meta + 2 single teachers; 3 students x 2 methods x 2 domains
    df = results.load(str(tmp_path / "prune_smoke"))
    test = df[df["split"] == "test"]
    pruned = test[test["prune_structure"].notna()]
    assert len(pruned) == 8 and set(pruned["latency_kind"]) == {"dense_masked", "physical"}
    for column in ("prune_criterion", "prune_target", "prune_contrastive", "prune_achieved", "encoder_remaining",
                   "student_nonzero_params", "heads_kept", "ffn_kept", "latency_ms_b1", "latency_ms_b32"):
        assert pruned[column].notna().all(), column
    movement = pruned[pruned["prune_criterion"] == "movement"]
    assert (movement["prune_achieved"] == 0.5).all()
    # tiny-teacher's layers are 2.1 % biases and LayerNorm, which stay: 0.5 of the matrices is 0.5105 of the layers
    assert ((movement["encoder_remaining"] - 0.5).abs() <= 0.011).all()
    heads = pruned[pruned["prune_structure"] == "heads_ffn"]
    assert (heads["heads_kept"] == 8).all() and (heads["ffn_kept"] == 256).all()
    assert (pruned["student_nonzero_params"] < pruned["student_params"]).all()
    assert (test["accuracy"] > test["majority_rate"]).all()  # every student beats chance
    assert analysis.student_size_table(df)["kind"].tolist() == ["dense", "heads_ffn", "unstructured"]
    out = _sweep(tmp_path)  # a rerun: everything is on the store
    assert (len(read_events(store, TEACHER)), len(read_events(store, STUDENT))) == trained, out
