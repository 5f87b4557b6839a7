"""Command line: ``selfgrow run`` (continual benchmark with growth and baselines) and
``selfgrow inspect RUN_DIR`` (growth timeline, summary, plot).

Exit codes: 0 success, 2 bad usage (unknown benchmark / strategy / model / action, value out
of range, bad --name, unusable --runs-dir, missing or non-run directory, bad --plot file,
missing data package; nothing is written), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from .errors import SelfgrowError


def _quiet_warnings() -> None:
    # Avalanche 0.6 calls its own deprecated storage-policy API on every experience, and
    # qpsolvers warns at import that no QP solver (unused here) is installed.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="no QP solver found")


def build_parser() -> argparse.ArgumentParser:
    from .continual.benchmarks import list_benchmarks
    from .continual.runner import MODELS, STRATEGIES, RunSpec
    from .runs import RUN_NAME_RULE

    d = RunSpec()
    p = argparse.ArgumentParser(
        prog="selfgrow",
        description="Grow neural networks while they learn.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    r = sub.add_parser(
        "run",
        help="train a growing model on a class-incremental benchmark, with fixed baselines",
        description=(
            "Train a small model that grows while it learns (GrowthController + Avalanche), "
            "then the same strategy with the small model fixed and with a fixed model of the "
            "grown run's final size. Writes RUNS_DIR/NAME/{events.jsonl,metrics.jsonl,tb/,"
            "summary.json,config.json}."
        ),
    )
    r.add_argument("--benchmark", choices=list_benchmarks(), default=d.benchmark)
    r.add_argument("--strategy", choices=STRATEGIES, default=d.strategy)
    r.add_argument("--model", choices=MODELS, default=d.model)
    r.add_argument("--mem-size", type=int, default=d.mem_size, help="replay buffer (samples)")
    r.add_argument("--epochs", type=int, default=d.epochs, help="epochs per experience")
    r.add_argument("--batch-size", type=int, default=d.batch_size, help="mini-batch size")
    r.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (all variants)")
    r.add_argument("--seed", type=int, default=d.seed,
                   help="seed of data split, initialisation and data order (>= 0)")
    r.add_argument("--width", type=int, default=d.width, help="hidden width of the small MLP")
    r.add_argument("--channels", type=int, default=d.channels,
                   help="channels of the small CNN")
    r.add_argument("--on-plateau", default=d.on_plateau,
                   help="growth action when the loss plateaus (e.g. widen, deepen)")
    r.add_argument("--on-forgetting", default=d.on_forgetting,
                   help="growth action when replay accuracy drops (e.g. widen, deepen)")
    r.add_argument("--max-growths", type=int, default=d.max_growths,
                   help="at most this many growths")
    r.add_argument("--name", default=None,
                   help="run name (default BENCHMARK-MODEL-STRATEGY; -1, -2 ... if taken): "
                        f"{RUN_NAME_RULE}")
    r.add_argument("--runs-dir", default="runs",
                   help="directory holding the runs (created if missing; default runs)")
    r.add_argument("--no-baselines", action="store_true", help="train the growing model only")
    r.add_argument("--device", default=d.device, help="cpu, cuda or auto")
    r.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: fastest for these small models, "
                        "and far faster than 2+ on a busy machine)")
    r.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are only drawn when stderr is a terminal)")

    i = sub.add_parser(
        "inspect",
        help="show a run's growth timeline and summary; --plot draws it",
        description="Growth timeline, summary, and an optional PNG plot of a run directory.",
    )
    i.add_argument("run_dir", metavar="RUN_DIR")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--plot", metavar="FILE.png", default=None,
                   help="write a plot (.png, .pdf or .svg) into an existing directory")
    i.add_argument("--all", action="store_true", help="include skipped decisions and anomalies")
    return p


def _cmd_run(a: argparse.Namespace) -> int:
    import torch

    from .continual.runner import RunSpec, run_experiment
    from .runs import check_run_name, check_runs_dir

    if a.threads < 1:
        print(f"selfgrow run: error: --threads must be >= 1, got {a.threads}", file=sys.stderr)
        return 2
    if a.name is not None:
        check_run_name(a.name)
    check_runs_dir(a.runs_dir)
    spec = RunSpec(
        benchmark=a.benchmark,
        strategy=a.strategy,
        model=a.model,
        mem_size=a.mem_size,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        device=a.device,
        baselines=not a.no_baselines,
        width=a.width,
        channels=a.channels,
        on_plateau=a.on_plateau,
        on_forgetting=a.on_forgetting,
        max_growths=a.max_growths,
    )
    spec.validate()  # before torch.set_num_threads: bad usage changes nothing
    torch.set_num_threads(a.threads)
    run_dir, _ = run_experiment(spec, runs_dir=a.runs_dir, name=a.name,
                                progress=not a.no_progress)
    print(f"\nrun directory: {run_dir}")
    print(f"inspect it:    selfgrow inspect {run_dir} --plot {run_dir}/growth.png")
    print(f"TensorBoard:   .venv/bin/tensorboard --logdir {run_dir}/tb")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from .inspect_run import inspect_main

    return inspect_main(a.run_dir, as_json=a.json, plot=a.plot, include_skipped=a.all)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``selfgrow``, ``python -m selfgrow``); returns the exit code."""
    _quiet_warnings()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args)
        return _cmd_inspect(args)
    except SelfgrowError as e:
        print(f"selfgrow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
