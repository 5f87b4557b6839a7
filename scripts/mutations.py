"""Mutation check: small deliberate bugs that the test suite must catch (run by
``scripts/mutation-check``; not part of CI).

Each mutation names a source file, an EXACT snippet of it, its replacement and the tests that
must turn red. The runner copies the repository to a temporary directory, applies one
mutation at a time to the copy, runs the named tests there and reports ``killed`` (red) or
``SURVIVED`` (green). It exits non-zero if a mutation survives, if its tests could not run,
or if a snippet is no longer found exactly once in the source (so this list cannot rot
silently: update the snippet when the code changes).

Usage: scripts/mutation-check [-k SUBSTRING] [--list] [--no-baseline]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str  # exact snippet, found exactly once
    new: str
    tests: tuple[str, ...]  # pytest arguments (files, node ids, -k expressions)
    #: further (file, old, new) edits applied together with this one (a bug that takes two
    #: lines, e.g. removing both of two redundant defences)
    also: tuple[tuple[str, str, str], ...] = ()

    def edits(self) -> list[tuple[str, str, str]]:
        return [(self.file, self.old, self.new), *self.also]


MUTATIONS: list[Mutation] = [
    # ---------------------------------------------------------------- DDP
    Mutation(
        "ddp-ranks-apply-their-own-decision",
        "selfgrow/control/distributed.py",
        "        box: list[Any] = [result]\n"
        "        dist.broadcast_object_list(box, src=src, group=self.group)\n",
        "        box: list[Any] = [result if self.rank == 0 else self.inner.decide(states, ctx)]\n",
        ("tests/test_distributed_decision.py",),
    ),
    Mutation(
        "ddp-policy-runs-on-every-rank",
        "selfgrow/control/distributed.py",
        "        if self.rank == 0:\n            try:\n                result = self.inner.decide",
        "        if True:\n            try:\n                result = self.inner.decide",
        ("tests/test_distributed_decision.py",),
    ),
    Mutation(
        "ddp-consistency-check-never-fires",
        "selfgrow/control/distributed.py",
        "            if any(x != all_[0] for x in all_):",
        "            if False:",
        ("tests/test_distributed.py::test_negative_control_unsynchronised_growth_rng_is_detected",),
    ),
    # ---------------------------------------------------------------- optimizer migration
    Mutation(
        "adam-new-coordinates-c-zero",
        "selfgrow/optim.py",
        "    return max((a - (1 - b2)) / b2, 0.0)",
        "    return 0.0",
        ("tests/test_optim_closed_form.py",),
    ),
    Mutation(
        "adam-new-coordinates-c-constant",
        "selfgrow/optim.py",
        "    return max((a - (1 - b2)) / b2, 0.0)",
        "    return 1.0",
        ("tests/test_optim_closed_form.py",),
    ),
    Mutation(
        "rmsprop-new-coordinates-c-zero",
        "selfgrow/optim.py",
        "                    c = max((1 / r**2 - (1 - a)) / a, 0.0)",
        "                    c = 0.0",
        ("tests/test_optim_closed_form.py",),
    ),
    Mutation(
        "adagrad-new-coordinates-c-zero",
        "selfgrow/optim.py",
        "                    c = max(1 / r**2 - 1, 0.0)",
        "                    c = 0.0",
        ("tests/test_optim_closed_form.py",),
    ),
    Mutation(
        "adagrad-new-tensor-c-zero",
        "selfgrow/optim.py",
        '"sum": (g * g * max(1 / r**2 - 1, 0.0)).to(p.dtype)}',
        '"sum": (g * g * 0.0).to(p.dtype)}',
        ("tests/test_optim_closed_form.py",),
    ),
    Mutation(
        "copies-first-moment-not-scaled",
        "selfgrow/optim.py",
        "        if k in FIRST_MOMENT_KEYS:\n            if scaled:\n"
        "                vals.mul_(_as(s, vals))",
        "        if k in FIRST_MOMENT_KEYS:\n            if scaled:\n"
        "                pass",
        ("tests/test_optim.py::test_copied_units_get_scaled_moments",),
    ),
    Mutation(
        "copies-second-moment-scaled-by-s-not-s2",
        "selfgrow/optim.py",
        "                vals.mul_(_as(s, vals) ** 2)",
        "                vals.mul_(_as(s, vals))",
        ("tests/test_optim.py::test_copied_units_get_scaled_moments",),
    ),
    Mutation(
        "optimizer-state-not-permuted-for-copies",
        "selfgrow/optim.py",
        "        vals, new_mask = m.gather(v, p.shape)\n",
        "        vals, new_mask = m.gather(v, p.shape)\n"
        "        if vals.shape != v.shape:  # mutation: state padded by position, not gathered\n"
        "            lead = tuple(slice(0, s) for s in v.shape)\n"
        "            vals = torch.zeros_like(vals)\n"
        "            vals[lead] = v\n",
        ("tests/test_optim.py::test_copied_units_get_scaled_moments",),
    ),
    # ---------------------------------------------------------------- growth operators
    Mutation(
        "splitting-layer-not-halving",
        "selfgrow/ops/depth.py",
        'out += [Slot(i, "copy", out_scale=0.5), Slot(i, "copy", out_scale=0.5)]',
        'out += [Slot(i, "copy"), Slot(i, "copy")]',
        ("tests/test_inexact_structure.py", "-k", "splitting"),
    ),
    Mutation(
        "splitting-layer-inf",
        "selfgrow/ops/depth.py",
        'out += [Slot(i, "copy", out_scale=0.5), Slot(i, "copy", out_scale=0.5)]',
        'out += [Slot(i, "copy", out_scale=0.5), Slot(i, "copy", out_scale=float("inf"))]',
        ("tests/test_inexact_structure.py", "-k", "splitting and sg-preln"),
    ),
    Mutation(
        "g-random-biases-not-zeroed",
        "selfgrow/ops/depth.py",
        '                    elif isinstance(getattr(m, "bias", None), nn.Parameter):\n'
        "                        m.bias.zero_()",
        "                    elif False:\n                        pass",
        ("tests/test_inexact_structure.py", "-k", "g_random"),
    ),
    Mutation(
        "g-interleave-noise-not-relative",
        "selfgrow/ops/depth.py",
        "p.add_(_randn_like(p, g) * float(p.detach().double().std()) * s.noise)",
        "p.add_(_randn_like(p, g) * s.noise)",
        ("tests/test_inexact_structure.py", "-k", "g_interleave"),
    ),
    Mutation(
        "identity-insert-residual-not-zeroed",
        "selfgrow/ops/depth.py",
        "                    if s.zero_out:\n                        t.zero_()",
        "                    if False:\n                        t.zero_()",
        ("tests/test_depth_ops.py", "-k", "depth_matrix and identity_insert and sg-preln"),
    ),
    Mutation(
        "pad-zero-mode-gains-one",
        "selfgrow/ops/width.py",
        'if n.endswith("weight") and config.mode != "zero":',
        'if n.endswith("weight"):',
        ("tests/test_inexact_structure.py", "-k", "pad-zero"),
    ),
    Mutation(
        "net2wider-not-dividing-outgoing-weights",
        "selfgrow/ops/net2net.py",
        "    share = (1.0 / counts[idx]).view(1, -1).expand(w.shape[0], -1)",
        "    share = torch.ones_like(counts[idx]).view(1, -1).expand(w.shape[0], -1)",
        ("tests/test_classifier_ops.py", "-k", "test_exact_in_eval_mode"),
    ),
    Mutation(
        "net2wider-noise-std-ignored",
        "selfgrow/ops/net2net.py",
        "t[e.row_old :] += config.noise_std * noise.to(t.device, t.dtype)",
        "t[e.row_old :] += 0.0 * noise.to(t.device, t.dtype)",
        ("tests/test_inexact_structure.py", "-k", "noisy"),
    ),
    Mutation(
        "compound-accepts-no-steps",
        "selfgrow/ops/compound.py",
        "        if not steps:\n"
        '            raise GrowthConfigError("compound_grow needs at least one step")',
        "        if False:\n"
        '            raise GrowthConfigError("compound_grow needs at least one step")',
        ("tests/test_transactional.py", "-k",
         "invalid_arguments and compound_grow and sg-preln"),
    ),
    # ---------------------------------------------------------------- core and control
    Mutation(
        "transaction-rollback-skipped",
        "selfgrow/core.py",
        "        if exc_type is not None:\n            self.rollback()",
        "        if exc_type is not None:\n            pass",
        ("tests/test_transactional.py", "-k", "mid_operator and g_stack and sg-preln"),
    ),
    Mutation(
        "budget-check-inverted",
        "selfgrow/control/policies.py",
        "            if v > limit:\n                return f\"{key} {v:.4g} > {limit:.4g}\"",
        "            if v <= limit:\n                return f\"{key} {v:.4g} > {limit:.4g}\"",
        ("tests/test_controller.py", "-k", "budget"),
    ),
    # ---------------------------------------------------------------- never fail silently
    Mutation(
        "growth-failure-not-warned",
        "selfgrow/control/controller.py",
        "            self._warn_failed(d, e, why)\n",
        "",
        ("tests/test_loud_failures.py",),
    ),
    Mutation(
        "strict-does-not-raise",
        "selfgrow/control/controller.py",
        "            if self.strict:\n                raise\n",
        "",
        ("tests/test_loud_failures.py",),
    ),
    Mutation(
        "accumulated-gradients-dropped-by-growth",
        "selfgrow/ops/_registry.py",
        "    for p, g in grads.items():\n        p.grad = g\n",
        "",
        ("tests/test_grad_accumulation.py",),
    ),
    Mutation(
        "lazy-init-from-a-zero-gradient",
        "selfgrow/optim.py",
        "            if not bool((g if mask is None else g[mask.expand_as(g)]).any()):",
        "            if False:",
        ("tests/test_grad_accumulation.py",),
    ),
    Mutation(
        # two redundant defences (own generator, RNG-isolated callbacks): remove both
        "plugin-draws-from-the-global-rng",
        "selfgrow/continual/plugin.py",
        "shuffle=False, generator=self._gen)",
        "shuffle=False)",
        ("tests/test_plugin_experiences.py::test_growth_disabled_is_bitwise_identical_to_no_plugin",),
        also=(("selfgrow/continual/plugin.py",
               "        with rng_isolated():\n            self._before_training_exp(strategy)",
               "        self._before_training_exp(strategy)"),),
    ),
    Mutation(
        "plugin-ignores-experience-groups",
        "selfgrow/continual/plugin.py",
        "            return dict(storage_policy.buffer_groups)\n",
        "            return {0: storage_policy}\n",
        ("tests/test_plugin_experiences.py::test_every_past_experience_is_measured_whatever_the_buffer",),
    ),
    # ---------------------------------------------------------------- pretrain
    Mutation(
        "flops-miss-cpu-attention",
        "selfgrow/runs/flops.py",
        "    return FlopCounterMode(display=False, custom_mapping=_cpu_attention_mapping())",
        "    return FlopCounterMode(display=False)",
        ("tests/test_pretrain.py::test_flop_counter_counts_cpu_attention",),
    ),
    Mutation(
        "search-overhead-not-counted",
        "selfgrow/pretrain/search.py",
        "    win.overhead = tr.overhead + overhead\n",
        "    win.overhead = tr.overhead\n",
        ("tests/test_pretrain.py::test_search_counts_its_own_flops_and_logs_the_winner",),
    ),
    Mutation(
        "compound-seq-warmup-ignored",
        "selfgrow/pretrain/api.py",
        "                      seq_len=min(start_cfg.max_seq_len, tgt.seq_len))",
        "                      seq_len=tgt.seq_len)",
        ("tests/test_pretrain.py::test_compound_grows_sequence_length_as_a_data_warm_up",),
    ),
    Mutation(
        "auto-deadline-never-forces",
        "selfgrow/pretrain/auto.py",
        "        forced = p >= self.deadline\n",
        "        forced = False\n",
        ("tests/test_pretrain.py::test_toward_target_decides_when_and_what",),
    ),
    # ---------------------------------------------------------------- LiGO
    Mutation(
        "ligo-readers-not-divided",
        "selfgrow/ops/learned.py",
        "            m = m * (old / new)  # each old coordinate read by new/old copies\n",
        "            m = m * 1.0\n",
        ("tests/test_learned_ops.py", "-k", "bitwise or exact"),
    ),
    Mutation(
        "ligo-tied-final-norm-as-writer",
        "selfgrow/ops/learned.py",
        '    norm_axis = "stream_in" if cfg.tie_embeddings else "stream_out"\n',
        '    norm_axis = "stream_out"\n',
        ("tests/test_learned_ops.py", "-k", "bitwise"),
    ),
    Mutation(
        "ligo-fit-keeps-a-worse-operator",
        "selfgrow/ops/learned.py",
        '    kept = "fitted" if steps and loss_final < loss_init else "init"\n',
        '    kept = "fitted" if steps else "init"\n',
        ("tests/test_learned_ops.py::test_a_fit_that_does_not_help_keeps_the_initialisation",),
    ),
    Mutation(
        "ligo-fit-flops-not-charged",
        "selfgrow/pretrain/api.py",
        '        tr.meter.add_flops(rep["flops"])\n',
        "",
        ("tests/test_pretrain.py::test_ligo_fits_then_materialises_and_its_flops_count",),
    ),
]


def _copy_repo(root: Path, dest: Path) -> None:
    anywhere = shutil.ignore_patterns("__pycache__", ".pytest_cache", ".hypothesis",
                                      ".ruff_cache", "*.egg-info")
    top = {".git", ".venv", "runs", "build", "dist"}  # only at the root: selfgrow/runs is code

    def ignore(d: str, names: list[str]) -> set[str]:
        skip = set(anywhere(d, names))
        if Path(d).resolve() == root.resolve():
            skip |= top & set(names)
        return skip

    shutil.copytree(root, dest, ignore=ignore, symlinks=True)


def _pytest(py: str, repo: Path, args: tuple[str, ...]) -> tuple[int, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo)  # the copy's selfgrow, also in subprocesses
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [py, "-m", "pytest", "-q", "-x", *args]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", dest="select", default="", help="only mutations whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running the tests on the unmutated copy first")
    args = ap.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    py = os.environ.get("PYTHON") or str(root / ".venv" / "bin" / "python")
    todo = [m for m in MUTATIONS if args.select in m.name]
    if args.list:
        for m in todo:
            print(f"{m.name:45s} {m.file}  ->  {' '.join(m.tests)}")
        return 0

    stale = []
    for m in todo:
        for file, old, _ in m.edits():
            n = (root / file).read_text().count(old)
            if n != 1:
                stale.append(f"{m.name}: snippet found {n} times in {file} (expected once)")
    if stale:
        print("STALE mutation list (update scripts/mutations.py):", *stale, sep="\n  ")
        return 2

    failures = 0
    with tempfile.TemporaryDirectory(prefix="selfgrow-mutation-") as tmp:
        repo = Path(tmp) / "repo"
        _copy_repo(root, repo)
        if not args.no_baseline:
            seen: list[tuple[str, ...]] = []
            for m in todo:
                if m.tests not in seen:
                    seen.append(m.tests)
            for t in seen:
                rc, last = _pytest(py, repo, t)
                if rc != 0:
                    print(f"BASELINE RED (unmutated): {' '.join(t)}: {last}")
                    return 2
            print(f"baseline: {len(seen)} test selections green on the unmutated copy", flush=True)
        for m in todo:
            originals: dict[Path, str] = {}
            for file, old, new in m.edits():
                path = repo / file
                originals.setdefault(path, path.read_text())
                path.write_text(path.read_text().replace(old, new))
            t0 = time.monotonic()
            try:
                rc, last = _pytest(py, repo, m.tests)
            finally:
                for path, text in originals.items():
                    path.write_text(text)
            dt = time.monotonic() - t0
            if rc == 1:
                verdict = "killed"
            elif rc == 0:
                verdict, failures = "SURVIVED", failures + 1
            else:  # usage error, nothing collected, interrupted: the check did not run
                verdict, failures = f"ERROR (pytest exit {rc})", failures + 1
            print(f"{verdict:10s} {m.name:45s} {dt:6.1f}s  {last}", flush=True)
    print(f"{len(todo) - failures}/{len(todo)} mutations killed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
