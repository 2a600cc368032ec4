"""FLOPs of the training steps and the peak FLOP/s of a GPU, for throughput and MFU figures.

A multiply-add is 2 FLOPs. Per token of an encoder with L layers, hidden H, feed-forward I, at
padded length S, one forward is

    L * (8 H^2 + 4 H I + 4 S H)

(Q, K, V, O projections 8 H^2; feed-forward 4 H I; QK^T and AV 4 S H), i.e. 2 x params x tokens
plus the attention term. Embedding look-ups, layer norms, softmax and the small heads are left
out. Training is 3 x forward (the backward is twice the forward). A distillation step adds:

- stage 1 (and ``joint``): the student-to-teacher projection W_h on every kept hidden state
  (the embedding output and each of the student's S layers), 2 H_s H_t per token and state,
  and W_d on r(x) once per example when L_TKD is on; both are trained (3 x). They are an
  identity, and free, when the widths are equal. For a TinyBERT-4L student (4-312-12-1200) of a
  BERT-base teacher at 128 tokens, W_h alone is ~25 % of the student's forward FLOPs.
- the teacher's forward, when the teacher runs (no cache).

Tokens are the *processed* (padded) tokens, so FLOP/s measure the hardware's use.
Sizes are ``(layers, hidden, heads, intermediate)``.
"""

from __future__ import annotations

import re

Sizes = tuple[int, int, int, int]


def encoder_forward(sizes: Sizes, batch: int, seq: int) -> float:
    """FLOPs of one encoder forward over ``batch`` sequences of padded length ``seq``."""
    layers, h, _, inter = sizes
    return float(batch * seq * layers * (8 * h * h + 4 * h * inter + 4 * seq * h))


def projection_forward(student_hidden: int, teacher_hidden: int, vectors: int) -> float:
    """FLOPs of a student-to-teacher projection (W_h or W_d) applied to ``vectors`` vectors;
    0 when the widths are equal (the projection is the identity)."""
    if student_hidden == teacher_hidden:
        return 0.0
    return float(2 * student_hidden * teacher_hidden * vectors)


def teacher_step(teacher: Sizes, batch: int, seq: int) -> float:
    """One teacher training step: 3 x forward."""
    return 3 * encoder_forward(teacher, batch, seq)


def stage1_step(student: Sizes, teacher: Sizes, batch: int, seq: int, teacher_runs: bool,
                tkd: bool = True) -> float:
    """One stage-1 (or ``joint``) distillation step: 3 x (student forward + W_h on the S + 1 kept
    hidden states of every token + W_d on r(x) when ``tkd``), plus the teacher's forward when it runs."""
    s_layers, s_hidden = student[0], student[1]
    t_hidden = teacher[1]
    states = (s_layers + 1) * batch * seq  # the embedding output and each student layer, per token
    forward = encoder_forward(student, batch, seq) + projection_forward(s_hidden, t_hidden, states)
    if tkd:
        forward += projection_forward(s_hidden, t_hidden, batch)
    return 3 * forward + (encoder_forward(teacher, batch, seq) if teacher_runs else 0.0)


def stage2_step(student: Sizes, teacher: Sizes, batch: int, seq: int, teacher_runs: bool) -> float:
    """One stage-2 (prediction-layer) step: 3 x student forward, plus the teacher's forward when it runs."""
    return 3 * encoder_forward(student, batch, seq) + (encoder_forward(teacher, batch, seq) if teacher_runs else 0.0)


# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets (which
# quote twice these figures, with sparsity). Matched against the device name as CUDA reports it
# ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL",
# "NVIDIA A100-SXM4-80GB", "NVIDIA L4", "NVIDIA L40S", "NVIDIA A10G", ...), first match wins, whole
# words only: "L4" is not "L40S", "H200" is not "GH200", "A10" is not "A100".
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bB200\b", 2250.0),
    (r"\bGH200\b", 989.0),
    (r"\bH200\b.*\bNVL\b", 835.0),
    (r"\bH200\b", 989.0),  # SXM
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b.*\bPCIE\b", 756.0),
    (r"\bH100\b", 989.0),  # SXM ("H100 80GB HBM3", "H100 SXM5")
    (r"\bH800\b.*\bPCIE\b", 756.0),
    (r"\bH800\b", 989.0),
    (r"\bA100\b", 312.0),  # SXM4 and PCIe alike
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA40\b", 150.0),
    (r"\bA30\b", 165.0),
    # AWS's A10G: NVIDIA publishes no data sheet; a clock-reduced A10. This is the A10's figure, an
    # upper bound; pass --peak-tflops for an exact MFU.
    (r"\bA10G\b", 125.0),
    (r"\bA10\b", 125.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of the GPU named ``device_name``, or None when it is not in
    :data:`PEAK_BF16_TFLOPS` (no bf16 tensor cores, or an unknown part: give the peak yourself)."""
    name = device_name.upper().replace("-", " ").replace("_", " ")
    for pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return peak
    return None
