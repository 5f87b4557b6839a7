"""Optimizer-state migration after growth, by parameter NAME (never by position).

An operator describes, for every parameter of the grown model that derives from an old one,
a :class:`ParamMap`: which old parameter it comes from, which old coordinate each new
coordinate copies (``-1`` = a brand-new coordinate), and how the gradient a copy will receive
relates to the source's gradient (``grad_scale``; ``1/c`` when ``c`` copies share the
original's output downstream). :func:`plan_migration` computes the new optimizer state
without touching the optimizer; :meth:`MigrationPlan.apply` swaps it in, keeping the same
optimizer object (so LR schedulers keep working).

Rules (docs/GROWTH-MATH.md, docs/optimizer-after-growth.md; staged training, Shen et al. 2022):

* untouched parameters keep their state objects (bit-identical) and their group;
* copied coordinates: first moments ``m' = m * s``, second moments ``v' = v * s**2`` where
  ``s = grad_scale``; step counts are copied;
* brand-new coordinates inside a grown tensor: first moments 0; second moments (Adam/AdamW,
  plain RMSprop) set at the tensor's first gradient after growth to ``c * g**2``, with ``c``
  solved so that the new coordinates' update RMS equals that of the tensor's old coordinates
  in the same step. A zero ``v`` with an already-corrected bias would make the first update
  about 3x too large; the mean of the old ``v`` (GROWTH-MATH's example, kept as the fallback
  until that first gradient) makes it 7-25x too small when the new coordinates' gradients
  are smaller than the old ones' (zero fan-out units, fresh heads, new position rows);
* brand-new tensors join the param group of their nearest sibling by name: the same tensor
  of another block when there is one (``h.1.attn.c_proj.weight`` -> ``h.0.attn.c_proj.weight``,
  so a new block's weights get the weight decay of the old blocks' weights), else the longest
  common dotted prefix. With Adam/AdamW their state is initialised at their first gradient so that
  their first update has the RMS of the sibling's last normalised update (``m = 0``,
  ``v = c * g**2`` with ``c`` solved from Adam's update rule, step count of the sibling).
  Fresh Adam state (step 0) would move every coordinate by about ``lr`` on the first step,
  2.5-8x more than trained coordinates move; borrowing the sibling's ``v`` undershoots by as
  much, because a new layer's gradient scale differs from its neighbour's. Other optimizers
  start brand-new tensors with empty state;
* hyper-parameters of every param group are kept.

Supported: Adam, AdamW (incl. amsgrad), SGD (with or without momentum, Nesterov), RMSprop
(incl. centered and momentum). Any other optimizer state raises
:class:`~selfgrow.errors.IncompatibleOptimizerError` before anything changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from .core import (  # noqa: F401 - re-exported
    MAX_RUNS,
    ParamMap,
    full_tensor,
    gather_dim,
    register_unique,
)
from .errors import GrowthConfigError, IncompatibleOptimizerError

#: elements sampled (evenly strided) to estimate a tensor's normalised Adam update RMS
RMS_SAMPLE = 1 << 16

#: state keys that behave like a first moment (scale by s; new coordinates 0)
FIRST_MOMENT_KEYS = frozenset({"exp_avg", "momentum_buffer", "grad_avg"})
#: state keys that behave like a second moment (scale by s**2; new coordinates: set at the
#: first gradient, mean of the old values until then). Adagrad's ``sum`` is one.
SECOND_MOMENT_KEYS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})
#: an infinity norm of gradients (Adamax ``exp_inf``): scales by s; new coordinates get the
#: mean of the old values (0 would make their first update ~lr * sign(g))
MAX_NORM_KEYS = frozenset({"exp_inf"})
#: accumulated squared UPDATES (Adadelta ``acc_delta``): a copy moves like its source, so the
#: value is copied unscaled; new coordinates get the mean of the old values
UPDATE_KEYS = frozenset({"acc_delta"})
#: parameter-valued state (ASGD's running average ``ax``): restarted at the grown parameter
PARAM_KEYS = frozenset({"ax"})
#: scalar bookkeeping copied as is (0-dim tensors: step, NAdam ``mu_product``, ASGD ``eta``,
#: ``mu``)
SCALAR_KEYS = frozenset({"step", "mu_product", "eta", "mu"})

#: optimizers whose state selfgrow migrates (subclasses included)
SUPPORTED_OPTIMIZERS = ("SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adagrad",
                        "Adadelta", "RMSprop", "ASGD")
_EXTRA_OPTIMIZERS: dict[str, type] = {}

#: state key marking state to be set at the first gradient; value: 0-dim tensor target RMS
#: (NaN: take it from the tensor's old coordinates). A brand-new tensor's marker state also
#: holds the sibling's ``step`` (Adam's ``load_state_dict`` expects a step in every state).
LAZY_INIT_KEY = "selfgrow_lazy_init"
#: bool mask (param shape) of new coordinates inside a grown tensor awaiting their first gradient
LAZY_MASK_KEY = "selfgrow_lazy_mask"


@dataclass
class MigrationReport:
    """What a migration did (counts of parameter tensors and coordinates)."""

    migrated: int = 0  # tensors whose state was carried over or re-indexed
    kept: int = 0  # untouched tensors (state objects kept)
    fresh: int = 0  # brand-new tensors (empty state)
    zero_init: int = 0  # brand-new coordinates inside carried tensors
    rule: str = (
        "by-name; copies m*s, v*s^2; new coords and new tensors m=0, v set at the first "
        "gradient to match the old coordinates' update RMS"
    )

    def as_dict(self) -> dict[str, object]:
        return {
            "migrated": self.migrated,
            "kept": self.kept,
            "fresh": self.fresh,
            "zero_init": self.zero_init,
            "rule": self.rule,
        }


@dataclass
class MigrationPlan:
    """A computed migration, applied with :meth:`apply` (cannot fail halfway)."""

    optimizer: torch.optim.Optimizer
    groups: list[list[nn.Parameter]]
    group_names: list[list[str] | None]
    remove: list[nn.Parameter]
    states: dict[nn.Parameter, dict]
    report: MigrationReport = field(default_factory=MigrationReport)

    def apply(self) -> MigrationReport:
        opt = self.optimizer
        for p in self.remove:
            opt.state.pop(p, None)
        for p, st in self.states.items():
            if st:
                opt.state[p] = st
            else:
                opt.state.pop(p, None)
        for g, params, names in zip(opt.param_groups, self.groups, self.group_names, strict=True):
            g["params"] = params
            if names is not None:
                g["param_names"] = names
        if any(LAZY_INIT_KEY in st for st in self.states.values()):
            install_hooks(opt)
        return self.report


def register_optimizer(cls: type[torch.optim.Optimizer], *, override: bool = False) -> None:
    """Declare that ``cls`` keeps only state selfgrow knows how to migrate (the keys of
    :data:`FIRST_MOMENT_KEYS`, :data:`SECOND_MOMENT_KEYS`, :data:`MAX_NORM_KEYS`,
    :data:`UPDATE_KEYS`, :data:`PARAM_KEYS`, :data:`SCALAR_KEYS`) and reads its parameters
    from ``param_groups`` at every step, so :func:`check_optimizer_supported` accepts it.

    Raises:
        IncompatibleOptimizerError: ``cls`` is not a torch.optim.Optimizer subclass.
        GrowthConfigError: the class name is registered to another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise IncompatibleOptimizerError(
            f"register_optimizer needs an Optimizer class, got {cls!r}"
        )
    register_unique(_EXTRA_OPTIMIZERS, cls.__name__, cls, "optimizer", override=override)


def supported_optimizers() -> list[str]:
    """Names of the optimizer classes selfgrow migrates (built-in and registered)."""
    return [*SUPPORTED_OPTIMIZERS, *sorted(_EXTRA_OPTIMIZERS)]


def check_optimizer_supported(optimizer: object) -> None:
    """Refuse, before anything changes, an optimizer that cannot follow growth.

    LBFGS keeps its own list of parameter tensors (growth would leave it updating the old
    ones) and an optimizer class selfgrow does not know keeps state it cannot migrate: both
    are refused up front, not when they already silently update stale tensors.

    Raises:
        IncompatibleOptimizerError: names the class and lists the supported optimizers.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise IncompatibleOptimizerError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    known = tuple(getattr(torch.optim, n) for n in SUPPORTED_OPTIMIZERS)
    if isinstance(optimizer, torch.optim.LBFGS):
        why = "it keeps its own list of parameter tensors, which growth cannot update"
    elif isinstance(optimizer, known + tuple(_EXTRA_OPTIMIZERS.values())):
        return
    else:
        why = "selfgrow does not know its state (see selfgrow.optim.register_optimizer)"
    raise IncompatibleOptimizerError(
        f"{type(optimizer).__name__} cannot follow growth: {why}; supported optimizers: "
        f"{', '.join(supported_optimizers())}"
    )


def check_optimizer_holds_model(optimizer: object, model: nn.Module) -> None:
    """Refuse an optimizer that cannot follow growth or trains none of ``model``'s parameters.

    Raises:
        IncompatibleOptimizerError: not an optimizer, an unsupported class, or an optimizer
            built for another model (it holds none of ``model.parameters()``).
    """
    check_optimizer_supported(optimizer)  # raises unless it is a supported Optimizer
    groups = cast(torch.optim.Optimizer, optimizer).param_groups
    held = {id(p) for g in groups for p in g["params"]}
    if not any(id(p) in held for p in model.parameters()):
        n_opt = sum(len(g["params"]) for g in groups)
        raise IncompatibleOptimizerError(
            f"the optimizer holds none of the model's parameters ({n_opt} tensors in the "
            f"optimizer, {len(list(model.parameters()))} in {type(model).__name__}); pass the "
            f"optimizer that trains this model (or optimizer=None)"
        )


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise IncompatibleOptimizerError if the optimizer's state cannot be migrated."""
    known = (FIRST_MOMENT_KEYS | SECOND_MOMENT_KEYS | MAX_NORM_KEYS | UPDATE_KEYS | PARAM_KEYS
             | SCALAR_KEYS | {LAZY_INIT_KEY, LAZY_MASK_KEY})
    for st in optimizer.state.values():
        for k, v in st.items():
            if k in known or not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue
            raise IncompatibleOptimizerError(
                f"{type(optimizer).__name__} has per-coordinate state {k!r} that selfgrow cannot "
                f"migrate; supported optimizers: {', '.join(supported_optimizers())}"
            )


def _sibling(name: str, candidates: list[str]) -> str | None:
    """The candidate most like ``name``: first one of the same pattern (equal but for its
    numeric parts: ``h.1.attn.c_proj.weight`` ~ ``h.0.attn.c_proj.weight``, the same tensor of
    another block), then the longest common dotted prefix, then the longest common suffix."""
    parts = name.split(".")
    pattern = ["#" if a.isdigit() else a for a in parts]

    def score(c: str) -> tuple[bool, int, int]:
        cp = c.split(".")
        same = len(cp) == len(parts) and ["#" if b.isdigit() else b for b in cp] == pattern
        pre = 0
        for a, b in zip(parts, cp, strict=False):
            if a != b:
                break
            pre += 1
        suf = 0
        for a, b in zip(reversed(parts), reversed(cp), strict=False):
            if a != b:
                break
            suf += 1
        return same, pre, suf

    best, best_score = None, (False, -1, -1)
    for c in candidates:
        sc = score(c)
        if sc > best_score:
            best, best_score = c, sc
    return best


def plan_migration(
    optimizer: torch.optim.Optimizer,
    old_named: Mapping[str, nn.Parameter],
    new_named: Mapping[str, nn.Parameter],
    maps: Mapping[str, ParamMap] | None = None,
) -> MigrationPlan:
    """Compute the optimizer after growth without modifying it.

    Args:
        optimizer: the live optimizer (its param groups hold old parameters).
        old_named: ``dict(model.named_parameters())`` captured before growth.
        new_named: ``dict(model.named_parameters())`` after growth.
        maps: ParamMap per new parameter name that was re-indexed, renamed or is brand-new.
            A new name absent from ``maps`` that is the same object as before keeps its state;
            one with the same name and shape as an old parameter is carried 1:1; any other is
            brand-new.

    Returns:
        MigrationPlan; call ``.apply()`` to swap it in.

    Raises:
        IncompatibleOptimizerError: unsupported per-coordinate optimizer state.
        GrowthConfigError: a ParamMap names an unknown source or gives the wrong shape.
    """
    check_optimizer_supported(optimizer)
    check_optimizer(optimizer)
    maps = dict(maps or {})
    report = MigrationReport()
    where: dict[nn.Parameter, int] = {}
    for gi, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            where[p] = gi
    old_names = list(old_named)
    new_ids = {id(p) for p in new_named.values()}
    old_ids = {id(p) for p in old_named.values()}
    optimized_old = [n for n in old_names if old_named[n] in where]

    assignment: dict[str, int] = {}  # new name -> group index
    states: dict[nn.Parameter, dict] = {}
    for name, p in new_named.items():
        m = maps.get(name)
        if m is None:
            old_p = old_named.get(name)
            if old_p is p:
                if p in where:
                    assignment[name] = where[p]
                    report.kept += 1
                continue
            if old_p is not None and old_p.shape == p.shape:
                m = ParamMap(source=name)
            else:
                m = ParamMap(source=None)
        if m.source is not None:
            if m.source not in old_named:
                raise GrowthConfigError(
                    f"ParamMap for {name!r} names unknown source {m.source!r}"
                )
            src = old_named[m.source]
            if src not in where:
                continue  # the source was not optimized: neither is its growth
            assignment[name] = where[src]
            st_old = optimizer.state.get(src, {})
            states[p] = _migrate_state(
                st_old, m, p, report, optimizer.param_groups[where[src]]
            )
            report.migrated += 1
        else:
            sib = _sibling(name, optimized_old) if optimized_old else None
            sib_all = _sibling(name, old_names) if old_names else None
            if sib is None or (sib_all is not None and old_named[sib_all] not in where):
                continue
            sib_p = old_named[sib]
            assignment[name] = where[sib_p]
            states[p] = _lazy_state(optimizer, sib_p, optimizer.param_groups[where[sib_p]])
            report.fresh += 1

    order = {n: i for i, n in enumerate(new_named)}
    groups: list[list[nn.Parameter]] = []
    group_names: list[list[str] | None] = []
    for gi, g in enumerate(optimizer.param_groups):
        # parameters of this group that are not part of the model stay where they are
        foreign = [p for p in g["params"] if id(p) not in new_ids and id(p) not in old_ids]
        mine = sorted((n for n, a in assignment.items() if a == gi), key=order.__getitem__)
        groups.append(foreign + [new_named[n] for n in mine])
        if "param_names" in g:
            old_pn = dict(zip((id(p) for p in g["params"]), g["param_names"], strict=False))
            group_names.append([old_pn.get(id(p), "") for p in foreign] + mine)
        else:
            group_names.append(None)
    remove = [p for p in where if id(p) not in new_ids and id(p) in old_ids]
    return MigrationPlan(optimizer, groups, group_names, remove, states, report)


def _migrate_state(
    st_old: dict, m: ParamMap, p: nn.Parameter, report: MigrationReport, group: dict
) -> dict:
    if LAZY_INIT_KEY in st_old and LAZY_MASK_KEY not in st_old:
        return {k: v.clone() for k, v in st_old.items()}  # brand-new, grown again: still new
    new: dict = {}
    s = m.grad_scale
    scaled = not (isinstance(s, (int, float)) and s == 1.0)
    n_new = _count_new(m, p.shape)  # from the index vectors: no pass over the tensor
    new_mask: torch.Tensor | None = None
    for k, v in st_old.items():
        if k == LAZY_INIT_KEY or not isinstance(v, torch.Tensor) or v.dim() == 0:
            new[k] = v.clone() if isinstance(v, torch.Tensor) else v
            continue
        vals, new_mask = m.gather(v, p.shape)
        if k == LAZY_MASK_KEY:  # new coordinates of an earlier growth, not yet stepped
            new[k] = (vals != 0) | new_mask  # (a float mask after a state_dict round trip)
            continue
        # one fresh tensor per key, then in place (gather returns ``v`` itself when nothing
        # is re-indexed: never write into the old state, a rollback must find it intact)
        vals = vals.clone() if vals is v else vals.contiguous()
        if k in FIRST_MOMENT_KEYS:
            if scaled:
                vals.mul_(_as(s, vals))
            if n_new:
                vals.masked_fill_(new_mask, 0.0)
        elif k in SECOND_MOMENT_KEYS:
            if scaled:
                vals.mul_(_as(s, vals) ** 2)
            if n_new:  # fallback until the first gradient (see _lazy_init_pre_step)
                vals.masked_fill_(new_mask, v.mean())
        elif k in MAX_NORM_KEYS:
            if scaled:
                vals.mul_(_as(s, vals))
            if n_new:
                vals.masked_fill_(new_mask, v.mean())
        elif k in UPDATE_KEYS:
            if n_new:
                vals.masked_fill_(new_mask, v.mean())
        elif k in PARAM_KEYS:
            vals = p.detach().clone()
        new[k] = vals
    if new_mask is not None and n_new:
        report.zero_init += n_new
        if _lazy_capable(group) and any(k in SECOND_MOMENT_KEYS for k in new):
            prev = new.get(LAZY_MASK_KEY)
            new[LAZY_MASK_KEY] = new_mask.contiguous() if prev is None else prev | new_mask
            new[LAZY_INIT_KEY] = torch.tensor(float("nan"), dtype=torch.float64)
    return new


def plan_grads(
    old_named: Mapping[str, nn.Parameter],
    new_named: Mapping[str, nn.Parameter],
    maps: Mapping[str, ParamMap] | None = None,
) -> dict[nn.Parameter, torch.Tensor | None]:
    """The ``.grad`` of every new parameter object after a growth between ``backward()`` and
    ``step()`` (gradient accumulation), without modifying anything.

    A gradient transforms like a first moment: a copied coordinate gets its source's
    accumulated gradient times ``grad_scale`` (its documented share: the gradient it would
    have received had it existed during the backward passes; for Net2WiderNet copies with
    ``split_noise`` the mean share ``1/c`` is used, see docs/optimizer-after-growth.md), a
    brand-new coordinate gets 0, a brand-new tensor a zero gradient (``None`` when no old
    parameter had one). For tensors copied with equal shares the result equals the gradient
    of the grown model on the same batches; what the backward passes never computed (new
    coordinates, inserted layers) is 0, so the pending ``step()`` updates every tensor that
    derives from an old one and the new ones start at the next backward.
    Parameters that are the same objects as before keep their ``.grad`` untouched.

    Returns:
        ``{new parameter: gradient or None}`` for every parameter object that is new.
    """
    maps = dict(maps or {})
    old_ids = {id(p) for p in old_named.values()}
    accumulating = any(p.grad is not None for p in old_named.values())
    out: dict[nn.Parameter, torch.Tensor | None] = {}
    for name, p in new_named.items():
        if id(p) in old_ids:
            continue
        m = maps.get(name)
        if m is None:
            old_p = old_named.get(name)
            m = ParamMap(source=name) if old_p is not None and old_p.shape == p.shape else (
                ParamMap(source=None)
            )
        src = old_named.get(m.source) if m.source is not None else None
        if src is None or src.grad is None:
            out[p] = torch.zeros_like(p) if accumulating and m.source is None else None
            continue
        g = src.grad.detach()
        vals, mask = m.gather(g, p.shape)
        vals = vals.clone() if vals is g else vals.contiguous()
        s = m.grad_scale
        if not (isinstance(s, (int, float)) and s == 1.0):
            vals.mul_(_as(s, vals))
        if _count_new(m, p.shape):
            vals.masked_fill_(mask, 0.0)
        out[p] = vals.to(dtype=p.dtype)
    return out


def _count_new(m: ParamMap, shape: torch.Size) -> int:
    """Number of brand-new coordinates (an index of -1 on any dimension) of ``m``."""
    total, kept = 1, 1
    for d, size in enumerate(shape):
        total *= int(size)
        idx = m.index[d] if d < len(m.index) else None
        kept *= int(size) if idx is None else int((idx >= 0).sum())
    return total - kept


def _as(s: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(s, torch.Tensor):
        return s.to(device=like.device, dtype=like.dtype)
    return s


def migrate(
    optimizer: torch.optim.Optimizer,
    old_named: Mapping[str, nn.Parameter],
    new_named: Mapping[str, nn.Parameter],
    maps: Mapping[str, ParamMap] | None = None,
) -> MigrationReport:
    """Plan and apply a migration in one call; see :func:`plan_migration`."""
    return plan_migration(optimizer, old_named, new_named, maps).apply()


# ---------------------------------------------------------------------------------------------
# brand-new tensors under Adam: state set at the first gradient
# ---------------------------------------------------------------------------------------------
def _is_adam_like(group: dict) -> bool:
    return "betas" in group and "eps" in group


def _lazy_state(optimizer: torch.optim.Optimizer, sibling: nn.Parameter, group: dict) -> dict:
    """State for a brand-new tensor: a marker (Adam-like optimizers whose sibling has been
    stepped) or empty (everything else: the optimizer initialises it itself)."""
    st = optimizer.state.get(sibling, {})
    if _is_adagrad(group) and "sum" in st and "step" in st:
        # Adagrad's normalised update |g| / sqrt(sum) after t steps of comparable gradients
        # is about 1 / sqrt(t): the target for the new tensor's first update
        t = float(st["step"])
        return {"step": st["step"].clone(),
                LAZY_INIT_KEY: torch.tensor(1.0 / math.sqrt(t + 1.0), dtype=torch.float64)}
    if not (_is_adam_like(group) and "exp_avg" in st and "exp_avg_sq" in st and "step" in st):
        return {}
    b1, b2 = group["betas"]
    t = float(st["step"])
    m, v = st["exp_avg"].reshape(-1), st["exp_avg_sq"].reshape(-1)
    if m.numel() > RMS_SAMPLE:  # an RMS estimate: an evenly strided sample is plenty
        stride = (m.numel() // RMS_SAMPLE) | 1  # odd: no aliasing with row lengths
        m, v = m[::stride], v[::stride]
    m_hat = m.double() / (1 - b1**t)
    v_hat = v.double() / (1 - b2**t)
    r = float((m_hat / (v_hat.sqrt() + group["eps"])).pow(2).mean().sqrt())
    if not (r > 0 and math.isfinite(r)):
        return {}
    scalars = {k: v.clone() for k, v in st.items()
               if isinstance(v, torch.Tensor) and v.dim() == 0 and k != LAZY_INIT_KEY}
    return {**scalars, LAZY_INIT_KEY: torch.tensor(r, dtype=torch.float64)}


def _is_rmsprop(group: dict) -> bool:
    return "alpha" in group and not group.get("centered", False)


def _is_adagrad(group: dict) -> bool:
    return "lr_decay" in group and "initial_accumulator_value" in group


def _lazy_capable(group: dict) -> bool:
    return _is_adam_like(group) or _is_rmsprop(group) or _is_adagrad(group)


def _adam_c(r: float, t: float, b1: float, b2: float) -> float:
    """``c`` such that ``m = 0, v = c g^2`` at step ``t`` gives a next update of RMS ``r`` (in
    units of lr): the update is ``(1-b1)/bc1 * sqrt(bc2) / sqrt(b2 c + 1 - b2)``."""
    bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
    a = ((1 - b1) * bc2**0.5 / (bc1 * r)) ** 2
    return max((a - (1 - b2)) / b2, 0.0)


def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt()) if x.numel() else float("nan")


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _masked_rms(x: torch.Tensor, keep: torch.Tensor) -> float:
    """RMS of ``x`` where ``keep`` (bool, ``x``'s shape) is set. An FSDP2 shard (``DTensor``)
    gives the RMS over the whole tensor (masked sums, then one reduction), the same as one
    process would compute up to summation order."""
    if not _is_dtensor(x):
        return _rms(x[keep])
    sq = torch.where(keep, x.double().pow(2), torch.zeros_like(x, dtype=torch.float64))
    n = float(full_tensor(keep.to(torch.float64).sum()))
    return float(full_tensor(sq.sum()) / n) ** 0.5 if n else float("nan")


def _any_nonzero(g: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether ``g`` (where ``mask`` is set, if given) has a nonzero entry, over the whole
    tensor for an FSDP2 shard."""
    if not _is_dtensor(g):
        return bool((g if mask is None else g[mask.expand_as(g)]).any())
    nz = (g != 0) if mask is None else ((g != 0) & mask.expand_as(g))
    return float(full_tensor(nz.to(torch.float64).sum())) > 0


def _lazy_init_pre_step(optimizer: torch.optim.Optimizer, *args: object, **kwargs: object) -> None:
    """Optimizer step pre-hook: give coordinates awaiting their first gradient their state.

    * Brand-new tensors (Adam/AdamW): ``m = 0`` and ``v = c g^2`` at the sibling's step ``t``,
      with ``c`` from :func:`_adam_c` so the update RMS equals the sibling's last normalised
      update RMS.
    * New coordinates inside a grown tensor (Adam/AdamW, RMSprop): the same construction, with
      the target RMS taken from THIS step's update of the tensor's old coordinates (computed
      from their state and the current gradient), so old and new coordinates move alike.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st or LAZY_INIT_KEY not in st or p.grad is None:
                continue
            g = p.grad.detach()
            mask = st.get(LAZY_MASK_KEY)
            if mask is not None:  # bool, or float after Optimizer.load_state_dict's cast
                mask = mask.to(device=g.device) != 0
            # a gradient that is still zero where the state awaits it (a growth between
            # backward() and step(), or units whose fan-out is still zero) carries no scale:
            # wait for the first nonzero one, or c * g**2 = 0 would make that one's update huge
            if not _any_nonzero(g, mask):
                if mask is None:  # the optimizer needs its keys: zero state moves nothing
                    _fill_zero_state(optimizer, p, group, st)
                continue
            if mask is None and _is_adagrad(group):  # brand-new tensor under Adagrad
                r = float(st[LAZY_INIT_KEY])
                optimizer.state[p] = {"step": st["step"].clone(),
                                      "sum": (g * g * max(1 / r**2 - 1, 0.0)).to(p.dtype)}
                continue
            if mask is None:  # brand-new tensor (Adam-like)
                t, r = float(st["step"]), float(st[LAZY_INIT_KEY])
                b1, b2 = group["betas"]
                c = _adam_c(r, t, b1, b2)
                new = {
                    **{k: v.clone() for k, v in st.items() if k != LAZY_INIT_KEY},
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": (g * g * c).to(p.dtype),
                }
                if group.get("amsgrad"):
                    new["max_exp_avg_sq"] = new["exp_avg_sq"].clone()
                optimizer.state[p] = new
                continue
            new = {k: v for k, v in st.items() if k not in (LAZY_INIT_KEY, LAZY_MASK_KEY)}
            old = ~mask
            eps = group["eps"]
            if _is_adam_like(group) and "exp_avg_sq" in new:
                t = float(new["step"])
                b1, b2 = group["betas"]
                bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
                m1 = b1 * new["exp_avg"] + (1 - b1) * g
                v1 = b2 * new["exp_avg_sq"] + (1 - b2) * g**2
                r = _masked_rms((m1 / bc1) / ((v1 / bc2).sqrt() + eps), old)
                if r > 0 and r == r:
                    c = _adam_c(r, t, b1, b2)
                    new["exp_avg"] = new["exp_avg"].masked_fill(mask, 0.0)
                    v_new = (g * g * c).to(p.dtype)
                    new["exp_avg_sq"] = torch.where(mask, v_new, new["exp_avg_sq"])
                    if "max_exp_avg_sq" in new:
                        new["max_exp_avg_sq"] = torch.where(mask, v_new, new["max_exp_avg_sq"])
            elif _is_adagrad(group) and "sum" in new:
                # Adagrad's update is g / (sqrt(sum + g^2) + eps): with sum = c g^2 on the new
                # coordinates it is 1 / sqrt(c + 1), so c = 1 / r^2 - 1 matches the old RMS r
                s1 = new["sum"] + g**2
                r = _masked_rms(g / (s1.sqrt() + eps), old)
                if r > 0 and r == r:
                    c = max(1 / r**2 - 1, 0.0)
                    new["sum"] = torch.where(mask, (g * g * c).to(p.dtype), new["sum"])
            elif _is_rmsprop(group) and "square_avg" in new:
                a = group["alpha"]
                v1 = a * new["square_avg"] + (1 - a) * g**2
                r = _masked_rms(g / (v1.sqrt() + eps), old)
                if r > 0 and r == r:
                    c = max((1 / r**2 - (1 - a)) / a, 0.0)
                    v_new = (g * g * c).to(p.dtype)
                    new["square_avg"] = torch.where(mask, v_new, new["square_avg"])
            optimizer.state[p] = new


def _fill_zero_state(
    optimizer: torch.optim.Optimizer, p: nn.Parameter, group: dict, st: dict
) -> None:
    """Keys the optimizer reads, all zero, for a brand-new tensor still awaiting a nonzero
    gradient (the marker stays): with a zero gradient its update is then exactly 0."""
    z = torch.zeros_like(p, memory_format=torch.preserve_format)
    keys = ("sum",) if _is_adagrad(group) else ("exp_avg", "exp_avg_sq")
    if group.get("amsgrad"):
        keys = (*keys, "max_exp_avg_sq")
    for k in keys:
        st.setdefault(k, z.clone())
    optimizer.state[p] = st


def install_hooks(optimizer: torch.optim.Optimizer) -> None:
    """Install selfgrow's step pre-hook on ``optimizer`` once (idempotent). Needed after loading
    an optimizer state that may hold brand-new tensors awaiting their first gradient."""
    if getattr(optimizer, "_selfgrow_hooked", False):
        return
    optimizer.register_step_pre_hook(_lazy_init_pre_step)
    optimizer._selfgrow_hooked = True  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# other per-parameter state (continual-learning regularisers) after a growth
# ---------------------------------------------------------------------------------------------
#: how a per-parameter state tensor transforms (see :class:`ParamTransition`)
STATE_RULES = ("anchor", "importance", "accumulator")


@dataclass
class ParamTransition:
    """What one committed growth did to the parameters, by name, for code that keeps its own
    per-parameter state (EWC's saved weights and Fisher importances, SI's path integrals,
    MAS's importances).

    Attributes:
        old: ``{name: tensor}`` of the parameters before the growth (detached values).
        new: ``{name: tensor}`` after it.
        maps: the operator's ParamMaps (new name -> source).

    :meth:`map` carries a state tensor of an old parameter to a new one. With ``c`` the
    number of new coordinates (over ALL new tensors) copying a source coordinate and ``a``
    the value ratio ``new / old`` of a copy (1 where the old value is 0), the rules keep a
    quadratic penalty ``sum imp * (theta - anchor)**2`` and a sum of accumulators exactly
    unchanged at the moment of growth (so right after an EXACT growth a regulariser's
    penalty is what it was):

    ======================= ================================= ==========================
    rule                    copied coordinate                 brand-new coordinate
    ======================= ================================= ==========================
    ``"anchor"``            ``a * anchor[src]``               the new value (no penalty)
    ``"importance"``        ``imp[src] / (c * a**2)``         0 (also where ``a == 0``)
    ``"accumulator"``       ``w[src] / c``                    0
    ======================= ================================= ==========================

    A new parameter with no ParamMap that keeps its name and shape maps 1:1 (as in the
    optimizer migration); a brand-new tensor (``ParamMap(None)``) has no state to map:
    :meth:`map` returns None for it.
    """

    old: dict[str, torch.Tensor]
    new: dict[str, torch.Tensor]
    maps: dict[str, ParamMap] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # built on first use: every growth makes a transition, few consumers read it
        self._src: dict[str, tuple[str, torch.Tensor, torch.Tensor] | None] | None = None
        self._count: dict[str, torch.Tensor] = {}

    def _index(self) -> dict[str, tuple[str, torch.Tensor, torch.Tensor] | None]:
        """Per new name: (source, flat source index per coordinate, brand-new mask), and the
        copy count of every source coordinate over all new tensors."""
        if self._src is None:
            self._src = {name: self._source_index(name) for name in self.new}
            for s in self._src.values():
                if s is None:
                    continue
                src, idx, fresh = s
                n = self.old[src].numel()
                c = torch.bincount(idx[~fresh].reshape(-1), minlength=n)
                self._count[src] = self._count.get(src, torch.zeros(n, dtype=torch.long)) + c
        return self._src

    def _source_index(self, name: str) -> tuple[str, torch.Tensor, torch.Tensor] | None:
        pm = self.maps.get(name)
        shape = self.new[name].shape
        if pm is None:
            if name in self.old and self.old[name].shape == shape:
                pm = ParamMap(source=name)
            else:
                return None
        if pm.source is None or pm.source not in self.old:
            return None
        old = self.old[pm.source]
        flat = torch.arange(old.numel(), device="cpu").view(old.shape)
        idx, fresh = pm.gather(flat, shape)
        idx = idx.expand(shape).clone() if idx.shape != shape else idx.clone()
        fresh = fresh.expand(shape).clone()
        idx[fresh] = 0
        return pm.source, idx, fresh

    def source_of(self, name: str) -> str | None:
        """The old parameter ``name``'s state comes from (None: a brand-new tensor)."""
        s = self._index().get(name)
        return None if s is None else s[0]

    def map(self, name: str, state: torch.Tensor, rule: str) -> torch.Tensor | None:
        """The state of new parameter ``name`` from ``state`` (the state of its source, any
        shape with the source's number of elements, e.g. flattened); returned in the new
        parameter's shape (reshape it yourself for flattened state) and ``state``'s
        dtype/device. None for a brand-new tensor.

        Raises:
            GrowthConfigError: unknown ``rule`` or a ``state`` that does not match the source.
        """
        if rule not in STATE_RULES:
            from .errors import choices_message

            raise GrowthConfigError(choices_message("state rule", rule, STATE_RULES))
        s = self._index().get(name)
        if s is None:
            return None
        src, idx, fresh = s
        old = self.old[src]
        if state.numel() != old.numel():
            raise GrowthConfigError(
                f"state for {src!r} has {state.numel()} elements, the parameter {old.numel()}")
        dev, dt = state.device, state.dtype
        flat_state = state.detach().reshape(-1).to(torch.float64).cpu()
        flat_old = old.detach().reshape(-1).to(torch.float64).cpu()
        new = self.new[name].detach().to(torch.float64).cpu()
        gathered = flat_state[idx]
        c = self._count[src][idx].clamp(min=1).to(torch.float64)
        base = flat_old[idx]
        a = torch.where(base != 0, new / torch.where(base != 0, base, 1.0),
                        torch.ones_like(base))
        # a copy whose value was zeroed (a == 0) is anchored where it is, like a new one
        fresh = fresh | (a == 0)
        if rule == "anchor":
            out = torch.where(fresh, new, a * gathered)
        elif rule == "importance":
            out = torch.where(fresh, torch.zeros_like(new),
                              gathered / (c * torch.where(fresh, 1.0, a * a)))
        else:
            out = torch.where(fresh, torch.zeros_like(new), gathered / c)
        return out.to(device=dev, dtype=dt)

    @staticmethod
    def capture(old_named: Mapping[str, nn.Parameter], new_named: Mapping[str, nn.Parameter],
                maps: Mapping[str, ParamMap]) -> ParamTransition:
        return ParamTransition(
            old={n: p.detach() for n, p in old_named.items()},
            new={n: p.detach() for n, p in new_named.items()},
            maps=dict(maps))
