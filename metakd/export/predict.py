"""Labels and probabilities of a model on texts: an exported directory (``metakd export``: its
standard transformers class or its ONNX graph) or a kept student (``students/<key>/`` on a store).

Texts are encoded as training encoded them (:func:`metakd.data.encode`: the data's ``max_length``
and ``truncation``) and batched as evaluation batches them (in order, each batch cut to its longest
sequence, :func:`metakd.loader.make_loader`), so the accuracy on a split's texts is the one the
results table holds for that split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..data import TextSplit, encode
from ..loader import make_loader
from .artifacts import ExportError, check_student, read_model_json


@dataclass
class Predictor:
    """A model with what encoding its inputs takes; ``logits(batch)`` -> [N, C] float32 on the CPU."""

    forward: object  # batch dict (input_ids, attention_mask, token_type_ids) -> logits
    tokenizer: object
    id2label: dict[int, str]
    max_length: int
    truncation: str
    what: str  # how messages name it

    def logits(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            return self.forward(batch).float()

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in self.id2label.items()}


def load_exported(directory: str | Path, meta: dict | None = None) -> Predictor:
    """An ``metakd export`` directory, by the route its ``metakd.json`` names."""
    d = Path(directory)
    if meta is None:
        if not (d / "metakd.json").is_file():
            raise ExportError(f"{d}: no metakd.json (not a directory written by metakd export)")
        meta = json.loads((d / "metakd.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(d))
    if meta["route"] == "transformers":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(d)).eval()

        def forward(batch):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"]).logits
    else:
        forward = _onnx_forward(d / "model.onnx")
    return Predictor(forward, tokenizer, {int(i): n for i, n in meta["id2label"].items()}, meta["max_length"],
                     meta.get("truncation", "head"), str(d))


def _onnx_forward(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(f"{path}: running an ONNX export needs onnxruntime (pip install 'metakd[export]')") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = [i.name for i in session.get_inputs()]  # an encoder that ignores token_type_ids has no such input

    def forward(batch):
        feed = {n: batch[n].numpy().astype(np.int64) for n in wanted}
        return torch.from_numpy(session.run(["logits"], feed)[0])

    return forward


def load_student(directory: str | Path, keep: str | None = None) -> Predictor:
    """A kept student (``students/<key>/``: model.json, model.safetensors, tokenizer/) run by metakd itself."""
    from transformers import AutoTokenizer

    from ..models import load_model

    d = check_student(directory, keep)
    meta = read_model_json(d)
    model = load_model(d).eval()
    names = meta.get("label_names") or [str(i) for i in range(model.num_labels)]

    def forward(batch):
        domains = torch.zeros_like(batch["input_ids"][:, 0])  # the domain head is not read
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], domains=domains,
                     token_type_ids=batch["token_type_ids"]).logits

    return Predictor(forward, AutoTokenizer.from_pretrained(str(d / "tokenizer")), dict(enumerate(names)),
                     meta["max_length"], meta.get("truncation", "head"), str(d))


def load_predictor(target: str) -> Predictor:
    """An exported directory (metakd.json) or a kept student's directory (model.json)."""
    d = Path(target)
    if (d / "metakd.json").is_file():
        return load_exported(d)
    if d.is_dir():
        return load_student(d)
    raise ExportError(f"{target}: neither an exported directory nor a student directory (give --sweep ROOT "
                      f"to name a student by its key)")


def predict(predictor: Predictor, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64,
            progress: bool = False) -> np.ndarray:
    """Probabilities [N, C] (softmax of the logits), in the order of ``texts``."""
    n = len(texts)
    split = TextSplit(texts=list(texts), text_pairs=None if pairs is None else list(pairs),
                      labels=np.zeros(n, dtype=np.int64), domains=np.zeros(n, dtype=np.int64))
    encoded = encode(split, predictor.tokenizer, predictor.max_length, truncation=predictor.truncation)
    out = []
    for batch in _progress(make_loader(encoded, batch_size, False, trim=True), progress, n, batch_size):
        out.append(torch.softmax(predictor.logits(batch), dim=-1))
    return torch.cat(out).numpy() if out else np.zeros((0, len(predictor.id2label)), dtype=np.float32)


def _progress(loader, on: bool, n: int, batch_size: int) -> Iterable:
    if not on:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, total=len(loader), unit="batch", desc=f"predict {n} rows ({batch_size} a batch)")


def label_ids(values: list, predictor: Predictor, where: str) -> list[int | None]:
    """Labels of a file as ids: an id (int or digits) or a label name; None where a row has none."""
    names = predictor.label2id
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
        elif isinstance(v, str) and v in names:
            out.append(names[v])
        elif isinstance(v, (int, np.integer)) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()):
            k = int(v)
            if k not in predictor.id2label:
                raise ExportError(f"{where}, row {i + 1}: label {v!r} is not one of the model's label ids "
                                  f"{sorted(predictor.id2label)}")
            out.append(k)
        else:
            raise ExportError(f"{where}, row {i + 1}: label {v!r} is neither a label id nor one of "
                              f"{sorted(names)}")
    return out
