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
from metakd.train.distill import Distiller
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


# ----------------------------------------------------------------------------- keys on the resolved precision


def test_planned_resolves_auto_from_the_configured_device_and_the_workers_gpus():
    assert precision.planned("auto", "auto", gpus=0) == "fp32"  # CPU workers
    assert precision.planned("auto", "auto", gpus=0.25) == "bf16"  # GPU workers, whatever the planning machine has
    assert precision.planned("auto", "cuda", gpus=0) == "bf16"
    assert precision.planned("auto", "cpu", gpus=1) == "fp32"  # device: cpu keeps GPU workers on the CPU
    assert precision.planned("fp32", "auto", gpus=1) == "fp32" and precision.planned("bf16", "cpu", gpus=0) == "bf16"
    expected = "bf16" if torch.cuda.is_available() else "fp32"
    assert precision.planned("auto", "auto") == expected  # gpus None: the worker is this process
    with pytest.raises(ValueError, match="precision"):
        precision.planned("fp16", "auto", 0)


def test_no_artifact_trained_in_fp32_is_reused_by_a_bf16_configuration():
    """Teachers, their outputs (stored in the teacher's directory), students and prototype features
    are keyed on the resolved precision: a CPU (fp32) plan and a GPU (bf16) plan of the same
    ``precision: auto`` YAML share nothing; auto on GPUs shares everything with an explicit bf16."""
    from dataclasses import replace

    from metakd.jobs.experiment import plan
    from metakd.train.features import features_key

    def keys(raw, teacher_gpus, student_gpus):
        cfg = from_dict({"methods": ["metakd", "kd_single", "student_ft"], **raw})
        specs, jobs = plan(cfg, ["a", "b"], teacher_gpus, student_gpus)
        # what a teacher worker keys the prototype features by: its config at the spec's precision
        features = {features_key(replace(cfg, precision=s.precision), s.seed, "data", "cpu") for s in specs}
        return specs, jobs, features

    cpu_specs, cpu_jobs, cpu_features = keys({}, 0, 0)
    gpu_specs, gpu_jobs, gpu_features = keys({}, 1, 0.25)
    assert {s.precision for s in cpu_specs} == {j.precision for j in cpu_jobs} == {"fp32"}
    assert {s.precision for s in gpu_specs} == {j.precision for j in gpu_jobs} == {"bf16"}
    assert not {s.key for s in cpu_specs} & {s.key for s in gpu_specs}  # teachers, and their outputs.safetensors
    assert not {s.rel for s in cpu_specs} & {s.rel for s in gpu_specs}
    assert not {j.key for j in cpu_jobs} & {j.key for j in gpu_jobs}  # students (student_ft too)
    assert not cpu_features & gpu_features
    # auto on GPU workers is bf16, on CPU workers fp32: the same artifacts as saying so
    bf16_specs, bf16_jobs, bf16_features = keys({"precision": "bf16"}, 0, 0)
    assert [s.key for s in bf16_specs] == [s.key for s in gpu_specs] and bf16_features == gpu_features
    assert [j.key for j in bf16_jobs] == [j.key for j in gpu_jobs]
    fp32_specs, fp32_jobs, _ = keys({"precision": "fp32"}, 1, 1)
    assert [s.key for s in fp32_specs] == [s.key for s in cpu_specs]
    assert [j.key for j in fp32_jobs] == [j.key for j in cpu_jobs]
    # teachers on GPUs, students on CPUs: each side keyed by its own workers
    _, mixed_jobs, _ = keys({}, 1, 0)
    assert {j.precision for j in mixed_jobs} == {"fp32"}
    assert [j.teacher_key for j in mixed_jobs] == [j.teacher_key for j in gpu_jobs]


class _Stop(Exception):
    pass


def test_workers_train_in_the_precision_their_key_says(monkeypatch):
    """A bf16-keyed teacher or student trains in bf16 even where auto would resolve to fp32 (this CPU)."""
    from types import SimpleNamespace

    from metakd.train import student as student_mod
    from metakd.train import teacher as teacher_mod
    from metakd.train.student import StudentJob, train_student
    from metakd.train.teacher import TeacherSpec, train_one_teacher

    seen = []

    def stage(model, step, train_loader, dev_loader, domains, settings, runtime, tag):
        seen.append(settings.precision)
        raise _Stop

    monkeypatch.setattr(teacher_mod, "train_stage", stage)
    monkeypatch.setattr(student_mod, "train_stage", stage)
    split = _split()
    prepared = SimpleNamespace(data=SimpleNamespace(domains=["a", "b"], num_labels=2), tokenizer=[0] * VOCAB,
                               train=split, dev=split, test=split, key="k")
    cfg = from_dict({"device": "cpu", "data": {"max_length": SEQ}})  # precision: auto, fp32 on this CPU
    runtime = LocalRuntime("cpu", log=lambda *_: None)
    with pytest.raises(_Stop):
        train_one_teacher(TeacherSpec("mix", None, 0, "t", "bf16"), cfg, prepared, runtime, "unused")
    with pytest.raises(_Stop):
        train_student(StudentJob("student_ft", "a", 0, "s", precision="bf16"), cfg, prepared, None, runtime)
    with pytest.raises(_Stop):
        train_student(StudentJob("student_ft", "a", 0, "s"), cfg, prepared, None, runtime)  # not planned: cfg's
    assert seen == ["bf16", "bf16", "auto"]


def test_tf32_is_a_scoped_setting_that_autocast_leaves_alone():
    before = precision._tf32_state()
    with precision.fp32_matmuls(tf32=True):
        assert precision.tf32_enabled()
        with precision.fp32_matmuls(tf32=False):  # the benchmark's IEEE-fp32 baseline
            assert not precision.tf32_enabled()
            with precision.autocast("fp32", "cuda"), precision.autocast("bf16", "cpu"):
                assert not precision.tf32_enabled()  # autocast no longer turns TF32 on for the whole process
        assert precision.tf32_enabled()
    assert precision._tf32_state() == before
    precision.use_tf32("cpu")  # only a CUDA runtime sets the engine's TF32
    assert precision._tf32_state() == before
