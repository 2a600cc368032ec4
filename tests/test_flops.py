"""The FLOP model of the training steps and the GPU peak lookup (metakd.flops), by hand."""

from __future__ import annotations

import pytest

from metakd import flops

BERT_BASE, TINYBERT_4L = (12, 768, 12, 3072), (4, 312, 12, 1200)


def test_encoder_forward_by_hand():
    # 2 layers, H 4, I 8, S 3, 5 sequences: per token and layer 8*16 + 4*4*8 + 4*3*4 = 128 + 128 + 48
    assert flops.encoder_forward((2, 4, 2, 8), 5, 3) == 5 * 3 * 2 * (128 + 128 + 48)


def test_projections_are_counted_in_stage1_and_free_at_equal_widths():
    # TinyBERT-4L -> BERT-base at 128 tokens: W_h on 5 states per token is ~25 % of the student's forward
    per_token = flops.encoder_forward(TINYBERT_4L, 1, 128) / 128
    assert per_token == 4 * (8 * 312**2 + 4 * 312 * 1200 + 4 * 128 * 312)
    w_h = flops.projection_forward(312, 768, 5)
    assert w_h == 5 * 2 * 312 * 768
    assert w_h / per_token == pytest.approx(0.2459, abs=1e-4)
    b, s = 32, 128
    student = flops.encoder_forward(TINYBERT_4L, b, s)
    teacher = flops.encoder_forward(BERT_BASE, b, s)
    cached = flops.stage1_step(TINYBERT_4L, BERT_BASE, b, s, teacher_runs=False)
    assert cached == 3 * (student + 2 * 312 * 768 * (5 * b * s + b))  # W_h on every state, W_d once per example
    assert flops.stage1_step(TINYBERT_4L, BERT_BASE, b, s, teacher_runs=True) == cached + teacher
    no_tkd = flops.stage1_step(TINYBERT_4L, BERT_BASE, b, s, False, tkd=False)
    assert no_tkd == 3 * (student + 2 * 312 * 768 * 5 * b * s)
    # a student as wide as its teacher has identity projections
    six = (6, 768, 12, 3072)
    assert flops.stage1_step(six, BERT_BASE, b, s, False) == 3 * flops.encoder_forward(six, b, s)
    # stage 2 has no projection
    assert flops.stage2_step(TINYBERT_4L, BERT_BASE, b, s, teacher_runs=False) == 3 * student
    assert flops.stage2_step(TINYBERT_4L, BERT_BASE, b, s, teacher_runs=True) == 3 * student + teacher
    assert flops.teacher_step(BERT_BASE, b, s) == 3 * teacher


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),  # SXM
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", 181.0),
    ("NVIDIA A10G", 125.0),
    ("NVIDIA A10", 125.0),
])
def test_peak_lookup_matches_the_exact_part(name, peak):
    assert flops.peak_bf16_tflops(name) == peak


@pytest.mark.parametrize("name", ["Tesla V100-SXM2-16GB", "Tesla T4", "NVIDIA GeForce RTX 3090", "cpu", ""])
def test_peak_lookup_refuses_parts_it_does_not_know(name):
    assert flops.peak_bf16_tflops(name) is None
