"""Expansion-based continual learning: DER (its own implementation; Avalanche has none) and
PNN (through Avalanche's own ``PNNStrategy`` / ``PNN``).

DER (Yan, Xie, He, "DER: Dynamically Expandable Representation for Class Incremental
Learning", CVPR 2021)::

    x (B, *) -> extractors.0 -> f_0 (B, F)   frozen, eval mode (experiences > 0)
             -> extractors.1 -> f_1 (B, F)   frozen, eval mode
             ...
             -> extractors.t -> f_t (B, F)   trained on experience t
    cat(f_0 .. f_t) (B, (t+1) F) -> classifier -> logits (B, n_out), unseen classes masked
    f_t (B, F) -> aux_classifier -> aux logits (B, n_new + 1)   (t >= 1; auxiliary loss only)

:class:`DERNet` is a plain ``nn.Module`` (``forward(x)``), so every Avalanche strategy can
train it; :class:`DERPlugin` expands it before each training experience, repairs the
strategy's optimizer in place and adds DER's auxiliary loss. Replay (DER trains with a
rehearsal memory) is the strategy's business: ``Replay`` or ``Naive`` + ``ReplayPlugin``.
DER's channel-mask pruning (the paper's optional compression stage) is not implemented.

PNN (Rusu et al., "Progressive Neural Networks", 2016): :func:`pnn_strategy` builds
Avalanche's ``PNNStrategy`` over ``avalanche.models.PNN`` and refuses, before building
anything, a scenario without task labels.
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from avalanche.core import BasePlugin, SupervisedPlugin
from avalanche.evaluation.metric_results import MetricValue
from torch import nn

from ..adapters.classifier import head_out_features
from ..core import AxisMap, ParamMap, Transaction, count_params, regrid
from ..errors import GrowthConfigError, IncompatibleModelError, choices_message
from ..models.cnn import CNNConfig, GrowableCNN
from ..models.mlp import GrowableMLP, MLPConfig
from ..optim import check_optimizer, check_optimizer_supported, plan_migration
from .benchmarks import sample_experience

#: how a new DER extractor is initialised
DER_INIT = ("copy", "fresh")
#: feature extractors :func:`der_extractor` builds
EXTRACTOR_KINDS = ("cnn", "mlp")
#: scenario kinds :func:`pnn_strategy` is told about; PNN accepts only ``task-incremental``
SCENARIO_KINDS = ("class-incremental", "domain-incremental", "task-incremental")
PNN_ADAPTERS = ("linear", "mlp")

__all__ = [
    "DERNet",
    "DERPlugin",
    "MultiHeadPaddingMask",
    "PNNStreamCheck",
    "PNN_REFUSAL",
    "TaskLogitMask",
    "with_pnn_plugins",
    "check_task_incremental",
    "der_extractor",
    "der_strategy",
    "pnn_strategy",
]


def _linear(n_in: int, n_out: int, like: torch.Tensor | None = None) -> nn.Linear:
    """``nn.Linear(n_in, n_out)`` with torch's default init, on ``like``'s device and dtype
    (a zero-row layer without torch's "zero-element tensor" warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        lin = nn.Linear(n_in, n_out)
    if like is not None:
        lin = lin.to(device=like.device, dtype=like.dtype)
    return lin


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GrowthConfigError(f"{name}={value!r} is out of range; valid: an integer >= 1")
    return value


# ---------------------------------------------------------------------------------------------
# DER
# ---------------------------------------------------------------------------------------------
def der_extractor(
    kind: str,
    input_shape: Sequence[int],
    width: int = 64,
    channels: Sequence[int] = (16, 32),
    depth: int = 1,
) -> nn.Module:
    """A features-only selfgrow model for :class:`DERNet`: the model without its classifier
    head (``head`` replaced by ``nn.Identity``), with an int attribute ``feat_dim``.

    * ``"mlp"``: :class:`~selfgrow.models.mlp.GrowableMLP` with ``depth`` hidden layers of
      ``width`` units; input ``(B, *input_shape)`` is flattened; features ``(B, width)``
      (after the last ReLU).
    * ``"cnn"``: :class:`~selfgrow.models.cnn.GrowableCNN` with conv blocks of ``channels``
      (BatchNorm, 2x2 max-pool after each of the first ``floor(log2(H))`` blocks); input
      ``(B, C, H, W)`` with ``input_shape = (C, H, W)``, ``H == W``; features
      ``(B, channels[-1])`` (global average pool).

    The model's ``config.n_classes`` (1) is a placeholder: the head is gone.

    Raises:
        GrowthConfigError: unknown ``kind`` (lists the valid ones), a non-positive size, or an
            ``input_shape`` the CNN cannot take.
    """
    if kind not in EXTRACTOR_KINDS:
        raise GrowthConfigError(choices_message("extractor kind", kind, EXTRACTOR_KINDS))
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise GrowthConfigError(f"input_shape={tuple(input_shape)!r} must be positive sizes")
    model: nn.Module
    if kind == "mlp":
        width, depth = _positive_int("width", width), _positive_int("depth", depth)
        model = GrowableMLP(MLPConfig(in_features=math.prod(shape), hidden=(width,) * depth,
                                      n_classes=1))
        feat_dim = width
    else:
        if len(shape) != 3 or shape[1] != shape[2]:
            raise GrowthConfigError(
                f"the cnn extractor needs input_shape (C, H, W) with H == W, got {shape}; "
                "use kind='mlp' for flattened inputs"
            )
        chans = tuple(_positive_int("channels", c) for c in channels)
        if not chans:
            raise GrowthConfigError("channels must name at least one conv block")
        n_pool = min(len(chans), int(math.log2(shape[1])))
        model = GrowableCNN(CNNConfig(in_channels=shape[0], image_size=shape[1],
                                      channels=chans, n_classes=1,
                                      pool_after=tuple(range(n_pool))))
        feat_dim = chans[-1]
    model.head = nn.Identity()
    model.feat_dim = feat_dim
    return model


class DERNet(nn.Module):
    """DER's network: one feature extractor per experience, a classifier over all features.

    Args:
        extractor_factory: ``() -> nn.Module`` mapping the input ``(B, *)`` to features
            ``(B, feat_dim)`` (e.g. ``functools.partial(der_extractor, "mlp", (64,))``).
        feat_dim: feature size of one extractor; default: the first extractor's ``feat_dim``
            attribute.
        init: new extractors are a copy of the previous one (``"copy"``, DER's default) or a
            fresh ``extractor_factory()`` (``"fresh"``).
        mask_value: logit given to classes not seen yet (Avalanche's IncrementalClassifier
            convention), so the output size can follow the largest class id seen while
            unseen class ids never win.
        n_classes: total number of classes, when known: the classifier has that many rows
            from the start (unseen ones masked), so evaluating on experiences not trained yet
            (their labels beyond the classes seen) works; default: rows follow the largest
            class id seen.

    Attributes:
        extractors: ``nn.ModuleList``; all but the last are frozen (``requires_grad`` False)
            and kept in eval mode, also through ``model.train()`` (their BatchNorm running
            statistics never change).
        classifier: ``nn.Linear(n_extractors * feat_dim, n_out)``; row ``c`` is class ``c``;
            ``n_out = max(classes seen) + 1`` (``n_classes_seen`` when the classes arrive in
            order 0, 1, ...). A zero-row layer before the first :meth:`expand`.
        aux_classifier: ``nn.Linear(feat_dim, n_new + 1)`` on the newest extractor's features
            (output 0 = "an old class", 1..n_new = the new classes in sorted order); None
            until the second expansion.
        active: bool buffer ``(n_out,)``, the classes seen so far.
        aux_target_map: long buffer ``(n_out,)``, class -> aux target.
        features: the newest extractor's features ``(B, feat_dim)`` from the last forward
            (graph attached), read by the auxiliary loss without a second forward.
        history: new classes of every expansion (rebuild a checkpoint's shape by calling
            :meth:`expand` with each entry, and the matching :attr:`extractor_added`, on a
            fresh DERNet, then ``load_state_dict``).
        extractor_added: per expansion, whether it added an extractor (False for the first
            and for gated expansions that kept the current one).
        params_history: parameter count (:func:`selfgrow.core.count_params`) after each
            expansion.

    Channel-mask pruning (DER's optional compression stage) is not implemented.
    """

    def __init__(
        self,
        extractor_factory: Callable[[], nn.Module],
        feat_dim: int | None = None,
        init: str = "copy",
        mask_value: float = -1000.0,
        n_classes: int | None = None,
    ) -> None:
        super().__init__()
        if init not in DER_INIT:
            raise GrowthConfigError(choices_message("DER init", init, DER_INIT))
        if isinstance(extractor_factory, nn.Module) or not callable(extractor_factory):
            raise GrowthConfigError(
                f"extractor_factory must be a callable returning a NEW nn.Module (e.g. "
                f"functools.partial(der_extractor, 'mlp', shape)), got "
                f"{type(extractor_factory).__name__}"
            )
        first = extractor_factory()
        if not isinstance(first, nn.Module):
            raise IncompatibleModelError(
                f"extractor_factory() returned {type(first).__name__}, not an nn.Module"
            )
        fd = getattr(first, "feat_dim", None) if feat_dim is None else feat_dim
        if fd is None:
            raise GrowthConfigError(
                "feat_dim is unknown: pass feat_dim= or give the extractor a feat_dim attribute"
            )
        self.feat_dim = _positive_int("feat_dim", fd)
        self.extractor_factory = extractor_factory
        self.init = init
        if isinstance(mask_value, bool) or not isinstance(mask_value, int | float) or not (
                math.isfinite(mask_value)):
            raise GrowthConfigError(f"mask_value={mask_value!r} must be a finite number")
        self.mask_value = float(mask_value)
        self.extractors = nn.ModuleList([first])
        ref = next(iter(first.parameters()), None)
        n0 = 0 if n_classes is None else _positive_int("n_classes", n_classes)
        self.classifier = _linear(self.feat_dim, n0, ref)
        self.register_module("aux_classifier", None)
        self.register_buffer("active", torch.zeros(n0, dtype=torch.bool))
        self.register_buffer("aux_target_map", torch.zeros(n0, dtype=torch.long))
        self.n_frozen = 0
        self.history: list[list[int]] = []
        self.extractor_added: list[bool] = []
        self.params_history: list[int] = []
        self.features: torch.Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave out :attr:`features` (a non-leaf tensor with its graph,
        which ``copy.deepcopy`` cannot copy; the capacity probe deep-copies the model)."""
        state = dict(self.__dict__)
        state["features"] = None
        return state

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, *) -> logits (B, n_out); classes not seen yet get ``mask_value``.

        Caches the newest extractor's features ``(B, feat_dim)`` in :attr:`features`.
        """
        feats = [ext(x) for ext in self.extractors]  # each (B, feat_dim)
        self.features = feats[-1]
        logits = self.classifier(torch.cat(feats, dim=1))  # (B, n_out)
        return logits.masked_fill(~self.active, self.mask_value)

    def aux_logits(self) -> torch.Tensor:
        """Auxiliary logits ``(B, n_new + 1)`` of the last forward's newest features.

        Raises:
            GrowthConfigError: no auxiliary classifier yet (before the second expansion) or no
                forward since the last expansion.
        """
        if self.aux_classifier is None or self.features is None:
            raise GrowthConfigError(
                "no auxiliary logits: DER has an auxiliary classifier from the second "
                "expansion on, and needs a forward after it"
            )
        return self.aux_classifier(self.features)

    def aux_targets(self, y: torch.Tensor) -> torch.Tensor:
        """Auxiliary targets ``(B,)`` of class labels ``y`` ``(B,)``: the classes new in the
        last expansion map to ``1..n_new`` (sorted), every other class to 0."""
        return self.aux_target_map.to(y.device)[y]

    def train(self, mode: bool = True) -> DERNet:
        """Set the mode; frozen extractors stay in eval mode (DER keeps old BatchNorm
        statistics fixed)."""
        super().train(mode)
        for ext in list(self.extractors)[: self.n_frozen]:
            ext.eval()
        return self

    # ------------------------------------------------------------------ sizes
    @property
    def n_out(self) -> int:
        """Number of logits (``max(class seen) + 1``)."""
        return int(self.classifier.out_features)

    @property
    def classes_seen(self) -> list[int]:
        return torch.nonzero(self.active).flatten().tolist()

    @property
    def n_params(self) -> int:
        """Parameter elements of the whole network (frozen extractors included)."""
        return count_params(self)

    @property
    def n_trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ expansion
    def _validate_classes(self, new_classes: Iterable[int]) -> tuple[list[int], list[int]]:
        try:
            given = list(new_classes)
        except TypeError:
            raise GrowthConfigError(
                f"new_classes must be a list of class ids, got {new_classes!r}") from None
        ids: list[int] = []
        for c in given:
            try:
                ids.append(-1 if isinstance(c, bool) else operator.index(c))
            except TypeError:
                ids.append(-1)
        if not ids or min(ids) < 0:
            raise GrowthConfigError(
                f"new_classes must be a non-empty list of class ids >= 0, got {given!r}")
        classes = sorted(set(ids))
        seen = set(self.classes_seen)
        unseen = [c for c in classes if c not in seen]
        if not unseen:
            raise GrowthConfigError(
                f"DER expands for new classes (class-incremental), but every class of "
                f"{classes} was seen already (seen: {sorted(seen)})"
            )
        return classes, unseen

    def expand(
        self,
        new_classes: Iterable[int],
        optimizer: torch.optim.Optimizer | None = None,
        add_extractor: bool = True,
    ) -> None:
        """Grow the network for an experience bringing ``new_classes``.

        First call (experience 0): size the classifier to ``max(new_classes) + 1`` rows and
        activate them. Later calls:

        1. freeze the current newest extractor (``requires_grad`` False, eval mode);
        2. append a new extractor: a copy of the previous one (``init="copy"``) or
           ``extractor_factory()`` (``init="fresh"``);
        3. grow the classifier ``(n_out, E F) -> (n_out', (E + 1) F)``: old entries copied,
           the NEW feature columns of every existing row ZERO, brand-new rows (and their
           biases) with torch's default Linear init;
        4. replace the auxiliary classifier by a fresh ``nn.Linear(F, n_new + 1)``.

        EXACT on the old classes: right after the expansion (eval mode), the logits of every
        class seen before equal those before it up to floating-point summation order (fp32:
        relative error below 1e-5, measured in ``tests/test_expansion.py``), because the
        frozen extractors compute the same features and their classifier rows read the new
        features with zero weights (the longer dot product only reorders the sum). Logits of the new
        classes change from ``mask_value`` to real values.

        ``add_extractor=False`` (selfgrow's gated DER, :class:`DERPlugin` with a ``gate``):
        only step 3's new rows; no extractor is frozen or added, the newest extractor goes on
        training, and the auxiliary classifier is removed (DER's auxiliary loss is about a
        new extractor). Exact on the old classes the same way (same features, same rows; a
        taller matrix product may reorder the sums).

        With ``optimizer`` (the one training this model), it is repaired in place by
        parameter name (:func:`selfgrow.optim.plan_migration`): the classifier's old
        coordinates keep their state bit-identical, its new coordinates start with zero first
        moments and a second moment set at their first gradient; a copied extractor takes the
        state of the one it copies, a fresh one (and the auxiliary classifier) starts as a
        brand-new tensor; the frozen extractors leave the optimizer.

        Args:
            new_classes: class ids of the experience (the ones seen before are "old").
            optimizer: optional optimizer to repair.

        Raises:
            GrowthConfigError: empty / negative class ids or no class not seen before.
            IncompatibleOptimizerError: an optimizer selfgrow cannot migrate.
            IncompatibleModelError: a new extractor that is not an nn.Module.
            In every case model and optimizer are unchanged.
        """
        classes, unseen = self._validate_classes(new_classes)
        if not isinstance(add_extractor, bool):
            raise GrowthConfigError(f"add_extractor={add_extractor!r} must be True or False")
        if optimizer is not None:
            check_optimizer_supported(optimizer)
            check_optimizer(optimizer)
        first = not self.history
        held = set() if optimizer is None else {
            p for g in optimizer.param_groups for p in g["params"]}
        old_named = {n: p for n, p in self.named_parameters() if p in held}
        maps: dict[str, ParamMap] = {}
        with Transaction() as tx:
            extend = add_extractor and not first
            if extend:
                self._add_extractor(tx, old_named, maps)
            self._grow_classifier(tx, classes, not extend, maps)
            self._set_buffers(tx, classes, unseen, first)
            if extend:
                self._new_aux(tx, len(unseen), maps)
            elif not first and self.aux_classifier is not None:
                aux_old = self.aux_classifier

                def drop_aux() -> None:
                    self._modules["aux_classifier"] = None

                def keep_aux() -> None:
                    self._modules["aux_classifier"] = aux_old

                tx.call(drop_aux, keep_aux)
            tx.set_attr(self, "history", [*self.history, classes])
            tx.set_attr(self, "extractor_added", [*self.extractor_added, extend])
            plan = None
            if optimizer is not None:
                new_named = {n: p for n, p in self.named_parameters() if p.requires_grad}
                plan = plan_migration(optimizer, old_named, new_named, maps)
        # committed: nothing below can fail
        if plan is not None:
            plan.apply()
        self.features = None
        self.params_history = [*self.params_history, self.n_params]

    def _add_extractor(self, tx: Transaction, old_named: dict[str, nn.Parameter],
                       maps: dict[str, ParamMap]) -> None:
        k = len(self.extractors)
        prev = self.extractors[k - 1]
        if self.init == "copy":
            new = copy.deepcopy(prev)
        else:
            new = self.extractor_factory()
            if not isinstance(new, nn.Module):
                raise IncompatibleModelError(
                    f"extractor_factory() returned {type(new).__name__}, not an nn.Module")
            ref = next(iter(prev.parameters()), None)
            if ref is not None:
                new = new.to(device=ref.device, dtype=ref.dtype)
        for p in new.parameters():
            p.requires_grad_(True)
        frozen = [(p, p.requires_grad) for p in prev.parameters()]
        modes = [(m, m.training) for m in prev.modules()]

        def freeze() -> None:
            for p, _ in frozen:
                p.requires_grad_(False)
            prev.eval()

        def unfreeze() -> None:
            for p, rg in frozen:
                p.requires_grad_(rg)
            for m, t in modes:
                m.train(t)

        tx.call(freeze, unfreeze)
        tx.set_attr(self, "n_frozen", k)
        tx.set_modules(self.extractors, {**self.extractors._modules, str(k): new})
        for n, _ in new.named_parameters():
            src = f"extractors.{k - 1}.{n}"
            copied = self.init == "copy" and src in old_named
            maps[f"extractors.{k}.{n}"] = ParamMap(source=src if copied else None)

    def _grow_classifier(self, tx: Transaction, classes: list[int], same_features: bool,
                         maps: dict[str, ParamMap]) -> None:
        old = self.classifier
        n_old, f_old = old.weight.shape
        n_new = max(n_old, max(classes) + 1)
        f_new = f_old if same_features else f_old + self.feat_dim

        def axis(n_keep: int, n_total: int) -> AxisMap:
            return AxisMap(torch.cat([torch.arange(n_keep),
                                      torch.full((n_total - n_keep,), -1, dtype=torch.long)]))

        rows, cols = axis(n_old, n_new), axis(f_old, f_new)
        # zeros_fill: the new feature columns of the existing rows are 0 (exactness)
        w, wmap = regrid(old.weight, {0: rows, 1: cols})
        b, bmap = regrid(old.bias, {0: rows})
        fresh = _linear(f_new, n_new - n_old, old.weight)  # brand-new rows: default init
        w[n_old:] = fresh.weight.detach()
        b[n_old:] = fresh.bias.detach()
        lin = _linear(f_new, n_new, old.weight)
        lin.weight = nn.Parameter(w, requires_grad=old.weight.requires_grad)
        lin.bias = nn.Parameter(b, requires_grad=old.bias.requires_grad)
        tx.replace_module(self, "classifier", lin)
        maps["classifier.weight"] = ParamMap("classifier.weight", wmap.index)
        maps["classifier.bias"] = ParamMap("classifier.bias", bmap.index)

    def _set_buffers(self, tx: Transaction, classes: list[int], unseen: list[int],
                     first: bool) -> None:
        n = self.n_out
        dev = self.active.device
        active = torch.zeros(n, dtype=torch.bool, device=dev)
        active[: self.active.numel()] = self.active
        active[classes] = True
        aux = torch.zeros(n, dtype=torch.long, device=dev)
        if not first:
            aux[unseen] = torch.arange(1, len(unseen) + 1, device=dev)
        tx.set_buffer(self, "active", active)
        tx.set_buffer(self, "aux_target_map", aux)

    def _new_aux(self, tx: Transaction, n_new: int, maps: dict[str, ParamMap]) -> None:
        aux = _linear(self.feat_dim, n_new + 1, self.classifier.weight)
        aux.train(self.training)
        tx.replace_module(self, "aux_classifier", aux)
        maps["aux_classifier.weight"] = ParamMap(source=None)
        maps["aux_classifier.bias"] = ParamMap(source=None)


class DERPlugin(SupervisedPlugin):
    """Run DER inside an Avalanche strategy whose model is a :class:`DERNet`.

    * ``before_training_exp``: ``model.expand(experience.classes_in_this_experience,
      optimizer=strategy.optimizer)`` (the strategy's ``make_optimizer`` has run already:
      the optimizer is repaired in place, by name, so LR schedulers keep pointing at it),
      then ``strategy.optimized_param_id`` is refreshed, or the next ``make_optimizer``
      would add the grown classifier tensors a second time. Avalanche's ``make_optimizer``
      re-adds the frozen extractors (empty state; they have no gradients, so they never
      move); the next expansion removes them again.
    * ``before_backward``: ``strategy.loss += aux_weight * CE(aux_logits, aux_targets)``
      from the features the model cached in the forward pass (no second forward); new
      classes map to ``1..n_new``, old ones (replayed samples) to 0.

    Publishes ``Growth/n_params`` after every expansion (``strategy.evaluator``).

    With ``gate`` (selfgrow's DER-style growth), a new extractor is added only when a short
    trial says it pays: before experience ``k >= 1``, the
    :class:`~selfgrow.continual.probe.CapacityProbe` trains two copies of the model for
    ``gate.steps`` steps on the new experience mixed with the replay memory, one expanded
    with a new extractor (candidate ``"expand"``), one with new classifier rows only (the
    newest extractor goes on training), and adds the extractor only when its mean held-out
    new/old accuracy beats the other by ``gate.margin``. Without stored samples (no replay
    plugin, or an empty buffer) the gate is skipped and DER expands as usual. The trials'
    FLOPs are in :attr:`gate_flops`.

    Args:
        aux_weight: weight of the auxiliary loss (DER: 1.0); 0 disables it.
        gate: a ``CapacityProbe(candidates=("expand",), ...)``, or None (plain DER).

    Attributes:
        params_per_experience: parameter count after each expansion.
        last_aux_loss: detached auxiliary loss of the last iteration (None before).
        gate_reports: one record per gated decision (experience, choice, trials).
        gate_flops: training + evaluation FLOPs of the gate's trials.

    Raises:
        GrowthConfigError: bad ``aux_weight``, or a ``gate`` that is not a CapacityProbe
            with candidates ``("expand",)``.
    """

    def __init__(self, aux_weight: float = 1.0, gate: Any = None) -> None:
        super().__init__()
        if gate is not None:
            from .probe import CapacityProbe

            if not isinstance(gate, CapacityProbe) or tuple(gate.candidates) != ("expand",):
                raise GrowthConfigError(
                    f"gate must be CapacityProbe(candidates=('expand',), ...) or None, got "
                    f"{gate!r:.80}")
        self.gate = gate
        self.gate_reports: list[dict[str, Any]] = []
        self.gate_flops = 0.0
        if isinstance(aux_weight, bool) or not isinstance(aux_weight, int | float) or not (
            math.isfinite(aux_weight) and aux_weight >= 0
        ):
            raise GrowthConfigError(f"aux_weight={aux_weight!r} is out of range; valid: >= 0")
        self.aux_weight = float(aux_weight)
        self.params_per_experience: list[int] = []
        self.last_aux_loss: torch.Tensor | None = None

    @staticmethod
    def _model(strategy: Any) -> DERNet:
        model = strategy.model
        if not isinstance(model, DERNet):
            raise IncompatibleModelError(
                f"DERPlugin needs the strategy's model to be a DERNet, got "
                f"{type(model).__name__}"
            )
        return model

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = self._model(strategy)
        classes = [int(c) for c in strategy.experience.classes_in_this_experience]
        add = True
        if self.gate is not None and model.history:
            add = self._gate(strategy, model, classes)
        model.expand(classes, optimizer=strategy.optimizer, add_extractor=add)
        strategy.optimized_param_id = dict(model.named_parameters())
        self.params_per_experience.append(model.n_params)
        ev = getattr(strategy, "evaluator", None)
        if ev is not None:
            ev.publish_metric_value(MetricValue(
                self, "Growth/n_params", float(model.n_params), strategy.clock.train_iterations))

    def _gate(self, strategy: Any, model: DERNet, classes: list[int]) -> bool:
        """Run the gate's two trials; True when the new extractor won."""
        old = _replay_samples(strategy)
        if old is None:
            return True
        exp = strategy.experience
        k = int(getattr(exp, "current_experience", len(model.history)))
        new = sample_experience(exp.dataset, self.gate.max_new, seed=10_000 + k)[:2]

        def apply(cand: str | None, m: nn.Module, opt: torch.optim.Optimizer) -> None:
            m.expand(classes, optimizer=opt, add_extractor=cand == "expand")

        report = self.gate.run(model, strategy.optimizer, new, old, apply=apply)
        self.gate_flops += report.flops
        self.gate_reports.append({"experience": k, **report.to_dict()})
        return report.choice == "expand"

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        model = self._model(strategy)
        if model.aux_classifier is None or self.aux_weight == 0:
            return
        y = strategy.mb_y
        if model.features is None or model.features.shape[0] != y.shape[0]:
            raise GrowthConfigError(
                "DERPlugin found no features of this mini-batch cached by the model's forward "
                "(did the strategy call something else than model(x)?)"
            )
        aux = F.cross_entropy(model.aux_logits(), model.aux_targets(y))
        strategy.loss = strategy.loss + self.aux_weight * aux
        self.last_aux_loss = aux.detach()


def _replay_samples(strategy: Any, n: int = 2000) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The strategy's replay memory (its ``ReplayPlugin``'s buffer) as tensors, or None when
    it has none or it is empty."""
    for p in getattr(strategy, "plugins", ()):
        buf = getattr(getattr(p, "storage_policy", None), "buffer", None)
        if buf is not None and len(buf) > 0:
            return sample_experience(buf, n, seed=0)[:2]
    return None


def der_strategy(
    model: DERNet,
    optimizer: torch.optim.Optimizer,
    *,
    mem_size: int = 200,
    aux_weight: float = 1.0,
    gate: Any = None,
    plugins: Sequence[Any] = (),
    **strategy_kwargs: Any,
) -> Any:
    """Avalanche ``Naive`` + :class:`DERPlugin` (``gate``: see there) (+
    ``ReplayPlugin(mem_size)`` with an
    experience-balanced buffer unless ``mem_size == 0``); ``strategy_kwargs`` go to
    ``Naive`` (``train_mb_size``, ``train_epochs``, ``device``, ``evaluator`` ...).

    Raises:
        IncompatibleModelError: ``model`` is not a DERNet.
        GrowthConfigError: negative ``mem_size`` or bad ``aux_weight``.
    """
    from avalanche.training.plugins import ReplayPlugin
    from avalanche.training.storage_policy import ExperienceBalancedBuffer
    from avalanche.training.supervised import Naive

    if not isinstance(model, DERNet):
        raise IncompatibleModelError(f"der_strategy needs a DERNet, got {type(model).__name__}")
    if isinstance(mem_size, bool) or not isinstance(mem_size, int) or mem_size < 0:
        raise GrowthConfigError(f"mem_size={mem_size!r} is out of range; valid: >= 0")
    ps: list[Any] = [DERPlugin(aux_weight, gate=gate)]
    if mem_size:
        ps.append(ReplayPlugin(mem_size=mem_size, storage_policy=ExperienceBalancedBuffer(
            max_size=mem_size, adaptive_size=True)))
    return Naive(model=model, optimizer=optimizer, plugins=[*ps, *plugins], **strategy_kwargs)


# ---------------------------------------------------------------------------------------------
# PNN (Avalanche's implementation)
# ---------------------------------------------------------------------------------------------
PNN_REFUSAL = (
    "PNN needs task labels: it is task-incremental only; use a task-incremental benchmark; "
    "valid choices: task-incremental"
)


def check_task_incremental(stream: Iterable[Any]) -> None:
    """Refuse a stream PNN cannot learn: every experience must carry exactly one task label
    and no two experiences the same one (a class-incremental stream has task label 0
    everywhere: PNN would keep training its first column, protecting nothing).

    Raises:
        GrowthConfigError: :data:`PNN_REFUSAL`, naming the offending experience; ``stream``
            not an iterable of experiences.
    """
    if stream is None or isinstance(stream, (str, bytes)) or not hasattr(stream, "__iter__"):
        raise GrowthConfigError(f"check_task_incremental: expected a stream (an iterable of "
                                f"experiences, e.g. benchmark.train_stream), got {stream!r}")
    seen: dict[int, int] = {}
    for i, exp in enumerate(stream):
        raw = getattr(exp, "task_labels", None)
        labels = [] if raw is None else sorted({int(t) for t in raw})
        if len(labels) != 1:
            raise GrowthConfigError(f"{PNN_REFUSAL} (experience {i} has task labels {labels})")
        if labels[0] in seen:
            raise GrowthConfigError(
                f"{PNN_REFUSAL} (experiences {seen[labels[0]]} and {i} share task label "
                f"{labels[0]})")
        seen[labels[0]] = i


class TaskLogitMask(SupervisedPlugin):
    """Masks each sample's logits outside the columns its task may predict.

    After every forward (training and evaluation), before the loss and the metrics, the
    columns a sample's task does not allow are set to the dtype's lowest value; the allowed
    logits are untouched (exact). This is the usual masked-head protocol of
    task-incremental learning with one output layer: ``classes_per_task[t]`` lists task
    ``t``'s classes (the columns it may predict).

    Args:
        classes_per_task: ``[[class, ...], ...]``, one list per task label ``0..T-1``.
        n_classes: width of the logits ``(B, n_classes)``.

    Raises:
        GrowthConfigError: at construction, an empty task list, a class outside
            ``[0, n_classes)`` or a non-positive ``n_classes``; at a forward, a task label
            with no entry in ``classes_per_task``.
    """

    def __init__(self, classes_per_task: Sequence[Sequence[int]], n_classes: int) -> None:
        super().__init__()
        n_classes = _positive_int("n_classes", n_classes)
        tasks = [list(c) for c in classes_per_task]
        if not tasks:
            raise GrowthConfigError("TaskLogitMask: classes_per_task is empty (one list of "
                                    "classes per task label is needed)")
        self.allowed = torch.zeros(len(tasks), n_classes, dtype=torch.bool)
        for t, raw in enumerate(tasks):
            try:
                cls = [operator.index(c) for c in raw]
            except TypeError:
                raise GrowthConfigError(f"TaskLogitMask: task {t}'s classes {raw} are not "
                                        f"integers") from None
            bad = [c for c in cls if not 0 <= c < n_classes]
            if bad:
                raise GrowthConfigError(f"TaskLogitMask: task {t} has classes {bad} outside "
                                        f"[0, {n_classes})")
            self.allowed[t, cls] = True

    def _keep(self, strategy: Any, tasks: list[int], n_cols: int) -> torch.Tensor:
        """``(B, n_cols)`` bool: True where sample ``b`` may predict column ``c``."""
        unknown = sorted({t for t in tasks if not 0 <= t < self.allowed.shape[0]})
        if unknown:
            raise GrowthConfigError(f"TaskLogitMask: task labels {unknown} have no classes "
                                    f"(known tasks: 0..{self.allowed.shape[0] - 1})")
        keep = self.allowed[tasks]
        if keep.shape[1] != n_cols:
            raise GrowthConfigError(f"TaskLogitMask: the model returns {n_cols} logits, the "
                                    f"mask was built for {keep.shape[1]} classes")
        return keep

    def _mask(self, strategy: Any) -> None:
        out = strategy.mb_output
        tasks = torch.as_tensor(strategy.mb_task_id).long().reshape(-1).tolist()
        keep = self._keep(strategy, tasks, out.shape[1]).to(out.device)
        strategy.mb_output = out.masked_fill(~keep, torch.finfo(out.dtype).min)

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        self._mask(strategy)

    def after_eval_forward(self, strategy: Any, **kwargs: Any) -> None:
        self._mask(strategy)


class MultiHeadPaddingMask(TaskLogitMask):
    """Masks the zero padding of Avalanche's multi-head outputs (PNN's heads).

    Avalanche 0.6's ``MultiTaskModule.forward`` returns ``(B, max_class_label)`` logits
    for a mini-batch, writing each task's head output ``(B_t, C_t)`` into the first ``C_t``
    columns and leaving the other columns at exactly 0. Once a later task has a wider head
    (its classes have larger labels), a sample of an old task whose own logits are all
    negative is predicted as one of those zero columns: measured on split-digits with PNN,
    task 0's accuracy fell from 0.986 to 0.861 after experience 1 with every weight of
    its column and head unchanged. This :class:`TaskLogitMask` allows each task the first
    ``C_t`` columns, ``C_t`` read from its head at every forward (heads appear as tasks
    arrive); the task's own logits are untouched (exact).

    Args:
        classifier_attr: the model attribute holding the ``MultiHeadClassifier``
            (``"classifier"`` for ``avalanche.models.PNN``).

    Raises:
        GrowthConfigError: at construction, an empty or non-string ``classifier_attr``; at
            the first forward, when the model has no multi-head classifier under it.
    """

    def __init__(self, classifier_attr: str = "classifier") -> None:
        SupervisedPlugin.__init__(self)
        if not isinstance(classifier_attr, str) or not classifier_attr:
            raise GrowthConfigError(f"MultiHeadPaddingMask: classifier_attr must be a model "
                                    f"attribute name, got {classifier_attr!r}")
        self.classifier_attr = classifier_attr

    def _keep(self, strategy: Any, tasks: list[int], n_cols: int) -> torch.Tensor:
        heads = getattr(getattr(strategy.model, self.classifier_attr, None), "classifiers", None)
        if heads is None:
            raise GrowthConfigError(
                f"MultiHeadPaddingMask: model {type(strategy.model).__name__} has no "
                f"multi-head classifier at .{self.classifier_attr}.classifiers")
        widths = {k: head_out_features(heads[str(k)]) for k in set(tasks) if str(k) in heads}
        width = torch.as_tensor([widths.get(k, n_cols) for k in tasks])
        return torch.arange(n_cols)[None, :] < width[:, None]


class PNNStreamCheck(SupervisedPlugin):
    """Refuses, before an experience trains or is evaluated, what PNN cannot learn: an
    experience with more or fewer than one task label, a task label trained twice (its
    column would be retrained, forgetting it), and samples of ``prod(shape) != in_features``
    (``PNN`` flattens its input, so a wrong size otherwise surfaces as a reshape error deep
    inside Avalanche). Added by :func:`pnn_strategy`.

    The checks run before Avalanche's dataset and model adaptation (which adds the
    experience's column), so a refused experience leaves the model as it was.

    Raises:
        GrowthConfigError: :data:`PNN_REFUSAL` naming the experience, or the input size
            mismatch naming both sizes.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self._trained: dict[int, int] = {}

    def _check_input(self, exp: Any) -> None:
        ds = exp.dataset
        if len(ds) == 0:
            return
        x = ds[0][0]
        n = int(torch.as_tensor(x).numel())
        if n != self.in_features:
            raise GrowthConfigError(
                f"PNN in_features={self.in_features} but experience {exp.current_experience}'s "
                f"samples have shape {tuple(torch.as_tensor(x).shape)} ({n} values); pass "
                f"in_features={n}")

    def before_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
        # before Avalanche's model adaptation, which adds the experience's PNN column
        exp = strategy.experience
        labels = sorted({int(t) for t in (getattr(exp, "task_labels", None) or [])})
        i = exp.current_experience
        if len(labels) != 1:
            raise GrowthConfigError(f"{PNN_REFUSAL} (experience {i} has task labels {labels})")
        if labels[0] in self._trained and self._trained[labels[0]] != i:
            raise GrowthConfigError(
                f"{PNN_REFUSAL} (experiences {self._trained[labels[0]]} and {i} share task "
                f"label {labels[0]})")
        self._trained[labels[0]] = i
        self._check_input(exp)

    def before_eval_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
        self._check_input(strategy.experience)


def pnn_strategy(
    scenario_kind: str,
    in_features: int,
    hidden: int = 100,
    num_layers: int = 1,
    *,
    adapter: str = "mlp",
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_kwargs: dict[str, Any] | None = None,
    **strategy_kwargs: Any,
) -> Any:
    """Avalanche's ``PNNStrategy`` over ``avalanche.models.PNN(num_layers, in_features,
    hidden, adapter)``: one column per task, old columns frozen (``requires_grad`` False),
    lateral adapters from old columns into new ones, a multi-head classifier. A
    :class:`MultiHeadPaddingMask` is added to the plugins (first) unless one is given:
    without it, Avalanche's zero-padded multi-head logits cost old tasks accuracy.
    A :class:`PNNStreamCheck` is added too (refuses a stream PNN cannot learn and a wrong
    ``in_features`` before an experience runs). Evaluate only the experiences trained so
    far (``test_stream[: i + 1]``): PNN adds a column for every task it sees, in evaluation
    too, and only the newest column trains, so evaluating a task before training it leaves
    that task a frozen random column.

    ``PNN`` reshapes its input to ``(B, in_features)`` itself, so image batches
    ``(B, 1, H, W)`` work with ``in_features = H * W`` (no Flatten wrapper; PNNStrategy
    also requires the model to BE a ``PNN``).

    Args:
        scenario_kind: the benchmark's kind (:data:`SCENARIO_KINDS`); only
            ``"task-incremental"`` is accepted (check the stream itself with
            :func:`check_task_incremental`).
        in_features: ``prod(input_shape)``.
        hidden: units per column and layer.
        num_layers: PNN layers.
        adapter: lateral adapter, ``"mlp"`` or ``"linear"``.
        optimizer_cls, optimizer_kwargs: optimizer built over ``model.parameters()``
            (default Adam with torch's defaults).
        strategy_kwargs: to ``PNNStrategy`` (``train_mb_size``, ``train_epochs``,
            ``eval_mb_size``, ``device``, ``plugins``, ``evaluator`` ...).

    Raises:
        GrowthConfigError: a scenario kind other than task-incremental, bad sizes /
            adapter / batch sizes / epochs, ``plugins`` not a list of Avalanche plugins, an
            optimizer class or kwargs the optimizer rejects (raised before the strategy is
            built); and, from the added :class:`PNNStreamCheck`, an experience that is not
            one new task or samples whose size is not ``in_features`` (raised before that
            experience trains or is evaluated).
    """
    from avalanche.models import PNN
    from avalanche.training import PNNStrategy

    if scenario_kind not in SCENARIO_KINDS:
        raise GrowthConfigError(choices_message("scenario kind", scenario_kind, SCENARIO_KINDS))
    if scenario_kind != "task-incremental":
        raise GrowthConfigError(f"{PNN_REFUSAL} (got scenario kind {scenario_kind!r})")
    in_features = _positive_int("in_features", in_features)
    hidden = _positive_int("hidden", hidden)
    num_layers = _positive_int("num_layers", num_layers)
    if adapter not in PNN_ADAPTERS:
        raise GrowthConfigError(choices_message("PNN adapter", adapter, PNN_ADAPTERS))
    for key in ("train_mb_size", "eval_mb_size", "train_epochs"):
        if key in strategy_kwargs:
            _positive_int(key, strategy_kwargs[key])
    raw_plugins = strategy_kwargs.pop("plugins", None)
    if raw_plugins is not None and not isinstance(raw_plugins, (list, tuple)):
        raise GrowthConfigError(f"plugins must be a list of Avalanche plugins, got "
                                f"{type(raw_plugins).__name__}; pass plugins=[...]")
    plugins = list(raw_plugins or [])
    wrong = [type(p).__name__ for p in plugins if not isinstance(p, BasePlugin)]
    if wrong:
        raise GrowthConfigError(f"plugins {wrong} are not Avalanche plugins "
                                f"(avalanche.core.BasePlugin subclasses)")
    if not isinstance(optimizer_cls, type) or not issubclass(optimizer_cls, torch.optim.Optimizer):
        raise GrowthConfigError(f"optimizer_cls must be a torch.optim.Optimizer subclass, "
                                f"got {optimizer_cls!r}")
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
        raise GrowthConfigError(f"optimizer_kwargs must be a dict, got {optimizer_kwargs!r}")
    model = PNN(num_layers=num_layers, in_features=in_features,
                hidden_features_per_column=hidden, adapter=adapter)
    try:
        optimizer = optimizer_cls(model.parameters(), **(optimizer_kwargs or {}))
    except (TypeError, ValueError) as e:
        raise GrowthConfigError(f"{optimizer_cls.__name__} rejected optimizer_kwargs="
                                f"{optimizer_kwargs!r}: {e}") from e
    return PNNStrategy(model=model, optimizer=optimizer,
                       plugins=with_pnn_plugins(plugins, in_features), **strategy_kwargs)


def with_pnn_plugins(plugins: list[Any], in_features: int) -> list[Any]:
    """``plugins`` with the two plugins every PNN run needs put first unless present: a
    :class:`PNNStreamCheck` (refuses a stream PNN cannot learn, a wrong input size) and a
    :class:`MultiHeadPaddingMask` (masks Avalanche's zero-padded multi-head logits). Used by
    :func:`pnn_strategy` and ``selfgrow run --strategy pnn``."""
    out = list(plugins)
    if not any(isinstance(p, MultiHeadPaddingMask) for p in out):
        out.insert(0, MultiHeadPaddingMask())
    if not any(isinstance(p, PNNStreamCheck) for p in out):
        out.insert(0, PNNStreamCheck(in_features))
    return out
