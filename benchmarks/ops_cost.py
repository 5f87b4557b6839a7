"""Cost of every growth operator on the ~100M-parameter selfgrow reference transformer.

For each registered operator that applies to :class:`~selfgrow.models.GrowableTransformer`
(registry-driven: new operators are picked up; those needing arguments get them from
``KW``), a FRESH subprocess builds the reference model (decoder, pre-LN, 12 layers,
d_model 768, 12 heads, d_ff 3072, vocab 16384, 1024 positions, tied embeddings: ~98M
parameters), gives Adam populated state (one step on random gradients: exp_avg, exp_avg_sq and
step for every tensor), and measures in that same process:

* **time**: wall time of ``grow_(model, config, optimizer=adam)`` (operator + optimizer
  migration, no probe) vs the **memory-copy floor**, the median time of cloning every
  parameter and every Adam state tensor once (``floor_pre``: the model before growth, the
  literal floor; ``floor_grown``: the grown model, the least traffic that could write the
  result). Target: exact operators within 3x ``floor_pre``.
* **peak extra memory**: the process's resident-set high-water mark during ``grow_`` minus
  its resident set just before, vs the bytes of the grown model's parameters plus its
  optimizer state. Target: within 2x.

Why this memory method is sound on CPU: tracemalloc does not see torch's allocator; RSS does,
but only if freed tensors really leave the process and reused heap pages do not hide new
allocations. The worker therefore runs with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` (fixed:
every allocation of 64 KiB and more -- every tensor that matters here -- is its own mmap,
returned to the OS when freed, and the dynamic threshold that would otherwise move large
tensors onto the never-trimmed heap after the first free is disabled) and
``MALLOC_TRIM_THRESHOLD_=131072``. Just before ``grow_`` the kernel's high-water mark is reset
(``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and the current RSS read from
``/proc/self/statm``; after ``grow_`` the high-water mark is read from ``VmHWM`` in
``/proc/self/status`` (``resource.getrusage().ru_maxrss`` deltas are recorded too; they are
only meaningful when the growth raises the lifetime peak, hence the reset). One subprocess
per operator, so no operator sees another's heap.

Usage::

    python benchmarks/ops_cost.py                      # full: 12 layers (the lead runs it)
    python benchmarks/ops_cost.py --quick              # 4 layers, d_model 768 (< 3 min)
    python benchmarks/ops_cost.py --quick --ops identity_insert,widen_d_model
    python benchmarks/ops_cost.py --quick --device cuda  # on a GPU: ops_cost_quick_cuda.*

Writes ``benchmarks/results/ops_cost.{md,json}`` (``--quick``: ``ops_cost_quick``;
``--out`` to change) with the command,
machine info and pass/fail per target.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
TIME_TARGET = 3.0  # grow_ time / copy floor, exact operators
MEM_TARGET = 2.0  # peak extra RSS / (grown params + optimizer state)
FULL = dict(n_layers=12, d_model=768, n_heads=12, d_ff=3072, vocab_size=16384, max_seq_len=1024)
QUICK_LAYERS = 4
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def build_model(**overrides: int) -> nn.Module:
    """The selfgrow reference transformer (~98M parameters with the defaults in ``FULL``)."""
    from selfgrow.models.transformer import GrowableTransformer, TransformerConfig

    return GrowableTransformer(TransformerConfig(**{**FULL, **overrides}))  # type: ignore[arg-type]


def _d(m: nn.Module) -> Any:
    return m.config


#: arguments per operator on the reference model (defaults when not listed)
KW: dict[str, Callable[[nn.Module], dict[str, Any]]] = {
    "identity_insert": lambda m: dict(positions=(_d(m).n_layers // 2,)),
    "g_insert": lambda m: dict(positions=(_d(m).n_layers // 2,)),
    "g_random": lambda m: dict(n_new=1, positions=(_d(m).n_layers // 2,)),
    "widen_d_model_pad": lambda m: dict(new_d=_d(m).d_model + 256),
    "widen_d_model_masked": lambda m: dict(new_d=_d(m).d_model + 256),
    "ffn_net2wider": lambda m: dict(new_d_ff=_d(m).d_ff + 1024),
    "ffn_zero_fanout": lambda m: dict(new_d_ff=_d(m).d_ff + 1024),
    "heads_clone": lambda m: dict(new_n_heads=_d(m).n_heads + 4),
    "heads_fresh": lambda m: dict(new_n_heads=_d(m).n_heads + 4),
    "extend_positions": lambda m: dict(new_len=2 * _d(m).max_seq_len),
    "ffn_remove_units": lambda m: dict(n_remove=_d(m).d_ff // 4),
    "heads_remove": lambda m: dict(n_remove=_d(m).n_heads // (_d(m).n_kv_heads or _d(m).n_heads)),
    "remove_layers": lambda m: dict(layers=(_d(m).n_layers // 2,)),
    "compound_grow": lambda m: dict(steps=[
        _make("identity_insert", positions=(_d(m).n_layers // 2,)),
        _make("ffn_net2wider", new_d_ff=_d(m).d_ff + 1024)]),
}


def _make(name: str, **kw: Any) -> Any:
    from selfgrow.ops import make_config

    return make_config(name, **kw)


# ------------------------------------------------------------------------------ worker
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for st in opt.state.values() for v in st.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0]


def _nbytes(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _copy_floor(model: nn.Module, opt: torch.optim.Optimizer, reps: int = 5) -> float:
    """Median seconds to clone every parameter and Adam state tensor once."""
    ts = list(model.parameters()) + _state_tensors(opt)
    device = ts[0].device
    times = []
    for _ in range(reps):
        gc.collect()
        _sync(device)
        t0 = time.perf_counter()
        clones = [t.detach().clone() for t in ts]
        _sync(device)
        times.append(time.perf_counter() - t0)
        del clones
    return statistics.median(times)


def worker(op: str, n_layers: int, device_name: str = "cpu") -> dict[str, Any]:
    from selfgrow.ops import get_operator, grow_, make_config

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = build_model(n_layers=n_layers).to(device)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-4)
    with torch.no_grad():
        for p in params:
            p.grad = torch.empty_like(p).normal_(0.0, 1e-3)
    opt.step()
    for p in params:
        p.grad = None
    del params
    kw = KW[op](model) if op in KW else {}
    cfg = make_config(op, **kw)
    exact = bool(get_operator(op).is_exact(model, cfg))
    n_before = sum(p.numel() for p in model.parameters())
    floor_pre = _copy_floor(model, opt)

    gc.collect()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:  # device memory: the caching allocator's own counters
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        reset_ok, rss0 = True, torch.cuda.memory_allocated(device)
    else:
        reset_ok = _reset_hwm()
        rss0 = _rss()
    t0 = time.perf_counter()
    ev = grow_(model, cfg, optimizer=opt)
    _sync(device)
    seconds = time.perf_counter() - t0
    hwm = torch.cuda.max_memory_allocated(device) if cuda else _hwm()
    maxrss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss1 = torch.cuda.memory_allocated(device) if cuda else _rss()

    grown_params = _nbytes(list(model.parameters()))
    grown_state = _nbytes(_state_tensors(opt))
    floor_grown = _copy_floor(model, opt, reps=3)
    return dict(
        op=op, device=str(device), kwargs={k: repr(v) for k, v in kw.items()}, exact=exact,
        params_before=n_before, params_after=sum(p.numel() for p in model.parameters()),
        grow_seconds=seconds, op_seconds_reported=ev.op_seconds,
        floor_pre_seconds=floor_pre, floor_grown_seconds=floor_grown,
        time_ratio=seconds / floor_pre, time_ratio_grown=seconds / floor_grown,
        rss_before=rss0, rss_after=rss1, hwm=hwm, hwm_reset=reset_ok,
        peak_extra_bytes=hwm - rss0, maxrss_delta_bytes=maxrss1 - maxrss0,
        grown_param_bytes=grown_params, grown_state_bytes=grown_state,
        mem_ratio=(hwm - rss0) / (grown_params + grown_state),
    )


# ------------------------------------------------------------------------------ driver
def applicable_ops(selected: list[str] | None, n_layers: int) -> tuple[list[str], dict[str, str]]:
    """Registered operators that accept the reference model, and why the others are left out."""
    from selfgrow.errors import GrowthConfigError, IncompatibleModelError
    from selfgrow.ops import get_operator, list_operators, make_config

    model = build_model(n_layers=2, vocab_size=64, max_seq_len=16, d_model=64, n_heads=4,
                        d_ff=128)
    ok, skipped = [], {}
    for op in list_operators():
        if op.startswith("_") or (selected and op not in selected):
            continue
        try:
            kw = KW[op](model) if op in KW else {}
            get_operator(op).validate(model, make_config(op, **kw))
        except IncompatibleModelError as e:
            skipped[op] = f"not applicable to GrowableTransformer ({str(e).split(';')[0]})"
            continue
        except GrowthConfigError as e:
            skipped[op] = f"needs arguments: add it to KW ({e})"
            continue
        ok.append(op)
    if selected:
        unknown = sorted(set(selected) - set(list_operators()))
        for op in unknown:
            skipped[op] = "unknown operator"
    return ok, skipped


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return dict(nproc=os.cpu_count(), cpu=cpu, torch=torch.__version__,
                torch_threads=torch.get_num_threads(), python=platform.python_version(),
                platform=platform.platform(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"))


def run_worker(op: str, n_layers: int, timeout: float, device: str = "cpu") -> dict[str, Any]:
    env = {**os.environ, **MALLOC_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", op,
           "--layers", str(n_layers), "--device", device]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                             check=False)
    except subprocess.TimeoutExpired:
        return dict(op=op, error=f"timed out after {timeout:.0f} s")
    if out.returncode != 0:
        return dict(op=op, error=out.stderr.strip().splitlines()[-1] if out.stderr else
                    f"exit {out.returncode}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["worker_seconds"] = time.perf_counter() - t0
    return res


def _mb(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def table(rows: list[dict[str, Any]], skipped: dict[str, str], layers: int) -> str:
    quick = f" (QUICK: fewer than the {FULL['n_layers']} of the full run)"
    head = (f"Reference transformer: {layers} layers{quick if layers != FULL['n_layers'] else ''}, "
            f"d_model {FULL['d_model']}, {FULL['n_heads']} heads, d_ff {FULL['d_ff']}, "
            f"vocab {FULL['vocab_size']}, {FULL['max_seq_len']} positions; Adam with populated "
            f"state.\n\n")
    lines = [
        "| operator | exact | params before -> after (M) | grow_ s | copy floor s (pre / grown) "
        "| time ratio (pre / grown) | time target | peak extra MiB | grown params+state MiB "
        "| mem ratio | mem target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | | | error: {r['error']} | | | FAIL | | | | FAIL |")
            continue
        t_ok = r["time_ratio"] <= TIME_TARGET
        t_cell = ("PASS" if t_ok else "FAIL") if r["exact"] else (
            "(inexact: " + ("within" if t_ok else "over") + ")")
        m_cell = "PASS" if r["mem_ratio"] <= MEM_TARGET else "FAIL"
        lines.append(
            f"| {r['op']} | {'yes' if r['exact'] else 'no'} "
            f"| {r['params_before'] / 1e6:.1f} -> {r['params_after'] / 1e6:.1f} "
            f"| {r['grow_seconds']:.3f} | {r['floor_pre_seconds']:.3f} / "
            f"{r['floor_grown_seconds']:.3f} | {r['time_ratio']:.2f} / "
            f"{r['time_ratio_grown']:.2f} | {t_cell} | {_mb(r['peak_extra_bytes'])} "
            f"| {_mb(r['grown_param_bytes'] + r['grown_state_bytes'])} | {r['mem_ratio']:.2f} "
            f"| {m_cell} |"
        )
    for op, why in sorted(skipped.items()):
        lines.append(f"| {op} | | | skipped: {why} | | | | | | | |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_LAYERS} layers instead of {FULL['n_layers']} (< 3 minutes)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--ops", default="", help="comma-separated operator names (default: all)")
    ap.add_argument("--out", default=None,
                    help="output path without extension (.md and .json are written); default "
                    "benchmarks/results/ops_cost (full run) or ops_cost_quick (--quick)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per operator")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the model and optimizer live (cuda: time with synchronize, "
                    "peak extra memory from torch.cuda.max_memory_allocated)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False on this machine")
    layers = args.layers or (QUICK_LAYERS if args.quick else FULL["n_layers"])
    if args.worker:
        print(json.dumps(worker(args.worker, layers, args.device)))
        return 0

    selected = [s for s in args.ops.split(",") if s] or None
    ops, skipped = applicable_ops(selected, layers)
    rows = []
    t0 = time.perf_counter()
    for op in ops:
        r = run_worker(op, layers, args.timeout, args.device)
        rows.append(r)
        msg = r.get("error") or (f"grow_ {r['grow_seconds']:.3f}s = {r['time_ratio']:.2f}x "
                                 f"floor, peak extra {r['mem_ratio']:.2f}x grown bytes")
        print(f"[ops_cost] {op}: {msg}", file=sys.stderr, flush=True)
    total = time.perf_counter() - t0
    md = table(rows, skipped, layers)
    exact_rows = [r for r in rows if "error" not in r and r["exact"]]
    ok_rows = [r for r in rows if "error" not in r]
    summary = dict(
        time_target=f"exact operators: grow_ <= {TIME_TARGET}x copy floor (pre-growth)",
        mem_target=f"peak extra RSS <= {MEM_TARGET}x grown params + optimizer state",
        time_pass=all(r["time_ratio"] <= TIME_TARGET for r in exact_rows),
        mem_pass=all(r["mem_ratio"] <= MEM_TARGET for r in ok_rows),
        errors=[r["op"] for r in rows if "error" in r],
        time_fail=[r["op"] for r in exact_rows if r["time_ratio"] > TIME_TARGET],
        mem_fail=[r["op"] for r in ok_rows if r["mem_ratio"] > MEM_TARGET],
    )
    command = "python " + " ".join(shlex.quote(a) for a in [
        os.path.relpath(Path(__file__).resolve(), Path.cwd()), *(argv or sys.argv[1:])])
    info = machine_info()
    if args.device == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(0)
    doc = (f"# Growth operator cost\n\nCommand: `{command}` ({total:.0f} s)\n\n"
           f"Machine: {info['nproc']} CPUs ({info['cpu']}), torch {info['torch']}, "
           f"{info['torch_threads']} torch threads, Python {info['python']}, "
           f"{info['platform']}"
           f"{'; device ' + info['cuda_device'] + ' (cuda)' if 'cuda_device' in info else ''}"
           f"\n\n{md}\n"
           f"Targets: {summary['time_target']} -> "
           f"{'PASS' if summary['time_pass'] else 'FAIL ' + str(summary['time_fail'])}; "
           f"{summary['mem_target']} -> "
           f"{'PASS' if summary['mem_pass'] else 'FAIL ' + str(summary['mem_fail'])}"
           f"{'; errors: ' + str(summary['errors']) if summary['errors'] else ''}.\n\n"
           "Time ratio `grown` divides by the floor of the grown model (the least memory "
           "traffic that could write the result); the target uses the literal pre-growth "
           "floor. Peak extra memory: VmHWM after a reset minus RSS before `grow_`, malloc "
           "pinned to mmap for >= 64 KiB (see the module docstring).\n")
    print(doc)
    out = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / (("ops_cost_quick" if args.quick else "ops_cost")
                                           + ("_cuda" if args.device == "cuda" else ""))
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(doc)
    out.with_suffix(".json").write_text(json.dumps(dict(
        command=command, seconds=total, machine=info, layers=layers, model={**FULL,
                                                                            "n_layers": layers},
        quick=layers != FULL["n_layers"], summary=summary, rows=rows, skipped=skipped,
    ), indent=2))
    return 0 if (summary["time_pass"] and summary["mem_pass"] and not summary["errors"]) else 1


if __name__ == "__main__":
    sys.exit(main())
