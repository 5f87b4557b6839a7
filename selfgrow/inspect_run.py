"""``selfgrow inspect RUN_DIR``: growth timeline, run summary and an optional PNG plot.

Reads what ``selfgrow run`` (or any loop with a GrowthController and a log_dir) writes:
``events.jsonl`` (growth events; corrupt or truncated lines are reported by number and
skipped), ``summary.json`` (optional), ``metrics.jsonl`` (optional scalars: loss, parameter
count, signal values, evaluations).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .errors import RunDirError, choices_message
from .events import STRUCTURE_KINDS, BadLine, GrowthEvent, read_events
from .events.record import jsonable
from .runs import cli_command

#: ``--run latest``: the run that started last in the directory (the last run id to appear in
#: ``events.jsonl``, then in ``metrics.jsonl``)
LATEST = "latest"


@dataclass
class RunRecord:
    """Everything ``inspect`` found in a run directory."""

    run_dir: Path
    events: list[GrowthEvent] = field(default_factory=list)
    bad_lines: list[BadLine] = field(default_factory=list)
    has_events_file: bool = False
    summary: dict[str, Any] | None = None
    summary_error: str | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    bad_metric_lines: list[int] = field(default_factory=list)
    #: every run id found in the directory, in order of first appearance
    run_ids: list[str] = field(default_factory=list)
    #: the run shown (None: the directory names no run id)
    run_id: str | None = None
    #: metrics.jsonl rows without a run_id left out because several runs share the directory
    unattributed_metric_rows: int = 0
    #: status.json of ``selfgrow run`` (``{"status": "running" | "interrupted" | "failed" |
    #: "complete", ...}``), None when absent
    status: dict[str, Any] | None = None
    #: the summary of every seed (mean and std) when ``summary`` was narrowed to the seed of
    #: the run shown (``selfgrow run --seeds``); None otherwise
    seeds_summary: dict[str, Any] | None = None

    @property
    def growths(self) -> list[GrowthEvent]:
        """Growth events (capacity added), in log order."""
        return [e for e in self.events if e.kind == "growth"]

    @property
    def prunes(self) -> list[GrowthEvent]:
        """Prune events (capacity removed by a shrink operator), in log order."""
        return [e for e in self.events if e.kind == "prune"]

    @property
    def changes(self) -> list[GrowthEvent]:
        """Every event that changed the model's structure (growths and prunes), in order."""
        return [e for e in self.events if e.kind in STRUCTURE_KINDS]

    @property
    def other_run_ids(self) -> list[str]:
        return [r for r in self.run_ids if r != self.run_id]

    @property
    def incomplete(self) -> bool:
        """A ``selfgrow run`` that did not finish (killed, interrupted or failed)."""
        return self.status is not None and self.status.get("status") != "complete"



RUN_FILES = ("events.jsonl", "summary.json", "config.json")
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def check_plot_path(path: str | Path) -> str | None:
    """Why ``path`` cannot take a plot (``None`` if it can): the suffix must be one of
    :data:`PLOT_SUFFIXES` and the parent directory must already exist and be writable
    (nothing is created)."""
    p = Path(path)
    if p.suffix.lower() not in PLOT_SUFFIXES:
        return (f"--plot {str(p)!r}: unsupported file type {p.suffix or '(none)'!r}; "
                f"use {', '.join(PLOT_SUFFIXES)}")
    parent = p.parent
    if not parent.is_dir():
        return f"--plot {str(p)!r}: directory {str(parent)!r} does not exist"
    if p.is_dir():
        return f"--plot {str(p)!r} is a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--plot {str(p)!r}: directory {str(parent)!r} is not writable"
    return None


def load_run(run_dir: str | Path, run: str | None = None) -> RunRecord:
    """Read a run directory tolerantly.

    A log directory shared by several runs (a plain ``GrowthController(log_dir=...)``
    appends) holds events and metrics of several run ids: only one run is kept, ``run``
    (an id, or ``"latest"``; default: the latest). Metrics rows without a ``run_id`` (older
    files) are kept only when the directory holds a single run.

    Raises:
        RunDirError: ``run_dir`` does not exist, is not a directory or not a run directory,
            or ``run`` names no run in it (the message lists the ids).
    """
    d = Path(run_dir)
    if not d.exists():
        raise RunDirError(f"run directory {str(d)!r} does not exist")
    if not d.is_dir():
        raise RunDirError(f"{str(d)!r} is not a directory")
    if not any((d / f).is_file() for f in RUN_FILES):
        raise RunDirError(
            f"{str(d)!r} is not a selfgrow run directory (no events.jsonl, summary.json or "
            "config.json)"
        )
    rec = RunRecord(run_dir=d)
    ev_path = d / "events.jsonl"
    if ev_path.is_file():
        rec.has_events_file = True
        rec.events, rec.bad_lines = read_events(ev_path)
    s_path = d / "summary.json"
    if s_path.is_file():
        try:
            rec.summary = json.loads(s_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            rec.summary_error = f"summary.json unreadable: {e}"
    m_path = d / "metrics.jsonl"
    if m_path.is_file():
        with open(m_path, encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    rec.bad_metric_lines.append(i)
                    continue
                if isinstance(row, dict):
                    rec.metrics.append(row)
                else:
                    rec.bad_metric_lines.append(i)
    st_path = d / "status.json"
    if st_path.is_file():
        try:
            st = json.loads(st_path.read_text(encoding="utf-8"))
            rec.status = st if isinstance(st, dict) else {"status": "unreadable"}
        except (ValueError, UnicodeDecodeError):
            rec.status = {"status": "unreadable"}
    _select_run(rec, run)
    return rec


def _select_run(rec: RunRecord, run: str | None) -> None:
    ids: dict[str, None] = {}
    for e in rec.events:
        if e.run_id:
            ids.setdefault(e.run_id, None)
    for r in rec.metrics:
        rid = r.get("run_id")
        if isinstance(rid, str) and rid:
            ids.setdefault(rid, None)
    rec.run_ids = list(ids)
    if not rec.run_ids:
        if run not in (None, LATEST):
            raise RunDirError(f"--run {run!r}: {str(rec.run_dir)!r} names no run ids")
        return
    if run in (None, LATEST):
        chosen = rec.run_ids[-1]
    elif run in ids:
        chosen = run
    else:
        raise RunDirError(choices_message("--run", run, [LATEST, *rec.run_ids]))
    rec.run_id = chosen
    several = len(rec.run_ids) > 1
    rec.events = [e for e in rec.events if e.run_id == chosen or (not e.run_id and not several)]
    kept = []
    for r in rec.metrics:
        rid = r.get("run_id")
        if rid == chosen or (rid is None and not several):
            kept.append(r)
        elif rid is None:
            rec.unattributed_metric_rows += 1
    rec.metrics = kept
    _narrow_summary_to_seed(rec)


def _narrow_summary_to_seed(rec: RunRecord) -> None:
    """A multi-seed run (run ids ``NAME-seedS``): the summary shown (and plotted) is the
    chosen seed's own results; the mean and std over seeds stay in ``seeds_summary``."""
    summ = rec.summary or {}
    per_seed = summ.get("per_seed")
    if not isinstance(per_seed, dict) or len(per_seed) < 2 or not rec.run_id:
        return
    seed = rec.run_id.rsplit("-seed", 1)[-1] if "-seed" in rec.run_id else None
    if seed not in per_seed:
        return
    rec.seeds_summary = summ
    rec.summary = {**summ, "variants": per_seed[seed], "seed": int(seed)}


def _num(v: Any, fmt: str = "{:.4g}") -> str:
    if isinstance(v, bool) or v is None:
        return "-"
    if isinstance(v, (int, float)):
        return fmt.format(v) if math.isfinite(v) else str(v)
    return str(v)


def timeline_rows(events: list[GrowthEvent], include_skipped: bool = False) -> list[dict[str, Any]]:
    """One dict per growth or prune (and, optionally, skipped/anomaly) event, in log order."""
    rows = []
    for e in events:
        if e.kind not in STRUCTURE_KINDS and not include_skipped:
            continue
        trig = e.trigger or {}
        act = e.action or {}
        pres = e.preservation or {}
        cfg = (act.get("config") or {}).get("data") or {}
        rows.append({
            "seq": e.seq,
            "kind": e.kind,
            "step": e.step,
            "epoch": e.epoch,
            "experience": e.experience,
            "signal": trig.get("signal"),
            "value": trig.get("value"),
            "threshold": trig.get("threshold"),
            "action": act.get("name"),
            "operator": act.get("op") or act.get("name") or ("-" if e.kind == "anomaly" else None),
            "operator_config": cfg,
            "params_before": e.params_before,
            "params_after": e.params_after,
            "preservation_max_abs": pres.get("max_abs"),
            "preservation_max_rel": pres.get("max_rel"),
            "exact_expected": pres.get("exact_expected"),
            "reason": e.reason,
            "blocked": (e.extra or {}).get("blocked"),
        })
    return rows


def _exp_number(v: Any) -> str:
    """Experience ids are 0-based in the files (Avalanche's ids); text shows them 1-based,
    like ``selfgrow run``'s progress lines (``exp 1/5`` is experience id 0)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v + 1)
    return _num(v, "{}")


def _why(r: dict[str, Any]) -> str:
    """Why a decision was skipped (or what the anomaly was): ``blocked: reason``."""
    if r["kind"] in STRUCTURE_KINDS:
        return ""
    reason = str(r.get("reason") or "").strip()
    blocked = r.get("blocked")
    text = f"{blocked}: {reason}" if blocked and reason else str(blocked or reason or "-")
    return text if len(text) <= 160 else text[:157] + "..."


def _brief_value(v: Any) -> str:
    if isinstance(v, (list, tuple)) and len(v) > 6:
        return f"[{len(v)} values]"
    if isinstance(v, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in v):
        return "[" + ", ".join(_brief_value(x) for x in v) + "]"  # per-layer lists
    if isinstance(v, dict) and "weights" not in v and len(str(v)) > 60:
        return "{...}"
    return str(v)


def _step_name(step: Any) -> str:
    """The operator name of a serialised step config (its type when unknown)."""
    from .ops import op_config_from_dict

    try:
        return type(op_config_from_dict(step)).name
    except Exception:  # noqa: BLE001 - an unknown step still shows its type
        return str((step or {}).get("type", "?"))


def _brief_op(op: Any, cfg: dict[str, Any]) -> str:
    """``op(k=v, ...)`` with long lists elided; a compound growth lists its steps' operators
    (``compound_grow(widen_d_model + heads_clone + ...)``); a component growth names its
    component (``audio:net2wider(layer=0, new_width=16)``)."""
    if op == "component" and isinstance(cfg.get("step"), dict):
        step = cfg["step"]
        return f"{cfg.get('component')}:{_brief_op(_step_name(step), step.get('data') or {})}"
    if op == "compound_grow" and isinstance(cfg.get("steps"), list):
        names = []
        for st in cfg["steps"]:
            name = _step_name(st)
            if name == "component":  # uniform multimodal growth: audio:net2wider + ...
                inner = (st.get("data") or {}).get("step") or {}
                name = f"{(st.get('data') or {}).get('component')}:{_step_name(inner)}"
            names.append(name)
        return f"compound_grow({' + '.join(names)})"
    skip = {"seed", "noise_std", "weights"}
    if cfg.get("units") is not None:  # given units: the count and criterion played no part
        skip |= {"n_remove", "criterion"}
    brief = ", ".join(f"{k}={_brief_value(v)}" for k, v in cfg.items() if k not in skip)
    return f"{op}({brief})" if brief else str(op)


def format_timeline(rows: list[dict[str, Any]]) -> str:
    """Aligned text table of :func:`timeline_rows` (with a ``why skipped`` column when there
    are skipped decisions or anomalies). The ``exp`` column is 1-based."""
    header = ["#", "kind", "step", "exp", "trigger", "value (threshold)", "operator",
              "params before -> after", "preservation max_abs (rel)"]
    show_why = any(r["kind"] not in STRUCTURE_KINDS for r in rows)
    if show_why:
        header.append("why skipped")
    table = [header]
    for r in rows:
        op = _brief_op(r["operator"], r["operator_config"])
        line = [
            str(r["seq"]),
            r["kind"],
            _num(r["step"], "{}"),
            _exp_number(r["experience"]),
            str(r["signal"] or "-"),
            f"{_num(r['value'])} ({_num(r['threshold'])})",
            op,
            f"{r['params_before']:,} -> {r['params_after']:,}",
            f"{_num(r['preservation_max_abs'], '{:.2e}')} "
            f"({_num(r['preservation_max_rel'], '{:.2e}')})",
        ]
        if show_why:
            line.append(_why(r))
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    out = []
    for n, row in enumerate(table):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_summary(summary: dict[str, Any]) -> str:
    """Human summary: benchmark, data source and the variants' table (a pretrain run: its
    schedule, budget, growths and final validation loss)."""
    if summary.get("kind") == "pretrain":
        from .pretrain import format_summary as pretrain_summary

        return pretrain_summary(summary)
    from .continual.runner import format_summary_table

    lines = []
    bench = summary.get("benchmark") or {}
    src = summary.get("data_source") or bench.get("data_source") or {}
    if bench:
        lines.append(
            f"benchmark: {bench.get('name')} ({bench.get('n_experiences')} experiences), "
            f"strategy: {summary.get('strategy')}, model: {summary.get('model')}, "
            f"lr: {summary.get('lr')}, epochs/experience: {summary.get('epochs')}"
        )
    if src:
        lines.append(
            f"data: {src.get('dataset')} via {src.get('package')} {src.get('version')} "
            f"({src.get('n_train')} train / {src.get('n_test')} test, split seed "
            f"{src.get('split_seed')})"
        )
    if summary.get("variants"):
        lines.append("")
        lines.append(format_summary_table(summary))
    if summary.get("wall_seconds_total") is not None:
        lines.append(f"\ntotal wall time: {summary['wall_seconds_total']:.1f} s")
    return "\n".join(lines)


def _series(metrics: list[dict[str, Any]], *keys: str) -> tuple[list[float], list[float]]:
    for key in keys:
        xs = [float(r["step"]) for r in metrics if key in r and "step" in r]
        ys = [float(r[key]) for r in metrics if key in r and "step" in r]
        if xs:
            return xs, ys
    return [], []


def _last_step(rec: RunRecord) -> float | None:
    steps = [float(r["step"]) for r in rec.metrics
             if isinstance(r.get("step"), (int, float)) and not isinstance(r.get("step"), bool)]
    steps += [float(e.step) for e in rec.events if e.step is not None]
    return max(steps) if steps else None


def plot_run(rec: RunRecord, path: str | Path) -> Path:
    """Write the figure of :func:`build_figure` to ``path`` (.png, .pdf or .svg; the parent
    directory must exist)."""
    import matplotlib.pyplot as plt

    fig = build_figure(rec)
    out = Path(path)
    try:
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out


#: marker colour of a structural change in the figure
_EVENT_COLOR = {"growth": "tab:red", "prune": "tab:purple"}


def build_figure(rec: RunRecord) -> Any:
    """Parameters over steps with growth events marked, the training loss, and average
    accuracy on seen experiences after each experience (every variant in the summary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 10), constrained_layout=True)
    ax_p, ax_l, ax_a = axes
    growths = rec.changes  # growths and prunes: the parameter count goes up and down
    evals = [r for r in rec.metrics if r.get("kind") == "eval"]

    # parameters over steps
    # model/params: the one parameter-count tag; selfgrow/n_params: run dirs of older versions
    xs, ys = _series(rec.metrics, "model/params", "selfgrow/n_params")
    last_known = _last_step(rec)
    if growths:  # exact steps from the event log; the scalar log is sampled
        last = max(last_known or 0.0, float(growths[-1].step or 0))
        xs, ys = [0.0], [float(growths[0].params_before)]
        for e in growths:
            xs += [float(e.step or 0), float(e.step or 0)]
            ys += [float(e.params_before), float(e.params_after)]
        xs.append(last)
        ys.append(float(growths[-1].params_after))
    elif not xs and rec.events:  # no growth, no scalars: the events still know the size
        first = rec.events[0]
        xs = [0.0, max(last_known or 0.0, 0.0)]
        ys = [float(first.params_before), float(rec.events[-1].params_after)]
    elif xs and last_known is not None and last_known > xs[-1]:
        xs.append(last_known)
        ys.append(ys[-1])
    if xs:
        ax_p.step(xs, ys, where="post", color="tab:blue", label="parameters")
    for e in growths:
        sig = (e.trigger or {}).get("signal") or "manual"
        color = _EVENT_COLOR[e.kind]
        ax_p.axvline(float(e.step or 0), color=color, ls="--", lw=1)
        ax_p.annotate(
            f"{sig}\n{(e.action or {}).get('op') or (e.action or {}).get('name')}",
            (float(e.step or 0), float(e.params_after)),
            fontsize=7, xytext=(3, 3), textcoords="offset points", color=color,
        )
    ax_p.set_xlabel("optimizer step")
    ax_p.set_ylabel("parameters")
    n_prune = sum(1 for e in growths if e.kind == "prune")
    ax_p.set_title(f"growth timeline ({len(growths) - n_prune} growth events"
                   + (f", {n_prune} prune event{'s' * (n_prune != 1)}: purple)" if n_prune
                      else ")"))

    # loss curve
    lx, ly = _series(rec.metrics, "train/loss", "loss")
    if lx:
        ax_l.plot(lx, ly, color="tab:gray", lw=1, label="training loss")
    for e in growths:
        ax_l.axvline(float(e.step or 0), color=_EVENT_COLOR[e.kind], ls="--", lw=1)
    for r in evals:
        ax_l.axvline(float(r.get("step", 0)), color="tab:green", ls=":", lw=1)
    ax_l.set_xlabel("optimizer step")
    ax_l.set_ylabel("loss")
    keys = ["red: growth"] + ["purple: prune"] * bool(n_prune) + [
        "green: end of experience"] * bool(evals)
    ax_l.set_title(f"training loss ({', '.join(keys)})")
    if not lx:
        ax_l.text(0.5, 0.5, "no loss recorded (metrics.jsonl missing)", ha="center",
                  transform=ax_l.transAxes)

    if (rec.summary or {}).get("kind") == "pretrain" or any(
            r.get("kind") == "val" for r in rec.metrics):
        vals = [r for r in rec.metrics if r.get("kind") == "val" and "val_loss" in r]
        ax_a.plot([float(r["step"]) for r in vals], [float(r["val_loss"]) for r in vals],
                  marker=".", color="tab:green", label="validation loss")
        for e in growths:
            ax_a.axvline(float(e.step or 0), color="tab:red", ls="--", lw=1)
        ax_a.set_xlabel("optimizer step")
        ax_a.set_ylabel("validation loss (nats/token)")
        ax_a.set_title("validation loss (red: growth)")
        if vals:
            ax_a.legend(loc="upper right", fontsize=8)
        fig.suptitle(f"selfgrow pretrain {rec.run_dir.name}")
        return fig

    # accuracy per experience
    variants = (rec.summary or {}).get("variants") or {}
    from .continual.runner import VARIANT_LABELS

    for key, v in variants.items():
        acc = v.get("avg_accuracy_per_exp") or []
        if acc:
            ax_a.plot(range(1, len(acc) + 1), acc, marker="o", label=VARIANT_LABELS.get(key, key))
    stream = bool(evals) and all("prequential" in r for r in evals)
    if not variants and stream:  # a stream's drivers log each experience's test-then-train
        ax_a.plot(range(1, len(evals) + 1), [float(r["prequential"]) for r in evals],
                  marker="o", label="prequential accuracy")
    elif not variants and evals:
        acc = []
        for r in evals:
            seen = [a for a in (r.get("accuracy") or [])[: int(r.get("experience", 0)) + 1]
                    if isinstance(a, (int, float))]
            acc.append(sum(seen) / len(seen) if seen else float("nan"))
        ax_a.plot(range(1, len(acc) + 1), acc, marker="o", label="grown")
    n_points = max((len(line.get_xdata()) for line in ax_a.lines), default=0)
    if n_points:
        ax_a.set_xticks(range(1, n_points + 1))
    ax_a.set_xlabel("after training experience")
    ax_a.set_ylabel("prequential accuracy" if stream and not variants
                    else "avg test accuracy (seen classes)")
    ax_a.set_ylim(0, 1.02)
    if ax_a.lines:
        ax_a.set_title("accuracy per experience")
        ax_a.legend(loc="lower left", fontsize=8)
    else:
        ax_a.set_title("accuracy per experience: no accuracy data was recorded")
        ax_a.text(0.5, 0.5, "no accuracy data was recorded\n(no summary.json variants and no "
                  "eval rows in metrics.jsonl)", ha="center", va="center",
                  transform=ax_a.transAxes)
    title = f"selfgrow run {rec.run_dir.name}"
    if rec.run_id and rec.run_id != rec.run_dir.name:
        title += f" (run id {rec.run_id})"
    fig.suptitle(title)
    return fig


def safe_text(text: str, limit: int = 80) -> str:
    """``repr`` of at most ``limit`` characters of ``text``: control characters and binary
    junk of a corrupt file are escaped, never written raw to the terminal."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def inspect_main(
    run_dir: str,
    as_json: bool = False,
    plot: str | None = None,
    include_skipped: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
    run: str | None = None,
) -> int:
    """Entry point of ``selfgrow inspect``; returns the exit code (2: no such run dir, not a
    run dir, an unknown ``run`` id, or a ``plot`` path that cannot be written; nothing is
    written then).

    ``run``: the run id to show when several runs share the directory (``"latest"``, the
    default, shows the last one and lists the others)."""
    out = out or sys.stdout
    err = err or sys.stderr
    if plot is not None:
        why = check_plot_path(plot) if str(plot).strip() else "--plot needs a file name"
        if why:
            print(f"error: {why}", file=err)
            return 2
    try:
        rec = load_run(run_dir, run=run)
    except RunDirError as e:
        print(f"error: {e}", file=err)
        return 2
    for b in rec.bad_lines:
        print(f"warning: events.jsonl line {b.lineno} skipped ({safe_text(b.error, 120)}): "
              f"{safe_text(b.text)}", file=err)
    if rec.bad_metric_lines:
        print(f"warning: metrics.jsonl lines {rec.bad_metric_lines[:10]} skipped", file=err)
    if rec.unattributed_metric_rows:
        print(f"warning: {rec.unattributed_metric_rows} metrics.jsonl rows carry no run_id and "
              f"several runs share this directory: they are not plotted", file=err)
    if rec.summary_error:
        print(f"warning: {rec.summary_error}", file=err)
    rows = timeline_rows(rec.events, include_skipped=include_skipped)
    try:
        plot_path = plot_run(rec, plot) if plot else None
    except OSError as e:
        print(f"error: --plot {plot!r} cannot be written ({e.strerror or e})", file=err)
        return 2
    if as_json:
        doc = {
            "run_dir": str(rec.run_dir),
            "run_id": rec.run_id,
            "other_run_ids": rec.other_run_ids,
            "status": rec.status,
            "incomplete": rec.incomplete,
            "timeline": rows,
            "events": [e.to_dict() for e in rec.events],
            "bad_lines": [{"lineno": b.lineno, "error": b.error} for b in rec.bad_lines],
            "summary": rec.summary,
            "seeds_summary": rec.seeds_summary,
            "plot": str(plot_path) if plot_path else None,
        }
        print(json.dumps(jsonable(doc), indent=2, allow_nan=False), file=out)
        return 0
    print(f"run: {rec.run_dir}", file=out)
    if rec.run_id is not None:
        print(f"run id: {rec.run_id}", file=out)
    if rec.other_run_ids:
        print(f"this directory holds {len(rec.run_ids)} runs; showing {rec.run_id!r} "
              f"(--run ID selects another): {', '.join(rec.other_run_ids)}", file=out)
    if rec.incomplete:
        st = rec.status or {}
        where = f" at {st['progress']}" if st.get("progress") else ""
        state = ("is still running, or was killed" if st.get("status") == "running"
                 else "did not finish")
        print(f"INCOMPLETE: this run {state} (status {st.get('status')!r}{where}); "
              f"continue it with: {cli_command()} run --resume {rec.run_dir}", file=out)
    if not rec.has_events_file:
        print("no events.jsonl in this run directory", file=out)
    else:
        n_skip = sum(1 for e in rec.events if e.kind == "skipped")
        n_anom = sum(1 for e in rec.events if e.kind == "anomaly")
        hint = "" if include_skipped else "; --all shows skipped ones"
        n_prune = len(rec.prunes)
        prunes = f", {n_prune} prunes" if n_prune else ""
        print(f"\ngrowth timeline ({len(rec.growths)} growths{prunes}, {n_skip} skipped "
              f"decisions, {n_anom} anomalies{hint}; exp is 1-based):", file=out)
        print(format_timeline(rows) if rows else "(no growth events)", file=out)
    if rec.summary:
        seed = rec.summary.get("seed") if rec.seeds_summary else None
        print("\nsummary:" if seed is None else f"\nsummary of seed {seed}:", file=out)
        print(format_summary(rec.summary), file=out)
    if rec.seeds_summary:
        from .continual.runner import format_summary_table

        print(f"\nmean ± std over seeds {rec.seeds_summary.get('seeds')}:", file=out)
        print(format_summary_table(rec.seeds_summary), file=out)
    if plot_path:
        print(f"\nplot written to {plot_path}", file=out)
    return 0
