"""Numeric precision of training and inference passes: ``precision: auto | fp32 | bf16``.

bf16 is autocast (weights, gradients and optimizer state stay fp32; matmuls run in bf16), so
no loss scaling is needed. Losses are computed in fp32 from upcast inputs
(the loss steps call ``.float()`` on what the forward returns).
On CUDA, fp32 matmuls use TF32 tensor cores (``NVIDIA_TF32_OVERRIDE=0`` turns that off).
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


def autocast(precision: str, device):
    """The context a forward pass (and its loss) runs in: bf16 autocast, or nothing for fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        _enable_tf32()
    resolved = resolve(precision, device)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[resolved])


_TF32_SET = False


def _enable_tf32() -> None:
    global _TF32_SET
    if not _TF32_SET:
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
        _TF32_SET = True
