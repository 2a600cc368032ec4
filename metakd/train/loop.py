"""The one loop skeleton every method uses: AdamW with linear warmup, epochs, evaluation,
best-checkpoint keeping, per-epoch checkpoints for resume, progress lines.

Methods differ only in ``loss_step(model, batch) -> scalar loss``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

from .runtime import LocalRuntime, unwrap

LOG_EVERY_S = 30.0
BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "domains", "index")


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in BATCH_KEYS}


@dataclass
class StageSettings:
    name: str  # teacher | stage1 | stage2 | joint | finetune
    epochs: int
    lr: float
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    keep_best: bool = True  # restore the best dev-accuracy weights at the end
    max_grad_norm: float = 1.0


@dataclass
class StageResult:
    best_dev: float
    curve: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def optimizer_for(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, domain_names: list[str], device) -> dict:
    """Accuracy and mean cross-entropy per domain present in ``loader``, plus their average."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    correct: dict[int, int] = {}
    total: dict[int, int] = {}
    loss_sum: dict[int, float] = {}
    for batch in loader:
        batch = to_device(batch, device)
        out = model(**batch)
        ce = F.cross_entropy(out.logits, batch["labels"], reduction="none")
        hit = out.logits.argmax(-1) == batch["labels"]
        for d in batch["domains"].unique().tolist():
            m = batch["domains"] == d
            correct[d] = correct.get(d, 0) + int(hit[m].sum())
            total[d] = total.get(d, 0) + int(m.sum())
            loss_sum[d] = loss_sum.get(d, 0.0) + float(ce[m].sum())
    model.train(was_training)
    acc = {domain_names[d]: correct[d] / total[d] for d in sorted(total)}
    loss = {domain_names[d]: loss_sum[d] / total[d] for d in sorted(total)}
    return {"accuracy": acc, "loss": loss, "average": sum(acc.values()) / max(len(acc), 1)}


def train_stage(
    model: torch.nn.Module,
    loss_step: Callable[[torch.nn.Module, dict], torch.Tensor],
    train_loader: DataLoader,
    dev_loader: DataLoader | None,
    domain_names: list[str],
    settings: StageSettings,
    runtime: LocalRuntime,
    tag: str,
    params: list | None = None,
) -> StageResult:
    """Train ``model`` (already prepared by the runtime) with ``loss_step`` for one stage.

    Resumes from the runtime's restored checkpoint when it belongs to this ``tag``/stage.
    """
    device = runtime.device
    opt = optimizer_for(unwrap(model), settings.lr, settings.weight_decay) if params is None else \
        torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps = max(1, settings.epochs * len(train_loader))
    sched = get_linear_schedule_with_warmup(opt, math.ceil(settings.warmup_ratio * steps), steps)
    start_epoch, best_dev, best_state, curve = 0, -1.0, None, []
    ckpt_name = f"{tag}/{settings.name}"
    restored = _restore(runtime, ckpt_name)
    if restored is not None:
        unwrap(model).load_state_dict(restored["model"])
        opt.load_state_dict(restored["optimizer"])
        sched.load_state_dict(restored["scheduler"])
        start_epoch, best_dev, curve = restored["epoch"] + 1, restored["best_dev"], restored["curve"]
        best_state = restored.get("best_model")
        runtime.log(f"[{tag}] {settings.name}: resumed after epoch {start_epoch}")
    t0 = time.perf_counter()
    step = start_epoch * len(train_loader)
    for epoch in range(start_epoch, settings.epochs):
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        running, n, last_log = 0.0, 0, time.perf_counter()
        for batch in train_loader:
            loss = loss_step(model, to_device(batch, device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            opt.step()
            sched.step()
            running += float(loss.detach())
            n += 1
            step += 1
            if time.perf_counter() - last_log > LOG_EVERY_S:  # long epochs: show they are moving
                last_log = time.perf_counter()
                runtime.log(f"[{tag}] {settings.name} epoch {epoch + 1}/{settings.epochs} "
                            f"step {n}/{len(train_loader)} loss {running / n:.4f}")
        dev = evaluate(model, dev_loader, domain_names, device)["average"] if dev_loader is not None else float("nan")
        point = {"stage": settings.name, "epoch": epoch + 1, "step": step, "train_loss": running / max(n, 1),
                 "dev_accuracy": dev, "seconds": time.perf_counter() - t0}
        curve.append(point)
        if settings.keep_best and dev > best_dev:
            best_dev = dev
            best_state = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
        runtime.log(f"[{tag}] {settings.name} epoch {epoch + 1}/{settings.epochs} "
                    f"loss {point['train_loss']:.4f} dev {dev:.2%} ({point['seconds']:.1f}s)")
        _checkpoint(runtime, ckpt_name, model, opt, sched, epoch, best_dev, best_state, curve)
    if settings.keep_best and best_state is not None:
        unwrap(model).load_state_dict(best_state)
    if not settings.keep_best:
        best_dev = curve[-1]["dev_accuracy"] if curve else float("nan")
    return StageResult(best_dev=best_dev, curve=curve, seconds=time.perf_counter() - t0)


def _checkpoint(runtime, name, model, opt, sched, epoch, best_dev, best_state, curve) -> None:
    """Report a resumable checkpoint (Ray Train) after an epoch; a no-op in-process."""
    if not runtime.epoch_checkpoints:
        return
    with tempfile.TemporaryDirectory(prefix="metakd-ckpt-") as d:
        if runtime.is_main:
            state = {"name": name, "model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "epoch": epoch, "best_dev": best_dev, "curve": curve}
            if best_state is not None:
                state["best_model"] = best_state
            torch.save(state, os.path.join(d, "state.pt"))
        runtime.report({"stage": name, "epoch": epoch + 1, "best_dev": best_dev}, checkpoint_dir=d)


def _restore(runtime, name) -> dict | None:
    d = runtime.restored_dir()
    if d is None or not os.path.exists(os.path.join(d, "state.pt")):
        return None
    state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    return state if state.get("name") == name else None
