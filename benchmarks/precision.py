"""Function-preservation error of the EXACT growth operators in fp32, bf16, fp16 and under
``torch.autocast("cpu", dtype=torch.bfloat16)``.

Registry-driven: every registered operator that claims exactness (``get_operator(n).exact``)
and does not shrink is measured on every model family of the growth tests
(``tests/_families.py``: selfgrow's transformer variants, ``nn.TransformerEncoder``, HF BERT /
GPT-2 / LLaMA; ``net2wider`` / ``net2deeper`` on the MLP and CNN classifiers) that accepts it.
An exact operator without arguments here is listed as "not measured" (add it to ``kwargs``).

Modes:

* ``fp32`` / ``bf16`` / ``fp16``: the randomised model's parameters (and float inputs) are in
  that dtype; ``grow_`` measures the probe output before and after growth in that dtype.
* ``autocast-bf16``: fp32 parameters, and ``grow_`` (probe included) runs inside
  ``torch.autocast("cpu", dtype=torch.bfloat16)``, as it does when a controller grows a model
  trained under autocast.

The error is ``grow_``'s ``preservation["max_rel"]`` = max|y_after - y_before| / max|y_before|
(fp64 math on the probe outputs). Usage::

    PYTHONPATH=. python benchmarks/precision.py            # markdown table per family x mode
    PYTHONPATH=. python benchmarks/precision.py --detail   # also every (op, model) row
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the growth tests' model families and output helper

from _families import FAMILIES, make_input, randomize_  # noqa: E402
from _growth_checks import output  # noqa: E402

from selfgrow.adapters import get_adapter  # noqa: E402
from selfgrow.errors import IncompatibleModelError  # noqa: E402
from selfgrow.ops import get_operator, grow_, list_operators, make_config  # noqa: E402

MODES: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    # mode -> (parameter dtype, autocast dtype or None)
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "autocast-bf16": (torch.float32, torch.bfloat16),
}


def classifier_families() -> dict[str, Callable[[], nn.Module]]:
    from selfgrow.models.cnn import CNNConfig, GrowableCNN
    from selfgrow.models.mlp import GrowableMLP, MLPConfig

    return {
        "mlp": lambda: GrowableMLP(MLPConfig(in_features=64, hidden=(12, 10), n_classes=10)),
        "cnn": lambda: GrowableCNN(CNNConfig(in_channels=1, image_size=8, channels=(4, 6),
                                             n_classes=10, pool_after=(0,))),
    }


def operator_family(op: str) -> str:
    """The operator's module under ``selfgrow.ops`` (depth, width, ffn, heads, ...)."""
    return type(get_operator(op)).__module__.rsplit(".", 1)[-1]


def kwargs(op: str, model: nn.Module) -> dict[str, Any] | None:
    """Arguments of an exact growth of ``model`` by ``op`` (as in the operator test files),
    or None when the script has none for this operator."""
    if op in ("net2wider", "net2deeper"):
        return dict(layer=0, new_width=17) if op == "net2wider" else dict(layer=0)
    d = get_adapter(model).dims()
    g = d.n_heads // d.n_kv_heads
    table: dict[str, dict[str, Any]] = {
        "identity_insert": dict(positions=(1, 2)),
        "function_preserving_stack": {},
        "widen_d_model": {},
        "widen_d_model_masked": dict(new_d=d.d_model + 3),
        "ffn_net2wider": dict(new_d_ff=d.d_ff + 5, seed=1),
        "ffn_zero_fanout": dict(new_d_ff=d.d_ff + 3, init_std=0.3),
        "heads_clone": dict(new_n_heads=d.n_heads + g),
        "heads_fresh": dict(new_n_heads=d.n_heads + g, init_std=0.3),
        "extend_positions": dict(new_len=24, fill="interpolate"),
        "moe_upcycle": dict(n_experts=4),
    }
    if op == "compound_grow":
        steps = [make_config("widen_d_model"),
                 make_config("ffn_net2wider", new_d_ff=d.d_ff + 5, seed=1),
                 make_config("function_preserving_stack")]
        if not d.heads_tied_to_width:
            steps.append(make_config("heads_clone", new_n_heads=d.n_heads + g))
        return dict(steps=steps)
    return table.get(op)


@contextlib.contextmanager
def _autocast(dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast("cpu", dtype=dtype):
            yield


def measure(op: str, family: str, mode: str, seed: int = 0) -> dict[str, Any] | None:
    """Grow a randomised tiny ``family`` model by ``op`` in ``mode``; None when the operator
    does not apply to the family (IncompatibleModelError) or has no arguments here.

    Returns:
        ``{"max_rel", "max_abs", "exact_expected", "param_dtypes"}`` (``param_dtypes``: the
        dtypes of the grown model's parameters, to catch a growth that changed them).
    """
    pdtype, ac = MODES[mode]
    factories = {**FAMILIES, **classifier_families()}
    torch.manual_seed(seed)
    model = randomize_(factories[family](), seed=seed).to(pdtype).eval()
    if family in ("mlp", "cnn"):
        shape = (4, 64) if family == "mlp" else (4, 1, 8, 8)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(pdtype)
        fn: Callable[[nn.Module], torch.Tensor] = lambda m: m(x)  # noqa: E731
    else:
        args = make_input(model, dtype=pdtype, seed=seed)
        c0 = get_adapter(model).dims().d_model
        fn = lambda m: output(m, args, c0)  # noqa: E731
    kw = kwargs(op, model)
    if kw is None:
        return None
    cfg = make_config(op, **kw)
    try:
        get_operator(op).validate(model, cfg)
    except IncompatibleModelError:
        return None
    with _autocast(ac):
        ev = grow_(model, cfg, probe_fn=fn)
    p = ev.preservation
    return {"max_rel": p["max_rel"], "max_abs": p["max_abs"],
            "exact_expected": p["exact_expected"],
            "param_dtypes": sorted({str(q.dtype) for q in model.parameters()})}


def exact_growth_operators() -> list[str]:
    # names starting with "_" are operators that tests register for themselves
    return [n for n in list_operators() if not n.startswith("_")
            and get_operator(n).exact and not get_operator(n).shrinks]


def run_all(modes: list[str], seeds: list[int]) -> tuple[list[dict[str, Any]], list[str],
                                                        list[str]]:
    """Every (exact operator, model family, mode, seed) that applies.

    Returns:
        ``(rows, not_measured, not_exact_here)``: the rows whose growth ``grow_`` expected to
        be exact, the exact operators without arguments here, and the (op, model) pairs for
        which the operator itself reports a non-exact application (excluded from the rows).
    """
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    inexact: set[str] = set()
    clf = classifier_families()
    for op in exact_growth_operators():
        fams = list(clf) if op in ("net2wider", "net2deeper") else sorted(FAMILIES)
        measured = False
        for fam in fams:
            for mode in modes:
                for seed in seeds:
                    r = measure(op, fam, mode, seed)
                    if r is None:
                        continue
                    measured = True
                    if not r["exact_expected"]:
                        inexact.add(f"{op} on {fam}")
                        continue
                    rows.append({"op": op, "op_family": operator_family(op), "model": fam,
                                 "mode": mode, "seed": seed, **r})
        if not measured:
            skipped.append(op)
    return rows, skipped, sorted(inexact)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of "
                    + ", ".join(MODES))
    ap.add_argument("--seeds", type=int, default=3, help="random models per (op, model, mode)")
    ap.add_argument("--detail", action="store_true", help="print every (op, model) row")
    ap.add_argument("--json", default=None, help="also write every row to this file")
    a = ap.parse_args()
    modes = a.modes.split(",")
    rows, skipped, inexact = run_all(modes, list(range(a.seeds)))
    fams = sorted({r["op_family"] for r in rows})
    print("| operator family | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for f in fams:
        cells = []
        for mode in modes:
            errs = [r["max_rel"] for r in rows if r["op_family"] == f and r["mode"] == mode]
            cells.append(f"{max(errs):.2e}" if errs else "-")
        ops = sorted({r["op"] for r in rows if r["op_family"] == f})
        print(f"| {f} ({', '.join(ops)}) | " + " | ".join(cells) + " |")
    overall = [f"{max(r['max_rel'] for r in rows if r['mode'] == m):.2e}" for m in modes]
    print("| **all exact operators** | " + " | ".join(overall) + " |")
    changed = [r for r in rows if len(r["param_dtypes"]) != 1
               or r["param_dtypes"][0] != str(MODES[r["mode"]][0])]
    print(f"\nrows: {len(rows)}; parameter dtype changed by growth: {len(changed)}")
    for r in changed:
        print(f"  {r['op']} {r['model']} {r['mode']}: {r['param_dtypes']}")
    if skipped:
        print(f"not measured (no arguments here): {', '.join(skipped)}")
    if inexact:
        print(f"not exact on this model (the operator says so; excluded): {', '.join(inexact)}")
    if a.detail:
        for r in sorted(rows, key=lambda r: (r["op"], r["model"], r["mode"], r["seed"])):
            print(f"{r['op']:26s} {r['model']:26s} {r['mode']:14s} {r['seed']} "
                  f"{r['max_rel']:.3e}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
