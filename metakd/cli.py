"""``metakd`` command line: run | sweep | validate | results | plot | table."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import DataError
from .config import ConfigError, load_experiment, load_sweep, load_yaml
from .preflight import preflight


def _quiet_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def cmd_validate(args) -> int:
    # a file with a search section is a sweep; without one, an experiment for `metakd run`
    loader = load_sweep if "search" in load_yaml(args.yaml) else load_experiment
    cfg = loader(args.yaml)
    kind = "experiment" if cfg.search is None else f"sweep ({len(cfg.search.params)} searched parameters)"
    # the data and checkpoints this machine can see are read as training would read them
    for note in preflight(cfg, remote=args.remote):
        print(f"  {note}")
    print(f"{args.yaml}: ok - {kind} '{cfg.name}', methods {', '.join(cfg.methods)}, seeds {cfg.seeds}")
    return 0


def cmd_run(args) -> int:
    from .jobs.run import run_and_report

    cfg = load_experiment(args.yaml)
    preflight(cfg, read_data=False)  # the run reads the data next; refuse bad paths and checkpoints first
    if args.output_dir:
        cfg.output_dir = args.output_dir
    return run_and_report(cfg, use_ray=args.ray)


def cmd_sweep(args) -> int:
    from .sweep.tuner import run_sweep

    cfg = load_sweep(args.yaml)
    # before Ray starts: on a cluster (--address / a submitted job) paths missing here are the cluster's
    for note in preflight(cfg, remote=bool(args.address or os.environ.get("RAY_ADDRESS"))):
        print(note, flush=True)
    return run_sweep(cfg, address=args.address, storage=args.storage, name=args.name, yaml_path=args.yaml,
                     verbose=args.verbose)


def build_parser() -> argparse.ArgumentParser:
    from .report import cli as cli_report

    parser = argparse.ArgumentParser(prog="metakd", description="Meta-KD experiments and Ray sweeps")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one experiment (meta-teacher, students, baselines) and print the table")
    p.add_argument("yaml", help="experiment YAML (e.g. sweeps/example_run.yaml)")
    p.add_argument("--ray", action="store_true", help="run the training loops as Ray Train workers on a local Ray instance")
    p.add_argument("--output-dir", default=None, help="override output_dir of the YAML")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="run a sweep YAML with Ray Tune (+ Optuna) over Ray Train")
    p.add_argument("yaml", help="sweep YAML (e.g. sweeps/smoke.yaml)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: the job's cluster, else a local instance)")
    p.add_argument("--storage", default=None, help="override search.storage (local path or s3://, gs:// URI)")
    p.add_argument("--name", default=None, help="override the sweep name (the YAML's name)")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's output: Tune's result blocks, Ray INFO lines, every worker's log lines")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("validate", help="check a sweep or experiment YAML, its data and checkpoints, "
                                        "without training anything")
    p.add_argument("yaml")
    p.add_argument("--remote", action="store_true",
                   help="paths that do not exist here are on the cluster: note them instead of failing")
    p.set_defaults(func=cmd_validate)

    cli_report.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_env()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing file, or a checkpoint / dataset that cannot be loaded offline
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
