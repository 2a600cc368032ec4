"""Checks that need the data and model files, run on this machine before any expensive work.

``metakd validate`` runs them after the schema checks of :mod:`metakd.config`; ``metakd run``
and a local ``metakd sweep`` run them before starting Ray or training. They read the data
with the same loader that training uses (:func:`metakd.data.load_multidomain`), so they
catch what training would catch (a missing path, an unknown domain, a missing column, a
label out of range, a line that does not parse, with its file and line number) without
tokenising or training anything.

What lives elsewhere (a hub id, or with ``remote=True`` a path that only exists on the cluster)
is not fetched: :func:`preflight` returns one note saying so. A data path that is a URI is
refused (the sources read local files), and so is a missing path that looks like one
(``./x``, ``/x``, ``~/x``, ``a/b/c``) rather than passing as a hub id. A hub id is
refused here when the hub cannot be reached (``HF_HUB_OFFLINE``, or no answer to one 3 s request)
and the id is not in the local cache, instead of failing after ~50 s of retries.

``remote=True`` means training runs elsewhere (a cluster sweep, ``validate --remote``): then
``device: cuda``, the hub's reachability and paths missing here are the cluster's business.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from pathlib import Path

from .config import ConfigError, ExperimentConfig, ModelConfig, check_layer_mapping

HUB_PROBE_TIMEOUT_S = 3.0


def is_hub_id(name: str) -> bool:
    """A well-formed Hugging Face repo id ('name' or 'namespace/name'), as the hub defines it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _is_uri(path: str) -> bool:
    return "://" in path


def check_checkpoint(spec: ModelConfig, where: str, remote: bool = False) -> str | None:
    """Refuse a checkpoint that is neither a local directory nor a well-formed hub id.

    Returns a note when the checkpoint cannot be checked here (a hub id that is not a local
    directory; with ``remote`` a path that does not exist on this machine), else None.
    """
    name = spec.checkpoint
    if not name:
        return None
    local = Path(os.path.expanduser(name))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"{where}.checkpoint: directory '{name}' has no config.json; expected a "
                              f"Hugging Face model directory (config.json + weights)")
        if not any(any(local.glob(pattern)) for pattern in _WEIGHTS):
            raise ConfigError(f"{where}.checkpoint: directory '{name}' has a config.json but no weights "
                              f"({', '.join(_WEIGHTS)}); an interrupted download or save?")
        return None
    if local.exists():
        raise ConfigError(f"{where}.checkpoint: '{name}' is a file; expected a model directory or a hub id")
    if is_hub_id(name):
        why = None if remote else hub_unreachable()
        if why is None:
            return f"{where}.checkpoint '{name}': a hub id, not a local directory; not checked here (loaded by id)"
        from huggingface_hub import constants, try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return (f"{where}.checkpoint '{name}': the hub is unreachable ({why}); loaded from the local cache "
                    f"(export HF_HUB_OFFLINE=1 to skip the hub's retries)")
        raise ConfigError(f"{where}.checkpoint: '{name}' is a hub id, but the hub is unreachable ({why}) and it "
                          f"is not in the local cache ({constants.HF_HUB_CACHE}); download it where there is "
                          f"network (huggingface-cli download {name}) or give a local directory")
    if remote and (name.startswith("/") or _is_uri(name)):
        return f"{where}.checkpoint '{name}': not on this machine; not checked here (a cluster path)"
    raise ConfigError(f"{where}.checkpoint: '{name}' is neither a local directory nor a well-formed Hugging "
                      f"Face hub id ('name' or 'namespace/name'; letters, digits, '-', '_', '.'); relative "
                      f"paths are resolved from {os.getcwd()}")


def searched_checkpoints(cfg: ExperimentConfig, remote: bool = False) -> list[str]:
    """:func:`check_checkpoint` for every checkpoint a search may try: the values of a searched
    ``student`` (a checkpoint name or a mapping with ``checkpoint``), ``student.checkpoint`` and
    ``teacher.checkpoint``, each named by its place in ``search.params``. Notes, one per hub id."""
    import copy

    from .config import set_path

    if cfg.search is None:
        return []
    notes = []
    for param, spec in (cfg.search.params or {}).items():
        if param not in ("student", "student.checkpoint", "teacher.checkpoint") or not spec.values:
            continue
        for i, value in enumerate(spec.values):
            where = f"search.params.{param}.values[{i}]"
            if param == "student":
                trial = copy.deepcopy(cfg)
                set_path(trial, "student", value)  # as a trial's config gets it
                model = trial.student
            elif not isinstance(value, str):
                continue  # the schema refuses it, naming the value
            else:
                model = ModelConfig(checkpoint=value)
            note = check_checkpoint(model, where, remote)
            if note:
                notes.append(note)
    return notes


_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")  # what AutoModel.from_pretrained loads (shards included)


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from here; None when it answers.

    ``HF_HUB_OFFLINE`` answers without the network; else one HEAD request to the hub's endpoint
    (``HF_ENDPOINT``; proxies from the environment) with a 3 s timeout, asked once per process.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    return _probe(constants.ENDPOINT)


@functools.lru_cache(maxsize=4)
def _probe(endpoint: str) -> str | None:
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S)
    except urllib.error.HTTPError:
        return None  # it answered, if only with an error status: it is reachable
    except (urllib.error.URLError, OSError) as e:
        return f"no answer from {endpoint} within {HUB_PROBE_TIMEOUT_S:.0f} s: {getattr(e, 'reason', e)}"
    return None


def _dataset_cached(name: str) -> bool:
    """Whether a hub dataset left files in the hub cache or in datasets' own cache on this machine."""
    from huggingface_hub import constants

    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    return ((Path(constants.HF_HUB_CACHE) / ("datasets--" + name.replace("/", "--"))).is_dir()
            or (datasets_cache / name.replace("/", "___")).is_dir())


def check_device(cfg: ExperimentConfig) -> None:
    """``device: cuda`` where training runs on this machine (not on a cluster, whose driver may lack a GPU)."""
    if cfg.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' is not available on this machine (torch.cuda.is_available() is False); "
                          "use auto (CUDA when there is one, else CPU) or cpu, or train on a GPU machine")


def check_writable_dir(path: str, where: str) -> None:
    """A local directory that training will create or write into: not a file, and writable."""
    p = Path(os.path.expanduser(path))
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{where}: '{path}' is a file; expected a directory (it is created if missing)")
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{where}: '{path}' cannot be created: '{existing}' is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: '{path}' is not writable by this user ('{existing}' is read-only)")


def check_output(cfg: ExperimentConfig, storage: str | None = None, name: str | None = None) -> None:
    """Where ``metakd run`` (output_dir) or a sweep (search.storage, local paths only) will write."""
    if cfg.search is None:
        where, base = "output_dir", cfg.output_dir
    else:
        where, base = ("--storage" if storage else "search.storage"), storage or cfg.search.storage
        if "://" in base:
            return  # an object store: its credentials are checked by the first write
    check_writable_dir(base, where)
    check_writable_dir(str(Path(os.path.expanduser(base)) / (name or cfg.name)), where)


def _layer_count(spec: ModelConfig) -> int | None:
    if spec.sizes() is not None:
        return spec.sizes()[0]
    if spec.checkpoint and Path(os.path.expanduser(spec.checkpoint)).is_dir():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(os.path.expanduser(spec.checkpoint)).num_hidden_layers
    return None


def check_layers(cfg: ExperimentConfig) -> None:
    """The layer map of checkpoints whose config is on this machine (presets are checked by the schema)."""
    L, S = _layer_count(cfg.teacher), _layer_count(cfg.student)
    prune = getattr(cfg.student, "prune", None)
    if prune is not None and cfg.teacher.sizes() is None and L is not None:  # a pruned copy of a checkpoint
        from transformers import AutoConfig

        heads = AutoConfig.from_pretrained(os.path.expanduser(cfg.teacher.checkpoint)).num_attention_heads
        prune.check_heads(L, heads)
    if L is None or S is None or (cfg.teacher.sizes() and cfg.student.sizes()):
        return
    fake = lambda n: ModelConfig(layers=n, hidden=8, heads=1, intermediate=8)  # noqa: E731 - only the count matters
    check_layer_mapping(fake(L), fake(S), cfg.distill.layer_map, "student")


def data_location(cfg: ExperimentConfig, remote: bool = False) -> str | None:
    """None when the data can be read here, else a note saying where it lives."""
    d = cfg.data
    if d.source == "synthetic":
        return None
    path = str(d.path)
    if _is_uri(path):
        raise ConfigError(f"data.path: '{path}' is a URI; source '{d.source}' reads local files (or, for hf, a hub "
                          f"id): copy the data to a path that every node can read")
    if Path(os.path.expanduser(path)).exists():
        return None
    from .data.sources import looks_like_path

    if d.source == "hf" and is_hub_id(path) and not looks_like_path(path):
        why = None if remote else hub_unreachable()
        if why is None:
            return f"data.path '{path}': a Hugging Face hub dataset; not checked here (loaded by id)"
        if _dataset_cached(path):
            return (f"data.path '{path}': the hub is unreachable ({why}); read from the local cache "
                    f"(export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 to skip the hub's retries)")
        raise ConfigError(f"data.path: '{path}' is neither a local path nor reachable: a hub dataset id, but the "
                          f"hub is unreachable ({why}) and it is not in the local cache; relative paths are "
                          f"resolved from {os.getcwd()}")
    if remote:
        return f"data.path '{path}': not on this machine; not checked here (a cluster path)"
    kind = "a local path, not a hub id 'name' or 'namespace/name'" if d.source == "hf" else \
        f"source '{d.source}' reads local files"
    raise ConfigError(f"data.path: '{path}' does not exist ({kind}; relative paths are resolved from {os.getcwd()})")


def check_data(cfg: ExperimentConfig) -> list[str]:
    """Read and validate the data as training would (no tokenising). Notes: a one-line summary,
    the rows of each domain and class (all splits), and what reading left out (unlabelled rows,
    unused splits) or inferred (splits from file names)."""
    from .data import load_multidomain

    data = load_multidomain(cfg.data, seed=cfg.seeds[0])
    sizes = ", ".join(f"{d}: {int((data.train.domains == k).sum())}" for k, d in enumerate(data.domains))
    names = data.label_names or [str(c) for c in range(data.num_labels)]
    per_class = "; ".join(f"{d} {{" + ", ".join(f"{names[c]}: {n}" for c, n in enumerate(counts)) + "}"
                          for d, counts in data.class_counts().items())
    return ([f"data: {data.name}, {data.num_labels} labels"
             + (f" {data.label_names}" if data.label_names else "") + f", training examples per domain {{{sizes}}}",
             f"data: rows per domain and class (train + dev + test): {per_class}"]
            + [f"data: {note}" for note in data.notes])


def preflight(cfg: ExperimentConfig, remote: bool = False, read_data: bool = True, storage: str | None = None,
              name: str | None = None) -> list[str]:
    """Every local check; raises ``ConfigError`` / ``DataError`` naming the field or file. Returns notes.

    ``storage`` / ``name``: a sweep's --storage / --name overrides, checked instead of the YAML's.
    """
    notes = []
    if remote:
        if cfg.device == "cuda":
            notes.append("device 'cuda': checked where the trials train (the cluster), not here")
    else:
        check_device(cfg)
        check_output(cfg, storage, name)
    notes += [n for n in (check_checkpoint(cfg.teacher, "teacher", remote),
                          check_checkpoint(cfg.student, "student", remote)) if n]
    notes += searched_checkpoints(cfg, remote)
    check_layers(cfg)
    where = data_location(cfg, remote)
    if where is not None:
        notes.append(where)
    elif read_data:
        notes += check_data(cfg)
    return notes
