"""The one loop skeleton every method uses: AdamW with linear warmup, epochs, evaluation,
best-checkpoint keeping, epoch checkpoints for resume, progress lines.

Methods differ only in ``loss_step(model, batch) -> scalar loss``.

The loss stays on the device between log lines: reading it (``float``) waits for the GPU,
so it is read only when a progress line is due and at the end of an epoch.

The same reads check that the training loss is finite, without a host sync per step: the
epoch's running sum is NaN or infinite as soon as one step's loss was. A non-finite loss stops
the stage with :class:`NonFiniteLoss` at the next progress line (one worker; at most
``LOG_EVERY_S`` later) or at the end of the epoch (every worker: the ranks agree in one
all-reduce, so they stop together). The steps in between are wasted, never kept: a NaN loss
makes NaN gradients, then NaN weights. A training another owner has taken over (this owner's
lease ran out) stops the same way, with :class:`Superseded`, at the same points.
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
from transformers import get_constant_schedule, get_linear_schedule_with_warmup

from .precision import autocast
from .runtime import LocalRuntime, unwrap

LOG_EVERY_S = 30.0
BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "domains", "index")


class NonFiniteLoss(FloatingPointError):
    """The training loss of one training (``tag``: which one) became NaN or infinite. Its result
    would be noise: the training stops, and the job is recorded as failed with this message."""

    def __init__(self, tag: str, stage: str, epoch: int, epochs: int, loss: float):
        self.tag = tag
        value = f"{loss}" if not math.isfinite(loss) else "not finite on another worker"
        super().__init__(f"{tag}: the training loss is {value} in {stage} epoch {epoch}/{epochs}: training "
                         f"stopped (a learning rate or a loss weight too large for this precision?)")


class Superseded(RuntimeError):
    """Another owner has taken over the training ``tag``: this owner's lease on it ran out (renewals
    that failed for longer than the lease). The training stops; nothing of it is published."""

    def __init__(self, tag: str, stage: str, epoch: int, epochs: int):
        self.tag = tag
        super().__init__(f"{tag}: another owner took this training over (the lease ran out) in {stage} epoch "
                         f"{epoch}/{epochs}: stopped here, its work dropped")


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in BATCH_KEYS}


@dataclass
class StageSettings:
    name: str  # teacher | stage1 | stage2 | joint | finetune
    epochs: int
    lr: float
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    keep_best: bool = True  # restore the best dev-accuracy weights at the end; False: evaluate only the last epoch
    max_grad_norm: float = 1.0
    checkpoint_interval_s: float = 0.0  # resumable checkpoints at most this often (runtimes with epoch_checkpoints)
    precision: str = "fp32"  # auto | fp32 | bf16: the autocast of forward + loss (metakd.train.precision)
    schedule: str = "linear"  # linear: warmup_ratio warmup then linear decay to 0 | constant: lr throughout


@dataclass
class StageResult:
    best_dev: float
    curve: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_epochs: int = 0  # epochs restored from a checkpoint instead of trained in this call
    epoch_examples: list[int] = field(default_factory=list)  # examples this rank trained on, per epoch trained here


class LossOf(torch.nn.Module):
    """``loss_step(model, batch)`` as a module, for DDP to wrap.

    DDP over the loss, not the model: DDP finds the parameters that get no gradient by walking
    back from the forward's outputs. From the model's outputs it would also reach heads that a
    loss step does not use (a CE teacher's domain head, a stage-2 student's W_h) and then wait
    for their gradients forever; from the loss it reaches exactly the used ones, including
    those a loss step applies outside the model's forward (W_h, W_d).
    """

    def __init__(self, model: torch.nn.Module, loss_step: Callable[[torch.nn.Module, dict], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_step = loss_step

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_step(self.model, batch)


def optimizer_for(model: torch.nn.Module, lr: float, weight_decay: float, device=None,
                  params: list | None = None) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and LayerNorm weights (or on ``params`` as given);
    the fused CUDA kernel on a GPU (one launch for all parameters instead of several per tensor)."""
    fused = torch.device(device).type == "cuda" if device is not None else False
    if params is not None:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, domain_names: list[str], device,
             precision: str = "fp32") -> dict:
    """Accuracy and mean cross-entropy per domain present in ``loader``, plus their average."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    correct: dict[int, int] = {}
    total: dict[int, int] = {}
    loss_sum: dict[int, float] = {}
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(precision, device):
            logits = model(**batch).logits.float()
        ce = F.cross_entropy(logits, batch["labels"], reduction="none")
        hit = logits.argmax(-1) == batch["labels"]
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
    """Train ``model`` (on the runtime's device) with ``loss_step`` for one stage.

    Resumes from the runtime's restored checkpoint when it belongs to this ``tag``/stage. The
    optimizer takes ``epochs * len(train_loader)`` steps; with the sharded loaders of
    :mod:`metakd.loader` that count does not depend on the number of workers.
    """
    device = runtime.device
    model = unwrap(model)
    step_loss = runtime.distribute(LossOf(model, loss_step))
    opt = optimizer_for(model, settings.lr, settings.weight_decay, device, params)
    steps = max(1, settings.epochs * len(train_loader))
    if settings.schedule == "constant":  # the released code's stage 1 (distill.stage1_schedule)
        sched = get_constant_schedule(opt)
    else:
        sched = get_linear_schedule_with_warmup(opt, math.ceil(settings.warmup_ratio * steps), steps)
    start_epoch, best_dev, best_epoch, best_state, curve, epoch_examples = 0, -1.0, -1, None, [], []
    ckpt_name = f"{tag}/{settings.name}"
    restored = _restore(runtime, ckpt_name)
    if restored is not None:
        model.load_state_dict(restored["model"])
        opt.load_state_dict(restored["optimizer"])
        sched.load_state_dict(restored["scheduler"])
        start_epoch, best_dev, curve = restored["epoch"] + 1, restored["best_dev"], restored["curve"]
        best_epoch = restored.get("best_epoch", -1)
        best_state = restored.get("best_model")
        if best_state is None and best_epoch == restored["epoch"]:  # the best weights are the saved ones
            best_state = {k: v.detach().cpu().clone() for k, v in restored["model"].items()}
        runtime.log(f"[{tag}] {settings.name}: resumed after epoch {start_epoch}")
    t0 = last_checkpoint = time.perf_counter()
    step = start_epoch * len(train_loader)
    for epoch in range(start_epoch, settings.epochs):
        for sampler in (getattr(train_loader, "batch_sampler", None), getattr(train_loader, "sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        model.train()
        running, n, examples, last_log = torch.zeros((), device=device), 0, 0, time.perf_counter()
        for batch in train_loader:
            examples += len(batch["labels"])
            with autocast(settings.precision, device):
                loss = step_loss(to_device(batch, device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            opt.step()
            sched.step()
            running += loss.detach()
            n += 1
            step += 1
            if time.perf_counter() - last_log > LOG_EVERY_S:  # long epochs: show they are moving
                last_log = time.perf_counter()
                so_far = float(running) / n
                if runtime.world_size == 1 and not math.isfinite(so_far):  # ranks check together, below
                    raise NonFiniteLoss(tag, settings.name, epoch + 1, settings.epochs, so_far)
                if runtime.world_size == 1 and runtime.stop_requested():
                    raise Superseded(tag, settings.name, epoch + 1, settings.epochs)
                runtime.log(f"[{tag}] {settings.name} epoch {epoch + 1}/{settings.epochs} "
                            f"step {n}/{len(train_loader)} loss {so_far:.4f}")
        if runtime.any_rank(~torch.isfinite(running)):  # a collective: every rank reaches it
            raise NonFiniteLoss(tag, settings.name, epoch + 1, settings.epochs, float(running) / max(n, 1))
        if runtime.stop_requested():  # rank 0 asks its registry client (no call: the lease thread's last answer)
            raise Superseded(tag, settings.name, epoch + 1, settings.epochs)
        last = epoch == settings.epochs - 1
        # a stage that keeps its last epoch needs no dev accuracy before it
        evaluated = dev_loader is not None and (settings.keep_best or last)
        dev = evaluate(model, dev_loader, domain_names, device, settings.precision)["average"] if evaluated \
            else float("nan")
        epoch_examples.append(examples)
        point = {"stage": settings.name, "epoch": epoch + 1, "step": step,
                 "train_loss": float(running) / max(n, 1), "dev_accuracy": dev, "seconds": time.perf_counter() - t0}
        curve.append(point)
        runtime.track(point)
        if settings.keep_best and dev > best_dev:
            best_dev, best_epoch = dev, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        runtime.log(f"[{tag}] {settings.name} epoch {epoch + 1}/{settings.epochs} "
                    f"loss {point['train_loss']:.4f} dev {f'{dev:.2%}' if evaluated else 'not measured'} "
                    f"({point['seconds']:.1f}s)")
        # none after the last epoch: the caller saves the result next. Rank 0's clock decides for all ranks,
        # since a checkpoint report is a collective.
        due = time.perf_counter() - last_checkpoint >= settings.checkpoint_interval_s
        if runtime.epoch_checkpoints and not last and runtime.agree(due):
            _checkpoint(runtime, ckpt_name, model, opt, sched, epoch, best_dev, best_epoch, best_state, curve)
            last_checkpoint = time.perf_counter()
    if settings.keep_best and best_state is not None:
        model.load_state_dict(best_state)
    if not settings.keep_best:
        best_dev = curve[-1]["dev_accuracy"] if curve else float("nan")
    return StageResult(best_dev=best_dev, curve=curve, seconds=time.perf_counter() - t0, resumed_epochs=start_epoch,
                       epoch_examples=epoch_examples)


def _checkpoint(runtime, name, model, opt, sched, epoch, best_dev, best_epoch, best_state, curve) -> None:
    """Report a resumable checkpoint (Ray Train) after an epoch: what resume needs, no more.

    Weights, AdamW moments, scheduler, epoch and curve; the best weights only when they are
    not the current ones (``best_epoch`` says which epoch they come from).
    """
    with tempfile.TemporaryDirectory(prefix="metakd-ckpt-") as d:
        if runtime.is_main:
            state = {"name": name, "model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "epoch": epoch, "best_dev": best_dev,
                     "best_epoch": best_epoch, "curve": curve}
            if best_state is not None and best_epoch != epoch:
                state["best_model"] = best_state
            torch.save(state, os.path.join(d, "state.pt"))
        runtime.report({"stage": name, "epoch": epoch + 1, "best_dev": best_dev}, checkpoint_dir=d)


def _restore(runtime, name) -> dict | None:
    """The checkpoint of stage ``name`` to resume from: the run's own (Ray Train restored it) or one
    another run left when it lost this training (``runtime.resume_dir``), whichever is further on."""
    found = []
    for d in (runtime.restored_dir(), getattr(runtime, "resume_dir", None)):
        if d is not None and os.path.exists(os.path.join(d, "state.pt")):
            try:
                state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
            except (RuntimeError, EOFError, OSError):  # a copy cut short: not a point to resume from
                continue
            if state.get("name") == name:
                found.append(state)
    return max(found, key=lambda state: state["epoch"], default=None)


def majority_rate(labels) -> float:
    """Share of the most frequent label: the accuracy of always predicting it (0.0 for no labels)."""
    counts = {}
    for y in (int(v) for v in labels):
        counts[y] = counts.get(y, 0) + 1
    return max(counts.values()) / len(labels) if counts else 0.0
