"""Students: meta-distillation (spec section 3) and the student baselines (section 5).

One student per (method, target domain, seed). The teacher is frozen; the student sees only
the target domain's training data.

method            teacher          lambda_i                          L_TKD
metakd            meta             (1 + t_i) / (1 + exp((1-p_i)^2))  gamma2
metakd_no_target  meta_no_target   same                              gamma2
kd_single/mix/mtl single/mix/mtl   1                                 none
student_ft        none             -                                 - (plain CE)

:func:`train_student` trains one student job; the per-worker function that claims jobs and
publishes their results is ``metakd.jobs.workers.student_worker``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..config import ExperimentConfig
from ..loader import make_loader
from ..losses import layer_map
from ..methods import METHODS
from ..models import Latency, build_student, build_teacher, load_model, measure_latency, save_model
from .loop import StageSettings, evaluate, majority_rate, train_stage
from .precision import autocast, resolve as resolve_precision
from .runtime import unwrap
from .distill import Distiller
from .teacher_cache import teacher_caches


@dataclass(frozen=True)
class StudentJob:
    """One student to train: ``method`` on the target ``domain`` with ``seed``, distilled from the
    teacher ``teacher_key`` published at ``teacher_rel`` (both None for student_ft). ``key`` is a
    content hash of everything that determines the result (``metakd.jobs.experiment.student_identity``),
    published at ``rel``."""

    method: str
    domain: str
    seed: int
    key: str
    teacher_key: str | None = None
    teacher_rel: str | None = None
    precision: str | None = None  # fp32 | bf16, resolved where it was planned and in the key; None: cfg.precision

    @property
    def rel(self) -> str:
        return f"students/{self.key}"


def finetune_step(model, batch):
    return F.cross_entropy(model(**batch).logits, batch["labels"])


def train_student(job: StudentJob, cfg: ExperimentConfig, prepared, teacher_dir: str | None, runtime,
                  keep_dir: str | None = None, store=None, claims=None) -> dict:
    """Train one student for ``job`` from the teacher in ``teacher_dir``; returns accuracies, timings, sizes, curve.
    With ``keep_dir``, the trained student is saved there too (:func:`keep_student`). ``store`` and ``claims``
    (the worker's registry client): where a pruned student's PrC rows are stored (none: computed here)."""
    method, domain, seed = job.method, job.domain, job.seed
    if job.precision is not None:  # the precision in its key, whatever this device would pick for auto
        cfg = replace(cfg, precision=job.precision)
    expertise = METHODS[method].domain_expertise  # lambda_i and gamma2 L_TKD (metakd/methods.py)
    domains = prepared.data.domains
    k = domains.index(domain)
    d = cfg.distill
    torch.manual_seed(seed * 1009 + k)
    teacher = scores = None
    if teacher_dir is not None:
        teacher = load_model(teacher_dir, runtime.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if expertise and os.path.exists(f"{teacher_dir}/scores.pt"):
            scores = torch.load(f"{teacher_dir}/scores.pt", map_location="cpu", weights_only=True)["scores"]
    vocab = len(prepared.tokenizer)
    pruned = None
    if cfg.student.prune is not None:  # a pruned student (metakd.train.pruned): the teacher's shape, masked
        from .pruned import PrunedStudent  # it builds on the Distiller below

        pruned = PrunedStudent(cfg, seed, k, prepared, teacher, runtime, store, claims)
        model = runtime.prepare_model(pruned.build())
    else:
        reference = teacher if teacher is not None else _shape_only_teacher(cfg, prepared)
        model = runtime.prepare_model(build_student(cfg.student, reference, vocab, cfg.data.max_length, d.layer_map))
    train = prepared.train.for_domains([k])
    # d.batch_size is the global batch: every worker count takes the same steps over the same batches
    train_loader = runtime.train_loader(train, d.batch_size, seed, "distill.batch_size",
                                        cfg.data.batching == "length_grouped")
    dev_loader = runtime.eval_loader(prepared.dev.for_domains([k]))
    test_loader = runtime.eval_loader(prepared.test.for_domains([k]))
    tag = f"student {method}:{domain} seed={seed}"
    curve, start = [], time.perf_counter()

    def stage(name, epochs, lr, step, keep_best=True, schedule="linear"):
        result = train_stage(model, step, train_loader, dev_loader, domains,
                             StageSettings(name, epochs, lr, d.warmup_ratio, d.weight_decay, keep_best,
                                           precision=cfg.precision, schedule=schedule), runtime, tag)
        curve.extend(result.curve)

    if pruned is not None:
        pruned.train(model, teacher_dir, train, train_loader, dev_loader, tag, curve, expertise, scores)
    elif teacher is None:
        stage("finetune", d.epochs, d.lr, finetune_step)
    else:
        # the frozen teacher computed once: stored outputs, and stage-1 states on the device when they fit
        layers = layer_map(unwrap(model).num_layers, teacher.num_layers, d.layer_map)
        needs_states = d.schedule == "joint" or d.stage1_epochs > 0
        outputs, states = teacher_caches(teacher, teacher_dir, prepared, train, cfg, runtime, layers,
                                         unwrap(model).encoder.config.num_attention_heads, needs_states)
        distiller = Distiller(teacher, model, cfg, expertise, scores, outputs, states, log=runtime.log)
        if d.schedule == "joint":
            stage("joint", d.epochs, d.lr, distiller.joint)
        else:
            if d.stage1_epochs:
                # the classifier is untrained in stage 1, so dev accuracy there means nothing: keep the last
                stage("stage1", d.stage1_epochs, d.stage1_lr, distiller.stage1, keep_best=False,
                      schedule=d.stage1_schedule)
            stage("stage2", d.stage2_epochs, d.stage2_lr, distiller.stage2)
    seconds = time.perf_counter() - start
    dev = evaluate(model, dev_loader, domains, runtime.device, cfg.precision)
    test = evaluate(model, test_loader, domains, runtime.device, cfg.precision)
    student = unwrap(model)
    sample = next(iter(make_loader(prepared.dev.for_domains([k]), 32, False, trim=False)))  # at max_length
    timed = pruned.inference_model(student) if pruned is not None else student  # heads_ffn: the smaller copy
    latency = measure_latency(timed, sample, autocast=lambda: autocast(cfg.precision, runtime.device)) \
        if runtime.is_main else Latency({1: float("nan"), 32: float("nan")}, {1: 0, 32: 0}, 0)
    if keep_dir is not None and runtime.is_main:
        keep_student(student, job, cfg, prepared, keep_dir)
    return {
        "method": method, "domain": domain, "seed": seed, "teacher_key": job.teacher_key,
        "dev_accuracy": dev["accuracy"][domain], "dev_loss": dev["loss"][domain],
        "test_accuracy": test["accuracy"][domain], "test_loss": test["loss"][domain],
        "dev_majority_rate": majority_rate(prepared.dev.for_domains([k]).labels),
        "test_majority_rate": majority_rate(prepared.test.for_domains([k]).labels),
        "train_seconds": seconds, "student_params": student.num_parameters(),
        "teacher_params": teacher.num_parameters() if teacher is not None else None,
        "student_layers": student.num_layers, "student_hidden": student.hidden_size,
        "student_heads": student.encoder.config.num_attention_heads,
        "student_intermediate": student.encoder.config.intermediate_size,
        "latency_ms_b1": latency.ms_per_example[1], "latency_ms_b32": latency.ms_per_example[32],
        # how the latencies were measured: the precision the student runs in, timed passes, and whether
        # other workers trained on the same GPU meanwhile (a GPU fraction; None on a CPU: not known)
        "latency_precision": resolve_precision(cfg.precision, runtime.device), "latency_warmup": latency.warmup,
        "latency_repeats_b1": latency.repeats[1], "latency_repeats_b32": latency.repeats[32],
        "latency_shared": getattr(runtime, "gpu_share", 1.0) < 1 if runtime.device.type == "cuda" else None,
        "device": str(runtime.device),
        **(pruned.summary if pruned is not None else {}),  # sparsity and latency_kind (cap-pruning spec §4)
        "curve": curve,
    }


def keep_student(student, job: StudentJob, cfg: ExperimentConfig, prepared, directory: str) -> None:
    """The student as its results were measured: ``model.safetensors`` + ``model.json`` (:func:`save_model`,
    with what ``metakd export`` / ``predict`` need to encode texts as training did) and ``tokenizer/``."""
    save_model(student, directory, extra={
        "student_key": job.key, "method": job.method, "domain": job.domain, "seed": job.seed,
        "teacher_key": job.teacher_key, "data_key": prepared.key, "domains": prepared.data.domains,
        "label_names": prepared.data.label_names, "max_length": cfg.data.max_length,
        "truncation": cfg.data.truncation, "prune": cfg.to_dict()["student"].get("prune")})
    prepared.tokenizer.save_pretrained(f"{directory}/tokenizer")


def failed_student(job: StudentJob, error: str, seconds: float) -> dict:
    """The result of a job that failed on its own (it ran out of device memory): ``status`` failed,
    ``error`` why, no accuracies; shaped like :func:`train_student`'s, so it becomes failed rows."""
    return {"method": job.method, "domain": job.domain, "seed": job.seed, "teacher_key": job.teacher_key,
            "status": "failed", "error": error, "dev_accuracy": None, "dev_loss": None, "test_accuracy": None,
            "test_loss": None, "train_seconds": seconds, "curve": []}


def _shape_only_teacher(cfg: ExperimentConfig, prepared):
    """student_ft has no trained teacher: build the untrained one, for the layer map and, with
    init_from_teacher, its initial (pretrained) layers."""
    return build_teacher(cfg.teacher, len(prepared.tokenizer), cfg.data.max_length, prepared.data.num_labels,
                         len(prepared.data.domains))

