"""A metakd model as a self-contained directory that standard tools load, with its tokenizer.

metakd's classifier reads ``pooled``: with ``pooling: cls`` the encoder's pooler output
tanh(W_p h_[CLS] + b_p) (``pooler_output``), with ``pooling: mean`` the mean of the token states
over non-padding positions; logits = W_c dropout(pooled) + b_c. Inference needs only that: the
domain head (W_r, e[d], W_g) and the student's projections W_h, W_d are dropped.

Two routes (:func:`route_of`), chosen so that the exported logits are metakd's:

- ``transformers`` (``pooling: cls`` on an encoder of :data:`CLS_ROUTES`): the encoder family's own
  ``*ForSequenceClassification``. BERT's computes exactly pooler + dropout + classifier, so the
  weights map one to one (``encoder.*`` -> ``bert.*``). RoBERTa's and MPNet's head,
  out_proj(dropout(tanh(dense(dropout(h_0))))), is that same function in eval mode, with metakd's
  pooler dense as its ``dense`` and metakd's classifier as its ``out_proj``.
- ``onnx`` (``pooling: mean``, or an encoder no standard class pools as metakd does: ELECTRA and
  DistilBERT put an extra activation before the classifier): no ``*ForSequenceClassification``
  mean-pools, and none may be made to without ``trust_remote_code``. ``model.onnx`` is the traced
  metakd forward, tokens (input_ids, attention_mask[, token_type_ids]) -> logits, which any ONNX
  runtime runs; ``encoder/`` beside it is the encoder as a plain transformers model (``AutoModel``)
  with ``classifier.safetensors``, for users who want the PyTorch weights. There is no top-level
  ``config.json``, so ``AutoModelForSequenceClassification`` refuses the directory instead of
  computing another head.

Both routes write the tokenizer files (``model_max_length`` = the data's ``max_length``) and
``metakd.json`` (route, labels, the tokenisation settings ``metakd predict`` applies), and check
the written model against the metakd model on a padded batch (:func:`verify`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.utils import logging as hf_logging

from ..models import EncoderClassifier
from .artifacts import ExportError

FORMAT = "metakd-export-1"
TOLERANCE = 1e-4  # max |logit difference| a written model may show against metakd's (fp32; measured ~1e-6)


@dataclass(frozen=True)
class Route:
    """How an encoder family's ``*ForSequenceClassification`` computes metakd's ``cls`` head."""

    architecture: str  # the transformers class named in config.json
    prefix: str  # its encoder attribute
    renames: tuple[tuple[str, str], ...]  # metakd name prefix -> its name prefix, for the head weights


_DENSE_TANH_HEAD = (("encoder.pooler.dense.", "classifier.dense."), ("classifier.", "classifier.out_proj."))
CLS_ROUTES: dict[str, Route] = {
    "bert": Route("BertForSequenceClassification", "bert", (("classifier.", "classifier."),)),
    "roberta": Route("RobertaForSequenceClassification", "roberta", _DENSE_TANH_HEAD),
    "xlm-roberta": Route("XLMRobertaForSequenceClassification", "roberta", _DENSE_TANH_HEAD),
    "mpnet": Route("MPNetForSequenceClassification", "mpnet", _DENSE_TANH_HEAD),
}


@dataclass(frozen=True)
class Packaging:
    """What the exported directory needs besides the weights."""

    id2label: dict[int, str]
    max_length: int
    truncation: str  # head | head_tail (data.truncation; metakd predict applies it, a plain tokenizer cuts the head)
    domain_index: int | None = None  # a multitask (kd_mtl) teacher: whose classifier head to export
    source: dict | None = None  # what was exported (kind, key, method, domain, seed, ...): into metakd.json


def route_of(model: EncoderClassifier) -> str:
    """``transformers`` when a standard class computes ``model``'s head, else ``onnx`` (module doc)."""
    has_pooler = getattr(model.encoder, "pooler", None) is not None
    if model.pooling == "cls" and has_pooler and model.encoder.config.model_type in CLS_ROUTES:
        return "transformers"
    return "onnx"


def export_model(model: EncoderClassifier, tokenizer, out: str | os.PathLike, pack: Packaging) -> dict:
    """Write ``model`` + ``tokenizer`` to ``out`` (created; must be empty or absent) by its route,
    check it (:func:`verify`) and return ``metakd.json``'s content, with ``max_abs_diff``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; export into a new directory")
    model = model.cpu().eval()
    weight, bias = _head(model, pack.domain_index)
    out.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()  # save_pretrained's one-shard "Writing model shards" bar
    labels = {int(i): str(n) for i, n in pack.id2label.items()}
    route = route_of(model)
    try:
        if route == "transformers":
            meta = _write_transformers(model, weight, bias, labels, out)
        else:
            meta = _write_onnx(model, weight, bias, labels, out, pack.domain_index)
        tokenizer.model_max_length = pack.max_length
        tokenizer.save_pretrained(str(out))
        meta.update(format=FORMAT, route=route, encoder=type(model.encoder).__name__, pooling=model.pooling,
                    max_length=pack.max_length, truncation=pack.truncation,
                    id2label={str(i): n for i, n in labels.items()},
                    parameters=sum(p.numel() for p in model.encoder.parameters()) + weight.numel() + bias.numel(),
                    source=pack.source or {})
        meta["max_abs_diff"] = verify(model, out, meta, pack.domain_index)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # it was empty or absent: no half-written or unfaithful export stays
        raise
    (out / "metakd.json").write_text(json.dumps(meta, indent=1))
    return meta


def _head(model: EncoderClassifier, domain_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's (weight [C, H], bias [C]); a multitask teacher's rows of ``domain_index``."""
    w, b = model.classifier.weight.detach(), model.classifier.bias.detach()
    if not model.multitask:
        return w.clone(), b.clone()
    if domain_index is None:
        raise ValueError("a multitask (kd_mtl) teacher has one classifier per domain: say which (--domain)")
    rows = slice(domain_index * model.num_labels, (domain_index + 1) * model.num_labels)
    return w[rows].clone(), b[rows].clone()


def _config(model: EncoderClassifier, labels: dict[int, str], architectures: list[str]):
    from transformers import AutoConfig

    raw = dict(model.encoder.config.to_dict())
    cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    cfg.num_labels = len(labels)
    cfg.id2label, cfg.label2id = dict(labels), {n: i for i, n in labels.items()}
    cfg.architectures = architectures
    return cfg


def _write_transformers(model, weight, bias, labels, out: Path) -> dict:
    from transformers import AutoModelForSequenceClassification

    route = CLS_ROUTES[model.encoder.config.model_type]
    state = {**{f"encoder.{k}": v for k, v in model.encoder.state_dict().items()},
             "classifier.weight": weight, "classifier.bias": bias}
    mapped = {}
    for name, value in state.items():
        new = next((to + name[len(fr):] for fr, to in route.renames if name.startswith(fr)), None)
        mapped[new or f"{route.prefix}.{name[len('encoder.'):]}"] = value
    hf = AutoModelForSequenceClassification.from_config(_config(model, labels, [route.architecture]))
    hf.load_state_dict(mapped, strict=True)  # every weight of the standard class comes from metakd's
    hf.save_pretrained(str(out))
    return {"architecture": route.architecture}


class _Logits(nn.Module):
    """tokens -> metakd's logits (the domain index only selects a multitask teacher's head)."""

    def __init__(self, model: EncoderClassifier, domain_index: int | None):
        super().__init__()
        self.model, self.domain = model, domain_index or 0

    def forward(self, input_ids, attention_mask, token_type_ids):
        domains = torch.full_like(input_ids[:, 0], self.domain)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, domains=domains,
                          token_type_ids=token_type_ids).logits


def _write_onnx(model, weight, bias, labels, out: Path, domain_index: int | None) -> dict:
    try:
        import onnx  # noqa: F401  (the exporter writes through it)
    except ImportError:
        raise ImportError(f"pooling {model.pooling!r} on {model.encoder.config.model_type}: no standard transformers "
                          f"class computes this head, so it is exported as ONNX; install onnx and onnxruntime "
                          f"(pip install 'metakd[export]')") from None
    inputs = _sample(model.encoder.config.vocab_size, 8, rows=2)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python branches over shapes: checked by verify()
        # an eval-mode wrapper: the exporter restores the mode it found, recursively (no dropout after it either)
        torch.onnx.export(_Logits(model, domain_index).eval(), tuple(inputs[n] for n in names), f"{tmp}/model.onnx",
                          input_names=names, output_names=["logits"], dynamic_axes=axes, opset_version=17,
                          dynamo=False)
        os.replace(f"{tmp}/model.onnx", out / "model.onnx")
    encoder = out / "encoder"
    model.encoder.config.id2label, model.encoder.config.label2id = dict(labels), {n: i for i, n in labels.items()}
    model.encoder.save_pretrained(str(encoder))
    save_file({"weight": weight.contiguous(), "bias": bias.contiguous()}, str(encoder / "classifier.safetensors"))
    return {"architecture": f"ONNX graph of {type(model.encoder).__name__} + {model.pooling} pooling + classifier"}


def _sample(vocab: int, length: int, rows: int = 8) -> dict[str, torch.Tensor]:
    """A seeded batch of token ids with padding on every row but the first (the masks matter)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(1, rows):
        mask[r, max(2, length - r * max(1, length // rows)):] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@torch.no_grad()
def verify(model: EncoderClassifier, out: Path, meta: dict, domain_index: int | None = None) -> float:
    """max |logits(exported) - logits(metakd)| on a padded batch at ``max_length``; ValueError over TOLERANCE."""
    from .predict import load_exported

    batch = _sample(model.encoder.config.vocab_size, meta["max_length"])
    ref = _Logits(model, domain_index).eval()(**batch)
    got = load_exported(out, meta).logits(batch)
    diff = float((got - ref).abs().max())
    if not diff <= TOLERANCE:
        raise ExportError(f"{out}: the exported model's logits differ from metakd's by {diff:.3g} (> {TOLERANCE}); "
                          f"nothing was exported")
    return diff
