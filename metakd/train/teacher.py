"""Teachers: the meta-teacher (spec section 2) and the baseline teachers (section 5).

kind (metakd.methods.TEACHER_KINDS)
                trained on                 loss
meta            all K domains              mean_i t_i CE_i + gamma1 L_TDA (tda_weighting instance:
                                           mean_i t_i (CE_i + gamma1 CE(g_i, target_i)))
meta_no_target  the K-1 other domains      same
single          target domain k only       CE
mix             all K domains              CE
mtl             all K domains              CE of each domain's own classifier head

:func:`train_one_teacher` trains one teacher into a directory; the per-worker function that
claims missing teachers and publishes them to the store is ``metakd.jobs.workers.teacher_worker``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..config import ExperimentConfig, content_hash
from ..data import data_identity
from ..losses import meta_teacher_loss, prototype_scores
from ..methods import METHODS, TEACHER_KINDS
from ..models import build_teacher, save_model
from ..storage import Store
from . import precision as prec
from .features import prototype_features
from .loop import StageSettings, train_stage
from .runtime import unwrap
from .teacher_cache import compute_outputs, save_outputs

# bump when training changes so that stale teachers are not reused. v2: batch_size is the global batch
# (v1 multiplied it by the workers), one seeded order for any worker count, unseen domains' e[k] = mean.
VERSION = "teacher-v2"
# teacher settings that do not change the trained weights: left out of the key
NOT_IN_KEY = ("checkpoint_interval_s",)


@dataclass(frozen=True)
class TeacherSpec:
    kind: str
    domain: str | None  # the target domain for single / meta_no_target
    seed: int
    key: str
    precision: str | None = None  # fp32 | bf16, resolved where it was planned and in the key; None: cfg.precision

    @property
    def rel(self) -> str:
        return f"teachers/{self.key}"


def teacher_identity(cfg: ExperimentConfig, kind: str, domain: str | None, seed: int,
                     precision: str | None = None, data_fingerprint: str | None = None) -> dict:
    """Exactly what determines a teacher: data (its config and ``data_fingerprint``, the contents
    of its files: :func:`metakd.data.data_identity`), sample rate, seed, teacher model and its settings.

    gamma2 and the student are absent on purpose: every student trial shares the teacher. So is
    the number of workers: ``teacher.batch_size`` is the global batch, and 1, 2 or 4 workers take
    the same optimizer steps over the same batches. So is how often it is checkpointed. The
    precision is in it, resolved (``precision`` from :func:`metakd.train.precision.planned`; None:
    planned for this process), never ``auto``: a bf16 teacher is not the fp32 one, and neither are
    its stored outputs and prototype features.
    """
    teacher = {k: v for k, v in cfg.to_dict()["teacher"].items() if k not in NOT_IN_KEY}
    ident = {"version": VERSION, "kind": kind, "domain": domain, "seed": seed,
             "data": data_identity(cfg.data, data_fingerprint), "teacher": teacher,
             "precision": precision or prec.planned(cfg.precision, cfg.device)}
    if TEACHER_KINDS[kind].meta:
        ident["meta_teacher"] = cfg.to_dict()["meta_teacher"]
    return ident


def teacher_spec(cfg: ExperimentConfig, method: str, domain: str, seed: int,
                 gpus: float | None = None, data_fingerprint: str | None = None) -> TeacherSpec | None:
    """The teacher ``method`` distils from, trained by workers with ``gpus`` GPUs each (None: this
    process), on data whose contents have ``data_fingerprint`` (``PreparedData.fingerprint``)."""
    kind = METHODS[method].teacher_kind
    if kind is None:
        return None
    dom = domain if kind.per_domain else None
    precision = prec.planned(cfg.precision, cfg.device, gpus)
    key = content_hash(teacher_identity(cfg, kind.name, dom, seed, precision, data_fingerprint))
    return TeacherSpec(kind.name, dom, seed, key, precision)


@torch.no_grad()
def compute_prototype_scores(features: torch.Tensor, split, domain_ids: list[int],
                             cfg: ExperimentConfig) -> torch.Tensor:
    """t_i for every training example (indexed by ``split.index``) from the frozen initial encoder's
    features E(x) (``features[index]``, :func:`metakd.train.features.prototype_features`).

    Prototypes come from the examples of ``domain_ids`` only; examples outside them get score 1
    (unweighted).
    """
    mt = cfg.meta_teacher
    scores = torch.ones(int(split.index.max()) + 1 if len(split) else 0)
    if not mt.prototype_weighting:
        return scores
    sub = split.for_domains(domain_ids)
    scores[sub.index] = prototype_scores(features[sub.index].float(), sub.labels, sub.domains, alpha=mt.alpha,
                                         by=mt.prototype)
    return scores


def teacher_loss_step(kind: str, cfg: ExperimentConfig, scores: torch.Tensor | None, seed: int):
    """The only part that differs between teachers."""
    mt = cfg.meta_teacher
    if TEACHER_KINDS[kind].meta:
        gen = torch.Generator().manual_seed(seed)  # the shuffled TDA target's permutations
        on_device: dict = {}  # the scores, copied to the device once

        def step(model, batch):
            out = model(**batch)
            if "t" not in on_device:
                on_device["t"] = scores.to(out.logits.device)
            t = on_device["t"][batch["index"]]
            return meta_teacher_loss(out.logits.float(), batch["labels"], t, out.domain_logits.float(),
                                     batch["domains"], mt.gamma1, tda_target=mt.tda_target, generator=gen,
                                     tda_weighting=mt.tda_weighting)
    else:
        def step(model, batch):
            return F.cross_entropy(model(**batch).logits.float(), batch["labels"])
    return step


@torch.no_grad()
def fill_unseen_domain_embeddings(model, trained: list[int]) -> None:
    """Set the domain embedding e[k] of every domain the teacher never trained on to the mean of
    the trained domains' rows: r(x) = tanh(W_r (mean_pool(H_last(x)) + mean_{j trained} e[j]) + b_r).

    An untrained row is its random initialisation; the mean is the one point of the embedding
    space that W_r was trained around (meta_no_target: r_T of target examples, the L_TKD target).
    """
    emb = model.domain_embedding.weight
    unseen = [k for k in range(emb.shape[0]) if k not in set(trained)]
    if unseen and trained:
        emb[unseen] = emb[list(trained)].mean(0)


def train_one_teacher(spec: TeacherSpec, cfg: ExperimentConfig, prepared, runtime, out_dir: str,
                      store: Store | None = None, claims=None) -> dict:
    """Train one teacher and save it (weights, prototype scores, outputs on the training data,
    summary) into ``out_dir``. ``store`` holds the shared prototype features (none: computed here),
    claimed through ``claims`` (the worker's registry client; :func:`prototype_features`).
    Raises :class:`metakd.train.loop.NonFiniteLoss` when the loss goes NaN or infinite."""
    if spec.precision is not None:  # the precision in its key, whatever this device would pick for auto
        cfg = replace(cfg, precision=spec.precision)
    domains = prepared.data.domains
    kind = TEACHER_KINDS[spec.kind]
    ids = kind.domain_ids(spec.domain, domains)
    torch.manual_seed(spec.seed)
    model = build_teacher(cfg.teacher, len(prepared.tokenizer), cfg.data.max_length, prepared.data.num_labels,
                          len(domains), multitask=kind.multitask)
    model = runtime.prepare_model(model)
    scores = all_scores = None
    if kind.meta:
        # prototypes come from the frozen *initial* encoder (section 1): features before any update,
        # one sharded pass per (initial encoder, prepared data) shared by every meta-teacher
        features = prototype_features(model, prepared, cfg, spec.seed, runtime, store, claims)
        scores = compute_prototype_scores(features, prepared.train, ids, cfg)
        all_scores = scores if len(ids) == len(domains) else \
            compute_prototype_scores(features, prepared.train, list(range(len(domains))), cfg)
    t = cfg.teacher
    # t.batch_size is the global batch: every worker count takes the same steps over the same batches
    train_loader = runtime.train_loader(prepared.train.for_domains(ids), t.batch_size, spec.seed, "teacher.batch_size",
                                        cfg.data.batching == "length_grouped")
    dev_loader = runtime.eval_loader(prepared.dev.for_domains(ids))
    tag = f"teacher {spec.kind}{':' + spec.domain if spec.domain else ''} seed={spec.seed}"
    result = train_stage(model, teacher_loss_step(spec.kind, cfg, scores, spec.seed), train_loader, dev_loader,
                         domains, StageSettings("teacher", t.epochs, t.lr, t.warmup_ratio, t.weight_decay,
                                                checkpoint_interval_s=t.checkpoint_interval_s, precision=cfg.precision),
                         runtime, tag)
    fill_unseen_domain_embeddings(unwrap(model), ids)
    # the frozen teacher computed once: its outputs on every training example, published with it
    outputs = compute_outputs(model, prepared.train, runtime, cfg.precision)
    summary = {"key": spec.key, "kind": spec.kind, "domain": spec.domain, "seed": spec.seed, "data_key": prepared.key,
               "dev_accuracy": result.best_dev, "train_seconds": result.seconds, "curve": result.curve,
               "resumed_epochs": result.resumed_epochs,
               "params": unwrap(model).num_parameters(), "domains": domains,
               "trained_domains": [domains[i] for i in ids],
               # DDP: each rank takes its share of every global batch (epoch_examples: this rank's share)
               "world_size": runtime.world_size, "train_examples": len(train_loader.dataset),
               "steps_per_epoch": len(train_loader), "epoch_examples": result.epoch_examples}
    if runtime.is_main:
        save_model(unwrap(model), out_dir, extra={"teacher_key": spec.key, "trained_domains": summary["trained_domains"]})
        if all_scores is not None:
            torch.save({"scores": all_scores}, f"{out_dir}/scores.pt")
        save_outputs(outputs, out_dir, prepared.key)
        with open(f"{out_dir}/teacher.json", "w") as f:
            json.dump(summary, f, indent=1)
    return summary

