"""The frozen teacher computed once: stored outputs, stage-1 states on the device, and training
with them giving the losses of training that re-runs the teacher."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from metakd.config import ModelConfig, from_dict
from metakd.data import EncodedSplit
from metakd.models import build_student, build_teacher
from metakd.train.loop import StageSettings, train_stage
from metakd.train.runtime import LocalRuntime
from metakd.train.distill import Distiller
from metakd.train import teacher_cache
from metakd.train.teacher_cache import (MemoryReport, TeacherOutputs, TeacherStates, cache_budget, compute_outputs,
                                        save_outputs, states_bytes, teacher_caches)

GIB = 2**30

VOCAB, SEQ, N = 90, 16, 24

pytestmark = pytest.mark.usefixtures("single_thread_torch")

# Measured on these models: cached (fp16 states) and recomputed training differ by at most 4.1e-6
# relative in any stage-1 / joint step's loss (the fp16 rounding of the teacher's hidden states
# and maps), and by at most 7e-8 in stage 2 (fp32 outputs). Asserted with margin:
STAGE1_RTOL, STAGE2_RTOL = 1e-4, 1e-6


def _split() -> EncodedSplit:
    """Two domains, right-padded sequences of different lengths, index = row."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, VOCAB, (N, SEQ), generator=g)
    lengths = torch.randint(4, SEQ + 1, (N,), generator=g)
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    return EncodedSplit(ids * mask, mask, torch.zeros_like(ids), labels=torch.randint(0, 2, (N,), generator=g),
                        domains=torch.arange(N) % 2)


def _models(student_heads=None):
    torch.manual_seed(0)
    teacher = build_teacher(ModelConfig(preset="tiny-teacher"), VOCAB, SEQ, 2, 2).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    spec = ModelConfig(preset="tiny-student") if student_heads is None else \
        ModelConfig(layers=2, hidden=32, heads=student_heads, intermediate=64)
    return teacher, build_student(spec, teacher, VOCAB, SEQ)


def _cfg(**distill):
    return from_dict({"device": "cpu", "distill": {"gamma2": 0.5, **distill}})


def _counting(teacher):
    """Count calls of the teacher's forward."""
    calls = []
    forward = teacher.forward

    def counted(*a, **k):
        calls.append(k.get("output_states", False))
        return forward(*a, **k)

    teacher.forward = counted
    return calls


def test_outputs_are_the_teachers_rows_by_index():
    teacher, _ = _models()
    split = _split().for_domains([1])  # index values 1, 3, 5, ...: not positions
    out = compute_outputs(teacher, split, LocalRuntime("cpu"))
    with torch.no_grad():
        ref = teacher(**split.to_dict())
    idx = split.index
    assert out["logits"].shape == (N, 2) and torch.equal(out["logits"][0], torch.zeros(2))  # domain 0: not computed
    assert torch.allclose(out["logits"][idx], ref.logits, atol=1e-5)
    assert torch.allclose(out["domain_repr"][idx], ref.domain_repr, atol=1e-5)
    p_gold = ref.logits.softmax(-1).gather(1, split.labels[:, None]).squeeze(1)
    assert torch.allclose(out["p_gold"][idx], p_gold, atol=1e-6)


def test_stored_outputs_round_trip_and_refuse_other_data(tmp_path):
    teacher, _ = _models()
    out = compute_outputs(teacher, _split(), LocalRuntime("cpu"))
    save_outputs(out, str(tmp_path), "datakey")
    loaded = TeacherOutputs.load(str(tmp_path), "datakey", "cpu")
    assert torch.equal(loaded.logits, out["logits"]) and torch.equal(loaded.p_gold, out["p_gold"])
    assert TeacherOutputs.load(str(tmp_path), "otherkey", "cpu") is None
    assert TeacherOutputs.load(str(tmp_path / "nothing"), "datakey", "cpu") is None


def test_states_bytes_by_hand():
    # 3 examples, seq 4, hidden 8, layers {2, 4}: hidden 3 layers x 4 x 8, maps 2 layers x heads x 4 x 4, fp16
    assert states_bytes(3, 4, 8, 4, 4, [2, 4]) == 2 * 3 * (3 * 4 * 8 + 2 * 4 * 16)
    assert states_bytes(3, 4, 8, 4, 2, [2, 4, 4]) == 2 * 3 * (3 * 4 * 8 + 2 * 1 * 16)  # averaged heads


@pytest.mark.parametrize("student_heads", [None, 4])  # 2 heads (maps head-averaged) and 4 (kept per head)
def test_states_lookup_matches_the_teacher_on_a_trimmed_batch(student_heads):
    teacher, student = _models(student_heads)
    split = _split()
    d = Distiller(teacher, student, _cfg(), meta=False, scores=None)
    heads = student.encoder.config.num_attention_heads
    states = TeacherStates.compute(teacher, split, d.layers, heads, LocalRuntime("cpu"))
    rows = torch.tensor([5, 2, 9])
    batch = split.select(rows).to_dict()
    length = int(batch["attention_mask"].sum(1).max())
    batch = {k: (v[:, :length] if v.ndim == 2 else v) for k, v in batch.items()}
    hidden, maps = states.lookup(batch["index"], length)
    with torch.no_grad():
        ref = teacher(**batch, output_states=True)
    for g in [0, *d.layers]:
        assert torch.allclose(hidden[g].float(), ref.hidden_states[g], atol=5e-3, rtol=1e-3)
    for g in d.layers:
        expected = ref.attentions[g - 1] if heads == 4 else ref.attentions[g - 1].mean(1, keepdim=True)
        assert torch.allclose(maps[g - 1].float(), expected, atol=1e-3)


def _train(distiller, student, split, stages):
    """Per-step losses of stage 1 then stage 2 from the same initial student and batch order."""
    torch.manual_seed(7)
    runtime = LocalRuntime("cpu")
    losses = []

    def recording(step):
        def run(model, batch):
            loss = step(model, batch)
            losses.append(float(loss.detach()))
            return loss
        return run

    for name in stages:
        loader = runtime.train_loader(split, 8, 0, "distill.batch_size")
        train_stage(student, recording(getattr(distiller, name)), loader, None, ["a", "b"],
                    StageSettings(name, 1, 1e-3, keep_best=False), runtime, "t")
    return losses


@pytest.mark.parametrize("attention", ["scores", "probs"])
@pytest.mark.parametrize("schedule", [("stage1", "stage2"), ("joint",)])
def test_cached_and_recomputed_training_give_the_same_losses(schedule, attention):
    teacher, student = _models()
    split = _split()
    scores = torch.rand(N, generator=torch.Generator().manual_seed(0))
    cfg = _cfg(attention=attention)
    plain = Distiller(teacher, student, cfg, meta=True, scores=scores)
    s_plain, s_cached = copy.deepcopy(student), copy.deepcopy(student)
    outputs = TeacherOutputs(compute_outputs(teacher, split, LocalRuntime("cpu")), "cpu")
    states = TeacherStates.compute(teacher, split, plain.layers, 2, LocalRuntime("cpu"), attention=attention)
    cached = Distiller(teacher, student, cfg, meta=True, scores=scores, outputs=outputs, states=states)

    reference = _train(plain, s_plain, split, schedule)
    calls = _counting(teacher)
    with_cache = _train(cached, s_cached, split, schedule)
    assert calls == []  # neither stage ran the teacher
    assert len(reference) == len(with_cache) == 3 * len(schedule)
    assert with_cache[:3] == pytest.approx(reference[:3], rel=STAGE1_RTOL)
    if schedule == ("stage1", "stage2"):  # stage 2 reads only the fp32 outputs: as exact as the forward
        assert with_cache[3:] == pytest.approx(reference[3:], rel=STAGE2_RTOL)


def test_stage2_with_stored_outputs_never_runs_the_teacher_and_without_runs_it_every_batch():
    teacher, student = _models()
    split = _split()
    outputs = TeacherOutputs(compute_outputs(teacher, split, LocalRuntime("cpu")), "cpu")
    calls = _counting(teacher)
    _train(Distiller(teacher, student, _cfg(), meta=False, scores=None, outputs=outputs), student, split, ["stage2"])
    assert calls == []
    _train(Distiller(teacher, student, _cfg(), meta=False, scores=None), student, split, ["stage2"])
    assert calls == [False] * 3


def test_teacher_caches_follow_the_setting_and_the_budget(tmp_path):
    teacher, student = _models()
    split = _split()
    prepared = SimpleNamespace(key="k", train=split)
    runtime = LocalRuntime("cpu", log=lambda *_: None)
    d = Distiller(teacher, student, _cfg(), meta=False, scores=None)
    args = (prepared, split)
    assert teacher_caches(teacher, None, *args, _cfg(teacher_cache="off"), runtime, d.layers, 2, True) == (None, None)
    # no stored outputs: computed here; states fit the default budget
    outputs, states = teacher_caches(teacher, None, *args, _cfg(), runtime, d.layers, 2, True)
    assert outputs is not None and states is not None and states.hidden.dtype == torch.float16
    # stored outputs are read, not recomputed; a budget that holds them but not the states too keeps no
    # states (the outputs count against it), and stage 1 then runs the teacher
    save_outputs({k: torch.full_like(v, 0.25) for k, v in compute_outputs(teacher, split, runtime).items()},
                 str(tmp_path), "k")
    out_bytes = outputs.nbytes
    state_bytes = states_bytes(N, SEQ, 64, 4, 2, d.layers)
    assert out_bytes < state_bytes  # so a budget of state_bytes fits either alone, not both
    gb = state_bytes / GIB
    outputs, states = teacher_caches(teacher, str(tmp_path), *args, _cfg(teacher_cache_gb=gb), runtime, d.layers, 2,
                                     True)
    assert states is None and torch.equal(outputs.logits, torch.full((N, 2), 0.25))
    calls = _counting(teacher)
    _train(Distiller(teacher, student, _cfg(), meta=False, scores=None, outputs=outputs), student, split, ["stage1"])
    assert calls == [True] * 3
    # without states (stage 2 only) the same budget keeps the outputs; a zero budget keeps nothing
    assert teacher_caches(teacher, str(tmp_path), *args, _cfg(teacher_cache_gb=gb), runtime, d.layers, 2,
                          False)[0] is not None
    assert teacher_caches(teacher, str(tmp_path), *args, _cfg(teacher_cache_gb=0), runtime, d.layers, 2,
                          True) == (None, None)


# ----------------------------------------------------------------------------- the budget on shared GPUs


def test_four_workers_at_a_quarter_of_a_24_gib_gpu_keep_a_quarter_each():
    """student_gpus_per_worker 0.25: four workers on one 24 GiB GPU, each holding 0.5 GiB of models
    and its 0.5 GiB CUDA context; they build their caches one after another."""
    total, models, context = 24 * GIB, GIB // 2, teacher_cache.CUDA_CONTEXT_BYTES
    kept = []
    for worker in range(4):
        # the device so far: every worker's context and models, and the caches already built
        free = total - 4 * (context + models) - sum(kept)
        memory = MemoryReport(total=total, free=free, reserved=models, allocated=models)
        kept.append(cache_budget(8 * GIB, memory, gpu_share=0.25))
    # half of (6 GiB share - 0.5 GiB models - 0.5 GiB context) = 2.5 GiB each, not half the free device
    assert kept == [int(2.5 * GIB)] * 4
    assert sum(kept) + 4 * (context + models) <= total - 4 * GIB  # room left for every worker's training step
    # the old rule (half of what the device has free, per worker) would promise 8 GiB to the first alone
    assert min(8 * GIB, 0.5 * (total - 4 * (context + models))) == 8 * GIB
    # a whole GPU to one worker: its cap (teacher_cache_gb) binds
    assert cache_budget(8 * GIB, MemoryReport(total, total - context - models, models, models)) == 8 * GIB
    assert cache_budget(3 * GIB, None) == 3 * GIB  # CPU: the cap alone


def test_budget_counts_memory_this_process_reserved_but_freed():
    # a worker whose allocator holds 5 GiB of which 1 GiB is in use, on a device with 1 GiB free:
    # mem_get_info says 1 GiB, but 4 GiB of the reserved blocks are this worker's to reuse
    memory = MemoryReport(total=24 * GIB, free=1 * GIB, reserved=5 * GIB, allocated=1 * GIB)
    assert cache_budget(8 * GIB, memory, gpu_share=1.0) == int(0.5 * (1 + 4) * GIB)
    # ...but never more than what is left of its share of the device
    share_left = 6 * GIB - GIB - teacher_cache.CUDA_CONTEXT_BYTES
    assert cache_budget(8 * GIB, memory, gpu_share=0.25) == int(0.5 * share_left)
    # a worker over its share keeps nothing
    over = MemoryReport(total=24 * GIB, free=10 * GIB, reserved=7 * GIB, allocated=7 * GIB)
    assert cache_budget(8 * GIB, over, gpu_share=0.25) == 0


def _oom(*_a, **_k):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.90 GiB")


def test_out_of_memory_while_building_the_states_falls_back_to_the_teacher_and_says_so(monkeypatch):
    teacher, student = _models()
    split = _split()
    lines = []
    runtime = LocalRuntime("cpu", log=lines.append)
    d = Distiller(teacher, student, _cfg(), meta=False, scores=None)
    monkeypatch.setattr(TeacherStates, "compute", classmethod(lambda cls, *a, **k: _oom()))
    outputs, states = teacher_caches(teacher, None, SimpleNamespace(key="k", train=split), split, _cfg(), runtime,
                                     d.layers, 2, True)
    assert outputs is not None and states is None
    said = [line for line in lines if "out of memory" in line]
    assert len(said) == 1 and "stage-1 states" in said[0] and "teacher runs on every batch" in said[0]


def test_out_of_memory_while_using_the_cache_drops_it_once_and_gives_the_same_loss(monkeypatch):
    teacher, student = _models()
    split = _split()
    outputs = TeacherOutputs(compute_outputs(teacher, split, LocalRuntime("cpu")), "cpu")
    lines = []
    d = Distiller(teacher, student, _cfg(), meta=False, scores=None, log=lines.append)
    states = TeacherStates.compute(teacher, split, d.layers, 2, LocalRuntime("cpu"), attention=d.attention)
    cached = Distiller(teacher, student, _cfg(), meta=False, scores=None, outputs=outputs, states=states,
                       log=lines.append)
    monkeypatch.setattr(states, "lookup", _oom)
    batch = split.select(torch.arange(8)).to_dict()
    calls = _counting(teacher)
    got = [float(cached.stage1(student.eval(), batch).detach()) for _ in range(2)]
    assert cached.outputs is None and cached.states is None and calls == [True, True]  # the teacher ran
    plain = float(d.stage1(student.eval(), batch).detach())
    assert got == pytest.approx([plain, plain], rel=1e-6)
    assert len([line for line in lines if "out of memory" in line]) == 1
    # without a cache an out-of-memory error is the training step's: it is raised
    monkeypatch.setattr(teacher, "forward", _oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        d.stage1(student, batch)


def test_teacher_cache_setting_is_validated():
    with pytest.raises(Exception, match="distill.teacher_cache"):
        _cfg(teacher_cache="always")
    with pytest.raises(Exception, match="distill.teacher_cache_gb"):
        _cfg(teacher_cache_gb=-1)
