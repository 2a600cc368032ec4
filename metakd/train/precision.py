"""Numeric precision of training and inference passes: ``precision: auto | fp32 | bf16``.

bf16 is autocast (weights, gradients and optimizer state stay fp32; matmuls run in bf16), so
no loss scaling is needed. Losses are computed in fp32 from upcast inputs
(the loss steps call ``.float()`` on what the forward returns).
On CUDA, fp32 matmuls use TF32 tensor cores: a runtime on a CUDA device sets that once for its
process (:func:`use_tf32`; ``NVIDIA_TF32_OVERRIDE=0`` forces IEEE fp32 anyway), and
:func:`fp32_matmuls` overrides it within a block and restores it after (the throughput
benchmark's IEEE-fp32 baseline). :func:`autocast` does not touch it.

Artifacts (teachers, their outputs, prototype features, students) are keyed on the precision
they were trained in, never on ``auto``: :func:`planned` resolves it where the work is planned.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve(precision: str, device) -> str:
    """``fp32`` or ``bf16``: auto is bf16 on a CUDA device that supports it, fp32 elsewhere (CPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def planned(precision: str, device: str, gpus: float | None = None) -> str:
    """``fp32`` or ``bf16``: the precision a worker will train in, decided where the work is planned.

    A trial driver may run on a CPU-only head while its workers get GPUs, so this reads the
    configuration, not ``torch.cuda.is_available()`` here: ``auto`` is bf16 when the worker trains
    on CUDA (``device: cuda``, or ``device: auto`` with ``gpus`` > 0 GPUs per worker) and fp32
    otherwise (:func:`resolve` on the worker agrees: bf16 on CUDA, fp32 on a CPU). ``gpus`` None:
    the worker is this process (``metakd run`` in-process, tests), which has a GPU when CUDA is
    available here. Teacher,
    teacher-output, student and prototype-feature keys hash this value, so a teacher trained in
    fp32 (on a CPU) is not reused by a bf16 configuration, and ``auto`` on a GPU shares artifacts
    with an explicit ``bf16``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if gpus is None:
        gpus = 1.0 if torch.cuda.is_available() else 0.0
    return "bf16" if device == "cuda" or (device == "auto" and gpus > 0) else "fp32"


def autocast(precision: str, device):
    """The context a forward pass (and its loss) runs in: bf16 autocast, or nothing for fp32."""
    device = torch.device(device)
    resolved = resolve(precision, device)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[resolved])


def _new_tf32_api() -> bool:
    # torch >= 2.9 has fp32_precision; mixing it with the legacy allow_tf32 flags is an error there
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _tf32_state() -> tuple:
    if _new_tf32_api():
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_tf32_state(state: tuple) -> None:
    if _new_tf32_api():
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = state
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = state


def _tf32(enabled: bool) -> tuple:
    if _new_tf32_api():
        return ("tf32", "tf32") if enabled else ("ieee", "ieee")
    return enabled, enabled


def tf32_enabled() -> bool:
    """Whether fp32 matmuls on CUDA may use TF32 tensor cores now (``NVIDIA_TF32_OVERRIDE=0`` aside)."""
    return _tf32_state()[0] in (True, "tf32")


def use_tf32(device) -> None:
    """The engine's fp32 on CUDA: fp32 matmuls and convolutions of this process use TF32 tensor
    cores (Ampere and newer). Called by a runtime on a CUDA device; a no-op elsewhere."""
    if torch.device(device).type == "cuda":
        _set_tf32_state(_tf32(True))


@contextlib.contextmanager
def fp32_matmuls(tf32: bool):
    """Within: fp32 matmuls and convolutions on CUDA use TF32 (``tf32``) or IEEE fp32; the setting
    before the block comes back after it."""
    before = _tf32_state()
    _set_tf32_state(_tf32(tf32))
    try:
        yield
    finally:
        _set_tf32_state(before)
