"""The experiment and sweep YAML schema: typed dataclasses, defaults, validation in one place.

An *experiment* YAML (``metakd run``) describes one Meta-KD experiment: data, teacher,
student, meta-teacher and distillation settings, the methods to run and the seeds.
A *sweep* YAML (``metakd sweep``) is an experiment YAML plus a ``search`` section.

Every field carries its help text in ``metadata["help"]``; ``metakd validate`` and the
README's YAML reference are generated from / checked against these dataclasses.
Errors are :class:`ConfigError` and name the field (dotted path), the bad value and what
is allowed. Unknown keys are errors.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from .methods import METHOD_NAMES

METHODS = METHOD_NAMES  # the table of methods: metakd/methods.py

# Size presets: (layers, hidden, heads, intermediate). The tiny-* ones exist so that tests and
# the laptop sweep train in seconds on a CPU.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "bert-base": (12, 768, 12, 3072),
    "tinybert-6l": (6, 768, 12, 3072),
    "tinybert-4l": (4, 312, 12, 1200),
    "bert-medium": (8, 512, 8, 2048),
    "bert-small": (4, 512, 8, 2048),
    "bert-mini": (4, 256, 4, 1024),
    "bert-tiny": (2, 128, 2, 512),
    "tiny-teacher": (4, 64, 4, 128),
    "tiny-student": (2, 32, 2, 64),
    "tiny-student-1l": (1, 32, 2, 64),
}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


# ----------------------------------------------------------------------------- sections


@dataclass
class SyntheticConfig:
    num_domains: int = _help("number of generated domains", default=4)
    num_labels: int = _help("number of classes", default=2)
    examples_per_domain: int = _help("examples generated per domain (before the 81/9/10 split)", default=400)
    words_per_example: int = _help("tokens per generated text", default=24)
    shared_vocab: int = _help("size of the vocabulary shared by all domains", default=200)
    domain_vocab: int = _help("size of each domain's own vocabulary", default=120)
    domain_cue_rate: float = _help("fraction of label-bearing words that are domain-specific cues", default=0.3)
    label_noise: float = _help("fraction of labels flipped at random", default=0.05)
    seed: int = _help("seed of the generator (the corpus, not the training)", default=7)

    def validate(self, where: str) -> None:
        _check(self.num_domains >= 1, where, "num_domains", self.num_domains, "an integer >= 1")
        _check(self.num_labels >= 2, where, "num_labels", self.num_labels, "an integer >= 2")
        _check(self.examples_per_domain >= 20, where, "examples_per_domain", self.examples_per_domain, ">= 20")
        for name in ("words_per_example", "shared_vocab", "domain_vocab"):
            _check(getattr(self, name) >= 1, where, name, getattr(self, name), "an integer >= 1")
        _check(0 <= self.domain_cue_rate <= 1, where, "domain_cue_rate", self.domain_cue_rate, "a number in [0, 1]")
        _check(0 <= self.label_noise < 0.5, where, "label_noise", self.label_noise, "a number in [0, 0.5)")


@dataclass
class DataConfig:
    source: str = _help("synthetic | amazon | files | hf", default="synthetic")
    path: str | None = _help(
        "amazon: directory of <domain>.jsonl; files: a file or directory of jsonl/json/csv/parquet; "
        "hf: a Hugging Face hub id or local path for datasets.load_dataset",
        default=None,
    )
    domains: list[str] | None = _help("keep only these domains, in this order (None: all, sorted)", default=None)
    text_column: str = _help("column holding the text (the premise for pairs)", default="text")
    text_pair_column: str | None = _help("column holding the second text of a pair (e.g. hypothesis)", default=None)
    label_column: str = _help("column holding the integer (or string) label", default="label")
    label_case: str = _help("fold (label names compared case-insensitively: Positive = positive) | keep "
                            "(case is significant)", default="fold")
    domain_column: str = _help("column naming the domain (e.g. genre for MNLI)", default="domain")
    hf_config: str | None = _help("datasets config name for source: hf", default=None)
    hf_train_split: str = _help("split of the hf dataset to train on", default="train")
    hf_test_split: str | None = _help("hf split used as test (e.g. validation_matched); None: validation_matched "
                                      "when the dataset has it (MNLI), else carved from train", default=None)
    num_labels: int | None = _help("number of classes (None: inferred from the data)", default=None)
    sample_rate: float = _help("fraction of each domain's training split kept, in (0, 1]", default=1.0)
    max_length: int = _help("maximum sequence length in tokens", default=64)
    batching: str = _help(
        "random (seeded random batches, each cut to its longest sequence: the same math as padding to "
        "max_length) | length_grouped (batches of similar lengths: less padding, but batches are no longer "
        "uniform random draws)", default="random")
    truncation: str = _help("head (first tokens) | head_tail (first quarter + last three quarters of the "
                            "budget; single texts, e.g. long reviews)", default="head")
    split_seed: int = _help("seed of the train/dev/test split (fixed across training seeds)", default=1234)
    vocab_size: int = _help("WordPiece vocabulary trained for randomly initialised models", default=2000)
    synthetic: SyntheticConfig = _help("generated corpus settings (source: synthetic)", default_factory=SyntheticConfig)

    def validate(self, where: str) -> None:
        _check_choice(self.source, ("synthetic", "amazon", "files", "hf"), where, "source")
        if self.source != "synthetic" and not self.path:
            raise ConfigError(f"{where}.path: required for source '{self.source}' (got nothing)")
        self.path = expand_user(self.path)
        _check(
            isinstance(self.sample_rate, (int, float)) and 0 < self.sample_rate <= 1,
            where, "sample_rate", self.sample_rate, "a number in (0, 1]",
        )
        _check_choice(self.truncation, ("head", "head_tail"), where, "truncation")
        _check_choice(self.batching, ("random", "length_grouped"), where, "batching")
        _check_choice(self.label_case, ("fold", "keep"), where, "label_case")
        _check(8 <= self.max_length <= 4096, where, "max_length", self.max_length, "an integer in [8, 4096]")
        _check(self.num_labels is None or self.num_labels >= 2, where, "num_labels", self.num_labels, "None or >= 2")
        _check(self.vocab_size >= 100, where, "vocab_size", self.vocab_size, "an integer >= 100")
        if self.domains is not None:
            _check(len(self.domains) >= 1 and len(set(self.domains)) == len(self.domains),
                   where, "domains", self.domains, "a non-empty list of distinct domain names")
        self.synthetic.validate(f"{where}.synthetic")


@dataclass
class ModelConfig:
    """A BERT-like encoder: a Hugging Face checkpoint, a size preset, or explicit sizes."""

    preset: str | None = _help(f"size preset, one of {sorted(PRESETS)} (without any model field: "
                               "tiny-teacher for the teacher, tiny-student for the student)", default=None)
    checkpoint: str | None = _help("Hugging Face model id or local directory (pretrained weights)", default=None)
    layers: int | None = _help("number of transformer layers (random init)", default=None)
    hidden: int | None = _help("hidden size (random init)", default=None)
    heads: int | None = _help("attention heads (random init)", default=None)
    intermediate: int | None = _help("feed-forward size (random init)", default=None)
    init_from_teacher: bool = _help(
        "student only: copy the teacher's embeddings and a layer-mapped subset of its layers "
        "(needs the same hidden size)", default=False)
    pooling: str = _help("classifier input: cls (BERT's pooler, the paper) | mean (mean of token states, "
                         "for sentence-embedding checkpoints such as all-MiniLM-L6-v2)", default="cls")

    def validate(self, where: str) -> None:
        _check_choice(self.pooling, ("cls", "mean"), where, "pooling")
        explicit = [self.layers, self.hidden, self.heads, self.intermediate]
        given = sum(x is not None for x in (self.preset, self.checkpoint)) + (any(v is not None for v in explicit))
        if given != 1:
            raise ConfigError(
                f"{where}: give exactly one of preset, checkpoint, or explicit sizes "
                f"(layers, hidden, heads, intermediate); got preset={self.preset!r}, "
                f"checkpoint={self.checkpoint!r}, sizes={explicit}")
        if self.preset is not None:
            _check_choice(self.preset, tuple(sorted(PRESETS)), where, "preset")
        if self.checkpoint is not None:
            self.checkpoint = expand_user(self.checkpoint)
            _refuse_preset_typo(self.checkpoint, where)
        if any(v is not None for v in explicit):
            for name, v in zip(("layers", "hidden", "heads", "intermediate"), explicit):
                _check(isinstance(v, int) and v >= 1, where, name, v, "a positive integer (all four sizes are needed)")
            _check(self.hidden % self.heads == 0, where, "hidden", self.hidden,
                   f"a multiple of heads ({self.heads})")

    def sizes(self) -> tuple[int, int, int, int] | None:
        """(layers, hidden, heads, intermediate) when known without loading a checkpoint."""
        if self.preset is not None:
            return PRESETS[self.preset]
        if self.layers is not None:
            return (self.layers, self.hidden, self.heads, self.intermediate)
        return None

    def label(self) -> str:
        if self.preset:
            return self.preset
        if self.checkpoint:
            return self.checkpoint
        return f"{self.layers}L-{self.hidden}H"


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher model and how teachers (meta-teacher and baseline teachers) are trained."""

    epochs: int = _help("training epochs of every teacher", default=3)
    lr: float = _help("peak learning rate (AdamW)", default=2e-5)
    batch_size: int = _help("global batch size: the workers of a DDP teacher (search.resources.workers_per_trial) "
                            "each take batch_size / workers, so the recipe is the same at any worker count",
                            default=32)
    warmup_ratio: float = _help("fraction of steps with linear warmup", default=0.1)
    weight_decay: float = _help("AdamW weight decay", default=0.01)
    checkpoint_interval_s: float = _help(
        "Ray Train: after a teacher epoch, write a resumable checkpoint (weights, AdamW state, best weights) "
        "only if this many seconds passed since the last one (0: after every epoch); only the latest is kept, "
        "and none after the last epoch", default=300.0)

    def validate(self, where: str) -> None:
        super().validate(where)
        _check_training(self, where, ("epochs",), ("lr",))
        _check(self.checkpoint_interval_s >= 0, where, "checkpoint_interval_s", self.checkpoint_interval_s,
               "a number of seconds >= 0")


# The criteria of each structure; the released values that differ between CAP-m/soft
# (unstructured) and CAP-f (heads_ffn) (cap-pruning spec §1.8): what an unset field resolves to.
PRUNE_CRITERIA = {"unstructured": ("movement", "soft_movement", "magnitude"), "heads_ffn": ("first_order",)}
PRUNE_DEFAULTS = {
    "unstructured": {"criterion": "movement", "w_unsup": 0.1, "w_sup": 10.0, "kd_temperature": 2.0, "lr": 3e-5,
                     "weight_decay": 0.0},
    "heads_ffn": {"criterion": "first_order", "w_unsup": 0.3, "w_sup": 3.0, "kd_temperature": 1.0, "lr": 2e-5,
                  "weight_decay": 0.01},
}
CONTRASTIVE_MODULES = ("prc", "snc", "fic")
# fields only one structure (or criterion) reads: the others leave them out of the student key
_PRUNE_ONLY = {"unstructured": ("epochs", "dense_epochs", "final_epochs"), "heads_ffn": ("step", "retrain_epochs",
               "min_heads_per_layer"), "scores": ("score_lr",), "soft_movement": ("soft_final_threshold",
               "soft_final_lambda"), "cap": ("kd_temperature",)}


@dataclass
class PruneConfig:
    """A pruned student (CAP, cap-pruning spec §3): the teacher's architecture with weights removed, trained
    in one joint stage. Unset (None) fields take the released value of the structure (§1.8)."""

    sparsity: float = _help("share of the encoder layers' prunable weights removed, 0 < s < 1 (unstructured: of the six "
                            "matrices of each layer; heads_ffn: of the heads and of the FFN neurons; soft_movement: "
                            "the nominal target only, reported as prune_target)", default=0.9)
    structure: str = _help("unstructured (per-weight masks on Q, K, V, attention-output, FFN-in, FFN-out) | heads_ffn "
                           "(attention heads and FFN neurons)", default="unstructured")
    criterion: str | None = _help("unstructured: movement (learned scores, topK per matrix) | soft_movement (sigmoid "
                                  "threshold + regulariser) | magnitude; heads_ffn: first_order (|dL/dgate|). None: "
                                  "movement / first_order", default=None)
    contrastive: list[str] = _help("CAP's contrastive modules, any subset of prc (the pre-trained model), snc (snapshots "
                                   "of the pruned model), fic (the fine-tuned model: the method's teacher); [] = "
                                   "pruning + distillation only", default_factory=lambda: list(CONTRASTIVE_MODULES))
    init: str = _help("pretrained (CAP: the teacher's initial encoder + fresh heads) | teacher (a copy of the "
                      "trained teacher)", default="pretrained")
    base_loss: str = _help("method (the method's own L_KD at every step, L_pred x kd_weight, + ce_weight CE) | cap "
                           "(released: ce_weight CE + kd_weight T^2 KL at kd_temperature)", default="method")
    temperature: float = _help("tau of the contrastive losses", default=0.1)
    w_unsup: float | None = _help("weight of the unsupervised contrastive term (None: 0.1 unstructured, 0.3 heads_ffn)",
                                  default=None)
    w_sup: float | None = _help("weight of the supervised (label-aware) contrastive term (None: 10 unstructured, 3 "
                                "heads_ffn)", default=None)
    extra_negatives: int = _help("Q: bank vectors drawn per batch, |E| = min(floor(Q / R), N)", default=4096)
    normalize: str = _help("released (the authors' code; its weights assume it) | anchor_mean (multi-positive "
                           "InfoNCE)", default="released")
    ce_weight: float = _help("weight of the cross-entropy with the labels (a student_ft student: 1)", default=0.1)
    kd_weight: float = _help("weight of the logit distillation term (base_loss method: of L_pred)", default=0.9)
    kd_temperature: float | None = _help("base_loss cap: T of the logit KD (None: 2 unstructured, 1 heads_ffn)",
                                         default=None)
    epochs: int = _help("unstructured: epochs of the one joint stage", default=10)
    dense_epochs: int = _help("unstructured: epochs before pruning starts (a of the cubic schedule)", default=2)
    final_epochs: int = _help("unstructured: epochs at the final mask (b of the cubic schedule)", default=3)
    lr: float | None = _help("learning rate of the weights (None: 3e-5 unstructured, 2e-5 heads_ffn)", default=None)
    score_lr: float = _help("movement / soft_movement: learning rate of the scores (no weight decay)", default=1e-2)
    weight_decay: float | None = _help("AdamW weight decay of the weights (None: 0 unstructured, 0.01 heads_ffn)",
                                       default=None)
    soft_final_threshold: float = _help("soft_movement: final sigmoid threshold kappa_f", default=0.1)
    soft_final_lambda: float | None = _help("soft_movement: final regulariser weight (required; released: QQP 190 / "
                                            "550 for 90 / 97 %)", default=None)
    step: float = _help("heads_ffn: sparsity added per pruning step", default=0.1)
    retrain_epochs: int = _help("heads_ffn: epochs of retraining after each step", default=2)
    min_heads_per_layer: int = _help("heads_ffn: the most important heads of each layer that are never pruned",
                                     default=1)

    def validate(self, where: str) -> None:
        """Checks the block and fills every unset field with its structure's value."""
        _check_choice(self.structure, tuple(PRUNE_CRITERIA), where, "structure")
        for name, value in PRUNE_DEFAULTS[self.structure].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        _check(0 < self.sparsity < 1, where, "sparsity", self.sparsity, "a number in (0, 1)")
        _check(self.criterion in PRUNE_CRITERIA[self.structure], where, "criterion", self.criterion,
               f"one of {', '.join(PRUNE_CRITERIA[self.structure])} for structure {self.structure}")
        _check(all(m in CONTRASTIVE_MODULES for m in self.contrastive) and len(set(self.contrastive)) == len(
            self.contrastive), where, "contrastive", self.contrastive, f"distinct modules from {CONTRASTIVE_MODULES}")
        _check_choice(self.init, ("pretrained", "teacher"), where, "init")
        _check_choice(self.base_loss, ("method", "cap"), where, "base_loss")
        _check_choice(self.normalize, ("released", "anchor_mean"), where, "normalize")
        for name in ("temperature", "kd_temperature"):
            _check(getattr(self, name) > 0, where, name, getattr(self, name), "a number > 0")
        for name in ("w_unsup", "w_sup", "ce_weight", "kd_weight", "weight_decay"):
            _check(getattr(self, name) >= 0, where, name, getattr(self, name), "a number >= 0")
        _check(self.extra_negatives >= 0, where, "extra_negatives", self.extra_negatives, "an integer >= 0")
        for name in ("lr", "score_lr"):
            _check(0 < getattr(self, name) < 1, where, name, getattr(self, name), "a learning rate in (0, 1)")
        if self.structure == "unstructured":
            _check(self.epochs >= 1, where, "epochs", self.epochs, "an integer >= 1")
            for name in ("dense_epochs", "final_epochs"):
                _check(getattr(self, name) >= 0, where, name, getattr(self, name), "an integer >= 0")
            _check(self.dense_epochs + self.final_epochs <= self.epochs, where, "final_epochs", self.final_epochs,
                   f"at most epochs - dense_epochs ({self.epochs - self.dense_epochs})")
        if self.criterion == "soft_movement":
            _check(0 < self.soft_final_threshold < 1, where, "soft_final_threshold", self.soft_final_threshold,
                   "a number in (0, 1)")
            if self.soft_final_lambda is None:
                raise ConfigError(f"{where}.soft_final_lambda: required for criterion soft_movement (released: "
                                  f"QQP 190 / 550, MNLI 290 / 680 for 90 / 97 % sparsity)")
            _check(self.soft_final_lambda >= 0, where, "soft_final_lambda", self.soft_final_lambda, "a number >= 0")
        if self.structure == "heads_ffn":
            _check(0 < self.step <= self.sparsity, where, "step", self.step, "a number in (0, sparsity]")
            steps = round(self.sparsity / self.step)
            _check(math.isclose(steps * self.step, self.sparsity, abs_tol=1e-9), where, "sparsity", self.sparsity,
                   f"a whole number of steps of {self.step} (heads_ffn prunes in steps)")
            _check(self.retrain_epochs >= 1, where, "retrain_epochs", self.retrain_epochs, "an integer >= 1")
            _check(self.min_heads_per_layer >= 1, where, "min_heads_per_layer", self.min_heads_per_layer,
                   "an integer >= 1 (a layer without heads has no attention)")

    def check_experiment(self, cfg: "ExperimentConfig", where: str = "student.prune") -> None:
        """Refusals that need the rest of the experiment: the methods and the teacher's size."""
        if "student_ft" in cfg.methods:
            if "fic" in self.contrastive:
                raise ConfigError(f"{where}.contrastive: fic needs the fine-tuned teacher, and method student_ft "
                                  f"has none; drop fic or student_ft")
            if self.init == "teacher":
                raise ConfigError(f"{where}.init: teacher needs a trained teacher, and method student_ft has none")
        sizes = cfg.teacher.sizes()
        if sizes is not None:  # a checkpoint's: metakd.preflight, where its config is on this machine
            self.check_heads(sizes[0], sizes[2], where)

    def check_heads(self, layers: int, heads: int, where: str = "student.prune") -> None:
        """heads_ffn: the heads the sparsity takes must leave min_heads_per_layer in every layer."""
        if self.structure != "heads_ffn":
            return
        off = math.floor(self.sparsity * layers * heads + 1e-9)
        most = layers * (heads - self.min_heads_per_layer)
        _check(off <= most, where, "sparsity", self.sparsity,
               f"at most {most / (layers * heads):.3g}: {off} of the teacher's {layers * heads} heads would go, "
               f"but min_heads_per_layer {self.min_heads_per_layer} keeps {layers * self.min_heads_per_layer}")

    def used(self) -> dict:
        """The resolved fields this block's structure, criterion and base loss read (the student key)."""
        skip = set(_PRUNE_ONLY["heads_ffn" if self.structure == "unstructured" else "unstructured"])
        if self.criterion not in ("movement", "soft_movement"):
            skip |= set(_PRUNE_ONLY["scores"])
        if self.criterion != "soft_movement":
            skip |= set(_PRUNE_ONLY["soft_movement"])
        if self.base_loss != "cap":
            skip |= set(_PRUNE_ONLY["cap"])
        if not self.contrastive:
            skip |= {"temperature", "w_unsup", "w_sup", "extra_negatives", "normalize"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def label(self) -> str:
        """e.g. 'movement 0.9 +prc+snc+fic', 'first_order 0.5' (no contrastive module)."""
        cap = "+" + "+".join(self.contrastive) if self.contrastive else ""
        return f"{self.criterion or PRUNE_DEFAULTS[self.structure]['criterion']} {self.sparsity:g} {cap}".strip()


@dataclass
class StudentConfig(ModelConfig):
    """The student: a smaller encoder (preset, checkpoint or sizes), or a pruned copy of the teacher (prune)."""

    prune: PruneConfig | None = _help("a pruned student (CAP) instead of a smaller architecture: the teacher's "
                                      "shape with weights removed; none of preset, checkpoint, sizes or "
                                      "init_from_teacher then", default=None)

    def validate(self, where: str) -> None:
        if self.prune is None:
            super().validate(where)
            return
        _check_choice(self.pooling, ("cls", "mean"), where, "pooling")
        given = {k: getattr(self, k) for k in ("preset", "checkpoint", "layers", "hidden", "heads", "intermediate",
                                               "init_from_teacher") if getattr(self, k)}
        if given:
            name = next(iter(given))
            raise ConfigError(f"{where}.{name}: a pruned student (student.prune) has the teacher's architecture; "
                              f"drop {', '.join(given)}")
        self.prune.validate(f"{where}.prune")

    def label(self) -> str:
        return f"pruned {self.prune.label()}" if self.prune is not None else super().label()

    @property
    def kind(self) -> str:
        """Its row of ``metakd.methods.STUDENT_KINDS``."""
        if self.prune is None:
            return "dense"
        return "pruned_cap" if self.prune.base_loss == "cap" else "pruned"


@dataclass
class MetaTeacherConfig:
    gamma1: float = _help("weight of the transferable domain-adversarial loss L_TDA", default=0.5)
    alpha: float = _help("weight of the own-domain prototype in the prototype score", default=0.5)
    prototype: str = _help("class (paper) | domain (released code)", default="class")
    prototype_weighting: bool = _help("weight CE by prototype scores (false: every t_i = 1, ablation)", default=True)
    tda_target: str = _help("uniform (default) | shuffled (released code)", default="uniform")
    tda_weighting: str = _help(
        "none (default, the paper: mean_i t_i CE_i + gamma1 L_TDA) | instance (released code: t_i also scales the "
        "domain term, mean_i t_i (CE_i + gamma1 CE(g_i, target_i)))", default="none")

    def validate(self, where: str) -> None:
        _check(self.gamma1 >= 0, where, "gamma1", self.gamma1, "a number >= 0")
        _check(0 <= self.alpha <= 1, where, "alpha", self.alpha, "a number in [0, 1]")
        _check_choice(self.prototype, ("class", "domain"), where, "prototype")
        _check_choice(self.tda_target, ("uniform", "shuffled"), where, "tda_target")
        _check_choice(self.tda_weighting, ("none", "instance"), where, "tda_weighting")


@dataclass
class DistillConfig:
    gamma2: float = _help("weight of the transferable-knowledge loss L_TKD", default=0.5)
    schedule: str = _help("two_stage (TinyBERT, default) | joint", default="two_stage")
    stage1_epochs: int = _help("two_stage: epochs of intermediate-layer distillation", default=10)
    stage1_lr: float = _help("two_stage: learning rate of stage 1", default=5e-5)
    stage2_epochs: int = _help("two_stage: epochs of prediction-layer distillation", default=3)
    stage2_lr: float = _help("two_stage: learning rate of stage 2", default=3e-5)
    epochs: int = _help("joint schedule and student_ft: epochs", default=3)
    lr: float = _help("joint schedule and student_ft: learning rate", default=5e-5)
    batch_size: int = _help("global batch size of student training: each of the search.resources.student_workers "
                            "workers takes batch_size / workers", default=32)
    warmup_ratio: float = _help("fraction of steps with linear warmup", default=0.1)
    weight_decay: float = _help("AdamW weight decay", default=0.01)
    temperature: float = _help("softmax temperature T of the prediction-layer loss", default=1.0)
    pred_loss: str = _help("kl (default) | rkl | js | tvd", default="kl")
    layer_map: str = _help("exact (L must be a multiple of S) | round", default="exact")
    attention: str = _help(
        "what L_attn fits: scores (default; TinyBERT and the released code: the pre-softmax attention logits "
        "QK^T/sqrt(d), plus MPNet's relative position bias, of every mapped layer, 0 on padded query/key "
        "positions) | probs (the softmax probabilities; ~85x smaller a loss)", default="scores")
    pred_weighting: str = _help(
        "metakd/metakd_no_target: lambda (default, the paper's L_KD: L_pred weighted by lambda_i) | none (released "
        "code: plain soft cross-entropy, batch mean); baselines have lambda_i = 1 either way", default="lambda")
    tkd: str = _help(
        "metakd/metakd_no_target: form of L_TKD. tanh (default, the spec: MSE(r_S W_d, r_T) of the tanh domain "
        "representations, per example, lambda_i-weighted) | pre_tanh_shared (released code: the pre-tanh "
        "representations, the student's mapped by W_h, the batch weighted by mean(lambda))", default="tanh")
    stage1_schedule: str = _help(
        "two_stage: learning-rate schedule of stage 1. linear (default: warmup_ratio warmup, then linear decay) | "
        "constant (released code: stage1_lr throughout, no warmup, no decay)", default="linear")
    teacher_cache: str = _help(
        "auto: the frozen teacher's logits and r(x) come from the outputs stored with the teacher, and "
        "stage 1 / joint keep the teacher's mapped hidden states and attention maps of the target domain on "
        "the device in fp16 when they fit teacher_cache_gb (else they are recomputed every batch) | off: "
        "run the teacher on every batch", default="auto")
    teacher_cache_gb: float = _help("teacher_cache auto: most device memory (GiB) the teacher's outputs and the "
                                    "stage-1 hidden states and attention maps may take together (on CUDA also at "
                                    "most half of what is left of the worker's share of the GPU, "
                                    "student_gpus_per_worker); what does not fit is recomputed every batch",
                                    default=8.0)

    def validate(self, where: str) -> None:
        _check(self.gamma2 >= 0, where, "gamma2", self.gamma2, "a number >= 0")
        _check_choice(self.teacher_cache, ("auto", "off"), where, "teacher_cache")
        _check(self.teacher_cache_gb >= 0, where, "teacher_cache_gb", self.teacher_cache_gb, "a number of GiB >= 0")
        _check_choice(self.schedule, ("two_stage", "joint"), where, "schedule")
        _check_choice(self.pred_loss, ("kl", "rkl", "js", "tvd"), where, "pred_loss")
        _check_choice(self.layer_map, ("exact", "round"), where, "layer_map")
        _check_choice(self.attention, ("scores", "probs"), where, "attention")
        _check_choice(self.pred_weighting, ("lambda", "none"), where, "pred_weighting")
        _check_choice(self.tkd, ("tanh", "pre_tanh_shared"), where, "tkd")
        _check_choice(self.stage1_schedule, ("linear", "constant"), where, "stage1_schedule")
        _check(self.temperature > 0, where, "temperature", self.temperature, "a number > 0")
        _check(self.stage1_epochs >= 0, where, "stage1_epochs", self.stage1_epochs, "an integer >= 0")
        _check_training(self, where, ("stage2_epochs", "epochs"), ("stage1_lr", "stage2_lr", "lr"))


@dataclass
class ParamSpec:
    """One searched parameter."""

    type: str = _help("uniform | loguniform | int | choice | grid", default="choice")
    low: float | None = _help("lower bound (uniform, loguniform, int)", default=None)
    high: float | None = _help("upper bound (uniform, loguniform, int)", default=None)
    values: list | None = _help("candidates (choice, grid)", default=None)
    when: dict | None = _help("condition {param: value}: sampled only when that parameter has that value", default=None)


@dataclass
class SchedulerConfig:
    type: str = _help("asha", default="asha")
    grace_period: int = _help("reports before a trial may be stopped", default=1)
    reduction_factor: int = _help("ASHA halving rate", default=2)

    def validate(self, where: str) -> None:
        _check_choice(self.type, ("asha",), where, "type")
        _check(self.grace_period >= 1, where, "grace_period", self.grace_period, "an integer >= 1")
        _check(self.reduction_factor >= 2, where, "reduction_factor", self.reduction_factor, "an integer >= 2")


@dataclass
class ResourcesConfig:
    workers_per_trial: int = _help("Ray Train workers (DDP ranks) for each teacher training", default=1)
    cpus_per_worker: float = _help("CPUs per Ray Train worker", default=1)
    gpus_per_worker: float = _help("GPUs per teacher worker (0 on CPU machines)", default=0)
    student_workers: int = _help(
        "Ray Train workers that share a trial's student jobs, each training one job at a time on its own "
        "(with student_ddp: the DDP ranks of one student at a time)", default=1)
    student_gpus_per_worker: float | None = _help(
        "GPUs per student worker; fractions (e.g. 0.25: four workers share a GPU) allowed unless student_ddp "
        "(None: same as gpus_per_worker)", default=None)
    student_ddp: bool = _help("train each student with all student_workers as DDP ranks (one job at a time) "
                              "instead of one job per worker", default=False)
    max_concurrent_trials: int = _help("Tune trials at once (Tune cannot see the GPUs Train workers take)", default=1)

    def validate(self, where: str) -> None:
        _check(self.workers_per_trial >= 1, where, "workers_per_trial", self.workers_per_trial, "an integer >= 1")
        _check(self.student_workers >= 1, where, "student_workers", self.student_workers, "an integer >= 1")
        _check(self.cpus_per_worker > 0, where, "cpus_per_worker", self.cpus_per_worker, "a number > 0")
        _check(self.gpus_per_worker >= 0, where, "gpus_per_worker", self.gpus_per_worker, "a number >= 0")
        _check(self.max_concurrent_trials >= 1, where, "max_concurrent_trials", self.max_concurrent_trials, ">= 1")
        for name in ("gpus_per_worker", "student_gpus_per_worker"):
            v = getattr(self, name)
            if v is not None and v > 1 and v != int(v):
                raise ConfigError(f"{where}.{name}: {v!r} is not allowed; fractions only below 1 GPU")
        if self.gpus_per_worker not in (0, int(self.gpus_per_worker)) and self.workers_per_trial > 1:
            raise ConfigError(f"{where}.gpus_per_worker: {self.gpus_per_worker!r} is fractional; "
                              f"multi-worker (DDP) teachers need whole GPUs per worker")
        s = self.student_gpus_per_worker
        if s is not None:
            _check(s >= 0, where, "student_gpus_per_worker", s, "a number >= 0")
        s = self.student_gpus()
        if s != int(s) and self.student_ddp and self.student_workers > 1:
            raise ConfigError(f"{where}.student_gpus_per_worker: {s!r} is fractional; DDP students "
                              f"(student_ddp with student_workers {self.student_workers}) need whole GPUs per worker")

    def student_gpus(self) -> float:
        return self.gpus_per_worker if self.student_gpus_per_worker is None else self.student_gpus_per_worker


# Short names of searched parameters (the paper's) -> dotted config paths.
PARAM_ALIASES = {
    "gamma1": "meta_teacher.gamma1",
    "gamma2": "distill.gamma2",
    "sample_rate": "data.sample_rate",
    "alpha": "meta_teacher.alpha",
    "temperature": "distill.temperature",
    "student": "student",
}


@dataclass
class MLflowSettings:
    tracking_uri: str | None = _help(
        "MLflow tracking URI: a server (http://host:5000; credentials in MLFLOW_TRACKING_USERNAME / "
        "MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN, never here) or sqlite:///path.db (None: "
        "MLFLOW_TRACKING_URI, else sqlite:///<storage>/<name>/mlflow.db)", default=None)
    experiment: str | None = _help("MLflow experiment (None: the sweep's name)", default=None)


@dataclass
class TensorBoardSettings:
    dir: str | None = _help("where event files go, <dir>/<sweep>/<trial>/... (a path every node writes; "
                            "None: <storage>/<name>/tensorboard)", default=None)


@dataclass
class WandbSettings:
    project: str | None = _help("W&B project (None: WANDB_PROJECT, else metakd)", default=None)
    mode: str = _help("online (needs WANDB_API_KEY or `wandb login` on every node) | offline (run directories "
                      "under dir, uploaded later with `wandb sync`)", default="offline")
    dir: str | None = _help("where run directories go, <dir>/wandb/ (None: <storage>/<name>)", default=None)

    def validate(self, where: str) -> None:
        _check_choice(self.mode, ("online", "offline"), where, "mode")


@dataclass
class TrackingConfig:
    """The experiment trackers a sweep logs to (metakd/tracking.py: the table of trackers). In YAML a list
    of names or {name: settings}, e.g. ``[mlflow, {tensorboard: {dir: /shared/tb}}]``; unset: none."""

    mlflow: MLflowSettings | None = _help("MLflow: a run per trial, a nested run per training", default=None)
    tensorboard: TensorBoardSettings | None = _help("TensorBoard event files per trial and per training", default=None)
    wandb: WandbSettings | None = _help("Weights & Biases: a run per trial and per training", default=None)

    def chosen(self) -> dict[str, Any]:
        """name -> settings of every tracker asked for, in table order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def validate(self, where: str) -> None:
        for name, settings in self.chosen().items():
            if hasattr(settings, "validate"):
                settings.validate(f"{where}.{name}")


def tracking_from_list(value: Any, where: str = "search.tracking") -> dict:
    """The YAML list form of ``search.tracking`` (``[mlflow, {wandb: {mode: offline}}]``) as the mapping
    :class:`TrackingConfig` reads; a mapping is returned as it is."""
    if value is None or isinstance(value, dict):
        return value or {}
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of trackers ({', '.join(f.name for f in fields(TrackingConfig))}), "
                          f"got {value!r}")
    out: dict = {}
    for i, item in enumerate(value):
        if isinstance(item, str):
            name, settings = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, settings = next(iter(item.items()))
            settings = settings or {}
        else:
            raise ConfigError(f"{where}[{i}]: expected a tracker name or {{name: settings}}, got {item!r}")
        if name in out:
            raise ConfigError(f"{where}[{i}]: {name!r} is listed twice")
        out[name] = settings
    return out


def tracking_from_flag(text: str, current: TrackingConfig | None = None) -> TrackingConfig:
    """``--tracking mlflow,tensorboard`` (or ``none``): these trackers instead of the YAML's, each with
    the YAML's settings where it has them, else the defaults."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return TrackingConfig()
    current = current or TrackingConfig()
    raw = {n: dataclasses.asdict(getattr(current, n)) if getattr(current, n, None) is not None else {} for n in names}
    if len(raw) != len(names):
        raise ConfigError(f"--tracking: {text!r} names a tracker twice")
    config = _build(TrackingConfig, raw, "--tracking")
    config.validate("--tracking")
    return config


@dataclass
class SearchConfig:
    params: dict[str, ParamSpec] = _help(
        f"searched parameters: a short name {sorted(PARAM_ALIASES)} or a dotted path "
        "(e.g. distill.stage1_lr) -> its spec", default_factory=dict)
    algorithm: str = _help("optuna (TPE) | grid | random", default="optuna")
    sampler: str = _help("optuna sampler: tpe | random", default="tpe")
    metric: str = _help("dev_accuracy | test_accuracy, averaged over domains and seeds of the first method", default="dev_accuracy")
    mode: str = _help("max | min", default="max")
    num_samples: int | None = _help("trials (optuna, random; None: 8) or runs of every grid point (grid; None: 1, "
                                    "each point once)", default=None)
    scheduler: SchedulerConfig | None = _help("optional ASHA early stopping of student trials", default=None)
    resources: ResourcesConfig = _help("Ray resources per trial", default_factory=ResourcesConfig)
    max_failures: int = _help(
        "times a trial launches one of its teacher or student runs again after it failed (from the run's last "
        "checkpoint) before the trial fails; a run whose node died (spot reclaim, OOM, a bad host) is launched "
        "again without counting here, up to 10 times", default=3)
    storage: str = _help("local path or pyarrow/fsspec URI (s3://, gs://): the sweep's results under <storage>/<name>/, "
                         "teachers, students and data in the cache <storage>/cache/ every sweep there shares",
                         default="runs/sweeps")
    cache: str | None = _help("the artifact cache (prepared data, features, teachers, students), a path or URI, when "
                              "not <storage>/cache: e.g. one cache for several storages", default=None)
    study_storage: str | None = _help(
        "optuna / random: where the Optuna study lives, sqlite:///path.db | postgresql://... | mysql://... | a "
        "journal file path (None: <storage>/<name>/study.journal on a local or NFS storage; an s3:// or gs:// "
        "storage keeps it in Tune's searcher state only: resumable, not extendable)", default=None)
    tracking: TrackingConfig = _help("experiment trackers: a list of mlflow, tensorboard, wandb, each a name or "
                                     "{name: settings} (unset: none; --tracking overrides)", default_factory=TrackingConfig)

    def validate(self, where: str) -> None:
        _check_choice(self.algorithm, ("optuna", "grid", "random"), where, "algorithm")
        _check_choice(self.sampler, ("tpe", "random"), where, "sampler")
        _check_choice(self.metric, ("dev_accuracy", "test_accuracy"), where, "metric")
        _check_choice(self.mode, ("max", "min"), where, "mode")
        if self.num_samples is None:  # a grid repeated 8 times would silently run every point 8 times
            self.num_samples = 1 if self.algorithm == "grid" else 8
        _check(self.num_samples >= 1, where, "num_samples", self.num_samples, "an integer >= 1")
        _check(len(self.params) >= 1, where, "params", self.params, "at least one searched parameter")
        for name, spec in self.params.items():
            _validate_param(name, spec, f"{where}.params.{name}", self)
        if self.scheduler is not None:
            self.scheduler.validate(f"{where}.scheduler")
        self.resources.validate(f"{where}.resources")
        _check(isinstance(self.max_failures, int) and self.max_failures >= 0, where, "max_failures",
               self.max_failures, "an integer >= 0")
        _check(bool(self.storage), where, "storage", self.storage, "a path or URI")
        self.storage = expand_user(self.storage)
        if self.cache is not None:
            _check(bool(self.cache), where, "cache", self.cache, "a path or URI")
            self.cache = expand_user(self.cache)
        if self.study_storage is not None:
            scheme = self.study_storage.split("://", 1)[0] if "://" in self.study_storage else None
            _check(scheme is None or scheme.split("+")[0] in ("sqlite", "postgresql", "mysql"), where,
                   "study_storage", self.study_storage,
                   "sqlite:///path.db, postgresql://..., mysql://... or a local journal file path")
            _check(self.algorithm != "grid", where, "study_storage", self.study_storage,
                   "unset for a grid search (no Optuna study)")
        self.tracking.validate(f"{where}.tracking")


@dataclass
class StudentsConfig:
    """What each trained student leaves in the store beside its result (``students/<key>/``)."""

    keep: str = _help(
        "all: the student itself too (model.safetensors, model.json, the tokenizer of its data), published with "
        "result.json, for metakd export / predict | none: result.json only (no disk per student; nothing to "
        "export). Part of the student key: a run never reuses a student kept otherwise", default="all")

    def validate(self, where: str) -> None:
        _check_choice(self.keep, ("all", "none"), where, "keep")


@dataclass
class ExperimentConfig:
    name: str = _help("experiment / sweep name (used in paths; letters, digits, - and _)", default="experiment")
    methods: list[str] = _help(f"methods to run, from {list(METHODS)}", default_factory=lambda: ["metakd"])
    seeds: list[int] = _help("every configuration runs once per seed", default_factory=lambda: [0])
    device: str = _help("auto | cpu | cuda", default="auto")
    precision: str = _help("auto (bf16 autocast on a CUDA device that supports it, fp32 on CPU) | fp32 | bf16 "
                           "(autocast; weights, optimizer and losses stay fp32)", default="auto")
    output_dir: str = _help("metakd run: where teachers, students and tables go", default="runs")
    data: DataConfig = _help("the multi-domain dataset", default_factory=DataConfig)
    teacher: TeacherConfig = _help("teacher model and its training", default_factory=lambda: TeacherConfig(preset="tiny-teacher"))
    student: StudentConfig = _help("student model: a smaller encoder, or a pruned copy of the teacher (prune)",
                                   default_factory=lambda: StudentConfig(preset="tiny-student"))
    meta_teacher: MetaTeacherConfig = _help("meta-teacher loss settings (section 1-2)", default_factory=MetaTeacherConfig)
    distill: DistillConfig = _help("meta-distillation settings (section 3-4)", default_factory=DistillConfig)
    students: StudentsConfig = _help("what each trained student leaves in the store", default_factory=StudentsConfig)
    search: SearchConfig | None = _help("sweeps only: the search space and how to run it", default=None)

    def validate(self) -> "ExperimentConfig":
        check_name(self.name)
        _check(len(self.methods) >= 1, "", "methods", self.methods, f"a non-empty list from {list(METHODS)}")
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"methods: {m!r} is not a method; allowed: {', '.join(METHODS)}")
        _check(len(set(self.methods)) == len(self.methods), "", "methods", self.methods, "distinct methods")
        _check(len(self.seeds) >= 1 and all(isinstance(s, int) for s in self.seeds), "", "seeds", self.seeds,
               "a non-empty list of integers")
        _check(len(set(self.seeds)) == len(self.seeds), "", "seeds", self.seeds, "distinct seeds (each runs once)")
        _check_choice(self.device, ("auto", "cpu", "cuda"), "", "device")
        self.output_dir = expand_user(self.output_dir)
        _check_choice(self.precision, ("auto", "fp32", "bf16"), "", "precision")
        self.data.validate("data")
        self.teacher.validate("teacher")
        if self.teacher.init_from_teacher:
            raise ConfigError("teacher.init_from_teacher: only a student can be initialised from the teacher")
        self.student.validate("student")
        self.meta_teacher.validate("meta_teacher")
        self.distill.validate("distill")
        self.students.validate("students")
        check_layer_mapping(self.teacher, self.student, self.distill.layer_map, "student")
        if self.student.prune is not None:
            self.student.prune.check_experiment(self)
        if self.student.init_from_teacher:
            t, s = self.teacher.sizes(), self.student.sizes()
            if t and s and t[1] != s[1]:
                raise ConfigError(f"student.init_from_teacher: the student's hidden size {s[1]} differs from "
                                  f"the teacher's {t[1]}; copying layers needs equal hidden sizes")
        if self.search is not None:
            self.search.validate("search")
            check_global_batches(self, self.search.resources)
            _validate_candidates(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_global_batches(cfg: ExperimentConfig, resources: ResourcesConfig) -> None:
    """Each batch_size is global: it must split evenly over the workers that train with it."""
    for where, batch, workers, wfield in (
            ("teacher.batch_size", cfg.teacher.batch_size, resources.workers_per_trial, "workers_per_trial"),
            # independent student workers (no student_ddp) each take the whole batch of their own job
            ("distill.batch_size", cfg.distill.batch_size,
             resources.student_workers if resources.student_ddp else 1, "student_workers")):
        if batch % workers:
            raise ConfigError(f"{where}: {batch} is the global batch size and must be a multiple of "
                              f"search.resources.{wfield} ({workers}), so that every worker gets the same share")


def check_layer_mapping(teacher: ModelConfig, student: ModelConfig, mode: str, where: str) -> None:
    """Refuse (before training) student/teacher layer counts that layer_map cannot map."""
    t, s = teacher.sizes(), student.sizes()
    if t is None or s is None:
        return  # a checkpoint: checked once its config is loaded
    L, S = t[0], s[0]
    if S > L:
        raise ConfigError(f"{where}: the student has {S} layers but the teacher only {L}; a student "
                          f"layer must map onto a teacher layer")
    if mode == "exact" and L % S:
        raise ConfigError(f"{where}: student layers ({S}) do not map onto teacher layers ({L}): "
                          f"{L} is not a multiple of {S}; pick another size or set distill.layer_map: round")


# ----------------------------------------------------------------------------- helpers


def expand_user(path: str | None) -> str | None:
    """``~/x`` -> ``/home/me/x``, once, in ``validate``: every reader (data, models, storage) gets the
    expanded path. Expanded where the file is loaded (the sweep's driver), so ``~`` is that machine's."""
    return os.path.expanduser(path) if isinstance(path, str) and path.startswith("~") else path


def check_name(name: Any, where: str = "name") -> None:
    """A sweep or experiment name is one path component under the storage root: no '/', no '..'."""
    _check(isinstance(name, str) and bool(name) and all(c.isalnum() or c in "-_" for c in name),
           "", where, name, "letters, digits, '-' and '_' (it names a directory under the storage root)")


def _check(ok: bool, where: str, name: str, value: Any, allowed: str) -> None:
    if not ok:
        path = f"{where}.{name}" if where else name
        raise ConfigError(f"{path}: {value!r} is not allowed; expected {allowed}")


def _check_choice(value: Any, allowed: tuple, where: str, name: str) -> None:
    _check(value in allowed, where, name, value, "one of " + ", ".join(map(str, allowed)))


def _check_training(obj: Any, where: str, epoch_fields: tuple, lr_fields: tuple) -> None:
    for name in epoch_fields:
        _check(isinstance(getattr(obj, name), int) and getattr(obj, name) >= 1, where, name, getattr(obj, name),
               "an integer >= 1")
    for name in lr_fields:
        _check(0 < getattr(obj, name) < 1, where, name, getattr(obj, name), "a learning rate in (0, 1)")
    _check(obj.batch_size >= 1, where, "batch_size", obj.batch_size, "an integer >= 1")
    _check(0 <= obj.warmup_ratio < 1, where, "warmup_ratio", obj.warmup_ratio, "a number in [0, 1)")
    _check(obj.weight_decay >= 0, where, "weight_decay", obj.weight_decay, "a number >= 0")


def resolve_param_path(name: str) -> str:
    return PARAM_ALIASES.get(name, name)


def _validate_param(name: str, spec: ParamSpec, where: str, search: SearchConfig) -> None:
    path = resolve_param_path(name)
    try:
        current = get_path(ExperimentConfig(), path)
    except ConfigError:
        raise ConfigError(f"{where}: '{name}' is not a searchable setting; use one of {sorted(PARAM_ALIASES)} "
                          f"or a dotted path to a config field (e.g. distill.stage1_lr)") from None
    if isinstance(current, (DataConfig, TeacherConfig, SyntheticConfig, MetaTeacherConfig, DistillConfig)):
        raise ConfigError(f"{where}: '{name}' is a whole section; search one of its fields instead")
    _check_choice(spec.type, ("uniform", "loguniform", "int", "choice", "grid"), where, "type")
    if spec.type in ("uniform", "loguniform", "int"):
        for b in ("low", "high"):
            _check(isinstance(getattr(spec, b), (int, float)), where, b, getattr(spec, b), f"a number for type {spec.type}")
        _check(spec.low < spec.high, where, "high", spec.high, f"a number above low ({spec.low})")
        # the probes of _validate_candidates try low and high only; what is drawn between them must fit too
        field_type = _field_type(path)
        if spec.type != "int" and field_type is not float:
            raise ConfigError(f"{where}.type: {spec.type!r} draws real numbers but {path} takes "
                              f"{_type_name(field_type)}; use type: int for an integer field, choice otherwise")
        if spec.type == "int":
            _check(field_type in (int, float), where, "type", spec.type,
                   f"choice: {path} takes {_type_name(field_type)}, not a number")
            for b in ("low", "high"):
                _check(float(getattr(spec, b)).is_integer(), where, b, getattr(spec, b), "an integer for type int")
        if spec.type == "loguniform":
            _check(spec.low > 0, where, "low", spec.low, "a number > 0 for loguniform")
        _check(spec.values is None, where, "values", spec.values, f"nothing for type {spec.type} (use low/high)")
        if search.algorithm == "grid":
            raise ConfigError(f"{where}.type: {spec.type!r} cannot be enumerated by algorithm: grid; use grid or choice")
    else:
        _check(isinstance(spec.values, list) and len(spec.values) >= 1, where, "values", spec.values,
               "a non-empty list")
        _check(spec.low is None and spec.high is None, where, "low", spec.low, f"nothing for type {spec.type}")
        if spec.type == "grid" and search.algorithm != "grid":
            raise ConfigError(f"{where}.type: 'grid' needs search.algorithm: grid (got {search.algorithm!r}); "
                              f"use choice for sampled lists")
    if spec.when is not None:
        if search.algorithm == "grid":
            raise ConfigError(f"{where}.when: conditional parameters need algorithm optuna or random")
        _check(isinstance(spec.when, dict) and len(spec.when) == 1, where, "when", spec.when, "{param: value}")
        ((other, wanted),) = spec.when.items()
        if other not in search.params or other == name:
            raise ConfigError(f"{where}.when: '{other}' is not another searched parameter "
                              f"(have {sorted(search.params)})")
        chain, cur = [name], other
        while cur in search.params and search.params[cur].when:  # a -> b -> a is never sampled
            chain.append(cur)
            if cur == name:
                raise ConfigError(f"{where}.when: circular condition {' -> '.join(chain)}")
            cur = next(iter(search.params[cur].when))
            if cur in chain[1:]:
                break  # a cycle that does not pass through this parameter: reported at its own members
        target = search.params[other]
        if target.type in ("choice", "grid"):
            if wanted not in (target.values or []):
                raise ConfigError(f"{where}.when: {other} = {wanted!r} is never drawn; {other} takes "
                                  f"{target.values}, so {name} would never be sampled")
        elif target.type == "int":
            ok = isinstance(wanted, int) and not isinstance(wanted, bool) and target.low <= wanted <= target.high
            _check(ok, f"{where}.when", other, wanted, f"an integer in [{target.low}, {target.high}]")
        else:
            raise ConfigError(f"{where}.when: {other} is drawn from a continuous range ({target.type}); "
                              f"a condition on one exact value is never met: search {other} as choice")


def _field_type(path: str) -> Any:
    """The declared type of a dotted config field, Optional unwrapped (``student``: ModelConfig)."""
    parent_path, _, last = path.rpartition(".")
    parent = get_path(ExperimentConfig(), parent_path) if parent_path else ExperimentConfig()
    tp = get_type_hints(type(parent))[last]
    inner = [a for a in get_args(tp) if a is not type(None)]
    return inner[0] if type(None) in get_args(tp) and len(inner) == 1 else tp


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            ModelConfig: "a model (a preset name, checkpoint or sizes)",
            StudentConfig: "a student (a preset name, checkpoint, sizes or a prune block)"}.get(
        tp, f"a {getattr(tp, '__name__', tp)}")


def _validate_candidates(cfg: "ExperimentConfig") -> None:
    """Every searched candidate, applied to *this* sweep's config, must make a valid experiment."""
    for name, spec in cfg.search.params.items():
        path = resolve_param_path(name)
        for value in spec.values or [spec.low, spec.high]:
            probe = copy.deepcopy(cfg)
            probe.search = None
            try:
                set_path(probe, path, value)
                probe.validate()
                check_global_batches(probe, cfg.search.resources)
            except ConfigError as e:
                raise ConfigError(f"search.params.{name}: value {value!r} is invalid: {e}") from None


def get_path(cfg: Any, path: str) -> Any:
    """A dotted config field; an unset optional section (student.prune) reads as its defaults."""
    obj = cfg
    for part in path.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in fields(obj)}:
            raise ConfigError(f"{path}: no such config field")
        obj = _section(obj, part, create=False)
    return obj


def _section(obj: Any, name: str, create: bool) -> Any:
    """``obj.name``; when it is None and typed as an optional dataclass, a default one (set on ``obj``
    with ``create``), so that ``student.prune.sparsity`` is a path before a prune block exists."""
    value = getattr(obj, name)
    if value is None:
        inner = [a for a in get_args(get_type_hints(type(obj))[name]) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            value = inner[0]()
            if create:
                setattr(obj, name, value)
    return value


def set_path(cfg: Any, path: str, value: Any) -> None:
    """Set a dotted config field; ``student`` accepts a preset name or a dict of sizes."""
    parts = path.split(".")
    obj = cfg
    for part in parts[:-1]:
        obj = _section(obj, part, create=True)
    last = parts[-1]
    if path == "student":
        cfg.student = _student_from_value(value, cfg.student)
        return
    hints = get_type_hints(type(obj))
    if last not in hints:
        raise ConfigError(f"{path}: no such config field")
    setattr(obj, last, _coerce(value, hints[last], path))


def _student_from_value(value: Any, old: ModelConfig) -> StudentConfig:
    if isinstance(value, str):
        if value in PRESETS:
            return StudentConfig(preset=value, init_from_teacher=old.init_from_teacher)
        return StudentConfig(checkpoint=value, init_from_teacher=old.init_from_teacher)
    if isinstance(value, dict):
        inherited = {} if "prune" in value else {"init_from_teacher": old.init_from_teacher}  # a pruned one copies nothing
        return _build(StudentConfig, {**inherited, **value}, "student")
    raise ConfigError(f"student: {value!r} is not allowed; expected a preset name, checkpoint, a dict of sizes or "
                      f"{{prune: {{...}}}}")


# ----------------------------------------------------------------------------- YAML -> dataclasses


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        if args and dataclasses.is_dataclass(args[1]):
            return {str(k): _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:  # YAML 1.1 reads "5e-5" as a string; accept numeric strings
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # .inf, .nan and the strings "inf" / "nan" alike
            raise ConfigError(f"{path}: {value!r} is not allowed; expected a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, raw: dict, path: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key; allowed keys here: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(value, hints[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _refuse_preset_typo(name: str, section: str) -> None:
    """'tiny-teachr' would otherwise be tried as a hub id, and fail only after network retries.

    A typo is a name without '/' that is not a local path and is within two characters of a
    preset's length and difflib-close (ratio >= 0.8) to it; 'roberta-base' is not 'bert-base'.
    """
    if "/" in name or os.path.exists(os.path.expanduser(name)):
        return
    close = [p for p in difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.8) if abs(len(p) - len(name)) <= 2]
    if close:
        raise ConfigError(f"{section}.checkpoint: {name!r} is neither a preset nor a local path; did you mean the "
                          f"preset {close[0]!r}? (presets: {', '.join(sorted(PRESETS))})")


_MODEL_SOURCE_KEYS = {"preset", "checkpoint", "layers", "hidden", "heads", "intermediate"}  # not pooling


def from_dict(raw: dict, *, require_search: bool = False, source: str = "<dict>") -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a YAML mapping at the top level, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for section, default in (("teacher", "tiny-teacher"), ("student", "tiny-student")):
        value = raw.get(section)
        if isinstance(value, str):  # shorthand: teacher: bert-base
            raw[section] = {"preset": value} if value in PRESETS else {"checkpoint": value}
        if isinstance(value, dict) and not set(value) & (_MODEL_SOURCE_KEYS | {"prune"}):
            raw[section] = {"preset": default, **value}  # only training settings given
    if isinstance(raw.get("search"), dict) and "tracking" in raw["search"]:
        raw["search"]["tracking"] = tracking_from_list(raw["search"]["tracking"])
    cfg = _build(ExperimentConfig, raw, "")
    if require_search and cfg.search is None:
        raise ConfigError("search: missing; a sweep YAML needs a search section (see README)")
    return cfg.validate()


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # '<<: *base' then overriding a merged key is YAML's way to extend, not a duplicate
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)):
            continue
        line = key_node.start_mark.line + 1
        if key in first:
            raise ConfigError(f"line {line}: duplicate key {key!r} (first at line {first[key]}); "
                              f"YAML would silently keep only the last one")
        first[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(path: str | os.PathLike) -> dict:
    """The top-level mapping of a UTF-8 YAML file (a UTF-8 BOM is skipped); one-line ConfigErrors name the file.

    Refused: UTF-16 (or any non-UTF-8) text, a duplicate key, a file whose top level is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
    data = p.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data[:4096]:
        raise ConfigError(f"{p}: the file is UTF-16 (or another wide encoding); save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")  # a leading UTF-8 BOM (Windows editors) is dropped
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{p}: line {line}: byte 0x{data[e.start]:02x} is not UTF-8; "
                          f"save the file as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}: {where}not valid YAML: {problem}") from None
    if raw is None:
        raise ConfigError(f"{p}: the file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a YAML mapping at the top level (name:, data:, teacher:, ...), got "
                          f"a {type(raw).__name__}: {str(raw)[:40]!r}")
    return raw


def load_experiment(path: str | os.PathLike) -> ExperimentConfig:
    raw = load_yaml(path)
    try:
        return from_dict(raw, source=str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_sweep(path: str | os.PathLike) -> ExperimentConfig:
    raw = load_yaml(path)
    try:
        return from_dict(raw, require_search=True, source=str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def content_hash(obj: Any, length: int = 16) -> str:
    """Stable hash of a JSON-able object (dataclasses are expanded)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]




def field_docs(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, help) rows for the README's YAML reference."""
    rows = []
    for f in fields(cls):
        name = f"{prefix}{f.name}"
        tp = get_type_hints(cls)[f.name]
        inner = [a for a in get_args(tp) if a is not type(None)] or [tp]
        if dataclasses.is_dataclass(inner[0]) and inner[0] is not ParamSpec:
            rows.append((name, "", f.metadata.get("help", "")))
            rows.extend(field_docs(inner[0], name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ""
        rows.append((name, repr(default), f.metadata.get("help", "")))
    return rows


def reference_markdown() -> str:
    """The README's YAML reference table, generated from the dataclasses (a test keeps them equal)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| field | default | meaning |", "| --- | --- | --- |"]
    for name, default, text in field_docs(ExperimentConfig):
        if default == "":
            lines.append(f"| **`{name}`** | | {cell(text)} |")
        else:
            lines.append(f"| `{name}` | `{cell(default)}` | {cell(text)} |")
    lines += ["", "Each entry of `search.params`:", "", "| field | default | meaning |", "| --- | --- | --- |"]
    for name, default, text in field_docs(ParamSpec):
        lines.append(f"| `{name}` | `{cell(default)}` | {cell(text)} |")
    return "\n".join(lines)
