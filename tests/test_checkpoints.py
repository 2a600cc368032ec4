"""Lean epoch checkpoints: only when due, never after the last epoch, holding what resume needs;
resuming from one gives the uninterrupted run's weights, also from a checkpoint another run left.
The slow test kills a Ray Train worker in the middle of a teacher and checks that the run,
launched again under its name, resumes after its last checkpoint."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, BertConfig

from metakd.data import EncodedSplit
from metakd.loader import make_loader
from metakd.models import EncoderClassifier
from metakd.train import loop
from metakd.train.loop import StageSettings, train_stage
from metakd.train.runtime import LocalRuntime

pytestmark = pytest.mark.usefixtures("single_thread_torch")

STATE_KEYS = {"name", "model", "optimizer", "scheduler", "epoch", "best_dev", "best_epoch", "curve"}


class RecordingRuntime(LocalRuntime):
    """In-process, with the checkpoints Ray Train would get kept in a list (and one to restore)."""

    epoch_checkpoints = True

    def __init__(self, root: Path, restore: str | None = None):
        super().__init__("cpu", log=lambda *a, **k: None)
        self.root, self.restore, self.saved = root, restore, []

    def report(self, metrics, checkpoint_dir=None):
        if checkpoint_dir is not None:
            dst = self.root / f"ckpt{len(self.saved)}"
            shutil.copytree(checkpoint_dir, dst)
            self.saved.append(str(dst))

    def restored_dir(self):
        return self.restore


def split(n: int = 40) -> EncodedSplit:
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(12)[None, :] < torch.randint(3, 12, (n, 1), generator=g)).long()
    return EncodedSplit(torch.randint(5, 60, (n, 12), generator=g) * mask, mask, torch.zeros_like(mask),
                        torch.randint(0, 2, (n,), generator=g), torch.randint(0, 2, (n,), generator=g))


def model(seed: int) -> EncoderClassifier:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return EncoderClassifier(AutoModel.from_config(cfg), 2, 2)


def ce(m, b):
    return F.cross_entropy(m(**b).logits, b["labels"])


def run(runtime, seed=0, epochs=4, keep_best=False, interval=0.0, dev=None, monkeypatch=None):
    """Train 4 epochs; ``dev`` scripts the dev accuracy of each epoch (needs ``monkeypatch``)."""
    if dev is not None:
        scores = iter(dev)
        monkeypatch.setattr(loop, "evaluate", lambda *a, **k: {"average": next(scores)})
    m = model(seed)
    result = train_stage(m, ce, make_loader(split(), 8, True, seed=5), [] if dev is not None else None, ["a", "b"],
                         StageSettings("teacher", epochs, 1e-3, keep_best=keep_best, checkpoint_interval_s=interval),
                         runtime, "t")
    return m, result


def state(path: str) -> dict:
    return torch.load(os.path.join(path, "state.pt"), weights_only=True)


def test_checkpoints_after_every_epoch_but_the_last_and_best_weights_only_when_not_current(tmp_path, monkeypatch):
    rt = RecordingRuntime(tmp_path)
    run(rt, keep_best=True, dev=[0.5, 0.7, 0.6, 0.8], monkeypatch=monkeypatch)
    assert len(rt.saved) == 3  # epochs 1-3; after epoch 4 the caller saves the trained model
    states = [state(p) for p in rt.saved]
    assert [s["epoch"] for s in states] == [0, 1, 2]
    assert [s["best_epoch"] for s in states] == [0, 1, 1]
    assert set(states[0]) == set(states[1]) == STATE_KEYS  # the best weights are the current ones
    assert set(states[2]) == STATE_KEYS | {"best_model"}
    for k, v in states[2]["best_model"].items():  # ... and here they are epoch 2's
        assert torch.equal(v, states[1]["model"][k])


def test_no_checkpoint_before_the_interval_has_passed(tmp_path):
    rt = RecordingRuntime(tmp_path)
    run(rt, interval=3600)
    assert rt.saved == []


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_weights(tmp_path):
    full = RecordingRuntime(tmp_path / "a")
    (tmp_path / "a").mkdir()
    m_full, r_full = run(full)
    resumed_rt = RecordingRuntime(tmp_path / "b", restore=full.saved[1])  # after epoch 2 of 4
    (tmp_path / "b").mkdir()
    m_res, r_res = run(resumed_rt, seed=1)  # other initial weights: everything must come from the checkpoint
    assert r_res.resumed_epochs == 2 and len(r_res.epoch_examples) == 2
    assert [p["step"] for p in r_res.curve] == [p["step"] for p in r_full.curve] == [5, 10, 15, 20]
    for k, v in m_full.state_dict().items():
        torch.testing.assert_close(m_res.state_dict()[k], v, rtol=0, atol=1e-6)


def test_a_checkpoint_another_run_left_is_resumed_when_it_is_further_on_and_of_this_training(tmp_path):
    def runtime(name: str, restore: str, resume: str) -> RecordingRuntime:
        (tmp_path / name).mkdir()
        rt = RecordingRuntime(tmp_path / name, restore=restore)
        rt.resume_dir = resume  # what metakd.jobs.workers sets: the checkpoint a lost run left
        return rt

    full = RecordingRuntime(tmp_path / "a")
    (tmp_path / "a").mkdir()
    run(full)
    # the run's own checkpoint is after epoch 1, the lost run's after epoch 3, or the other way round
    assert run(runtime("b", full.saved[0], full.saved[2]), seed=1)[1].resumed_epochs == 3
    assert run(runtime("c", full.saved[2], full.saved[0]), seed=1)[1].resumed_epochs == 3
    # a checkpoint of another training (another tag) is not resumed, nor is a copy cut short
    other = RecordingRuntime(tmp_path / "d")
    (tmp_path / "d").mkdir()
    train_stage(model(0), ce, make_loader(split(), 8, True, seed=5), None, ["a", "b"],
                StageSettings("teacher", 3, 1e-3), other, "another teacher")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "state.pt").write_bytes((Path(full.saved[2]) / "state.pt").read_bytes()[:100])
    assert run(runtime("e", full.saved[0], other.saved[1]), seed=1)[1].resumed_epochs == 1
    assert run(runtime("f", full.saved[0], str(tmp_path / "cut")), seed=1)[1].resumed_epochs == 1


def test_resume_restores_best_weights_saved_as_the_current_ones(tmp_path, monkeypatch):
    full = RecordingRuntime(tmp_path / "a")
    (tmp_path / "a").mkdir()
    m_full, _ = run(full, keep_best=True, dev=[0.5, 0.9, 0.6, 0.7], monkeypatch=monkeypatch)
    assert "best_model" not in state(full.saved[1])  # epoch 2 was the best when saved
    m_res, r_res = run(RecordingRuntime(tmp_path, restore=full.saved[1]), seed=1, keep_best=True, dev=[0.6, 0.7],
                       monkeypatch=monkeypatch)
    assert r_res.best_dev == 0.9
    for k, v in m_full.state_dict().items():  # both end on epoch 2's weights
        torch.testing.assert_close(m_res.state_dict()[k], v, rtol=0, atol=1e-6)
        torch.testing.assert_close(v, state(full.saved[1])["model"][k], rtol=0, atol=0)


# ----------------------------------------------------------------------------- Ray Train worker killed


def _train_workers():
    import psutil

    return [p for p in psutil.Process().children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline() if p.is_running() else [])]


def _checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("ray/*/checkpoint_*") if (p / "state.pt").is_file())


def _saved_epochs(root: Path) -> list[int]:
    """Epochs done when each checkpoint on disk was saved (one may vanish while we read it)."""
    out = []
    for p in _checkpoints(root):
        try:
            out.append(state(str(p))["epoch"] + 1)
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
    return out


@pytest.mark.slow
def test_a_killed_train_worker_resumes_the_teacher_after_its_last_checkpoint(tmp_path):
    """``metakd run --ray``; once the teacher run has a checkpoint, SIGKILL its Train worker."""
    import ray

    from metakd.config import from_dict
    from metakd.jobs.run import run_local

    cfg = from_dict({
        "name": "kill", "methods": ["kd_mix"], "seeds": [0], "device": "cpu",
        "data": {"max_length": 16, "vocab_size": 200, "domains": ["alpha"],
                 "synthetic": {"num_domains": 2, "examples_per_domain": 600, "words_per_example": 12}},
        "teacher": {"preset": "tiny-teacher", "epochs": 8, "lr": 1e-3, "batch_size": 8, "checkpoint_interval_s": 0},
        "distill": {"stage1_epochs": 1, "stage2_epochs": 1}})
    root = tmp_path / "run"
    os.environ["OMP_NUM_THREADS"] = "1"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out: dict = {}
        run = threading.Thread(target=lambda: out.update(run_local(cfg, str(root), use_ray=True, log=lambda *a: None)),
                               daemon=True)
        run.start()
        # kill once epoch 2's checkpoint is on disk: epoch 1's report was then surely registered by
        # Train's controller (a checkpoint directory appears before its report is processed)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and max(_saved_epochs(root), default=0) < 2:
            time.sleep(0.2)
        workers = _train_workers()
        assert _checkpoints(root) and len(workers) == 1, "no checkpoint or no worker to kill"
        os.kill(workers[0].pid, signal.SIGKILL)
        workers[0].wait(30)
        seen = _saved_epochs(root)
        run.join(timeout=400)
        assert not run.is_alive(), "the run did not finish after the worker was killed"
    finally:
        ray.shutdown()

    (summary,) = out["teachers_trained"]
    assert max(seen) < 8, "the worker was killed after the teacher finished"
    # resumed after the last checkpoint (or the one before, when the last was still being registered),
    # not from scratch
    assert max(seen) - 1 <= summary["resumed_epochs"] <= max(seen) and summary["resumed_epochs"] >= 1
    assert [p["epoch"] for p in summary["curve"]] == list(range(1, 9))
    assert len(out["students"]) == 1  # and the run went on to its student
    assert len(_checkpoints(root)) <= 1  # num_to_keep: only the latest is kept
