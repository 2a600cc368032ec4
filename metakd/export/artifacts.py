"""A kept student's or a teacher's directory on the store, checked before anything reads it.

A student under ``students.keep: all`` is published with its weights (``model.safetensors`` +
``model.json``, :func:`metakd.models.save_model`) and the tokenizer of its prepared data
(``tokenizer/``) beside ``result.json``; a teacher with its weights beside ``teacher.json``, its
tokenizer being the one of its prepared data (``data/<data key>/tokenizer``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..storage import Store

WEIGHTS = ("model.json", "model.safetensors")
STUDENT_FILES = (*WEIGHTS, "tokenizer")


class ExportError(ValueError):
    """A model cannot be selected, found or exported; the message names it and what is missing."""


def student_dir(store: Store, key: str, keep: str | None = None) -> Path:
    """The local directory of the kept student ``key`` (downloaded from an object store).

    ``keep``: the ``students.keep`` its sweep ran with, for the message when the weights are missing."""
    return _artifact(store, f"students/{key}", f"student {key}", STUDENT_FILES, keep)


def teacher_dir(store: Store, key: str) -> Path:
    return _artifact(store, f"teachers/{key}", f"teacher {key}", WEIGHTS)


def tokenizer_dir(store: Store, data_key: str) -> Path:
    """``tokenizer/`` of the prepared data ``data_key`` (what a teacher was trained on)."""
    return _artifact(store, f"data/{data_key}", f"prepared data {data_key}", ("tokenizer",)) / "tokenizer"


def check_student(directory: str | Path, keep: str | None = None) -> Path:
    """``directory`` if it holds a kept student's weights, architecture and tokenizer, else ExportError naming it."""
    return _complete(Path(directory), f"student directory {directory}", STUDENT_FILES, keep)


def read_model_json(directory: str | Path) -> dict:
    return json.loads((Path(directory) / "model.json").read_text())


def _artifact(store: Store, rel: str, what: str, files: tuple[str, ...], keep: str | None = None) -> Path:
    if not store.is_complete(rel):
        raise ExportError(f"{what}: {store.uri(rel)} is missing or incomplete (no _COMPLETE marker)")
    return _complete(Path(store.fetch_dir(rel)), f"{what} ({store.uri(rel)})", files, keep)


def _complete(directory: Path, what: str, files: tuple[str, ...], keep: str | None) -> Path:
    missing = [f for f in files if not (directory / f).exists()]
    if not missing:
        return directory
    if keep == "none":
        raise ExportError(f"{what} has no weights: it was trained with students.keep: none, which keeps only "
                          f"result.json; set students.keep: all and run it again to keep the student")
    raise ExportError(f"{what} lacks {', '.join(missing)}: no weights to export (a student trained before metakd "
                      f"kept students, or a damaged directory); delete it and run the sweep again to retrain it")
