"""``metakd plan FILE``: what a sweep (or ``metakd run``) will train and what that costs, before
anything runs. Starts no Ray, needs no GPU.

- Trials: a grid's points x ``num_samples``; an Optuna or random search's trials already in its
  study (:mod:`metakd.sweep.study`), then draws of its space by a random sampler for the rest (an
  estimate: TPE picks its values from the results as they come in).
- Teachers and student jobs: every trial planned as its driver will plan it
  (:func:`metakd.jobs.experiment.plan`: same keys, same precision on the sweep's resources),
  counted once over the sweep, and looked up in the artifact cache (:mod:`metakd.jobs.cache`).
- FLOPs of what is missing (:mod:`metakd.flops`, every sequence padded to ``data.max_length``):
  a teacher trains 3 x forward over its epochs, then one forward over the training data for its
  stored outputs (and, for meta-teachers, one for the prototype features of each initial encoder);
  a distilled student takes stage-1 and stage-2 steps over its target domain (the teacher's outputs
  come from the cache; stage 1 adds one teacher forward for its cached states), a fine-tuned one
  3 x forward over its epochs; a pruned student is counted as the teacher's size over its epochs
  (an upper estimate).
- GPU-hours at ``--mfu`` of ``--gpu``'s dense bf16 peak; wall time on ``--gpus`` GPUs (default:
  what ``max_concurrent_trials`` trials take at once), teachers as the sweep runs them
  (``workers_per_trial`` workers each, side by side as they fit), then the students in the sweep's
  student slots, longest first; the two phases do not overlap here (an upper estimate).

The data is read only when it is on this machine (synthetic, local files): then the example
counts are exact and the keys, which hold the data's content fingerprint, match the cache's.
Otherwise the counts are the paper's datasets' (Amazon reviews, MNLI) and the cache is not
consulted.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .. import flops
from ..config import PRESETS, ExperimentConfig, ModelConfig, content_hash
from ..methods import METHODS, TEACHER_KINDS
from ..storage import Store

# The paper's datasets, for data that is not on this machine: labelled examples per domain and
# the share of them that trains (81/9/10 splits; MNLI's first 90 % of train, its dev the rest).
PAPER_DATA = {
    "amazon": ({"books": 2000, "dvd": 2000, "electronics": 2000, "kitchen": 2000}, 0.81),
    "mnli": ({"fiction": 77348, "government": 77350, "slate": 77306, "telephone": 83348, "travel": 77350}, 0.90),
}
# checkpoints whose sizes are known without their config.json
CHECKPOINT_SIZES = {
    "bert-base-uncased": "bert-base", "bert-base-cased": "bert-base", "google-bert/bert-base-uncased": "bert-base",
    "huawei-noah/TinyBERT_General_4L_312D": "tinybert-4l", "huawei-noah/TinyBERT_General_6L_768D": "tinybert-6l",
}


@dataclass
class DataInfo:
    """What the plan knows of one data configuration."""
    domains: list[str]
    train: dict[int, dict[str, int]]  # seed -> domain -> training examples (after sample_rate)
    fingerprint: str | None
    exact: bool  # read here (or found prepared in the cache): the keys are the real ones
    how: str


@dataclass
class Item:
    """One artifact the sweep needs: its kind ("data", "teacher", "student"), its rel path in the
    cache, the FLOPs of training it (None: unknown here) and whether the cache holds it."""
    kind: str
    rel: str
    flops: float | None = None
    cached: bool = False


@dataclass
class Plan:
    cfg: ExperimentConfig
    trials: list[dict]
    drawn: int  # trials drawn here (optuna / random) rather than known
    items: dict[str, Item] = field(default_factory=dict)  # rel -> item
    per_trial: list[tuple[int, int]] = field(default_factory=list)  # (teachers, student jobs) of each trial
    data: list[DataInfo] = field(default_factory=list)
    cache: str = ""
    cache_note: str | None = None  # why the cache was not consulted


def checkpoint_sizes(spec: ModelConfig) -> tuple[int, int, int, int] | None:
    """(layers, hidden, heads, intermediate) of a model spec: its preset or sizes, a local
    checkpoint's config.json, a known hub checkpoint, or one in the local hub cache; else None."""
    if spec.sizes() is not None:
        return spec.sizes()
    name = spec.checkpoint
    if not name:
        return None
    if name in CHECKPOINT_SIZES:
        return PRESETS[CHECKPOINT_SIZES[name]]
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(name, local_files_only=True)
        return (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size)
    except Exception:  # noqa: BLE001 - not here: the FLOPs are unknown
        return None


def trials(cfg: ExperimentConfig, root: str | None = None) -> tuple[list[dict], int]:
    """(every trial's searched values, how many of them were drawn here); see the module doc."""
    from .space import DefineByRun

    s = cfg.search
    if s is None:
        return [{}], 0
    if s.algorithm == "grid":
        names = list(s.params)
        points = [dict(zip(names, values)) for values in itertools.product(*(s.params[n].values for n in names))]
        return [p for p in points for _ in range(s.num_samples)], 0
    known = _study_trials(cfg, root) if root else []
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        space, drawn = DefineByRun(s.params), []
        for _ in range(max(0, s.num_samples - len(known))):
            trial = study.ask()
            space(trial)
            drawn.append(dict(trial.params))
    finally:
        optuna.logging.set_verbosity(verbosity)
    return known + drawn, len(drawn)


def _study_trials(cfg: ExperimentConfig, root: str) -> list[dict]:
    from . import study

    try:
        found = study.load_study(root)
    except Exception:  # noqa: BLE001 - an unreadable study: plan as if new
        return []
    return [dict(t.params) for t in found.get_trials(deepcopy=False)] if found is not None else []


def data_info(cfg: ExperimentConfig, cache: Store | None) -> DataInfo:
    """Domains and training examples per seed of ``cfg.data``; see the module doc."""
    from ..data import data_key, fingerprint

    d = cfg.data
    if on_this_machine(cfg):
        from ..data import load_full
        from ..data.splits import apply_sample_rate

        contents = fingerprint(d)
        checkpoint = cfg.teacher.checkpoint or cfg.student.checkpoint
        train, domains, full = {}, None, None
        for seed in cfg.seeds:
            rel = f"data/{data_key(d, seed, checkpoint, contents)}"
            meta = _prepared_meta(cache, rel)
            if meta is None:
                full = full or load_full(d)
                data = apply_sample_rate(full, d, seed)
                meta = {"domains": data.domains, "counts": data.counts()}
            domains = meta["domains"]
            train[seed] = dict(meta["counts"]["train"])
        return DataInfo(domains, train, contents, True, "read here")
    name = "mnli" if d.source == "hf" and "nli" in str(d.path).lower() else d.source
    if name not in PAPER_DATA:
        if not d.domains:
            raise ValueError(f"data.path {d.path} is not on this machine and data.domains is unset: the plan "
                             f"cannot tell the domains (set data.domains, or plan where the data is)")
        return DataInfo(list(d.domains), {s: {} for s in cfg.seeds}, None, False, "not on this machine")
    sizes, share = PAPER_DATA[name]
    domains = list(d.domains) if d.domains else list(sizes)
    per = {dom: max(1, round(sizes.get(dom, 0) * share * d.sample_rate)) for dom in domains if dom in sizes}
    return DataInfo(domains, {s: dict(per) for s in cfg.seeds}, None, False,
                    f"not on this machine: the paper's {name} sizes")


def on_this_machine(cfg: ExperimentConfig) -> bool:
    """Whether ``cfg.data`` can be read here without the network: synthetic, or an existing local path."""
    from ..data.sources import local_path

    d = cfg.data
    return d.source == "synthetic" or (d.path is not None and "://" not in str(d.path) and local_path(d.path).exists())


def _prepared_meta(cache: Store | None, rel: str) -> dict | None:
    try:
        return cache.read_json(f"{rel}/meta.json") if cache is not None and cache.is_complete(rel) else None
    except Exception:  # noqa: BLE001 - an unreachable or unreadable cache: read the data instead
        return None


def make_plan(cfg: ExperimentConfig, root: str | None, cache_root: str | None) -> Plan:
    """Every trial's teachers and student jobs, counted once, with their FLOPs and cache state."""
    from ..jobs.experiment import plan as plan_experiment
    from ..data import data_key
    from .space import trial_config

    searched, drawn = trials(cfg, root)
    out = Plan(cfg, searched, drawn, cache=cache_root or "")
    cache = None
    # an object store is asked only when the keys can be known (the data is here): no network call for nothing
    if cache_root and ("://" not in cache_root or on_this_machine(cfg)):
        try:
            cache = Store(cache_root)
        except Exception as e:  # noqa: BLE001 - credentials, an unknown bucket...
            out.cache_note = f"cache {cache_root} not reachable ({type(e).__name__}: {e}); counted as missing"
    r = cfg.search.resources if cfg.search else None
    teacher_gpus = float(r.gpus_per_worker) if r else None
    student_gpus = float(r.student_gpus()) if r else None
    infos: dict[str, DataInfo] = {}
    features: set[tuple] = set()
    for params in searched:
        tcfg = trial_config(cfg, params) if params else _copy(cfg)
        data_id = json.dumps(tcfg.to_dict()["data"], sort_keys=True) + json.dumps(tcfg.seeds)
        if data_id not in infos:
            infos[data_id] = data_info(tcfg, cache)
            out.data.append(infos[data_id])
        info = infos[data_id]
        specs, jobs = plan_experiment(tcfg, info.domains, teacher_gpus, student_gpus, info.fingerprint)
        out.per_trial.append((len(specs), len(jobs)))
        checkpoint = tcfg.teacher.checkpoint or tcfg.student.checkpoint
        data_rels = {}
        for seed in tcfg.seeds:
            # without the data here its key is unknown (it holds the fingerprint): one stand-in per config and seed
            key = data_key(tcfg.data, seed, checkpoint, info.fingerprint) if info.exact else \
                content_hash({"data": tcfg.to_dict()["data"], "seed": seed if tcfg.data.sample_rate < 1 else None,
                              "checkpoint": checkpoint})  # as data_key: the seed matters only when it subsamples
            rel = data_rels[seed] = f"data/{key}"
            out.items.setdefault(rel, Item("data", rel))
        for spec in specs:
            if spec.rel not in out.items:
                out.items[spec.rel] = _teacher_item(tcfg, spec, info, data_rels[spec.seed], features)
        for job in jobs:
            if job.rel not in out.items:
                out.items[job.rel] = _student_item(tcfg, job, info)
    exact = all(i.exact for i in out.data)
    if not exact:
        out.cache_note = out.cache_note or ("the data is not on this machine, so the keys (which hold its content "
                                            "fingerprint) are not known here: every artifact counted as missing")
    elif cache is not None and out.cache_note is None:
        try:
            for item in out.items.values():
                item.cached = cache.is_complete(item.rel)
        except Exception as e:  # noqa: BLE001
            out.cache_note = f"cache {cache_root} not reachable ({type(e).__name__}: {e}); counted as missing"
            for item in out.items.values():
                item.cached = False
    return out


def _copy(cfg: ExperimentConfig) -> ExperimentConfig:
    c = copy.deepcopy(cfg)
    c.search = None
    return c


def _examples(info: DataInfo, seed: int, domains: list[str]) -> int | None:
    counts = info.train.get(seed, {})
    if not all(d in counts for d in domains):
        return None
    return sum(counts[d] for d in domains)


def _teacher_item(cfg: ExperimentConfig, spec, info: DataInfo, data_rel: str, features: set) -> Item:
    kind = TEACHER_KINDS[spec.kind]
    ids = kind.domain_ids(spec.domain, info.domains)
    n = _examples(info, spec.seed, [info.domains[i] for i in ids])
    n_all = _examples(info, spec.seed, info.domains)
    sizes = checkpoint_sizes(cfg.teacher)
    if n is None or n_all is None or sizes is None:
        return Item("teacher", spec.rel)
    seq = cfg.data.max_length
    total = flops.teacher_step(sizes, n * cfg.teacher.epochs, seq) + flops.encoder_forward(sizes, n_all, seq)
    # one features pass per initial encoder (a checkpoint, or the seed's random init), data and precision,
    # shared by every meta-teacher with that key (metakd.train.features)
    init = (cfg.teacher.checkpoint or f"seed {spec.seed}", data_rel, spec.precision)
    if kind.meta and cfg.meta_teacher.prototype_weighting and init not in features:
        features.add(init)
        total += flops.encoder_forward(sizes, n_all, seq)
    return Item("teacher", spec.rel, total)


def _student_item(cfg: ExperimentConfig, job, info: DataInfo) -> Item:
    n = _examples(info, job.seed, [job.domain])
    teacher = checkpoint_sizes(cfg.teacher)
    prune = getattr(cfg.student, "prune", None)
    student = teacher if prune is not None else checkpoint_sizes(cfg.student)
    if n is None or teacher is None or student is None:
        return Item("student", job.rel)
    d, seq = cfg.distill, cfg.data.max_length
    if prune is not None:
        epochs = prune.epochs if prune.structure == "unstructured" else \
            prune.retrain_epochs * math.ceil(prune.sparsity / prune.step - 1e-9)
        total = flops.stage2_step(student, teacher, n * epochs, seq, teacher_runs=False)
    elif not METHODS[job.method].distills:
        total = 3 * flops.encoder_forward(student, n * d.epochs, seq)
    else:
        tkd = METHODS[job.method].domain_expertise and d.gamma2 > 0
        teacher_runs = d.teacher_cache == "off"
        once = 0.0 if teacher_runs else flops.encoder_forward(teacher, n, seq)  # the cached stage-1 states
        if d.schedule == "joint":
            total = flops.stage1_step(student, teacher, n * d.epochs, seq, teacher_runs, tkd) + once
        else:
            total = (flops.stage1_step(student, teacher, n * d.stage1_epochs, seq, teacher_runs, tkd)
                     + (once if d.stage1_epochs else 0.0)
                     + flops.stage2_step(student, teacher, n * d.stage2_epochs, seq, teacher_runs))
    return Item("student", job.rel, total)


# ---------------------------------------------------------------- time

def lpt_makespan(durations: list[float], machines: int) -> float:
    """Wall time of ``durations`` on ``machines`` identical slots, longest first to the freest slot."""
    if not durations:
        return 0.0
    free = [0.0] * max(1, machines)
    for d in sorted(durations, reverse=True):
        i = free.index(min(free))
        free[i] += d
    return max(free)


@dataclass
class Estimate:
    peak_tflops: float
    mfu: float
    gpus: float  # in the cluster
    teacher_gpu_h: float
    student_gpu_h: float
    teacher_wall_h: float
    student_wall_h: float
    teacher_slots: int
    student_slots: int
    unknown: int  # missing items without a FLOP count


def estimate(plan: Plan, peak_tflops: float, mfu: float, gpus: float | None = None) -> Estimate:
    """GPU-hours and wall time of what the plan has to train; see the module doc."""
    r = plan.cfg.search.resources if plan.cfg.search else None
    per_teacher = (r.workers_per_trial * (r.gpus_per_worker or 1)) if r else 1
    per_student = (r.student_gpus() or 1) if r else 1
    student_slots_max = (r.max_concurrent_trials * r.student_workers) if r else 1
    if gpus is None:
        gpus = max(per_teacher, per_student * r.student_workers) * r.max_concurrent_trials if r else 1
    rate = peak_tflops * 1e12 * mfu  # FLOP/s of one GPU
    todo = [i for i in plan.items.values() if not i.cached and i.kind != "data"]
    unknown = sum(i.flops is None for i in todo)
    teachers = [i.flops / rate / 3600 for i in todo if i.kind == "teacher" and i.flops is not None]
    students = [i.flops / rate / 3600 for i in todo if i.kind == "student" and i.flops is not None]
    t_slots = max(1, min(len(teachers) or 1, int(gpus // per_teacher) if r else 1))
    s_slots = max(1, min(len(students) or 1, student_slots_max, int(gpus / per_student + 1e-9) if r else 1))
    # a teacher run's workers share its FLOPs (DDP); a student on a GPU fraction runs at that fraction
    return Estimate(peak_tflops, mfu, gpus, sum(teachers), sum(students),
                    lpt_makespan([h / per_teacher for h in teachers], t_slots),
                    lpt_makespan([h / per_student for h in students], s_slots), t_slots, s_slots, unknown)


# ---------------------------------------------------------------- output

def _hours(h: float) -> str:
    return f"{h * 3600:.2g} s" if h < 1 / 60 else f"{h * 60:.1f} min" if h < 1 else f"{h:.1f} h"


def format_plan(plan: Plan, est: Estimate, gpu: str, source: str) -> str:
    cfg, s = plan.cfg, plan.cfg.search
    lines = []
    what = f"sweep '{cfg.name}', {s.algorithm}" if s else f"experiment '{cfg.name}' (metakd run)"
    lines.append(f"metakd plan {source}: {what}; methods {', '.join(cfg.methods)}; seeds {cfg.seeds}")
    lines.append(f"cache: {plan.cache}" + (f" ({plan.cache_note})" if plan.cache_note else ""))
    for info in plan.data:
        seed = next(iter(info.train))
        counts = ", ".join(f"{d} {info.train[seed].get(d, '?')}" for d in info.domains)
        lines.append(f"data ({info.how}): {len(info.domains)} domains; training examples (seed {seed}): {counts}")
    drawn = f", {plan.drawn} of them drawn here at random (Optuna picks them as results come in)" \
        if plan.drawn else ""
    lines.append(f"trials: {len(plan.trials)}{drawn}")
    for i, (params, (nt, nj)) in enumerate(zip(plan.trials, plan.per_trial)):
        if i == 20 and len(plan.trials) > 24:
            lines.append(f"  ... {len(plan.trials) - 20} more")
            break
        values = " ".join(f"{k}={_short(v)}" for k, v in params.items()) or "(one configuration)"
        lines.append(f"  trial {i}: {values}: {nt} teachers, {nj} student jobs")
    lines.append("")
    header = f"{'':16}{'distinct':>9}{'in cache':>10}{'to train':>10}{'PFLOPs':>12}{'GPU-hours':>11}"
    lines.append(header)
    rate = est.peak_tflops * 1e12 * est.mfu
    for kind, name in (("data", "prepared data"), ("teacher", "teachers"), ("student", "student jobs")):
        items = [i for i in plan.items.values() if i.kind == kind]
        todo = [i for i in items if not i.cached]
        if kind == "data":
            lines.append(f"{name:16}{len(items):>9}{len(items) - len(todo):>10}{len(todo):>10}")
            continue
        total = sum(i.flops for i in todo if i.flops is not None)
        unknown = "+?" if any(i.flops is None for i in todo) else ""
        lines.append(f"{name:16}{len(items):>9}{len(items) - len(todo):>10}{len(todo):>10}"
                     f"{total / 1e15:>11.3g}{unknown:1}{total / rate / 3600:>11.3g}")
    lines.append("")
    r = s.resources if s else None
    cpu = r is None or not r.gpus_per_worker
    lines.append(f"estimate on {gpu} ({est.peak_tflops:g} TFLOP/s dense bf16) at MFU {est.mfu:g}, sequences "
                 f"padded to {cfg.data.max_length} tokens" + (": the resources name no GPUs, each worker is "
                                                              "counted as one" if cpu else ""))
    lines.append(f"  GPU-hours: {est.teacher_gpu_h + est.student_gpu_h:.3g} (teachers {est.teacher_gpu_h:.3g}, "
                 f"students {est.student_gpu_h:.3g})" + (f"; {est.unknown} artifact(s) without a FLOP count "
                                                          f"(model sizes or data unknown here)" if est.unknown else ""))
    if r is not None:
        lines.append(f"  on {est.gpus:g} GPUs: teachers {est.teacher_slots} at a time ({r.workers_per_trial} worker(s) "
                     f"x {r.gpus_per_worker or 1:g} GPU each) ~ {_hours(est.teacher_wall_h)}; students "
                     f"{est.student_slots} at a time ({r.student_gpus() or 1:g} GPU each) ~ "
                     f"{_hours(est.student_wall_h)}")
    lines.append(f"  wall time ~ {_hours(est.teacher_wall_h + est.student_wall_h)} of compute (teachers, then "
                 f"students: the sweep overlaps them; start-up of Ray and of each run, tens of seconds, not counted)")
    return "\n".join(lines)


def _short(v) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else f"{v:g}" if isinstance(v, float) else str(v)


def plan_file(path: str, storage: str | None = None, name: str | None = None, gpu: str = "H100",
              mfu: float = 0.4, gpus: float | None = None, peak_tflops: float | None = None) -> str:
    """The text ``metakd plan`` prints for the YAML at ``path``."""
    from ..config import ConfigError, load_experiment, load_sweep, load_yaml
    from ..jobs.cache import cache_root
    from .tuner import sweep_root

    raw = load_yaml(path)
    cfg = load_sweep(path) if "search" in raw else load_experiment(path)
    peak = peak_tflops or flops.peak_bf16_tflops(gpu)
    if peak is None:
        raise ConfigError(f"--gpu {gpu}: no known bf16 peak; give --peak-tflops")
    if cfg.search is not None:
        storage = storage or cfg.search.storage
        root = sweep_root(storage, name or cfg.name)
        cache = cache_root(storage, cfg.search.cache)
    else:
        root = str(Path(cfg.output_dir) / (name or cfg.name))
        cache = cache_root(cfg.output_dir)
    plan = make_plan(cfg, root if "://" not in root else None, cache)
    return format_plan(plan, estimate(plan, peak, mfu, gpus), gpu, path)
