"""How much of a sweep's wall time is training, and how many teacher trainings reuse saves.

    python benchmarks/sweep_overhead.py [--sweep sweeps/smoke.yaml]

Runs the sweep from scratch in a temporary storage directory (a local Ray instance), then prints
- the time spent inside the training loops (teacher and student stages, summed over all
  processes) divided by the sweep's wall time: below 1 on a small machine, where Ray start-up and
  the fixed cost of each ``TorchTrainer.fit()`` dominate; concurrent trials can push it above 1;
- the number of teacher and student trainings against a naive sweep that trains, in every trial,
  every teacher and student that trial needs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metakd.report import results  # noqa: E402
from metakd.config import load_sweep  # noqa: E402
from metakd.storage import Store  # noqa: E402
from metakd.jobs.events import STUDENT, TEACHER, read_events  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default=str(ROOT / "sweeps" / "smoke.yaml"))
    args = parser.parse_args()
    cfg = load_sweep(args.sweep)
    with tempfile.TemporaryDirectory(prefix="metakd-overhead-") as storage:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "metakd.cli", "sweep", args.sweep, "--storage", storage],
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
        root = Path(storage) / cfg.name
        df = results.load(str(root))
        students = df[df["split"] == "test"]
        events = read_events(Store(str(root)), TEACHER)
        student_events = read_events(Store(str(root)), STUDENT)
    student_s = sum(e["train_seconds"] for e in student_events)
    teacher_s = sum(e["train_seconds"] for e in events)
    # a naive sweep trains, in every trial, every teacher that trial's students need
    naive = int(students.groupby("trial_id")["teacher_key"].nunique().sum())
    print(f"command: python benchmarks/sweep_overhead.py --sweep {Path(args.sweep).relative_to(ROOT)}")
    print(f"trials: {students['trial_id'].nunique()}, students: {len(students)}, wall time {wall:.1f}s "
          f"(including Ray start-up)")
    print(f"time inside training loops: teachers {teacher_s:.1f}s + students {student_s:.1f}s = "
          f"{teacher_s + student_s:.1f}s -> {(teacher_s + student_s) / wall:.2f} of the sweep's wall time")
    print(f"teacher trainings: {len(events)} (naive sweep, one set per trial: {naive}) -> "
          f"{naive / max(len(events), 1):.1f}x fewer")
    print(f"student trainings: {len(student_events)} (naive sweep, one per result row and split: {len(students)}) -> "
          f"{len(students) / max(len(student_events), 1):.1f}x fewer")


if __name__ == "__main__":
    main()
