"""Prototype features E(x) = mean_pool(H_last(x)) of the frozen *initial* teacher encoder (spec
section 1), computed once per (initial encoder, prepared data) and stored as an artifact
``features/<key>/features.safetensors`` that every meta-teacher with that key reuses. A pruned
student's PrC bank is stored the same way (:func:`pooled_key`: with mean pooling, the same artifact).

The key covers what fixes the initial weights (the checkpoint, or the sizes and the seed of
the random initialisation), the prepared data (tokenizer, max_length, examples) and the
precision of the pass. The pass is shared out among the DDP ranks (:func:`sharded_forward`).

Like a teacher, the artifact is claimed before it is computed (registry key ``features/<key>``),
so meta-teachers starting side by side in different runs compute it once: the others wait for
it, up to ``WAIT_S``, and then compute it themselves rather than keep their DDP ranks waiting
in a collective (two publishers of the same features leave one complete copy).
"""

from __future__ import annotations

import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

from ..config import ExperimentConfig, content_hash
from . import precision as prec
from .sharded import sharded_forward

VERSION = "features-v1"
FILE = "features.safetensors"
POLL_S = 1.0
WAIT_S = 300.0  # the longest rank 0 waits for another trainer's features (its other ranks wait in a broadcast)


def features_key(cfg: ExperimentConfig, seed: int, data_key: str, device) -> str:
    """Identity of the initial encoder's features. A checkpoint's weights do not depend on the
    seed; a random initialisation is ``torch.manual_seed(seed)`` then the encoder of these sizes."""
    t = cfg.teacher
    init = {"checkpoint": t.checkpoint} if t.checkpoint else {"sizes": list(t.sizes()), "seed": int(seed)}
    return content_hash({"version": VERSION, "init": init, "data": data_key,
                         "precision": prec.resolve(cfg.precision, device)})


def encoder_features(model, split, runtime, precision: str = "fp32") -> torch.Tensor:
    """E(x) for every example of ``split``, in its order, [N, H] fp32 on the CPU, on every rank."""
    rows = sharded_forward(model, split, lambda out, _b: {"features": out.features.float()}, runtime, precision)
    return rows["features"]


def pooled_rows(model, split, runtime, precision: str = "fp32") -> torch.Tensor:
    """z(x), what the classifier reads (``Output.pooled``, unnormalised), for every example of ``split``, in
    its order, [N, H] fp32 on the CPU, on every rank. With mean pooling: E(x), as :func:`encoder_features`."""
    return sharded_forward(model, split, lambda out, _b: {"z": out.pooled.float()}, runtime, precision)["z"]


def pooled_key(cfg: ExperimentConfig, seed: int, data_key: str, device, pooling: str) -> str:
    """Identity of z(x) of the initial encoder under ``pooling`` (a pruned student's PrC bank). With
    ``mean`` it is E(x) itself: the prototype features' key. With ``cls`` the pooler may be newly
    initialised (a checkpoint without one), so the seed joins the key."""
    if pooling == "mean":
        return features_key(cfg, seed, data_key, device)
    return content_hash({"features": features_key(cfg, seed, data_key, device), "pooling": pooling, "seed": int(seed)})


def prototype_features(model, prepared, cfg: ExperimentConfig, seed: int, runtime, store=None,
                       claims=None) -> torch.Tensor:
    """E(x) of every training example (row = the example's ``index``): loaded from the store when
    an earlier teacher made them, else computed (sharded) and published by rank 0.

    ``claims``: the registry client of the worker (``claim``/``finish``/``release``), through which
    rank 0 claims ``features/<key>`` first; None: no claim (one process, the tests)."""
    if not cfg.meta_teacher.prototype_weighting:
        return torch.zeros(len(prepared.train), 0)  # not used: every t_i = 1
    rel = f"features/{features_key(cfg, seed, prepared.key, runtime.device)}"
    return stored_features(rel, lambda: encoder_features(model, prepared.train, runtime, cfg.precision), prepared,
                           runtime, store, claims)


def stored_features(rel: str, compute, prepared, runtime, store=None, claims=None) -> torch.Tensor:
    """The [M, H] rows (row = the example's ``index``) of the artifact ``rel``: loaded when complete on
    ``store``, else ``compute()`` (one vector per example of ``prepared.train``, in its order; a sharded
    pass, so every rank calls it) and published by rank 0 under a claim, as :func:`prototype_features`."""
    answer = _claim(store, claims, rel) if store is not None and runtime.is_main else "compute"
    # rank 0 decides for all ranks: the computation below is a collective
    if store is not None and runtime.agree(answer == "ready"):
        return load_file(f"{store.fetch_dir(rel)}/{FILE}")["features"]
    try:
        feats = compute()
        by_index = torch.zeros((int(prepared.train.index.max()) + 1, feats.shape[1]), dtype=feats.dtype)
        by_index[prepared.train.index] = feats
        if store is not None and runtime.is_main:
            with tempfile.TemporaryDirectory(prefix="metakd-features-") as d:
                save_file({"features": by_index.contiguous()}, f"{d}/{FILE}", metadata={"data_key": prepared.key})
                store.publish_dir(d, rel)
    except BaseException:
        if answer == "mine":
            claims.release(rel)  # the next trainer that needs them computes them
        raise
    if answer == "mine":
        claims.finish(rel)
    return by_index


def _claim(store, claims, rel: str) -> str:
    """Rank 0's answer for the features at ``rel``: "ready" (complete on the store: load them),
    "mine" (claimed: compute and publish them) or "compute" (compute them unclaimed: no registry,
    or another trainer held them for longer than ``WAIT_S``)."""
    deadline = time.monotonic() + WAIT_S
    while not store.is_complete(rel):
        if claims is None:
            return "compute"
        answer = claims.claim(rel)
        if answer == "mine":
            if store.is_complete(rel):  # published between the look and the claim
                claims.finish(rel)
                return "ready"
            return "mine"
        if answer == "done" or time.monotonic() > deadline:  # done: finished without them (never, but not a hang)
            return "ready" if store.is_complete(rel) else "compute"
        time.sleep(POLL_S)  # "wait": another trainer computes them now
    return "ready"
