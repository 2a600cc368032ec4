"""precision: auto | fp32 | bf16 -- resolution, validation, and fp32 / bf16 agreement of the losses."""

from __future__ import annotations

import copy

import pytest
import torch

from metakd.config import ConfigError, ModelConfig, from_dict
from metakd.data import EncodedSplit
from metakd.models import build_student, build_teacher
from metakd.train import precision
from metakd.train.loop import StageSettings, evaluate, train_stage
from metakd.train.runtime import LocalRuntime
from metakd.train.student import Distiller
from metakd.train.teacher import teacher_loss_step

pytestmark = pytest.mark.usefixtures("single_thread_torch")

VOCAB, SEQ, N = 90, 16, 24
# Measured on CPU (bf16 autocast) with these tiny models: one step's stage-1 / stage-2 / joint loss
# differs from fp32 by at most 9e-5 relative and the teacher's logits by 1.1e-3 absolute; over 12
# training steps (2 epochs of stage 1 and stage 2) the per-step losses differ by at most 1.8e-4.
LOSS_RTOL, LOGIT_ATOL, TRAIN_RTOL = 2e-3, 1e-2, 3e-3


def test_auto_is_fp32_on_cpu_and_names_are_checked():
    assert precision.resolve("auto", "cpu") == "fp32"
    assert precision.resolve("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        precision.resolve("fp16", "cpu")
    with pytest.raises(ConfigError, match="precision: 'fp16'.*auto, fp32, bf16"):
        from_dict({"precision": "fp16"})


def test_autocast_runs_matmuls_in_bf16_and_fp32_leaves_them():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with precision.autocast("bf16", "cpu"):
        assert lin(x).dtype == torch.bfloat16
    with precision.autocast("fp32", "cpu"):
        assert lin(x).dtype == torch.float32
    with precision.autocast("auto", "cpu"):
        assert lin(x).dtype == torch.float32


def _split():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, VOCAB, (N, SEQ), generator=g)
    mask = (torch.arange(SEQ)[None] < torch.randint(4, SEQ + 1, (N,), generator=g)[:, None]).long()
    return EncodedSplit(ids * mask, mask, torch.zeros_like(ids), labels=torch.randint(0, 2, (N,), generator=g),
                        domains=torch.arange(N) % 2)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    teacher = build_teacher(ModelConfig(preset="tiny-teacher"), VOCAB, SEQ, 2, 2).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, build_student(ModelConfig(preset="tiny-student"), teacher, VOCAB, SEQ).eval()


def test_losses_in_bf16_are_fp32_and_agree_with_fp32(models):
    teacher, student = models
    batch = _split().to_dict()
    d = Distiller(teacher, student, from_dict({"distill": {"gamma2": 0.5}}), meta=True, scores=torch.rand(N))
    res = {}
    for p in ("fp32", "bf16"):
        with torch.no_grad(), precision.autocast(p, "cpu"):
            res[p] = {"logits": teacher(**batch).logits, **{s: getattr(d, s)(student, batch)
                                                              for s in ("stage1", "stage2", "joint")}}
    assert res["bf16"]["logits"].dtype == torch.bfloat16  # the forward did run in bf16
    assert torch.allclose(res["bf16"]["logits"].float(), res["fp32"]["logits"], atol=LOGIT_ATOL)
    for s in ("stage1", "stage2", "joint"):
        assert res["bf16"][s].dtype == torch.float32
        assert float(res["bf16"][s]) == pytest.approx(float(res["fp32"][s]), rel=LOSS_RTOL)


def test_training_steps_in_bf16_follow_fp32(models):
    teacher, student = models
    split = _split()
    d = Distiller(teacher, student, from_dict({"distill": {"gamma2": 0.5}}), meta=True, scores=torch.rand(N))

    def train(p):
        torch.manual_seed(7)
        model, runtime, losses = copy.deepcopy(student), LocalRuntime("cpu", log=lambda *_: None), []
        for name in ("stage1", "stage2"):
            def step(m, b, fn=getattr(d, name)):
                loss = fn(m, b)
                losses.append(float(loss.detach()))
                return loss
            train_stage(model, step, runtime.train_loader(split, 8, 0, "distill.batch_size"), None, ["a", "b"],
                        StageSettings(name, 2, 1e-3, keep_best=False, precision=p), runtime, "t")
        return losses, evaluate(model, runtime.eval_loader(split), ["a", "b"], "cpu", p)

    (fp32, acc32), (bf16, acc16) = train("fp32"), train("bf16")
    assert len(fp32) == 12 and bf16 == pytest.approx(fp32, rel=TRAIN_RTOL)
    assert acc16["loss"]["a"] == pytest.approx(acc32["loss"]["a"], rel=TRAIN_RTOL)


def test_teacher_loss_is_fp32_under_bf16_and_agrees(models):
    teacher, _ = models  # eval mode: no dropout, so both precisions see the same network
    batch = _split().to_dict()
    scores = torch.rand(N, generator=torch.Generator().manual_seed(1))
    losses = {}
    for p in ("fp32", "bf16"):
        step = teacher_loss_step("meta", from_dict({}), scores, 0)
        with torch.no_grad(), precision.autocast(p, "cpu"):
            losses[p] = step(teacher, batch)
    assert losses["bf16"].dtype == torch.float32
    assert float(losses["bf16"]) == pytest.approx(float(losses["fp32"]), rel=LOSS_RTOL)
