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
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..config import ExperimentConfig
from ..data import make_loader
from ..losses import (attention_mse, domain_expertise_weights, hidden_mse, layer_map, pred_divergence,
                      soft_cross_entropy, tkd_loss, weighted_mean)
from ..methods import METHODS
from ..models import build_student, build_teacher, load_model, measure_latency
from .loop import StageSettings, evaluate, majority_rate, train_stage
from .runtime import unwrap
from .teacher_cache import TeacherOutputs, TeacherStates, teacher_caches

class Distiller:
    """The loss steps of distillation: L_KD = (1/N) sum_i lambda_i (L_embd + L_hidn + L_attn + L_pred + gamma2 L_TKD).

    The teacher's side of each batch comes from ``outputs`` (logits, r_T) and ``states`` (hidden
    states, attention maps) when they are given (:mod:`metakd.train.teacher_cache`), else from a
    teacher forward. Loss inputs are cast to fp32 whatever precision the forward ran in.
    """

    def __init__(self, teacher, student, cfg: ExperimentConfig, meta: bool, scores: torch.Tensor | None,
                 outputs: TeacherOutputs | None = None, states: TeacherStates | None = None):
        d = cfg.distill
        self.teacher, self.meta, self.scores = teacher, meta, scores
        self.outputs, self.states = outputs, states
        self.gamma2 = d.gamma2 if meta else 0.0
        self.temperature, self.pred_loss = d.temperature, d.pred_loss
        self.layers = layer_map(unwrap(student).num_layers, teacher.num_layers, d.layer_map)

    def _targets(self, batch, states: bool) -> SimpleNamespace:
        """logits, domain_repr and (with ``states``) hidden_states / attentions of the teacher for ``batch``."""
        t_out = None
        if self.outputs is None or (states and self.states is None):
            with torch.no_grad():
                t_out = self.teacher(**batch, output_states=states, layers=self.layers)
        if self.outputs is not None:
            logits, domain_repr = self.outputs.lookup(batch["index"])
        else:
            logits, domain_repr = t_out.logits, t_out.domain_repr
        hidden = attentions = None
        if states:
            if self.states is not None:
                hidden, attentions = self.states.lookup(batch["index"], batch["input_ids"].shape[1])
            else:
                hidden, attentions = t_out.hidden_states, t_out.attentions
        return SimpleNamespace(logits=logits.float(), domain_repr=domain_repr.float(), hidden_states=hidden,
                               attentions=attentions)

    def _weights(self, t, batch) -> torch.Tensor:
        if not self.meta:
            return torch.ones_like(batch["labels"], dtype=torch.float32)
        if self.scores.device != t.logits.device:
            self.scores = self.scores.to(t.logits.device)  # once, not every step
        return domain_expertise_weights(t.logits, batch["labels"], self.scores[batch["index"]])

    def _intermediate(self, model, s_out, t, mask) -> torch.Tensor:
        student = unwrap(model)
        proj = student.hidden_proj
        per = hidden_mse(proj(s_out.hidden_states[0]).float(), t.hidden_states[0].float(), mask)  # L_embd
        for j, g in enumerate(self.layers, start=1):
            per = per + hidden_mse(proj(s_out.hidden_states[j]).float(), t.hidden_states[g].float(), mask)  # L_hidn
            per = per + attention_mse(s_out.attentions[j - 1].float(), t.attentions[g - 1].float(), mask)  # L_attn
        if self.gamma2:
            per = per + self.gamma2 * tkd_loss(student.repr_proj(s_out.domain_repr).float(), t.domain_repr)
        return per

    def _pred(self, s_out, t) -> torch.Tensor:
        if self.pred_loss == "kl":  # the spec's soft cross-entropy: same gradient as KL(P||Q)
            return soft_cross_entropy(s_out.logits.float(), t.logits, self.temperature)
        return pred_divergence(s_out.logits.float(), t.logits, self.pred_loss, self.temperature)

    def stage1(self, model, batch):
        t = self._targets(batch, True)
        s_out = model(**batch, output_states=True)
        return weighted_mean(self._intermediate(model, s_out, t, batch["attention_mask"]), self._weights(t, batch))

    def stage2(self, model, batch):
        t = self._targets(batch, False)
        s_out = model(**batch)
        return weighted_mean(self._pred(s_out, t), self._weights(t, batch))

    def joint(self, model, batch):
        t = self._targets(batch, True)
        s_out = model(**batch, output_states=True)
        per = self._intermediate(model, s_out, t, batch["attention_mask"]) + self._pred(s_out, t)
        return weighted_mean(per, self._weights(t, batch))


def finetune_step(model, batch):
    return F.cross_entropy(model(**batch).logits, batch["labels"])


def train_student(job: dict, cfg: ExperimentConfig, prepared, teacher_dir: str | None, runtime) -> dict:
    """Train one student for ``job`` (method, domain, seed); returns accuracies, timings, sizes, curve."""
    method, domain, seed = job["method"], job["domain"], job["seed"]
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

    def stage(name, epochs, lr, step, keep_best=True):
        result = train_stage(model, step, train_loader, dev_loader, domains,
                             StageSettings(name, epochs, lr, d.warmup_ratio, d.weight_decay, keep_best,
                                           precision=cfg.precision), runtime, tag)
        curve.extend(result.curve)

    if teacher is None:
        stage("finetune", d.epochs, d.lr, finetune_step)
    else:
        # the frozen teacher computed once: stored outputs, and stage-1 states on the device when they fit
        layers = layer_map(unwrap(model).num_layers, teacher.num_layers, d.layer_map)
        needs_states = d.schedule == "joint" or d.stage1_epochs > 0
        outputs, states = teacher_caches(teacher, teacher_dir, prepared, train, cfg, runtime, layers,
                                         unwrap(model).encoder.config.num_attention_heads, needs_states)
        distiller = Distiller(teacher, model, cfg, expertise, scores, outputs, states)
        if d.schedule == "joint":
            stage("joint", d.epochs, d.lr, distiller.joint)
        else:
            if d.stage1_epochs:
                # the classifier is untrained in stage 1, so dev accuracy there means nothing: keep the last
                stage("stage1", d.stage1_epochs, d.stage1_lr, distiller.stage1, keep_best=False)
            stage("stage2", d.stage2_epochs, d.stage2_lr, distiller.stage2)
    seconds = time.perf_counter() - start
    dev = evaluate(model, dev_loader, domains, runtime.device, cfg.precision)
    test = evaluate(model, test_loader, domains, runtime.device, cfg.precision)
    student = unwrap(model)
    sample = next(iter(make_loader(prepared.dev.for_domains([k]), 32, False, trim=False)))  # at max_length
    latency = measure_latency(student, sample) if runtime.is_main else {1: float("nan"), 32: float("nan")}
    return {
        "method": method, "domain": domain, "seed": seed, "teacher_key": job.get("teacher_key"),
        "dev_accuracy": dev["accuracy"][domain], "dev_loss": dev["loss"][domain],
        "test_accuracy": test["accuracy"][domain], "test_loss": test["loss"][domain],
        "dev_majority_rate": majority_rate(prepared.dev.for_domains([k]).labels),
        "test_majority_rate": majority_rate(prepared.test.for_domains([k]).labels),
        "train_seconds": seconds, "student_params": student.num_parameters(),
        "teacher_params": teacher.num_parameters() if teacher is not None else None,
        "student_layers": student.num_layers, "student_hidden": student.hidden_size,
        "student_heads": student.encoder.config.num_attention_heads,
        "student_intermediate": student.encoder.config.intermediate_size,
        "latency_ms_b1": latency[1], "latency_ms_b32": latency[32], "device": str(runtime.device),
        "curve": curve,
    }


def _shape_only_teacher(cfg: ExperimentConfig, prepared):
    """student_ft has no trained teacher: build the untrained one, for the layer map and, with
    init_from_teacher, its initial (pretrained) layers."""
    return build_teacher(cfg.teacher, len(prepared.tokenizer), cfg.data.max_length, prepared.data.num_labels,
                         len(prepared.data.domains))

