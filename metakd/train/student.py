"""Students: meta-distillation (spec section 3) and the student baselines (section 5).

One student per (method, target domain, seed). The teacher is frozen; the student sees only
the target domain's training data.

method            teacher          lambda_i                          L_TKD
metakd            meta             (1 + t_i) / (1 + exp((1-p_i)^2))  gamma2
metakd_no_target  meta_no_target   same                              gamma2
kd_single/mix/mtl single/mix/mtl   1                                 none
student_ft        none             -                                 - (plain CE)

``student_worker`` is a Ray Train per-worker function (also called in-process) that trains
every student job in its config, reporting one result per finished job.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from ..config import ExperimentConfig, from_dict
from ..data import load_prepared, make_loader
from ..losses import (attention_mse, domain_expertise_weights, hidden_mse, layer_map, pred_divergence,
                      soft_cross_entropy, tkd_loss, weighted_mean)
from ..models import build_student, build_teacher, load_model, measure_latency
from ..results import write_part
from ..storage import Store
from .loop import StageSettings, evaluate, train_stage
from .rows import result_rows
from .runtime import make_runtime, unwrap

META_METHODS = ("metakd", "metakd_no_target")


class Distiller:
    """The loss steps of distillation: L_KD = (1/N) sum_i lambda_i (L_embd + L_hidn + L_attn + L_pred + gamma2 L_TKD)."""

    def __init__(self, teacher, student, cfg: ExperimentConfig, meta: bool, scores: torch.Tensor | None):
        d = cfg.distill
        self.teacher, self.meta, self.scores = teacher, meta, scores
        self.gamma2 = d.gamma2 if meta else 0.0
        self.temperature, self.pred_loss = d.temperature, d.pred_loss
        self.layers = layer_map(unwrap(student).num_layers, teacher.num_layers, d.layer_map)

    def _teacher(self, batch, states: bool):
        with torch.no_grad():
            return self.teacher(**batch, output_states=states)

    def _weights(self, t_out, batch) -> torch.Tensor:
        if not self.meta:
            return torch.ones_like(batch["labels"], dtype=t_out.logits.dtype)
        t = self.scores.to(t_out.logits.device)[batch["index"]]
        return domain_expertise_weights(t_out.logits, batch["labels"], t)

    def _intermediate(self, model, s_out, t_out, mask) -> torch.Tensor:
        student = unwrap(model)
        proj = student.hidden_proj
        per = hidden_mse(proj(s_out.hidden_states[0]), t_out.hidden_states[0], mask)  # L_embd
        for j, g in enumerate(self.layers, start=1):
            per = per + hidden_mse(proj(s_out.hidden_states[j]), t_out.hidden_states[g], mask)  # L_hidn
            per = per + attention_mse(s_out.attentions[j - 1], t_out.attentions[g - 1], mask)  # L_attn
        if self.gamma2:
            per = per + self.gamma2 * tkd_loss(student.repr_proj(s_out.domain_repr), t_out.domain_repr)
        return per

    def _pred(self, s_out, t_out) -> torch.Tensor:
        if self.pred_loss == "kl":  # the spec's soft cross-entropy: same gradient as KL(P||Q)
            return soft_cross_entropy(s_out.logits, t_out.logits, self.temperature)
        return pred_divergence(s_out.logits, t_out.logits, self.pred_loss, self.temperature)

    def stage1(self, model, batch):
        t_out = self._teacher(batch, True)
        s_out = model(**batch, output_states=True)
        return weighted_mean(self._intermediate(model, s_out, t_out, batch["attention_mask"]), self._weights(t_out, batch))

    def stage2(self, model, batch):
        t_out = self._teacher(batch, False)
        s_out = model(**batch)
        return weighted_mean(self._pred(s_out, t_out), self._weights(t_out, batch))

    def joint(self, model, batch):
        t_out = self._teacher(batch, True)
        s_out = model(**batch, output_states=True)
        per = self._intermediate(model, s_out, t_out, batch["attention_mask"]) + self._pred(s_out, t_out)
        return weighted_mean(per, self._weights(t_out, batch))


def finetune_step(model, batch):
    return F.cross_entropy(model(**batch).logits, batch["labels"])


def train_student(job: dict, cfg: ExperimentConfig, prepared, teacher_dir: str | None, runtime) -> dict:
    """Train one student for ``job`` (method, domain, seed); returns accuracies, timings, sizes, curve."""
    method, domain, seed = job["method"], job["domain"], job["seed"]
    domains = prepared.data.domains
    k = domains.index(domain)
    d = cfg.distill
    torch.manual_seed(seed * 1009 + k)
    teacher = scores = None
    if teacher_dir is not None:
        teacher = load_model(teacher_dir, runtime.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if method in META_METHODS and os.path.exists(f"{teacher_dir}/scores.pt"):
            scores = torch.load(f"{teacher_dir}/scores.pt", map_location="cpu", weights_only=True)["scores"]
    vocab = len(prepared.tokenizer)
    reference = teacher if teacher is not None else _shape_only_teacher(cfg, prepared)
    model = runtime.prepare_model(build_student(cfg.student, reference, vocab, cfg.data.max_length, d.layer_map))
    train = prepared.train.for_domains([k])
    train_loader = runtime.prepare_loader(make_loader(train, d.batch_size, True, seed))
    dev_loader = make_loader(prepared.dev.for_domains([k]), 64, False, 0)
    test_loader = make_loader(prepared.test.for_domains([k]), 64, False, 0)
    tag = f"student {method}:{domain} seed={seed}"
    curve, start = [], time.perf_counter()

    def stage(name, epochs, lr, step, keep_best=True):
        result = train_stage(model, step, train_loader, dev_loader, domains,
                             StageSettings(name, epochs, lr, d.warmup_ratio, d.weight_decay, keep_best), runtime, tag)
        curve.extend(result.curve)

    if teacher is None:
        stage("finetune", d.epochs, d.lr, finetune_step)
    else:
        distiller = Distiller(teacher, model, cfg, method in META_METHODS, scores)
        if d.schedule == "joint":
            stage("joint", d.epochs, d.lr, distiller.joint)
        else:
            if d.stage1_epochs:
                # the classifier is untrained in stage 1, so dev accuracy there means nothing: keep the last
                stage("stage1", d.stage1_epochs, d.stage1_lr, distiller.stage1, keep_best=False)
            stage("stage2", d.stage2_epochs, d.stage2_lr, distiller.stage2)
    seconds = time.perf_counter() - start
    dev = evaluate(model, dev_loader, domains, runtime.device)
    test = evaluate(model, test_loader, domains, runtime.device)
    student = unwrap(model)
    sample = next(iter(make_loader(prepared.dev.for_domains([k]), 32, False, 0)))
    latency = measure_latency(student, sample) if runtime.is_main else {1: float("nan"), 32: float("nan")}
    return {
        "method": method, "domain": domain, "seed": seed, "teacher_key": job.get("teacher_key"),
        "dev_accuracy": dev["accuracy"][domain], "dev_loss": dev["loss"][domain],
        "test_accuracy": test["accuracy"][domain], "test_loss": test["loss"][domain],
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


def running_metrics(results: list[dict], methods: list[str]) -> dict:
    """Trial metrics so far: mean dev/test accuracy of the first method (all methods when it has none yet)."""
    primary = [r for r in results if r["method"] == methods[0]] or results
    out = {"jobs_done": len(results)}
    for split in ("dev", "test"):
        out[f"{split}_accuracy"] = sum(r[f"{split}_accuracy"] for r in primary) / len(primary) if primary else 0.0
        for m in methods:
            rs = [r[f"{split}_accuracy"] for r in results if r["method"] == m]
            if rs:
                out[f"{m}/{split}_accuracy"] = sum(rs) / len(rs)
    return out


def student_worker(config: dict) -> list[dict]:
    """Per-worker function: train each student job of ``config["jobs"]``, reporting after each.

    config: experiment (dict), jobs (list of {method, domain, seed, teacher_key, teacher_rel}),
    store (root), data (seed -> rel path), runtime. A restored checkpoint holds the finished
    jobs' results, so a restarted worker group skips them.
    """
    cfg = from_dict(config["experiment"])
    store = Store(config["store"])
    runtime = make_runtime(config.get("runtime", "local"), cfg.device, epoch_checkpoints=False)
    results: list[dict] = []
    restored = runtime.restored_dir()
    if restored and os.path.exists(f"{restored}/results.json"):
        results = json.load(open(f"{restored}/results.json"))
    done = {(r["method"], r["domain"], r["seed"]) for r in results}
    prepared_cache: dict[str, object] = {}
    for job in config["jobs"]:
        if (job["method"], job["domain"], job["seed"]) in done:
            continue
        data_rel = config["data"][str(job["seed"])]
        if data_rel not in prepared_cache:
            prepared_cache[data_rel] = load_prepared(store.fetch_dir(data_rel))
        teacher_dir = store.fetch_dir(job["teacher_rel"]) if job.get("teacher_rel") else None
        results.append(train_student(job, cfg, prepared_cache[data_rel], teacher_dir, runtime))
        part = config.get("rows_part")
        if part and runtime.is_main:  # rows so far: an early-stopped or killed trial keeps them
            write_part(part["root"], result_rows(cfg, part["sweep"], part["trial_id"], results,
                                                 part["search_params"]), part["part"])
        with tempfile.TemporaryDirectory(prefix="metakd-students-") as d:
            with open(f"{d}/results.json", "w") as f:
                json.dump(results, f)
            runtime.report(running_metrics(results, cfg.methods), checkpoint_dir=d)
    return results
