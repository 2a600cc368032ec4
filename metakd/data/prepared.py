"""Prepared data: the split, subsampled and tokenised splits of one (data config, seed,
tokenizer), its key, and its directory on a :class:`~metakd.storage.Store`.

A prepared-data directory holds ``encoded.pt`` (the tensors of each split), ``tokenizer/``
and ``meta.json`` (key, domains, labels, counts). It is published like teachers and students
are: written to a temp dir, then :meth:`Store.publish_dir` (``_COMPLETE`` marker last), and
read only when complete (:func:`load_prepared`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from ..storage import MARKER, Store
from .containers import SPLITS, MultiDomainData, TextSplit
from .encode import EncodedSplit, encode
from .sources import fingerprint as source_fingerprint
from .splits import apply_sample_rate, load_full
from .vocab import build_tokenizer

# Bump when the split rule, the encoding or the directory layout changes: old prepared data
# then stops matching instead of being silently reused.
CACHE_VERSION = "metakd-data-1"

_SYNTH_FIELDS = ("num_domains", "num_labels", "examples_per_domain", "words_per_example", "shared_vocab",
                 "domain_vocab", "domain_cue_rate", "label_noise", "seed")


@dataclass
class PreparedData:
    data: MultiDomainData
    tokenizer: Any
    train: EncodedSplit
    dev: EncodedSplit
    test: EncodedSplit
    key: str = ""
    from_cache: bool = False
    fingerprint: str | None = None  # of the source's contents (metakd.data.sources.fingerprint)


def data_key(cfg: DataConfig, seed: int, checkpoint: str | None, fingerprint: str | None = None) -> str:
    """sha256 (16 hex chars) of what determines the prepared tensors: the data fields that
    matter for ``cfg.source``, the seed (only when sample_rate < 1), the checkpoint (or the
    WordPiece ``cfg.vocab_size`` when training one), ``CACHE_VERSION`` and the contents:
    ``fingerprint`` (:func:`metakd.data.sources.fingerprint`: a content hash of the local files,
    a hub revision; computed here when not given; none for the synthetic source). Edited files
    give a new key, so everything built on them (teachers, students: their keys hold the
    fingerprint too) is rebuilt; unchanged files keep it."""
    fingerprint = fingerprint or source_fingerprint(cfg)
    d: dict[str, Any] = {f: getattr(cfg, f) for f in ("source", "domains", "num_labels", "sample_rate",
                                                         "max_length", "split_seed")}
    d["truncation"] = cfg.truncation
    if cfg.source == "synthetic":
        d["synthetic"] = {f: getattr(cfg.synthetic, f) for f in _SYNTH_FIELDS}
    else:
        d.update({f: getattr(cfg, f) for f in ("path", "text_column", "text_pair_column", "label_column")})
    if cfg.source in ("files", "hf"):
        d["domain_column"] = cfg.domain_column
    if cfg.source == "hf":
        d.update({f: getattr(cfg, f) for f in ("hf_config", "hf_train_split", "hf_test_split")})
    if cfg.source != "synthetic" and getattr(cfg, "label_case", "fold") != "fold":
        d["label_case"] = cfg.label_case
    if fingerprint is not None:
        d["fingerprint"] = fingerprint
    payload = {"version": CACHE_VERSION, "data": d, "seed": int(seed) if cfg.sample_rate < 1 else None,
               "checkpoint": checkpoint, "vocab_size": cfg.vocab_size if checkpoint is None else None}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def data_identity(cfg: DataConfig, fingerprint: str | None) -> dict:
    """``cfg`` as the teacher and student keys hold it (``metakd.train.teacher.teacher_identity``,
    ``metakd.jobs.experiment.student_identity``): every field, plus the source's ``fingerprint``
    when it has one (so edited files retrain them). ``label_case`` enters only when it is not the
    default, so the keys of data without one (synthetic) are those made before the field existed."""
    d = dataclasses.asdict(cfg)
    if d.get("label_case") == "fold":
        del d["label_case"]
    if fingerprint is not None:
        d["fingerprint"] = fingerprint
    return d


def prepare(cfg: DataConfig, seed: int, checkpoint: str | None,
            cache_dir: str | os.PathLike | None = None, fingerprint: str | None = None) -> PreparedData:
    """Load (:func:`~metakd.data.splits.load_full`, then the sample rate of ``seed``) and
    tokenise. The WordPiece tokenizer (checkpoint None, ``cfg.vocab_size`` tokens) is trained
    on the *full* training split of all domains (text and pair), so every sample_rate and seed
    share one vocabulary.

    With ``cache_dir``, a :class:`Store` on that directory: the prepared data is published
    there under its :func:`data_key` (:func:`publish_prepared`), and a later call with the same
    key loads it (``from_cache``) instead of tokenising; a cached entry whose domains or split
    sizes differ from the data read now raises :class:`DataError`. ``fingerprint``: the
    source's, when the caller has it (else computed, before the data is read)."""
    fingerprint = fingerprint or source_fingerprint(cfg)
    key = data_key(cfg, seed, checkpoint, fingerprint)
    full = load_full(cfg)
    data = apply_sample_rate(full, cfg, seed)
    store = Store(str(cache_dir)) if cache_dir is not None else None
    if store is not None and store.is_complete(key):
        return _reuse(Path(store.fetch_dir(key)), data)

    tokenizer = build_tokenizer(full.train.texts + (full.train.text_pairs or []), checkpoint, cfg.vocab_size)
    encoded = {s: encode(getattr(data, s), tokenizer, cfg.max_length, truncation=cfg.truncation) for s in SPLITS}
    prepared = PreparedData(data=data, tokenizer=tokenizer, key=key, fingerprint=fingerprint, **encoded)
    if store is not None:
        publish_prepared(prepared, store, key)
    return prepared


def publish_prepared(prepared: PreparedData, store: Store, rel: str) -> None:
    """Write ``prepared`` (:func:`write_prepared`) into a temp dir and publish it as
    ``<store>/<rel>`` with :meth:`Store.publish_dir`; a no-op when ``rel`` is already complete."""
    with tempfile.TemporaryDirectory(prefix="metakd-data-") as tmp:
        write_prepared(prepared, tmp)
        store.publish_dir(tmp, rel)


def write_prepared(prepared: PreparedData, directory: str | os.PathLike) -> None:
    """``encoded.pt``, ``tokenizer/`` and ``meta.json`` into ``directory`` (no ``_COMPLETE`` marker:
    publishing writes it)."""
    target = Path(directory)
    torch.save({s: getattr(prepared, s).to_dict() for s in SPLITS}, target / "encoded.pt")
    prepared.tokenizer.save_pretrained(str(target / "tokenizer"))
    d = prepared.data
    meta = {"key": prepared.key, "version": CACHE_VERSION, "name": d.name, "domains": d.domains,
            "num_labels": d.num_labels, "label_names": d.label_names, "counts": d.counts(),
            "fingerprint": prepared.fingerprint, "notes": d.notes}
    (target / "meta.json").write_text(json.dumps(meta, indent=1))


def load_prepared(directory: str | os.PathLike) -> PreparedData:
    """A complete prepared-data directory (tensors, tokenizer, meta), without the raw data.

    Training workers use this: they need the encoded splits, the tokenizer and the domain /
    label names, not the source files (which may not exist on a worker node).
    """
    target = Path(directory)
    if not (target / MARKER).exists():
        raise DataError(f"{target}: not a complete prepared-data directory (no {MARKER})")
    meta = _read_meta(target)
    empty = TextSplit(texts=[], text_pairs=None, labels=np.zeros(0), domains=np.zeros(0))
    data = MultiDomainData(domains=meta["domains"], num_labels=meta["num_labels"], train=empty, dev=empty,
                           test=empty, name=meta["name"], label_names=meta.get("label_names"),
                           notes=meta.get("notes", []))
    return _read_encoded(target, data, meta["key"], meta.get("fingerprint"))


def _reuse(target: Path, data: MultiDomainData) -> PreparedData:
    """The cached tensors of ``target`` with the raw ``data`` read now, which must match them."""
    meta = _read_meta(target)
    if meta["counts"] != data.counts() or meta["domains"] != data.domains:
        raise DataError(f"cache {target} does not match the data read now (the files under data.path changed?); "
                        f"delete that directory to rebuild it")
    return _read_encoded(target, data, meta["key"], meta.get("fingerprint"))


def _read_meta(target: Path) -> dict:
    return json.loads((target / "meta.json").read_text())


def _read_encoded(target: Path, data: MultiDomainData, key: str, fingerprint: str | None) -> PreparedData:
    from transformers import AutoTokenizer

    tensors = torch.load(target / "encoded.pt", weights_only=True)
    return PreparedData(data=data, tokenizer=AutoTokenizer.from_pretrained(str(target / "tokenizer")), key=key,
                        from_cache=True, fingerprint=fingerprint,
                        **{s: EncodedSplit.from_dict(tensors[s]) for s in SPLITS})
