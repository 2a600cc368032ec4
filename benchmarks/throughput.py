"""Training-step throughput: the engine's settings against the old ones, measured in the same run.

Steps (random-init models, synthetic batches; each row times ``--steps`` optimizer steps after
``--warmup`` untimed ones):
- teacher: one meta-teacher training step (t_i-weighted CE + gamma1 L_TDA);
- stage1: intermediate-layer distillation (L_embd + L_hidn + L_attn + gamma2 L_TKD);
- stage2: prediction-layer distillation (L_pred).

Settings:
- new: ``precision: auto`` (bf16 autocast on a CUDA GPU, fp32 on CPU), SDPA attention except in the
  forwards that return attention maps, batches cut to their longest sequence, fused AdamW on CUDA,
  no per-step host sync; ``+cache``: the frozen teacher's outputs (stage 2) and its stage-1 states
  (fp16, on the device) read from ``metakd.train.teacher_cache`` instead of a teacher forward;
- old: IEEE fp32 (TF32 off for these rows only: ``precision.fp32_matmuls(tf32=False)``), eager attention
  everywhere, every batch padded to ``--seq``, the teacher re-run on every batch, AdamW without the
  fused kernel, ``float(loss)`` after every step.

FLOPs: :mod:`metakd.flops` (multiply-add = 2 FLOPs; forward = L (8 H^2 + 4 H I + 4 S H) per token,
training = 3 x forward; stage 1 adds the student-to-teacher projections W_h and W_d; a distillation
step adds the teacher's forward only when the teacher runs). Tokens are the *processed* (padded)
tokens, so TFLOP/s and MFU measure the hardware's use; examples/s measures the speed that matters.
MFU is against ``--peak-tflops`` (default: the dense bf16 peak of the exact part CUDA names,
``metakd.flops.peak_bf16_tflops``; none for a part it does not know). ``--json PATH`` also writes the
rows and the run's settings as JSON (``benchmarks/gpu_check.sh`` reads them).

    python benchmarks/throughput.py                 # BERT-base teacher, TinyBERT-4L student, seq 128
    python benchmarks/throughput.py --cpu-small     # a CPU-sized shape
    python benchmarks/throughput.py --teacher 12-768-12-3072 --student 6-768-12-3072 --seq 256 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metakd import flops as flop_model  # noqa: E402
from metakd.config import from_dict  # noqa: E402
from metakd.data import EncodedSplit  # noqa: E402
from metakd.loader import stack_collate, trim_collate  # noqa: E402
from metakd.models import build_student, build_teacher  # noqa: E402
from metakd.train import precision as prec  # noqa: E402
from metakd.train.loop import optimizer_for, to_device  # noqa: E402
from metakd.train.runtime import LocalRuntime  # noqa: E402
from metakd.train.distill import Distiller  # noqa: E402
from metakd.train.teacher import teacher_loss_step  # noqa: E402
from metakd.train.teacher_cache import TeacherOutputs, TeacherStates, compute_outputs  # noqa: E402

def sizes(text: str) -> tuple[int, int, int, int]:
    parts = [int(x) for x in text.split("-")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"{text!r}: expected layers-hidden-heads-intermediate, e.g. 12-768-12-3072")
    return tuple(parts)


def synthetic_split(n: int, seq: int, vocab: int, min_length: int, seed: int = 0) -> EncodedSplit:
    """Right-padded random token ids, lengths uniform in [min_length, seq]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, seq), generator=g)
    lengths = torch.randint(min_length, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    return EncodedSplit(ids * mask, mask, torch.zeros_like(ids), labels=torch.randint(0, 2, (n,), generator=g),
                        domains=torch.randint(0, 4, (n,), generator=g))


def batches(split: EncodedSplit, batch: int, trim: bool) -> list[dict]:
    collate = trim_collate if trim else stack_collate
    return [collate(split.select(torch.arange(i, i + batch)).to_dict()) for i in range(0, len(split), batch)]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, loss_step, pool: list[dict], device, precision: str, fused: bool, host_sync: bool,
               flops, steps: int, warmup: int) -> tuple[float, int, float]:
    """Seconds for ``steps`` optimizer steps, the examples they took and their model FLOPs
    (``flops(batch_size, padded_length)`` per step)."""
    opt = optimizer_for(model, 1e-5, 0.01, device if fused else None)
    model.train()
    examples, total = 0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
            examples, total = 0, 0.0
        batch = to_device(pool[i % len(pool)], device)
        with prec.autocast(precision, device):
            loss = loss_step(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if host_sync:
            float(loss.detach())
        n, length = batch["input_ids"].shape
        examples += n
        total += flops(n, length)
    sync(device)
    return time.perf_counter() - start, examples, total


def set_eager(*models) -> None:
    for m in models:
        m.encoder.set_attn_implementation("eager")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=sizes, default=(12, 768, 12, 3072), help="layers-hidden-heads-intermediate")
    p.add_argument("--student", type=sizes, default=(4, 312, 12, 1200), help="layers-hidden-heads-intermediate")
    p.add_argument("--seq", type=int, default=128, help="max_length (the old settings pad every batch to it)")
    p.add_argument("--min-length", type=int, default=None,
                   help="sequence lengths are uniform in [min-length, seq] (default: seq // 2)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--pool", type=int, default=8, help="distinct batches cycled through (and cached)")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all settings; the fastest round is reported")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=prec.PRECISIONS, help="of the new settings")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="for MFU (default: the dense bf16 peak of the GPU, looked up by its exact name)")
    p.add_argument("--json", default=None, help="also write the rows and settings to this JSON file")
    p.add_argument("--cpu-small", action="store_true",
                   help="a CPU-sized shape: teacher 4-256-4-1024, student 2-128-4-512, seq 64, batch 16, vocab 2000, "
                        "8 steps after 2")
    a = p.parse_args()
    if a.cpu_small:
        a.teacher, a.student, a.seq, a.batch, a.vocab, a.steps, a.warmup = \
            (4, 256, 4, 1024), (2, 128, 4, 512), 64, 16, 2000, 8, 2
    min_length = a.min_length if a.min_length is not None else a.seq // 2
    runtime = LocalRuntime(a.device, log=lambda *_: None)
    device = runtime.device
    new_precision = prec.resolve(a.precision, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = a.peak_tflops if a.peak_tflops is not None else \
        flop_model.peak_bf16_tflops(name) if device.type == "cuda" else None
    peak_source = "--peak-tflops" if a.peak_tflops is not None else f"the data-sheet peak of {name}"

    cfg = from_dict({"teacher": dict(zip(("layers", "hidden", "heads", "intermediate"), a.teacher)),
                     "student": dict(zip(("layers", "hidden", "heads", "intermediate"), a.student)),
                     "distill": {"gamma2": 0.5, "layer_map": "round"}, "precision": a.precision})
    split = synthetic_split(a.pool * a.batch, a.seq, a.vocab, min_length)
    scores = torch.rand(len(split))
    fill = float(split.attention_mask.float().mean())

    def fresh_models():
        torch.manual_seed(0)
        teacher = build_teacher(cfg.teacher, a.vocab, a.seq, 2, 4).to(device)
        student = build_student(cfg.student, teacher, a.vocab, a.seq, "round").to(device)
        return teacher, student

    tkd = cfg.distill.gamma2 > 0  # the meta distiller adds W_d r(x) to stage 1

    def teacher_train(n, length):
        return flop_model.teacher_step(a.teacher, n, length)

    def step_flops(stage: str, teacher_runs: bool):
        if stage == "stage1":
            return lambda n, length: flop_model.stage1_step(a.student, a.teacher, n, length, teacher_runs, tkd)
        return lambda n, length: flop_model.stage2_step(a.student, a.teacher, n, length, teacher_runs)

    trimmed, fixed = batches(split, a.batch, True), batches(split, a.batch, False)
    # (step, setting, model, loss step, batches, precision, fused AdamW, host sync, FLOPs per step)
    cases = []
    step = teacher_loss_step("meta", cfg, scores.to(device), 0)
    teacher, _ = fresh_models()
    cases.append(("teacher", f"new ({new_precision}, sdpa, trimmed)", teacher, step, trimmed, new_precision, True,
                  False, teacher_train))
    teacher, _ = fresh_models()
    set_eager(teacher)
    cases.append(("teacher", "old (fp32 IEEE, eager, fixed)", teacher, step, fixed, "fp32", False, True, teacher_train))

    # distillation: the same frozen teacher for every setting
    teacher, student = fresh_models()
    teacher.eval().requires_grad_(False)
    d_plain = Distiller(teacher, student, cfg, meta=True, scores=scores)
    sync(device)
    t0 = time.perf_counter()
    outputs = TeacherOutputs(compute_outputs(teacher, split, runtime, new_precision), device)
    states = TeacherStates.compute(teacher, split, d_plain.layers, a.student[2], runtime, new_precision,
                                   attention=cfg.distill.attention)
    sync(device)
    build_s = time.perf_counter() - t0
    d_cache = Distiller(teacher, student, cfg, meta=True, scores=scores, outputs=outputs, states=states)
    old_teacher = build_teacher(cfg.teacher, a.vocab, a.seq, 2, 4).to(device).eval().requires_grad_(False)
    old_teacher.load_state_dict(teacher.state_dict())
    set_eager(old_teacher)
    d_old = Distiller(old_teacher, student, cfg, meta=True, scores=scores)
    for stage in ("stage1", "stage2"):
        cases.append((stage, f"new ({new_precision}) + cache", fresh_models()[1], getattr(d_cache, stage), trimmed,
                      new_precision, True, False, step_flops(stage, False)))
        cases.append((stage, f"new ({new_precision}), teacher re-run", fresh_models()[1], getattr(d_plain, stage),
                      trimmed, new_precision, True, False, step_flops(stage, True)))
        student = fresh_models()[1]
        set_eager(student)
        cases.append((stage, "old (fp32 IEEE, eager, fixed, re-run)", student, getattr(d_old, stage), fixed, "fp32",
                      False, True, step_flops(stage, True)))

    # rounds over all cases, best round kept: load from other processes slows single rounds, not the best
    best: dict[int, tuple] = {}
    for _ in range(a.repeats):
        for i, (_s, setting, model, fn, pool, precision, fused, host_sync, flops) in enumerate(cases):
            # the old rows in IEEE fp32: TF32 off for them alone (the engine's fp32 uses TF32 on CUDA)
            with prec.fp32_matmuls(tf32=not setting.startswith("old")):
                res = time_steps(model, fn, pool, device, precision, fused, host_sync, flops, a.steps, a.warmup)
            if i not in best or res[0] < best[i][0]:
                best[i] = res
    cut = sum(b["input_ids"].numel() for b in trimmed) / sum(b["input_ids"].numel() for b in fixed)
    rows = []
    for i, case in enumerate(cases):
        seconds, examples, flops = best[i]
        tflops = flops / seconds / 1e12
        rows.append({"step": case[0], "setting": case[1], "ex_s": examples / seconds, "tflops": tflops,
                     "mfu": tflops / peak if peak else None, "ms_step": 1000 * seconds / a.steps})

    tf32_env = os.environ.get("NVIDIA_TF32_OVERRIDE")
    print(f"device {device}{' (' + name + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}"
          + (f"; new fp32 matmuls TF32, old IEEE fp32{' (NVIDIA_TF32_OVERRIDE=' + tf32_env + ')' if tf32_env else ''}"
             if device.type == "cuda" else ""))
    print(f"teacher {'-'.join(map(str, a.teacher))}, student {'-'.join(map(str, a.student))} "
          f"(layers-hidden-heads-intermediate), seq {a.seq}, batch {a.batch}, vocab {a.vocab}, "
          f"lengths uniform in [{min_length}, {a.seq}]: real tokens {fill:.0%} of max_length; batches cut to their "
          f"longest sequence hold {cut:.0%} of the fixed-padding tokens")
    print(f"teacher cache build (outputs + stage-1 states of {len(split)} examples, "
          f"{(states.hidden.numel() + states.attention.numel()) * 2 / 2**20:.0f} MiB fp16): "
          f"{len(split) / build_s:.1f} examples/s, outputs once per teacher, states once per student job")
    print(f"timed: {a.steps} steps after {a.warmup} warm-up steps, best of {a.repeats} interleaved rounds; "
          "TFLOP/s from metakd.flops (stage 1 with the W_h / W_d projections)"
          + (f"; MFU against {peak:.0f} TFLOP/s (dense bf16, {peak_source})" if peak else
             ("; MFU: no known peak for this GPU, pass --peak-tflops" if device.type == "cuda" else "")))
    print()
    head = f"{'step':8} {'setting':38} {'examples/s':>11} {'ms/step':>9} {'TFLOP/s':>9}"
    head += f" {'MFU':>6}" if peak else ""
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['step']:8} {r['setting']:38} {r['ex_s']:11.1f} {r['ms_step']:9.1f} {r['tflops']:9.3f}"
              + (f" {r['mfu']:6.1%}" if peak else ""))
    print()
    by = {(r["step"], r["setting"].split(" ")[0] + (" cache" if "cache" in r["setting"] else "")): r["ex_s"]
          for r in rows}
    print("ratios (examples/s, same run):")
    print(f"  teacher  new / old:                  {by['teacher', 'new'] / by['teacher', 'old']:.2f}x")
    for stage in ("stage1", "stage2"):
        print(f"  {stage}   new + cache / old:          {by[stage, 'new cache'] / by[stage, 'old']:.2f}x")
        print(f"  {stage}   new + cache / new re-run:   {by[stage, 'new cache'] / by[stage, 'new']:.2f}x")
        print(f"  {stage}   new re-run / old:           {by[stage, 'new'] / by[stage, 'old']:.2f}x")
    if a.json:
        ratios = {"teacher new/old": by["teacher", "new"] / by["teacher", "old"]}
        for stage in ("stage1", "stage2"):
            ratios.update({f"{stage} cache/old": by[stage, "new cache"] / by[stage, "old"],
                           f"{stage} cache/re-run": by[stage, "new cache"] / by[stage, "new"],
                           f"{stage} re-run/old": by[stage, "new"] / by[stage, "old"]})
        with open(a.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                       "teacher": a.teacher, "student": a.student, "seq": a.seq, "batch": a.batch,
                       "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats, "precision": new_precision,
                       "nvidia_tf32_override": tf32_env, "peak_tflops": peak, "rows": rows, "ratios": ratios}, f,
                      indent=1)


if __name__ == "__main__":
    main()
