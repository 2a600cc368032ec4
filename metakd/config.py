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
    domain_column: str = _help("column naming the domain (e.g. genre for MNLI)", default="domain")
    hf_config: str | None = _help("datasets config name for source: hf", default=None)
    hf_train_split: str = _help("split of the hf dataset to train on", default="train")
    hf_test_split: str | None = _help("hf split used as test (e.g. validation_matched); None: carve from train", default=None)
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
        _check(
            isinstance(self.sample_rate, (int, float)) and 0 < self.sample_rate <= 1,
            where, "sample_rate", self.sample_rate, "a number in (0, 1]",
        )
        _check_choice(self.truncation, ("head", "head_tail"), where, "truncation")
        _check_choice(self.batching, ("random", "length_grouped"), where, "batching")
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
    teacher_cache_gb: float = _help("teacher_cache auto: most device memory (GiB) the stage-1 hidden states and "
                                    "attention maps may take (on CUDA also at most half of the free memory)",
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
class SearchConfig:
    params: dict[str, ParamSpec] = _help(
        f"searched parameters: a short name {sorted(PARAM_ALIASES)} or a dotted path "
        "(e.g. distill.stage1_lr) -> its spec", default_factory=dict)
    algorithm: str = _help("optuna (TPE) | grid | random", default="optuna")
    sampler: str = _help("optuna sampler: tpe | random", default="tpe")
    metric: str = _help("dev_accuracy | test_accuracy, averaged over domains and seeds of the first method", default="dev_accuracy")
    mode: str = _help("max | min", default="max")
    num_samples: int = _help("trials (optuna, random) or repeats of the grid (grid)", default=8)
    scheduler: SchedulerConfig | None = _help("optional ASHA early stopping of student trials", default=None)
    resources: ResourcesConfig = _help("Ray resources per trial", default_factory=ResourcesConfig)
    storage: str = _help("local path or pyarrow/fsspec URI (s3://, gs://) for teachers, data and results", default="runs/sweeps")

    def validate(self, where: str) -> None:
        _check_choice(self.algorithm, ("optuna", "grid", "random"), where, "algorithm")
        _check_choice(self.sampler, ("tpe", "random"), where, "sampler")
        _check_choice(self.metric, ("dev_accuracy", "test_accuracy"), where, "metric")
        _check_choice(self.mode, ("max", "min"), where, "mode")
        _check(self.num_samples >= 1, where, "num_samples", self.num_samples, "an integer >= 1")
        _check(len(self.params) >= 1, where, "params", self.params, "at least one searched parameter")
        for name, spec in self.params.items():
            _validate_param(name, spec, f"{where}.params.{name}", self)
        if self.scheduler is not None:
            self.scheduler.validate(f"{where}.scheduler")
        self.resources.validate(f"{where}.resources")
        _check(bool(self.storage), where, "storage", self.storage, "a path or URI")


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
    student: ModelConfig = _help("student model", default_factory=lambda: ModelConfig(preset="tiny-student"))
    meta_teacher: MetaTeacherConfig = _help("meta-teacher loss settings (section 1-2)", default_factory=MetaTeacherConfig)
    distill: DistillConfig = _help("meta-distillation settings (section 3-4)", default_factory=DistillConfig)
    search: SearchConfig | None = _help("sweeps only: the search space and how to run it", default=None)

    def validate(self) -> "ExperimentConfig":
        _check(bool(self.name) and all(c.isalnum() or c in "-_" for c in self.name),
               "", "name", self.name, "letters, digits, '-' and '_'")
        _check(len(self.methods) >= 1, "", "methods", self.methods, f"a non-empty list from {list(METHODS)}")
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"methods: {m!r} is not a method; allowed: {', '.join(METHODS)}")
        _check(len(set(self.methods)) == len(self.methods), "", "methods", self.methods, "distinct methods")
        _check(len(self.seeds) >= 1 and all(isinstance(s, int) for s in self.seeds), "", "seeds", self.seeds,
               "a non-empty list of integers")
        _check_choice(self.device, ("auto", "cpu", "cuda"), "", "device")
        _check_choice(self.precision, ("auto", "fp32", "bf16"), "", "precision")
        self.data.validate("data")
        self.teacher.validate("teacher")
        if self.teacher.init_from_teacher:
            raise ConfigError("teacher.init_from_teacher: only a student can be initialised from the teacher")
        self.student.validate("student")
        self.meta_teacher.validate("meta_teacher")
        self.distill.validate("distill")
        check_layer_mapping(self.teacher, self.student, self.distill.layer_map, "student")
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
        (other,) = spec.when
        if other not in search.params or other == name:
            raise ConfigError(f"{where}.when: '{other}' is not another searched parameter "
                              f"(have {sorted(search.params)})")

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
    obj = cfg
    for part in path.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in fields(obj)}:
            raise ConfigError(f"{path}: no such config field")
        obj = getattr(obj, part)
    return obj


def set_path(cfg: Any, path: str, value: Any) -> None:
    """Set a dotted config field; ``student`` accepts a preset name or a dict of sizes."""
    parts = path.split(".")
    obj = cfg
    for part in parts[:-1]:
        obj = getattr(obj, part)
    last = parts[-1]
    if path == "student":
        cfg.student = _student_from_value(value, cfg.student)
        return
    hints = get_type_hints(type(obj))
    if last not in hints:
        raise ConfigError(f"{path}: no such config field")
    setattr(obj, last, _coerce(value, hints[last], path))


def _student_from_value(value: Any, old: ModelConfig) -> ModelConfig:
    if isinstance(value, str):
        if value in PRESETS:
            return ModelConfig(preset=value, init_from_teacher=old.init_from_teacher)
        return ModelConfig(checkpoint=value, init_from_teacher=old.init_from_teacher)
    if isinstance(value, dict):
        return _build(ModelConfig, {"init_from_teacher": old.init_from_teacher, **value}, "student")
    raise ConfigError(f"student: {value!r} is not allowed; expected a preset name, checkpoint or a dict of sizes")


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
        if not isinstance(value, (int, float)):
            # YAML 1.1 reads "5e-5" as a string; accept numeric strings
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{path}: expected a number, got NaN")
        return float(value)
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
    """'tiny-teachr' would otherwise be tried as a hub id, and fail only after network retries."""
    if "/" in name or os.path.exists(os.path.expanduser(name)):
        return
    close = difflib.get_close_matches(name, PRESETS, n=1, cutoff=0.8)
    if close:
        raise ConfigError(f"{section}: {name!r} is neither a preset nor a local path; did you mean the preset "
                          f"{close[0]!r}? (presets: {', '.join(sorted(PRESETS))})")


_MODEL_SOURCE_KEYS = {"preset", "checkpoint", "layers", "hidden", "heads", "intermediate"}  # not pooling


def from_dict(raw: dict, *, require_search: bool = False, source: str = "<dict>") -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a YAML mapping at the top level, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for section, default in (("teacher", "tiny-teacher"), ("student", "tiny-student")):
        value = raw.get(section)
        if isinstance(value, str):  # shorthand: teacher: bert-base
            raw[section] = {"preset": value} if value in PRESETS else {"checkpoint": value}
        model = raw.get(section)
        if isinstance(model, dict) and isinstance(model.get("checkpoint"), str):
            _refuse_preset_typo(model["checkpoint"], section)
        elif isinstance(value, dict) and not set(value) & _MODEL_SOURCE_KEYS:
            raw[section] = {"preset": default, **value}  # only training settings given
    cfg = _build(ExperimentConfig, raw, "")
    if require_search and cfg.search is None:
        raise ConfigError("search: missing; a sweep YAML needs a search section (see README)")
    return cfg.validate()


def load_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    with open(p) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if raw is None:
        raise ConfigError(f"{p}: the file is empty")
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
