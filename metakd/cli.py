"""``metakd`` command line: run | sweep | plan | validate | results | plot | table | compare | cost | export | predict."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from .errors import DataError
from .config import ConfigError, check_name, expand_user, load_experiment, load_sweep, load_yaml, tracking_from_flag
from .preflight import check_output, preflight


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
    trials = "" if cfg.search is None else f"; {_trials(cfg)}"
    print(f"{args.yaml}: ok - {kind} '{cfg.name}', methods {', '.join(cfg.methods)}, seeds {cfg.seeds}{trials}")
    return 0


def _trials(cfg) -> str:
    """How many trials the search makes, said explicitly: a grid's num_samples repeats every point."""
    s = cfg.search
    if s.algorithm != "grid":
        return f"{s.num_samples} trials ({s.algorithm})"
    points = 1
    for spec in s.params.values():
        points *= len(spec.values)
    return (f"grid of {points} points x search.num_samples {s.num_samples} = {points * s.num_samples} trials"
            + ("" if s.num_samples > 1 else " (each point once)"))


def cmd_run(args) -> int:
    from .jobs.run import run_and_report

    if "search" in load_yaml(args.yaml):
        raise ConfigError(f"{args.yaml}: has a search section, so it is a sweep; `metakd run` trains one "
                          f"configuration and would ignore it: run `metakd sweep {args.yaml}`")
    cfg = load_experiment(args.yaml)
    if args.output_dir:
        cfg.output_dir = expand_user(args.output_dir)
    # training runs on this machine (--ray starts a local instance): device, output_dir, paths, checkpoints;
    # the run reads the data next
    preflight(cfg, read_data=False)
    trackers = tracking_from_flag(args.tracking) if args.tracking else None
    return run_and_report(cfg, use_ray=args.ray, trackers=trackers)


def cmd_sweep(args) -> int:
    from .sweep.tuner import run_sweep

    cfg = load_sweep(args.yaml)
    if args.tracking is not None:
        cfg.search.tracking = tracking_from_flag(args.tracking, cfg.search.tracking)
    if args.name is not None:
        check_name(args.name, "--name")
    if args.storage is not None:
        args.storage = expand_user(args.storage)
    # before Ray starts: on a cluster (--address / a submitted job) paths missing here are the cluster's,
    # and so is the device; the storage is written from here (the driver) either way
    remote = bool(args.address or os.environ.get("RAY_ADDRESS"))
    for note in preflight(cfg, remote=remote, storage=args.storage, name=args.name):
        print(note, flush=True)
    if remote:
        check_output(cfg, args.storage, args.name)
    return run_sweep(cfg, address=args.address, storage=args.storage, name=args.name, yaml_path=args.yaml,
                     verbose=args.verbose, restart=args.restart)


def cmd_plan(args) -> int:
    from .sweep.plan import plan_file

    if args.name is not None:
        check_name(args.name, "--name")
    print(plan_file(args.yaml, storage=expand_user(args.storage), name=args.name, gpu=args.gpu, mfu=args.mfu,
                    gpus=args.gpus, peak_tflops=args.peak_tflops))
    return 0


def cmd_cost(args) -> int:
    from .jobs.events import STUDENT, TEACHER, read_events
    from .report import results
    from .report.cost import format_cost, sweep_cost
    from .storage import Store

    store = Store(args.path)
    try:
        rows = results.load(args.path)
    except (FileNotFoundError, ValueError):  # a sweep that has not written rows yet
        rows = None
    cost = sweep_cost(read_events(store, TEACHER), read_events(store, STUDENT), rows, args.slots)
    text = format_cost(cost, args.format)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0


_TRACKING_HELP = ("experiment trackers, comma-separated: mlflow, tensorboard, wandb (or none); each needs its "
                  "extra, e.g. pip install -e '.[mlflow]'")


def build_parser() -> argparse.ArgumentParser:
    from .export import cli as cli_export
    from .report import cli as cli_report

    parser = argparse.ArgumentParser(prog="metakd", description="Meta-KD experiments and Ray sweeps")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the Python traceback too (accepted anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one experiment (meta-teacher, students, baselines) and print the table")
    p.add_argument("yaml", help="experiment YAML (e.g. sweeps/example_run.yaml)")
    p.add_argument("--ray", action="store_true", help="run the training loops as Ray Train workers on a local Ray instance")
    p.add_argument("--output-dir", default=None, help="override output_dir of the YAML")
    p.add_argument("--tracking", default=None, metavar="NAMES", help=_TRACKING_HELP)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="run a sweep YAML with Ray Tune (+ Optuna) over Ray Train")
    p.add_argument("yaml", help="sweep YAML (e.g. sweeps/smoke.yaml)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: the job's cluster, else a local instance)")
    p.add_argument("--storage", default=None, help="override search.storage (local path or s3://, gs:// URI)")
    p.add_argument("--name", default=None, help="override the sweep name (the YAML's name)")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's output: Tune's result blocks, Ray INFO lines, every worker's log lines")
    p.add_argument("--restart", action="store_true",
                   help="start a new Tune run under this name: the old run's results, curves, Tune state and "
                        "events move to <storage>/<name>/previous/<timestamp>/ (teachers and students are "
                        "content-addressed and stay, to be reused)")
    p.add_argument("--tracking", default=None, metavar="NAMES", help=_TRACKING_HELP + "; replaces search.tracking, "
                   "keeping its settings for the trackers named")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("validate", help="check a sweep or experiment YAML, its data and checkpoints, "
                                        "without training anything")
    p.add_argument("yaml")
    p.add_argument("--remote", action="store_true",
                   help="paths that do not exist here are on the cluster: note them instead of failing")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="before a sweep (or run): its trials, the teachers and student jobs it needs, "
                                    "how many are in the cache, the FLOPs, GPU-hours and wall time of the rest "
                                    "(starts nothing)")
    p.add_argument("yaml", help="sweep or experiment YAML")
    p.add_argument("--storage", default=None, help="override search.storage (where the cache is looked up)")
    p.add_argument("--name", default=None, help="override the sweep name (its stored Optuna study, if any)")
    p.add_argument("--gpu", default="H100", help="GPU to estimate on, as CUDA names it (default: H100)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation to assume (default: 0.4)")
    p.add_argument("--gpus", type=float, default=None,
                   help="GPUs in the cluster (default: what max_concurrent_trials trials take at once)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for a --gpu not known")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("cost", help="device-hours of a sweep or run from its event files: by phase, method and "
                                    "trial, share served from the cache, utilisation, meta-teacher vs "
                                    "single-domain teachers")
    p.add_argument("path", help="sweep directory (<storage>/<name>) or metakd run directory (<output_dir>/<name>)")
    p.add_argument("--format", default="markdown", choices=("markdown", "csv"), help="output format")
    p.add_argument("--slots", type=float, default=None,
                   help="devices the sweep could use (default: the most it held at once)")
    p.add_argument("-o", "--out", default=None, help="write to this file instead of stdout")
    p.set_defaults(func=cmd_cost)

    cli_report.register(sub)
    cli_export.register(sub)
    return parser


# Bad input: one line `metakd: error: ...`, exit code 2 (argparse's own usage errors look the same).
# A missing or unreadable file, or a checkpoint / dataset that cannot be loaded, is an OSError.
_INPUT_ERRORS = (ConfigError, DataError, OSError, UnicodeDecodeError)


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input prints ``metakd: error: ...`` (exit 2), ``--debug`` adds the traceback."""
    _quiet_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, as the traceback is wanted after the fact
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("metakd: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        if isinstance(e, _INPUT_ERRORS):
            print(f"metakd: error: {e}", file=sys.stderr)
            return 2
        hint = "" if debug else " (add --debug for the traceback)"
        print(f"metakd: error: {type(e).__name__}: {e}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
