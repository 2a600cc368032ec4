"""The paper's recipe at any worker count: batch_size is the global batch, steps and examples
per epoch do not depend on the number of DDP workers, and the order is seeded by the run's seed.

The 2-worker run uses two processes with a gloo process group and a small runtime (what
``RayRuntime`` does inside a TorchTrainer, without Ray's ~15 s per fit).
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing as mp
import socket

import pytest
import torch
import torch.distributed as dist

from metakd.config import ConfigError, from_dict
from metakd.data import load_prepared, prepare
from metakd.loader import ShardedBatchSampler, per_worker_batch
from metakd.train.runtime import LocalRuntime
from metakd.train.student import StudentJob, train_student
from metakd.train.teacher import teacher_spec, train_one_teacher

pytestmark = pytest.mark.usefixtures("single_thread_torch")

TINY = {
    "name": "ddp", "methods": ["kd_mix"], "seeds": [0], "device": "cpu",
    "data": {"max_length": 16, "vocab_size": 200,
             "synthetic": {"num_domains": 2, "examples_per_domain": 100, "words_per_example": 10}},
    "teacher": {"preset": "tiny-teacher", "epochs": 2, "lr": 1e-3, "batch_size": 16},
    "student": {"preset": "tiny-student"},  # narrower than the teacher: W_h is a Linear, used outside the forward
    "distill": {"stage1_epochs": 1, "stage2_epochs": 1, "batch_size": 8},
}


# ----------------------------------------------------------------------------- the sampler


def global_steps(n: int, batch: int, workers: int, seed: int = 0, epoch: int = 0) -> list[list[list[int]]]:
    """[step][rank] -> that rank's example indices."""
    per_rank = []
    for rank in range(workers):
        s = ShardedBatchSampler(n, batch, True, seed, rank, workers)
        s.set_epoch(epoch)
        per_rank.append(list(s))
    assert len({len(r) for r in per_rank}) == 1  # every rank takes every step
    return [list(step) for step in zip(*per_rank)]


@pytest.mark.parametrize("n", [37, 40, 200])
def test_every_worker_count_takes_the_same_steps_over_the_same_global_batches(n):
    single = global_steps(n, 8, 1)
    assert len(single) == math.ceil(n / 8)
    for workers in (2, 4):
        steps = global_steps(n, 8, workers)
        assert len(steps) == len(single)
        for one, shares in zip(single, steps):
            assert sorted(i for share in shares for i in share) == sorted(one[0])
            if len(one[0]) == 8:  # a full global batch: equal shares, so DDP's mean is the 1-worker mean
                assert [len(s) for s in shares] == [8 // workers] * workers
        assert sum(len(s) for shares in steps for s in shares) == n  # each example once per epoch


def test_a_last_batch_smaller_than_the_world_repeats_examples_to_keep_ranks_in_step():
    steps = global_steps(33, 8, 4)  # the 5th global batch holds 1 example for 4 ranks
    assert len(steps) == 5
    assert [len(s) for s in steps[-1]] == [1, 1, 1, 1]
    seen = [i for shares in steps for s in shares for i in s]
    assert sorted(set(seen)) == list(range(33)) and len(seen) == 36


def test_seeds_and_epochs_give_different_orders_under_ddp():
    def order(seed, epoch):
        return global_steps(64, 8, 2, seed, epoch)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != order(0, 1)
    assert order(1, 0) != order(0, 1)  # unlike DistributedSampler's seed + epoch
    assert [s[0] for s in order(0, 0)] != [s[0] for s in order(1, 0)]  # each rank's own share differs too


def test_a_global_batch_that_does_not_split_names_the_field():
    assert per_worker_batch(32, 4, "teacher.batch_size") == 8
    with pytest.raises(ValueError, match=r"teacher\.batch_size: 30 is the global batch size .* workers \(4\)"):
        per_worker_batch(30, 4, "teacher.batch_size")


def _sweep(**resources) -> dict:
    raw = copy.deepcopy(TINY)
    raw["search"] = {"algorithm": "grid", "params": {"gamma2": {"type": "grid", "values": [0.5]}},
                     "resources": resources}
    return raw


def test_config_refuses_batches_that_do_not_split_over_the_workers():
    from_dict(_sweep(workers_per_trial=4, student_workers=2))  # 16 and 32 split
    with pytest.raises(ConfigError, match=r"^teacher\.batch_size: 16 .* search\.resources\.workers_per_trial \(3\)"):
        from_dict(_sweep(workers_per_trial=3))
    from_dict(_sweep(student_workers=3))  # independent student workers: each trains its own job on the whole batch
    with pytest.raises(ConfigError, match=r"^distill\.batch_size: 8 .* search\.resources\.student_workers \(3\)"):
        from_dict(_sweep(student_workers=3, student_ddp=True))
    raw = _sweep(workers_per_trial=4)
    raw["search"]["params"] = {"teacher.batch_size": {"type": "grid", "values": [32, 30]}}
    with pytest.raises(ConfigError, match=r"search\.params\.teacher\.batch_size: value 30 .*workers_per_trial \(4\)"):
        from_dict(raw)


def test_teacher_key_ignores_workers_and_checkpoint_interval_but_not_the_global_batch():
    def key(**over):
        raw = _sweep(workers_per_trial=over.pop("workers", 1))
        raw["teacher"] = {**raw["teacher"], **over}
        return teacher_spec(from_dict(raw), "kd_mix", "alpha", 0).key

    assert key() == key(workers=2) == key(workers=4) == key(checkpoint_interval_s=0)
    assert key(batch_size=32) != key()


# ----------------------------------------------------------------------------- a teacher on 1 and 2 workers


class GlooRuntime(LocalRuntime):
    """A DDP worker of a plain torch.distributed group (what RayRuntime is inside TorchTrainer)."""

    def __init__(self, rank: int, world_size: int):
        super().__init__("cpu", log=lambda *a, **k: None)
        self.rank, self.world_size = rank, world_size


def _teacher_run(runtime, data_dir: str, out_dir: str, teacher_dir: str) -> dict:
    """Train the tiny kd_mix teacher and a student from it (two stages); also list the global
    batches of seeds 0 and 1, epochs 0 and 1."""
    cfg = from_dict(TINY)
    prepared = load_prepared(data_dir)
    spec = teacher_spec(cfg, "kd_mix", "alpha", 0)
    summary = train_one_teacher(spec, cfg, prepared, runtime, out_dir)
    if runtime.world_size > 1:
        dist.barrier()  # rank 0 saved the teacher
    job = StudentJob("kd_mix", "alpha", 0, "student-key", spec.key, spec.rel)
    student = train_student(job, cfg, prepared, teacher_dir, runtime)
    orders = {}
    for seed in (0, 1):
        loader = runtime.train_loader(prepared.train, 16, seed, "teacher.batch_size")
        for epoch in (0, 1):
            loader.batch_sampler.set_epoch(epoch)
            orders[f"{seed}/{epoch}"] = [b["index"].tolist() for b in loader]
    return {"summary": summary, "orders": orders, "student_steps": [p["step"] for p in student["curve"]]}


def _ddp_worker(rank: int, world: int, port: int, data_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mine = _teacher_run(GlooRuntime(rank, world), data_dir, f"{out_dir}/rank{rank}", f"{out_dir}/rank0")
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            with open(f"{out_dir}/ranks.json", "w") as f:
                json.dump(gathered, f)
        # leave together: a rank that tears gloo down while its peer is still inside a collective
        # can take the peer down with SIGABRT ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_teacher_on_one_and_two_gloo_workers_takes_the_same_steps_over_the_same_examples(tmp_path):
    cfg = from_dict(TINY)
    prepared = prepare(cfg.data, 0, None, cache_dir=str(tmp_path / "data"))
    data_dir = str(tmp_path / "data" / prepared.key)
    n = len(prepared.train)
    assert n % 16 >= 2  # the last global batch gives both ranks an example: no repeats

    one = _teacher_run(LocalRuntime("cpu", log=lambda *a, **k: None), data_dir, str(tmp_path / "one"),
                       str(tmp_path / "one"))

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, data_dir, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    two = json.loads((tmp_path / "ranks.json").read_text())

    s1, ranks = one["summary"], [r["summary"] for r in two]
    assert s1["world_size"] == 1 and [s["world_size"] for s in ranks] == [2, 2]
    steps = math.ceil(n / 16)
    assert s1["steps_per_epoch"] == steps and all(s["steps_per_epoch"] == steps for s in ranks)
    # the same optimizer steps, hence the same learning-rate schedule
    assert [p["step"] for p in s1["curve"]] == [p["step"] for p in ranks[0]["curve"]] == [steps, 2 * steps]
    # every epoch covers the training set once, in one process or split over two
    assert s1["epoch_examples"] == [n, n]
    assert [a + b for a, b in zip(ranks[0]["epoch_examples"], ranks[1]["epoch_examples"])] == [n, n]
    assert ranks[0]["epoch_examples"] == [math.ceil(n / 2)] * 2
    # the same global batches, each split over the two ranks
    for name, batches in one["orders"].items():
        shares = [r["orders"][name] for r in two]
        assert len(shares[0]) == len(shares[1]) == len(batches) == steps
        for b, s0, s1_ in zip(batches, *shares):
            assert sorted(s0 + s1_) == sorted(b) and not set(s0) & set(s1_)
    # seeds 0 and 1 see different orders under DDP, and each epoch is reshuffled
    for rank in two:
        assert rank["orders"]["0/0"] != rank["orders"]["1/0"]
        assert rank["orders"]["0/0"] != rank["orders"]["0/1"]
    assert (tmp_path / "rank0" / "model.safetensors").exists()
    # a DDP student (stage 1 uses W_h outside the model's forward, stage 2 leaves heads unused) takes the same steps
    k = math.ceil(len(prepared.train.for_domains([0])) / 8)
    assert one["student_steps"] == two[0]["student_steps"] == two[1]["student_steps"] == [k, k]
