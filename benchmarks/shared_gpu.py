"""Student workers sharing one GPU, without Ray: what ``student_gpus_per_worker: 0.25`` does to memory.

First this process runs the experiment of ``--yaml`` (its ``search`` section dropped) once, which
trains and stores its teachers; then ``--workers`` processes start together, each training its
share of the student jobs again (job i goes to worker i mod N) on the same GPU with ``gpu_share``
= 1/N, as Ray's fractional-GPU student workers do: the teacher cache of each keeps to its share
(``metakd.train.teacher_cache.cache_budget``). Each worker's jobs, accuracies, seconds, peak
allocated / reserved memory and teacher-cache log lines go to ``--json``. ``benchmarks/gpu_check.sh``
runs it (where Ray is not installed) while it samples ``nvidia-smi`` per process every second.

    python benchmarks/shared_gpu.py --yaml sweeps/smoke.yaml --workers 4 --store /tmp/shared --json shared.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(path: str, device: str):
    from metakd.config import from_dict, load_yaml

    raw = load_yaml(path)
    raw.pop("search", None)
    raw["device"] = device
    return from_dict(raw, source=path)


def _worker(rank: int, workers: int, yaml_path: str, device: str, store_root: str, queue) -> None:
    import torch

    from metakd.data import load_prepared
    from metakd.jobs.experiment import ensure_data, plan
    from metakd.jobs.registry import LocalRegistry
    from metakd.storage import Store
    from metakd.train.runtime import LocalRuntime
    from metakd.train.student import train_student

    torch.set_num_threads(max(1, (os.cpu_count() or 4) // workers))
    cfg = _config(yaml_path, device)
    store = Store(store_root)
    lines: list[str] = []
    runtime = LocalRuntime(device, log=lambda msg: lines.append(str(msg)), gpu_share=1.0 / workers)
    rels = ensure_data(cfg, store, LocalRegistry(), log=lambda *_: None)  # published by the parent
    domains = store.read_json(f"{next(iter(rels.values()))}/meta.json")["domains"]
    gpus = 1.0 / workers if runtime.device.type == "cuda" else 0.0
    _, jobs = plan(cfg, domains, gpus, gpus)
    done = []
    for job in jobs[rank::workers]:
        start = time.perf_counter()
        teacher_dir = store.fetch_dir(job.teacher_rel) if job.teacher_rel else None
        result = train_student(job, cfg, load_prepared(store.fetch_dir(rels[job.seed])), teacher_dir, runtime)
        done.append({"job": f"{job.method}:{job.domain} seed={job.seed}", "dev_accuracy": result["dev_accuracy"],
                     "seconds": time.perf_counter() - start, "latency_ms_b1": result["latency_ms_b1"],
                     "latency_shared": result.get("latency_shared")})
    cuda = runtime.device.type == "cuda"
    queue.put({"rank": rank, "pid": os.getpid(), "gpu_share": runtime.gpu_share, "jobs": done,
               "max_allocated_mib": torch.cuda.max_memory_allocated(runtime.device) / 2**20 if cuda else None,
               "max_reserved_mib": torch.cuda.max_memory_reserved(runtime.device) / 2**20 if cuda else None,
               "cache_log": [line for line in lines if "teacher cache" in line]})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--yaml", default=str(ROOT / "sweeps" / "smoke.yaml"))
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--store", required=True, help="directory for the data, teachers and the first students")
    p.add_argument("--json", default=None, help="write the workers' reports here")
    a = p.parse_args()

    from metakd.jobs.experiment import LocalRunner, run_experiment
    from metakd.jobs.registry import LocalRegistry
    from metakd.storage import Store

    start = time.perf_counter()
    cfg = _config(a.yaml, a.device)
    first = run_experiment(cfg, Store(a.store), LocalRegistry(), LocalRunner(), log=lambda *_: None)
    setup = time.perf_counter() - start
    print(f"teachers and a first pass of {len(first['students'])} students (one process): {setup:.1f}s", flush=True)

    ctx = mp.get_context("spawn")  # CUDA in the children
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, a.workers, a.yaml, a.device, a.store, queue))
             for r in range(a.workers)]
    start = time.perf_counter()
    for proc in procs:
        proc.start()
    reports = []
    while len(reports) < len(procs):
        try:
            reports.append(queue.get(timeout=2.0))
        except queue_mod.Empty:
            if not any(proc.is_alive() for proc in procs) and queue.empty():
                break  # a worker died without reporting (its traceback is above)
    for proc in procs:
        proc.join()
    wall = time.perf_counter() - start
    reports.sort(key=lambda r: r["rank"])
    for r in reports:
        mem = f", peak allocated {r['max_allocated_mib']:.0f} MiB, reserved {r['max_reserved_mib']:.0f} MiB" \
            if r["max_allocated_mib"] is not None else ""
        print(f"worker {r['rank']} (pid {r['pid']}, {r['gpu_share']:g} of the device): {len(r['jobs'])} job(s){mem}")
        for line in r["cache_log"]:
            print(f"    {line}")
    print(f"{a.workers} workers side by side: {wall:.1f}s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"workers": a.workers, "setup_s": setup, "wall_s": wall, "reports": reports}, f, indent=1)
    return 0 if len(reports) == len(procs) and all(proc.exitcode == 0 for proc in procs) else 1


if __name__ == "__main__":
    sys.exit(main())
