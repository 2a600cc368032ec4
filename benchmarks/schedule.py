"""How well a sweep fills its machine: slot utilisation, trainings against a naive sweep, teacher->student wait.

    python benchmarks/schedule.py [--gamma2 0,0.25,0.5,1] [--seeds 2] [--trials 2] [--student-workers 2]

Runs a small Figure-4-shaped sweep from scratch on a local Ray instance (gamma2 grid x seeds x
{metakd, kd_single} x 2 domains, tiny models on the generated corpus; one slot = one CPU = one
Train worker) and prints, from the event files every training leaves under
``<storage>/<name>/events/``:

- slot utilisation = busy slot-seconds / (slots x wall), where a training busies its
  ``world_size`` slots from its start to its end; for the teacher phase (first teacher start to
  last teacher end, students that overlap it count as busy) and for the whole sweep (first
  training start to last training end; Ray start-up and the first fit's start-up are outside);
- teacher and student trainings against a naive sweep, which trains in every trial every
  teacher and student that trial lists;
- the longest wait between a teacher's publication and the start of the first student that
  distils from it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metakd.report import results  # noqa: E402
from metakd.storage import Store  # noqa: E402
from metakd.jobs.events import STUDENT, TEACHER, read_events  # noqa: E402


def sweep_yaml(gamma2: list[float], seeds: int, trials: int, student_workers: int) -> dict:
    return {
        "name": "schedule", "methods": ["metakd", "kd_single"], "seeds": list(range(seeds)),
        "data": {"source": "synthetic", "domains": ["alpha", "beta"], "max_length": 24, "vocab_size": 400,
                 "synthetic": {"num_domains": 2, "examples_per_domain": 300, "words_per_example": 16,
                               "shared_vocab": 40, "domain_vocab": 20, "label_noise": 0.0}},
        "teacher": {"preset": "tiny-teacher", "epochs": 6, "lr": 2e-3, "batch_size": 16},
        "student": {"preset": "tiny-student"},
        "distill": {"stage1_epochs": 1, "stage1_lr": 3e-3, "stage2_epochs": 3, "stage2_lr": 3e-3, "batch_size": 16},
        "search": {"algorithm": "grid", "num_samples": 1, "metric": "dev_accuracy", "mode": "max",
                   "params": {"gamma2": {"type": "grid", "values": gamma2}},
                   "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "student_workers": student_workers,
                                 "max_concurrent_trials": trials}},
    }


def busy(events: list[dict], lo: float, hi: float) -> float:
    """Slot-seconds the trainings in ``events`` spent inside [lo, hi]."""
    return sum(max(0.0, min(e["end"], hi) - max(e["start"], lo)) * e.get("world_size", 1) for e in events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gamma2", default="0,0.25,0.5,1")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--trials", type=int, default=2, help="max_concurrent_trials")
    parser.add_argument("--student-workers", type=int, default=2)
    parser.add_argument("--keep", default=None, help="keep the sweep's storage here instead of a temp dir")
    args = parser.parse_args()
    gamma2 = [float(g) for g in args.gamma2.split(",")]
    slots = os.cpu_count() or 2
    with tempfile.TemporaryDirectory(prefix="metakd-schedule-") as tmp:
        storage = args.keep or tmp
        path = Path(tmp) / "schedule.yaml"
        path.write_text(yaml.safe_dump(sweep_yaml(gamma2, args.seeds, args.trials, args.student_workers)))
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        env.pop("RAY_ADDRESS", None)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "metakd.cli", "sweep", str(path), "--storage", storage],
                              capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
        root = Path(storage) / "schedule"
        store = Store(str(root))
        teachers, students = read_events(store, TEACHER), read_events(store, STUDENT)
        df = results.load(str(root))
    rows = df[df["split"] == "test"]
    everything = teachers + students
    t_lo, t_hi = min(e["start"] for e in teachers), max(e["end"] for e in teachers)
    a_lo, a_hi = min(e["start"] for e in everything), max(e["end"] for e in everything)
    naive_teachers = int(rows.groupby("trial_id")["teacher_key"].nunique().sum())
    published = {e["key"]: e["end"] for e in teachers}
    first_student: dict[str, float] = {}
    for e in students:
        if e.get("teacher_key"):
            first_student[e["teacher_key"]] = min(first_student.get(e["teacher_key"], float("inf")), e["start"])
    waits = {k: first_student[k] - published[k] for k in first_student if k in published}
    worst = max(waits, key=waits.get) if waits else None
    print(f"command: python benchmarks/schedule.py --gamma2 {args.gamma2} --seeds {args.seeds} "
          f"--trials {args.trials} --student-workers {args.student_workers}")
    print(f"sweep: {len(gamma2)} gamma2 values x {args.seeds} seeds x {{metakd, kd_single}} x 2 domains; "
          f"{slots} slots (1 CPU each); max_concurrent_trials {args.trials}, student_workers "
          f"{args.student_workers}; wall {wall:.0f}s including Ray start-up")
    print(f"slot utilisation, teacher phase ({t_hi - t_lo:.1f}s): {busy(everything, t_lo, t_hi) / (slots * (t_hi - t_lo)):.2f}")
    print(f"slot utilisation, whole sweep ({a_hi - a_lo:.1f}s, first training start to last end): "
          f"{busy(everything, a_lo, a_hi) / (slots * (a_hi - a_lo)):.2f}")
    print(f"teacher trainings: {len(teachers)} (distinct teachers {df['teacher_key'].nunique()}; "
          f"naive sweep {naive_teachers})")
    print(f"student trainings: {len(students)} (distinct student jobs {df['student_key'].nunique()}; "
          f"naive sweep {len(rows)}; result rows per split {len(rows)}, {int(rows['reused_from'].notna().sum())} "
          f"of them reused)")
    if worst is not None:
        t = next(e for e in teachers if e["key"] == worst)
        print(f"longest wait from a teacher's publication to its first student's start: {waits[worst]:.1f}s "
              f"(teacher {t['kind']}{':' + t['domain'] if t.get('domain') else ''} seed={t['seed']}); "
              f"median {sorted(waits.values())[len(waits) // 2]:.1f}s")


if __name__ == "__main__":
    main()
