"""Teachers: the meta-teacher (spec section 2) and the baseline teachers (section 5).

kind            trained on                 loss
meta            all K domains              mean_i t_i CE_i + gamma1 L_TDA
meta_no_target  the K-1 other domains      same
single          target domain k only       CE
mix             all K domains              CE
mtl             all K domains              CE of each domain's own classifier head

``teacher_worker`` is a Ray Train per-worker function (also called in-process): it trains
every teacher spec in its config and publishes each to the store under ``teachers/<key>``.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ExperimentConfig, content_hash, from_dict
from ..data import load_prepared, make_loader
from ..losses import meta_teacher_loss, prototype_scores
from ..models import build_teacher, save_model
from ..storage import Store
from .loop import StageSettings, to_device, train_stage
from .runtime import make_runtime, unwrap

META_KINDS = ("meta", "meta_no_target")
TEACHER_OF_METHOD = {"metakd": "meta", "metakd_no_target": "meta_no_target", "kd_single": "single",
                     "kd_mix": "mix", "kd_mtl": "mtl", "student_ft": None}
PER_DOMAIN_KINDS = ("single", "meta_no_target")
VERSION = "teacher-v1"  # bump when training changes so that stale teachers are not reused


@dataclass(frozen=True)
class TeacherSpec:
    kind: str
    domain: str | None  # the target domain for single / meta_no_target
    seed: int
    key: str

    @property
    def rel(self) -> str:
        return f"teachers/{self.key}"


def teacher_identity(cfg: ExperimentConfig, kind: str, domain: str | None, seed: int) -> dict:
    """Exactly what determines a teacher: data, sample rate, seed, teacher model and its settings.

    gamma2 and the student are absent on purpose: every student trial shares the teacher.
    """
    ident = {"version": VERSION, "kind": kind, "domain": domain, "seed": seed,
             "data": cfg.to_dict()["data"], "teacher": cfg.to_dict()["teacher"]}
    if kind in META_KINDS:
        ident["meta_teacher"] = cfg.to_dict()["meta_teacher"]
    return ident


def teacher_spec(cfg: ExperimentConfig, method: str, domain: str, seed: int) -> TeacherSpec | None:
    kind = TEACHER_OF_METHOD[method]
    if kind is None:
        return None
    dom = domain if kind in PER_DOMAIN_KINDS else None
    return TeacherSpec(kind, dom, seed, content_hash(teacher_identity(cfg, kind, dom, seed)))


def teacher_domains(kind: str, domain: str | None, domains: list[str]) -> list[int]:
    if kind == "single":
        return [domains.index(domain)]
    if kind == "meta_no_target":
        return [i for i, d in enumerate(domains) if d != domain]
    return list(range(len(domains)))


@torch.no_grad()
def compute_prototype_scores(model, split, domain_ids: list[int], cfg: ExperimentConfig, device) -> torch.Tensor:
    """t_i for every training example (indexed by ``split.index``) from the frozen initial encoder.

    Examples outside ``domain_ids`` get no prototype of their own domain among the passed
    examples and are scored with the others left out (score 1, i.e. unweighted).
    """
    mt = cfg.meta_teacher
    scores = torch.ones(int(split.index.max()) + 1 if len(split) else 0)
    if not mt.prototype_weighting:
        return scores
    sub = split.for_domains(domain_ids)
    model = unwrap(model).eval()
    feats, labels, doms, idx = [], [], [], []
    for batch in make_loader(sub, batch_size=64, shuffle=False, seed=0):
        batch = to_device(batch, device)
        out = model(**batch)
        feats.append(out.features.float().cpu())
        labels.append(batch["labels"].cpu())
        doms.append(batch["domains"].cpu())
        idx.append(batch["index"].cpu())
    t = prototype_scores(torch.cat(feats), torch.cat(labels), torch.cat(doms), alpha=mt.alpha, by=mt.prototype)
    scores[torch.cat(idx)] = t
    model.train()
    return scores


def teacher_loss_step(kind: str, cfg: ExperimentConfig, scores: torch.Tensor | None, seed: int):
    """The only part that differs between teachers."""
    mt = cfg.meta_teacher
    if kind in META_KINDS:
        gen = torch.Generator().manual_seed(seed)  # the shuffled TDA target's permutations

        def step(model, batch):
            out = model(**batch)
            t = scores.to(out.logits.device)[batch["index"]]
            return meta_teacher_loss(out.logits, batch["labels"], t, out.domain_logits, batch["domains"],
                                     mt.gamma1, tda_target=mt.tda_target, generator=gen)
    else:
        def step(model, batch):
            return F.cross_entropy(model(**batch).logits, batch["labels"])
    return step


def train_one_teacher(spec: TeacherSpec, cfg: ExperimentConfig, prepared, runtime, out_dir: str) -> dict:
    """Train one teacher and save it (weights, prototype scores, summary) into ``out_dir``."""
    domains = prepared.data.domains
    ids = teacher_domains(spec.kind, spec.domain, domains)
    torch.manual_seed(spec.seed)
    model = build_teacher(cfg.teacher, len(prepared.tokenizer), cfg.data.max_length, prepared.data.num_labels,
                          len(domains), multitask=spec.kind == "mtl")
    model = runtime.prepare_model(model)
    scores = all_scores = None
    if spec.kind in META_KINDS:
        # prototypes come from the frozen *initial* encoder (section 1): score before any update.
        scores = compute_prototype_scores(model, prepared.train, ids, cfg, runtime.device)
        all_scores = scores if len(ids) == len(domains) else \
            compute_prototype_scores(model, prepared.train, list(range(len(domains))), cfg, runtime.device)
    t = cfg.teacher
    train_loader = runtime.prepare_loader(make_loader(prepared.train.for_domains(ids), t.batch_size, True, spec.seed))
    dev_loader = make_loader(prepared.dev.for_domains(ids), 64, False, 0)
    tag = f"teacher {spec.kind}{':' + spec.domain if spec.domain else ''} seed={spec.seed}"
    result = train_stage(model, teacher_loss_step(spec.kind, cfg, scores, spec.seed), train_loader, dev_loader,
                         domains, StageSettings("teacher", t.epochs, t.lr, t.warmup_ratio, t.weight_decay),
                         runtime, tag)
    summary = {"key": spec.key, "kind": spec.kind, "domain": spec.domain, "seed": spec.seed,
               "dev_accuracy": result.best_dev, "train_seconds": result.seconds, "curve": result.curve,
               "params": unwrap(model).num_parameters(), "domains": domains,
               # DDP: each rank sees its shard (DistributedSampler), recorded so tests can check it
               "world_size": runtime.world_size, "train_examples": len(train_loader.dataset),
               "rank_examples": len(getattr(train_loader, "sampler", train_loader.dataset))}
    if runtime.is_main:
        save_model(unwrap(model), out_dir, extra={"teacher_key": spec.key})
        if all_scores is not None:
            torch.save({"scores": all_scores}, f"{out_dir}/scores.pt")
        with open(f"{out_dir}/teacher.json", "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def teacher_worker(config: dict) -> list[dict]:
    """Per-worker function: train each teacher in ``config["specs"]`` and publish it to the store.

    config: experiment (dict), specs (list of TeacherSpec dicts), store (root), data (seed -> rel
    path of the prepared data), runtime ("ray" | "local").
    """
    cfg = from_dict(config["experiment"])
    store = Store(config["store"])
    runtime = make_runtime(config.get("runtime", "local"), cfg.device, epoch_checkpoints=True)
    summaries = []
    for raw in config["specs"]:
        spec = TeacherSpec(**raw)
        if store.is_complete(spec.rel):  # finished before a restart
            continue
        prepared = load_prepared(store.fetch_dir(config["data"][str(spec.seed)]))
        with tempfile.TemporaryDirectory(prefix="metakd-teacher-") as out:
            start = time.perf_counter()
            summary = train_one_teacher(spec, cfg, prepared, runtime, out)
            summary["wall_seconds"] = time.perf_counter() - start
            if runtime.is_main:
                store.publish_dir(out, spec.rel)
        summaries.append(summary)
    return summaries
