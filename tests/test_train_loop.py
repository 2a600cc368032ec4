"""The loop's evaluation: per-domain accuracy and loss, by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from metakd.train.loop import evaluate


class _Stub(torch.nn.Module):
    """Logits looked up from a table by input_ids[:, 0]."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def test_evaluate_per_domain_accuracy_and_loss_by_hand():
    table = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 3.0]])
    rows = [  # (table row, label, domain)
        (0, 0, 0), (1, 0, 0), (3, 1, 2),  # batch 1
        (1, 1, 0), (0, 1, 2), (3, 1, 2), (2, 0, 2),  # batch 2
    ]

    def batch(rs):
        return {"input_ids": torch.tensor([[r[0], 0] for r in rs]), "attention_mask": torch.ones(len(rs), 2),
                "labels": torch.tensor([r[1] for r in rs]), "domains": torch.tensor([r[2] for r in rs]),
                "extra": torch.zeros(len(rs))}

    loader = [batch(rows[:3]), batch(rows[3:])]
    model = _Stub(table).train()
    out = evaluate(model, loader, ["books", "dvd", "kitchen"], "cpu")
    assert model.training  # mode restored
    # books: rows 0 (argmax 0, y 0 ok), 1 (argmax 1, y 0 wrong), 1 (argmax 1, y 1 ok) -> 2/3
    # kitchen: 3 (y 1 ok), 0 (argmax 0, y 1 wrong), 3 (ok), 2 (tie -> argmax 0, y 0 ok) -> 3/4
    assert set(out["accuracy"]) == {"books", "kitchen"}
    assert out["accuracy"]["books"] == pytest.approx(2 / 3)
    assert out["accuracy"]["kitchen"] == pytest.approx(3 / 4)
    assert out["average"] == pytest.approx((2 / 3 + 3 / 4) / 2)

    def ce(row, y):
        z = table[row].tolist()
        return math.log(sum(math.exp(v) for v in z)) - z[y]

    books = (ce(0, 0) + ce(1, 0) + ce(1, 1)) / 3
    kitchen = (ce(3, 1) + ce(0, 1) + ce(3, 1) + ce(2, 0)) / 4
    assert out["loss"]["books"] == pytest.approx(books, rel=1e-5)
    assert out["loss"]["kitchen"] == pytest.approx(kitchen, rel=1e-5)


def _steps(losses: list[float], epochs: int, monkeypatch, log_every_s: float | None = None):
    """train_stage over ``len(losses)`` one-example batches whose loss is losses[i] (times a weight);
    returns (loss steps taken, the error raised or None)."""
    from metakd.train import loop
    from metakd.train.runtime import LocalRuntime

    if log_every_s is not None:
        monkeypatch.setattr(loop, "LOG_EVERY_S", log_every_s)
    model = _Stub(torch.zeros(1, 2))
    batches = [{"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.tensor([i]),
                "domains": torch.zeros(1, dtype=torch.long)} for i in range(len(losses))]
    taken = []

    def loss_step(m, batch):
        i = int(batch["labels"][0])
        taken.append(i)
        return m.w.sum() * 0 + losses[i]

    settings = loop.StageSettings("stage2", epochs, 1e-3, keep_best=False)
    try:
        loop.train_stage(model, loss_step, batches, None, ["books"], settings, LocalRuntime("cpu", log=lambda *_: None),
                         "student metakd:books seed=3")
    except loop.NonFiniteLoss as e:
        return taken, e
    return taken, None


def test_a_non_finite_loss_stops_the_training_at_the_epoch_end_naming_it(monkeypatch):
    taken, error = _steps([0.5, float("nan"), 0.5, 0.5], epochs=3, monkeypatch=monkeypatch)
    assert taken == [0, 1, 2, 3]  # no host read per step: found at the end of the first epoch, no second one
    assert str(error).startswith("student metakd:books seed=3: the training loss is nan in stage2 epoch 1/3")
    taken, error = _steps([0.5, float("inf"), 0.5], epochs=1, monkeypatch=monkeypatch)
    assert "the training loss is inf" in str(error)
    assert _steps([0.5, 0.25], epochs=2, monkeypatch=monkeypatch) == ([0, 1, 0, 1], None)


def test_a_non_finite_loss_stops_one_worker_at_its_next_progress_line(monkeypatch):
    taken, error = _steps([0.5, float("nan"), 0.5, 0.5], epochs=1, monkeypatch=monkeypatch, log_every_s=-1.0)
    assert taken == [0, 1] and "epoch 1/1" in str(error)  # a progress line after every step here


def _nan_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Two gloo ranks; rank 1's loss is NaN on the last step of epoch 1 only, so rank 0's own sum stays finite."""
    import datetime

    import torch.distributed as dist

    from metakd.train import loop
    from metakd.train.runtime import LocalRuntime

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    runtime = LocalRuntime("cpu", log=lambda *_: None)
    runtime.rank, runtime.world_size = rank, 2
    batches = [{"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.tensor([i]),
                "domains": torch.zeros(1, dtype=torch.long)} for i in range(3)]
    bad = float("nan") if rank == 1 else 0.5

    def loss_step(m, batch):
        return (m.w * 0).sum() + (bad if int(batch["labels"][0]) == 2 else 0.5)

    try:
        loop.train_stage(_Stub(torch.zeros(1, 2)), loss_step, batches, None, ["books"],
                         loop.StageSettings("teacher", 2, 1e-3, keep_best=False), runtime, "teacher mix seed=0")
        outcome = "finished"
    except loop.NonFiniteLoss as e:
        outcome = str(e)
    with open(f"{out_dir}/{rank}.txt", "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_non_finite_loss_on_one_ddp_rank_stops_every_rank_together(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_nan_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = ((tmp_path / f"{r}.txt").read_text() for r in (0, 1))
    assert r1.startswith("teacher mix seed=0: the training loss is nan in teacher epoch 1/2")
    assert r0.startswith("teacher mix seed=0: the training loss is not finite on another worker in teacher epoch 1/2")


# ----------------------------------------------------------------------------- a training taken over


def _counting_stage(superseded, epochs=3, log_every=None, monkeypatch=None):
    """train_stage over 5 batches x ``epochs`` with ``runtime.superseded``; returns (steps taken, error)."""
    from metakd.train import loop
    from metakd.train.runtime import LocalRuntime

    if log_every is not None:
        monkeypatch.setattr(loop, "LOG_EVERY_S", log_every)
    torch.manual_seed(0)
    model, steps = torch.nn.Linear(3, 2), []
    batches = [{"input_ids": torch.randn(4, 3), "labels": torch.zeros(4, dtype=torch.long)} for _ in range(5)]

    def step(m, batch):
        steps.append(1)
        return torch.nn.functional.cross_entropy(m(batch["input_ids"]), batch["labels"])

    runtime = LocalRuntime("cpu", log=lambda *_: None)
    runtime.superseded = superseded
    try:
        loop.train_stage(model, step, batches, None, [], loop.StageSettings("teacher", epochs, 1e-3), runtime, "t")
    except loop.Superseded as e:
        return len(steps), e
    return len(steps), None


def test_a_training_taken_over_stops_at_the_end_of_its_epoch():
    steps, error = _counting_stage(lambda: True)
    assert steps == 5 and "another owner took this training over" in str(error) and "epoch 1/3" in str(error)
    assert _counting_stage(lambda: False) == (15, None)  # still its own: all three epochs
    assert _counting_stage(None) == (15, None)


def test_a_training_taken_over_stops_at_its_next_progress_line(monkeypatch):
    answers = iter([False, False, True])  # the third look (a progress line after every step) finds it taken
    steps, error = _counting_stage(lambda: next(answers), log_every=-1.0, monkeypatch=monkeypatch)
    assert steps == 3 and error is not None
