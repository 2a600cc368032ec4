"""Pruned students (CAP, the cap-pruning spec): the teacher's architecture, pruned while it trains.

:func:`metakd.train.student.train_student` hands a job whose ``student.prune`` is set to a
:class:`PrunedStudent`, which builds the model, trains it in one joint stage and says how sparse
and how fast it is. The loss of every step is

    L = base + sum_{m in prune.contrastive} L_m(z, B_m)   (+ lambda_t R(S) for soft movement)

- base (``prune.base_loss``): ``method``, the method's own L_KD (the Distiller's joint step) with
  L_pred scaled by kd_weight, plus ce_weight CE; ``cap``, CAP's released ce_weight CE +
  kd_weight T^2 KL(softmax(f_T/T) || softmax(f_S/T)); without a teacher (student_ft), CE.
- L_m: :func:`metakd.losses.cap_contrastive_loss` of z(x), the classifier's input (the pooler
  output, or the mean-pooled states with ``student.pooling: mean``), against the module's bank:
  PrC (theta before its first update), FiC (the method's frozen teacher), both encoded once and
  stored (:meth:`PrunedStudent.fixed_banks`); SnC (snapshots of theta), in memory. A module without
  a bank yet adds nothing.

unstructured: ``prune.epochs`` epochs; kappa_t follows the cubic schedule, a snapshot is taken at
the start of every epoch after the first, and at the end the masks are baked into the weights.
heads_ffn: for each step of ``prune.step`` up to the sparsity, first-order importance under the
full loss, then ``retrain_epochs`` epochs with a new optimizer; a snapshot before every step after
the first. Latency is measured on a physically smaller copy (``latency_kind: physical``) for
heads_ffn, on the dense matrices holding zeros (``dense_masked``) for unstructured.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import ExperimentConfig
from ..losses import cap_contrastive_loss, pred_divergence
from ..models import Student, build_teacher
from ..pruning.accounting import structured_summary, unstructured_summary
from ..pruning.banks import MemoryBank
from ..pruning.importance import first_order_importance, heads_to_prune, neurons_to_prune, normalized_by_layer
from ..pruning.masks import HeadFFNGates, UnstructuredMasks
from ..pruning.physical import physical_copy
from ..pruning.schedule import cubic_keep, pruned_counts, soft_lambda, structured_targets
from .loop import StageSettings, to_device, train_stage
from .precision import autocast
from .runtime import unwrap
from .distill import Distiller
from .features import pooled_key, pooled_rows, stored_features
from .teacher_cache import stored_pooled, teacher_caches


@contextmanager
def classifier_inputs(model):
    """Within: ``seen["z"]`` is the input of ``model.classifier`` at the model's last forward: z(x) before
    its normalisation (in training, after the classifier's dropout, as released)."""
    seen: dict = {}
    handle = model.classifier.register_forward_pre_hook(lambda module, args: seen.__setitem__("z", args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def encode(model, split, runtime, precision: str = "fp32") -> torch.Tensor:
    """z(x)/||z(x)|| of every example of ``split`` (its order), eval mode, no grad: [N, H] fp32 on the CPU."""
    return F.normalize(pooled_rows(unwrap(model), split, runtime, precision), dim=-1)


def bank_of(model, split, runtime, precision: str = "fp32") -> MemoryBank:
    """A one-vector bank (PrC, FiC, a first snapshot) of ``model`` over ``split``, on the runtime's device."""
    return MemoryBank(split.index, split.labels, encode(model, split, runtime, precision)).to(runtime.device)


class PrunedDistiller(Distiller):
    """The method's L_KD for a pruned student: L_pred scaled by ``kd_weight``; with ``gates`` (heads_ffn),
    L_attn compares only the heads that are on (the layer map of a pruned student is the identity)."""

    def __init__(self, *args, kd_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_weight = kd_weight
        self.gates: HeadFFNGates | None = None

    def _pred(self, s_out, t) -> torch.Tensor:
        return self.kd_weight * super()._pred(s_out, t)

    def _layers(self, model, s_out, t, mask) -> torch.Tensor:
        if self.gates is None or bool((self.gates.heads == 1).all()):
            return super()._layers(model, s_out, t, mask)
        kept = [torch.nonzero(row).flatten() for row in self.gates.heads]

        def only_kept(maps):
            return tuple(None if a is None else a[:, kept[i].to(a.device)] for i, a in enumerate(maps))

        s_out = dataclasses.replace(s_out, attentions=only_kept(s_out.attentions))
        t = SimpleNamespace(**{**vars(t), "attentions": only_kept(t.attentions)})
        return super()._layers(model, s_out, t, mask)


def _param_groups(model, weight_decay: float, scores: list, score_lr: float) -> list[dict]:
    """AdamW groups: weights with decay, biases and LayerNorm without, the pruning scores at their own lr."""
    ids = {id(s) for s in scores}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in ids:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if scores:
        groups.append({"params": scores, "lr": score_lr, "weight_decay": 0.0})
    return groups


class PrunedStudent:
    """The pruned-student path of one student job: :meth:`build`, :meth:`train`, then :meth:`inference_model`
    (what latency is measured on) and :attr:`summary` (the result fields of the cap-pruning spec §4)."""

    def __init__(self, cfg: ExperimentConfig, seed: int, domain_id: int, prepared, teacher, runtime, store=None,
                 claims=None):
        self.cfg, self.p, self.seed, self.k = cfg, cfg.student.prune, seed, domain_id
        self.prepared, self.teacher, self.runtime = prepared, teacher, runtime
        self.store, self.claims = store, claims  # where the PrC rows are stored, claimed through the registry
        self.banks: dict[str, MemoryBank] = {}
        self.snapshots = 0
        self.masks: UnstructuredMasks | None = None
        self.gates: HeadFFNGates | None = None
        self.physical = None
        self.distiller: PrunedDistiller | None = None  # set when there is a teacher
        self.summary: dict = {}
        self.soft_weight = 0.0
        self.generator = torch.Generator().manual_seed(seed * 1009 + domain_id)  # draws the extra negatives E

    # ------------------------------------------------------------------ the model

    def build(self) -> Student:
        """theta at the start. init pretrained (CAP): phi_pre, the teacher's initial encoder (the checkpoint,
        or the seeded random initialisation its teacher job starts from), with fresh heads; init teacher: a
        copy of the trained teacher, heads included (a multi-task teacher's target-domain head)."""
        cfg, data = self.cfg, self.prepared.data
        if self.p.init == "teacher":
            student = Student(copy.deepcopy(self.teacher.encoder), data.num_labels, len(data.domains),
                              self.teacher.hidden_size, cfg.student.pooling)
            self._copy_heads(student)
            for p in student.parameters():
                p.requires_grad_(True)  # the teacher's were frozen
            return student
        state = torch.get_rng_state()
        torch.manual_seed(self.seed)  # as train_one_teacher does before building the teacher it trains
        encoder = build_teacher(cfg.teacher, len(self.prepared.tokenizer), cfg.data.max_length, data.num_labels,
                                len(data.domains)).encoder
        torch.set_rng_state(state)
        return Student(encoder, data.num_labels, len(data.domains), encoder.config.hidden_size, cfg.student.pooling)

    @torch.no_grad()
    def _copy_heads(self, student: Student) -> None:
        t = self.teacher
        for name in ("domain_embedding", "domain_proj", "domain_head"):
            getattr(student, name).load_state_dict(getattr(t, name).state_dict())
        weight, bias = t.classifier.weight, t.classifier.bias
        if t.multitask:  # rows k*C .. (k+1)*C are the target domain's head
            c = t.num_labels
            weight, bias = weight[self.k * c:(self.k + 1) * c], bias[self.k * c:(self.k + 1) * c]
        student.classifier.weight.copy_(weight)
        student.classifier.bias.copy_(bias)

    def inference_model(self, student):
        """What latency is measured on: the physical copy (heads_ffn) or the student itself."""
        return self.physical if self.physical is not None else student

    # ------------------------------------------------------------------ the loss

    def _base(self, teacher_dir, split, method_reads_expertise, scores, student):
        """(model, batch) -> the base loss; see the module docstring."""
        p, cfg = self.p, self.cfg
        if self.teacher is None:
            return lambda model, batch: F.cross_entropy(model(**batch).logits.float(), batch["labels"])
        layers = list(range(1, self.teacher.num_layers + 1))  # the teacher's own shape: the identity map
        needs_states = p.base_loss == "method"
        outputs, states = teacher_caches(self.teacher, teacher_dir, self.prepared, split, cfg, self.runtime, layers,
                                         student.encoder.config.num_attention_heads, needs_states)
        distiller = PrunedDistiller(self.teacher, student, cfg, method_reads_expertise, scores, outputs, states,
                                    log=self.runtime.log, kd_weight=p.kd_weight)
        self.distiller = distiller
        if p.base_loss == "method":
            def method_base(model, batch):
                t = distiller._targets(batch, True)
                s_out = model(**batch, output_states=True, attention=distiller.attention)
                ce = F.cross_entropy(s_out.logits.float(), batch["labels"])
                return distiller._loss(model, s_out, t, batch, intermediate=True, pred=True) + p.ce_weight * ce
            return method_base

        def cap_base(model, batch):
            t = distiller._targets(batch, False)
            logits = model(**batch).logits.float()
            kd = pred_divergence(logits, t.logits, "kl", p.kd_temperature).mean() * p.kd_temperature ** 2
            return p.ce_weight * F.cross_entropy(logits, batch["labels"]) + p.kd_weight * kd
        return cap_base

    def loss(self, model, batch) -> torch.Tensor:
        """base + the contrastive modules that have a bank (+ lambda_t R(S), soft movement)."""
        p = self.p
        with classifier_inputs(unwrap(model)) as seen:
            loss = self.base(model, batch)
        for name in p.contrastive:
            bank = self.banks.get(name)
            if bank is not None:
                loss = loss + cap_contrastive_loss(
                    seen["z"].float(), bank.rows(batch["index"]), batch["labels"], bank.vectors, bank.labels,
                    p.temperature, p.w_unsup, p.w_sup, p.extra_negatives, p.normalize, generator=self.generator)
        if self.soft_weight:
            loss = loss + self.soft_weight * self.masks.regularization()
        return loss

    def snapshot(self, model, split) -> None:
        """Append theta as it is now to the SnC bank."""
        vectors = encode(model, split, self.runtime, self.cfg.precision).to(self.runtime.device)
        snc = self.banks.get("snc")
        self.banks["snc"] = bank_of_vectors(split, vectors) if snc is None else snc.with_snapshot(vectors)
        self.snapshots += 1

    # ------------------------------------------------------------------ training

    def train(self, model, teacher_dir, split, train_loader, dev_loader, tag: str, curve: list, expertise: bool,
              scores) -> None:
        """Banks, then the joint stage of the structure; fills :attr:`summary`."""
        student, p, cfg = unwrap(model), self.p, self.cfg
        self.base = self._base(teacher_dir, split, expertise, scores, student)
        self.fixed_banks(student, teacher_dir, split)
        if p.structure == "unstructured":
            self._unstructured(model, split, train_loader, dev_loader, tag, curve)
        else:
            self._heads_ffn(model, split, train_loader, dev_loader, tag, curve)
        self.summary["snc_snapshots"] = self.snapshots

    def fixed_banks(self, student, teacher_dir, split) -> None:
        """The PrC and FiC banks of ``split`` (cap-pruning spec, Caching), each computed once:

        - FiC: z_T(x), stored with the teacher's outputs (:func:`stored_pooled`); a teacher published
          before they were stored is encoded here;
        - PrC, init pretrained: z(x) of phi_pre over every training example, the artifact
          ``features/<pooled_key>`` (claimed and published like the prototype features; with mean
          pooling it is the prototype features artifact itself); init teacher: the FiC rows (theta
          starts as the teacher's copy)."""
        p, cfg, prepared, runtime = self.p, self.cfg, self.prepared, self.runtime

        def bank(rows):
            return bank_of_vectors(split, F.normalize(rows[split.index].float(), dim=-1).to(runtime.device))

        teacher_rows = stored_pooled(teacher_dir, prepared.key) if self.teacher is not None else None
        if "fic" in p.contrastive:
            self.banks["fic"] = bank(teacher_rows) if teacher_rows is not None else \
                bank_of(self.teacher, split, runtime, cfg.precision)
        if "prc" not in p.contrastive:
            return
        if p.init == "teacher":  # theta before its first update is the teacher's copy
            self.banks["prc"] = bank(teacher_rows) if teacher_rows is not None else \
                bank_of(student, split, runtime, cfg.precision)
            return
        rel = f"features/{pooled_key(cfg, self.seed, prepared.key, runtime.device, cfg.student.pooling)}"
        rows = stored_features(rel, lambda: pooled_rows(student, prepared.train, runtime, cfg.precision), prepared,
                               runtime, self.store, self.claims)
        self.banks["prc"] = bank(rows)

    def _stage(self, model, step, train_loader, dev_loader, tag, curve, epochs, scores=()) -> None:
        p, cfg = self.p, self.cfg
        # the last epoch is kept, never an earlier and denser best one
        settings = StageSettings("prune", epochs, p.lr, cfg.distill.warmup_ratio, p.weight_decay, keep_best=False,
                                 precision=cfg.precision)
        groups = _param_groups(unwrap(model), p.weight_decay, list(scores), p.score_lr)
        result = train_stage(model, step, train_loader, dev_loader, self.prepared.data.domains, settings,
                             self.runtime, tag, params=groups)
        curve.extend(result.curve)

    def _unstructured(self, model, split, train_loader, dev_loader, tag, curve) -> None:
        p, student = self.p, unwrap(model)
        self.masks = masks = UnstructuredMasks(student.encoder, p.criterion)
        soft = p.criterion == "soft_movement"
        initial, final = (0.0, p.soft_final_threshold) if soft else (1.0, 1.0 - p.sparsity)
        per_epoch = len(train_loader)
        total, dense, last = p.epochs * per_epoch, p.dense_epochs * per_epoch, p.final_epochs * per_epoch
        taken = [0]

        def step(m, batch):
            t = taken[0] = taken[0] + 1
            if t > 1 and (t - 1) % per_epoch == 0 and "snc" in p.contrastive:  # each epoch after the first
                self.snapshot(m, split)
            keep = cubic_keep(t, total, dense, last, initial, final)
            masks.set_keep(keep)
            if soft:
                self.soft_weight = soft_lambda(keep, final, p.soft_final_lambda)
            return self.loss(m, batch)

        masks.set_keep(initial)
        self._stage(model, step, train_loader, dev_loader, tag, curve, p.epochs, masks.score_parameters())
        masks.set_keep(final)
        self.soft_weight = 0.0
        final_masks = masks.remove()
        self.summary = {**unstructured_summary(student, final_masks), "latency_kind": "dense_masked"}

    def _heads_ffn(self, model, split, train_loader, dev_loader, tag, curve) -> None:
        p, student, runtime = self.p, unwrap(model), self.runtime
        self.gates = gates = HeadFFNGates(student.encoder)
        if self.distiller is not None:
            self.distiller.gates = gates  # L_attn over the kept heads only
        enc = student.encoder.config
        targets = structured_targets(p.sparsity, p.step)
        heads_off = pruned_counts(enc.num_hidden_layers * enc.num_attention_heads, targets)
        neurons_off = pruned_counts(enc.num_hidden_layers * enc.intermediate_size, targets)

        def importance_step(m, batch):
            with autocast(self.cfg.precision, runtime.device):
                return self.loss(m, to_device(batch, runtime.device))

        for i, target in enumerate(targets):
            if i > 0 and "snc" in p.contrastive:  # theta as retrained at the previous sparsity
                self.snapshot(model, split)
            heads, neurons = first_order_importance(student, gates, importance_step, train_loader,
                                                    normalize_by_layer=False)
            if runtime.world_size > 1 and dist.is_available() and dist.is_initialized():
                dist.all_reduce(heads)  # every rank saw its share of the batches: the sum is over all of them
                dist.all_reduce(neurons)
            gates.heads = heads_to_prune(normalized_by_layer(heads), heads_off[i], gates.heads, p.min_heads_per_layer)
            gates.neurons = neurons_to_prune(normalized_by_layer(neurons), neurons_off[i], gates.neurons)
            runtime.log(f"[{tag}] heads_ffn {target:.0%}: {int(gates.heads.sum())} heads, "
                        f"{int(gates.neurons.sum())} FFN neurons kept")
            self._stage(model, self.loss, train_loader, dev_loader, f"{tag} {target:.0%}", curve, p.retrain_epochs)
        self.physical = physical_copy(student, gates).eval()
        gates.bake(student.encoder)  # the student itself becomes a plain model holding zeros, same logits
        gates.remove()
        self.summary = {**structured_summary(student, self.physical, gates.heads, gates.neurons),
                        "latency_kind": "physical"}


def bank_of_vectors(split, vectors: torch.Tensor) -> MemoryBank:
    return MemoryBank(split.index.to(vectors.device), split.labels.to(vectors.device), vectors)
