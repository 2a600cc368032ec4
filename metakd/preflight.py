"""Checks that need the data and model files, run on this machine before any expensive work.

``metakd validate`` runs them after the schema checks of :mod:`metakd.config`; ``metakd run``
and a local ``metakd sweep`` run them before starting Ray or training. They read the data
with the same loader that training uses (:func:`metakd.data.load_multidomain`), so they
catch what training would catch (a missing path, an unknown domain, a missing column, a
label out of range, a line that does not parse, with its file and line number) without
tokenising or training anything.

What lives elsewhere (a hub id, an object-store URI, or with ``remote=True`` a path that only
exists on the cluster) is not fetched: :func:`preflight` returns one note saying so.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError, ExperimentConfig, ModelConfig, check_layer_mapping


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
        return None
    if local.exists():
        raise ConfigError(f"{where}.checkpoint: '{name}' is a file; expected a model directory or a hub id")
    if is_hub_id(name):
        return f"{where}.checkpoint '{name}': a hub id, not a local directory; not checked here (loaded by id)"
    if remote and (name.startswith("/") or _is_uri(name)):
        return f"{where}.checkpoint '{name}': not on this machine; not checked here (a cluster path)"
    raise ConfigError(f"{where}.checkpoint: '{name}' is neither a local directory nor a well-formed Hugging "
                      f"Face hub id ('name' or 'namespace/name'; letters, digits, '-', '_', '.'); relative "
                      f"paths are resolved from {os.getcwd()}")


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
        return f"data.path '{path}': remote storage; not checked here"
    if Path(os.path.expanduser(path)).exists():
        return None
    if d.source == "hf" and is_hub_id(path):
        return f"data.path '{path}': a Hugging Face hub dataset; not checked here (loaded by id)"
    if remote:
        return f"data.path '{path}': not on this machine; not checked here (a cluster path)"
    raise ConfigError(f"data.path: '{path}' does not exist (source '{d.source}' reads local files; relative "
                      f"paths are resolved from {os.getcwd()})")


def check_data(cfg: ExperimentConfig) -> str:
    """Read and validate the data as training would (no tokenising); a one-line summary."""
    from .data import load_multidomain

    data = load_multidomain(cfg.data, seed=cfg.seeds[0])
    sizes = ", ".join(f"{d}: {int((data.train.domains == k).sum())}" for k, d in enumerate(data.domains))
    return f"data: {data.name}, {data.num_labels} labels, training examples per domain {{{sizes}}}"


def preflight(cfg: ExperimentConfig, remote: bool = False, read_data: bool = True) -> list[str]:
    """Every local check; raises ``ConfigError`` / ``DataError`` naming the field or file. Returns notes."""
    notes = [n for n in (check_checkpoint(cfg.teacher, "teacher", remote),
                         check_checkpoint(cfg.student, "student", remote)) if n]
    check_layers(cfg)
    where = data_location(cfg, remote)
    if where is not None:
        notes.append(where)
    elif read_data:
        notes.append(check_data(cfg))
    return notes
