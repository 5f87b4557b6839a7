"""DER (an extractor per experience, exact on old logits, optimizer repaired by name) and PNN
(Avalanche's, task-incremental only) from ``selfgrow.continual.expansion``, and their runs
through ``selfgrow run``."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from _growth_checks import FP32_TOL, rel_err
from torch import nn

from selfgrow.errors import GrowthConfigError, IncompatibleModelError

pytest.importorskip("avalanche")

from selfgrow.continual.benchmarks import build_benchmark  # noqa: E402
from selfgrow.continual.expansion import (  # noqa: E402
    DERNet,
    DERPlugin,
    MultiHeadPaddingMask,
    PNNStreamCheck,
    TaskLogitMask,
    check_task_incremental,
    der_extractor,
    der_strategy,
    pnn_strategy,
)
from selfgrow.continual.probe import CapacityProbe  # noqa: E402


def _net(kind: str = "mlp", **kw: Any) -> DERNet:
    torch.manual_seed(0)
    shape = (64,) if kind == "mlp" else (1, 8, 8)
    extra = {"width": 16} if kind == "mlp" else {"channels": (4, 8)}
    return DERNet(functools.partial(der_extractor, kind, shape, **extra), **kw)


def _x(kind: str = "mlp", n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 64, generator=g) if kind == "mlp" else torch.randn(
        n, 1, 8, 8, generator=g)


def _train_steps(net: DERNet, opt: torch.optim.Optimizer, kind: str, classes: list[int],
                 steps: int = 3) -> None:
    net.train()
    x = _x(kind)
    y = torch.tensor(classes * (len(x) // len(classes)))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_der_expansion_is_exact_on_old_logits(kind: str) -> None:
    net = _net(kind)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.expand([0, 1], optimizer=opt)
    _train_steps(net, opt, kind, [0, 1])  # BN statistics and weights move
    net.eval()
    before = net(_x(kind)).detach()
    net.expand([2, 3], optimizer=opt)
    net.eval()
    after = net(_x(kind)).detach()
    assert len(net.extractors) == 2 and net.extractor_added == [False, True]
    # exact on old classes up to fp32 summation order (the new columns are zero)
    assert rel_err(after[:, :2], before[:, :2]) < FP32_TOL
    assert not torch.equal(after[:, 2:4], before[:, 2:4])  # new classes got real logits
    # the frozen extractor stays frozen and in eval mode through model.train()
    net.train()
    assert not net.extractors[0].training
    assert all(not p.requires_grad for p in net.extractors[0].parameters())
    assert net.aux_classifier is not None and net.aux_classifier.out_features == 3


def test_der_negative_control_nonzero_new_columns_break_exactness() -> None:
    net = _net()
    net.expand([0, 1])
    net.eval()
    before = net(_x()).detach()
    net.expand([2, 3])
    with torch.no_grad():  # what a careless expansion would do: new feature columns random
        net.classifier.weight[:2, 16:].normal_()
    net.eval()
    assert rel_err(net(_x())[:, :2], before[:, :2]) > 100 * FP32_TOL


def test_der_add_extractor_false_only_adds_rows_and_is_exact() -> None:
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.expand([0, 1], optimizer=opt)
    _train_steps(net, opt, "mlp", [0, 1])
    net.eval()
    before = net(_x()).detach()
    net.expand([2, 3], optimizer=opt, add_extractor=False)
    net.eval()
    assert len(net.extractors) == 1 and net.extractor_added == [False, False]
    assert net.aux_classifier is None
    assert rel_err(net(_x())[:, :2], before[:, :2]) < FP32_TOL
    assert all(p.requires_grad for p in net.extractors[0].parameters())


def test_der_optimizer_state_is_repaired_by_name() -> None:
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.expand([0, 1], optimizer=opt)
    _train_steps(net, opt, "mlp", [0, 1])
    old_w = net.classifier.weight
    old_state = {k: v.clone() for k, v in opt.state[old_w].items()}
    ext0 = dict(net.extractors[0].named_parameters())
    ext0_state = {n: opt.state[p]["exp_avg"].clone() for n, p in ext0.items()}
    net.expand([2, 3], optimizer=opt)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held})  # nothing registered twice
    assert all(p.requires_grad for p in held)  # the frozen extractor left the optimizer
    new_w = net.classifier.weight
    assert new_w.shape == (4, 32)
    st = opt.state[new_w]
    assert torch.equal(st["exp_avg"][:2, :16], old_state["exp_avg"])
    assert torch.equal(st["exp_avg_sq"][:2, :16], old_state["exp_avg_sq"])
    assert torch.count_nonzero(st["exp_avg"][:, 16:]) == 0
    # the copied extractor takes the state of the one it copies
    for n, p in net.extractors[1].named_parameters():
        assert torch.equal(opt.state[p]["exp_avg"], ext0_state[n])
    _train_steps(net, opt, "mlp", [2, 3], steps=2)  # training goes on


def test_der_failed_expansion_leaves_everything_unchanged() -> None:
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.expand([0, 1], optimizer=opt)
    _train_steps(net, opt, "mlp", [0, 1])
    snap = copy.deepcopy(net.state_dict())
    n_state = len(opt.state)
    for bad, msg in (([0, 1], "was seen already"), ([], "class"), ([-1], "-1")):
        with pytest.raises(GrowthConfigError, match=msg):
            net.expand(bad, optimizer=opt)
    with pytest.raises(GrowthConfigError, match="add_extractor"):
        net.expand([2], optimizer=opt, add_extractor="yes")  # type: ignore[arg-type]
    assert net.history == [[0, 1]] and len(net.extractors) == 1
    assert all(torch.equal(v, snap[k]) for k, v in net.state_dict().items())
    assert len(opt.state) == n_state


def test_der_bad_construction() -> None:
    with pytest.raises(GrowthConfigError, match="DER init.*copy, fresh"):
        _net(init="clone")
    with pytest.raises(GrowthConfigError, match="extractor kind.*cnn, mlp"):
        der_extractor("resnet", (64,))
    with pytest.raises(GrowthConfigError, match="H == W"):
        der_extractor("cnn", (1, 8, 6))
    with pytest.raises(IncompatibleModelError, match="DERNet"):
        der_strategy(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    with pytest.raises(GrowthConfigError, match="aux_weight"):
        DERPlugin(aux_weight=-1)
    with pytest.raises(GrowthConfigError, match="gate must be CapacityProbe"):
        DERPlugin(gate=CapacityProbe())
    with pytest.raises(GrowthConfigError, match="callable returning a NEW nn.Module"):
        DERNet(nn.Linear(64, 8))  # a module, not a factory
    for bad in ("x", float("nan"), True):
        with pytest.raises(GrowthConfigError, match="mask_value"):
            _net(mask_value=bad)
    with pytest.raises(GrowthConfigError, match="scenario kind.*task-incremental"):
        pnn_strategy("nope", 64)


def _evaluator() -> Any:
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    return EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])


def _stream_acc(res: dict[str, Any]) -> float:
    acc = [v for k, v in res.items() if k.startswith("Top1_Acc_Stream/eval_phase/test")]
    assert len(acc) == 1, sorted(res)
    return float(acc[0])


def _digits(**kw: Any) -> Any:
    return build_benchmark("split-digits", n_experiences=3, flatten=True, seed=0, **kw)


def test_der_strategy_trains_and_gate_reports() -> None:
    bench = _digits()
    torch.manual_seed(0)
    net = DERNet(functools.partial(der_extractor, "mlp", (64,), width=16), n_classes=10)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gate = CapacityProbe(steps=3, candidates=("expand",))
    s = der_strategy(net, opt, mem_size=60, gate=gate, train_mb_size=32, train_epochs=1,
                     evaluator=_evaluator())
    plugin = next(p for p in s.plugins if isinstance(p, DERPlugin))
    for exp in bench.scenario.train_stream:
        s.train(exp)
    assert len(net.history) == 3
    assert len(plugin.gate_reports) == 2 and plugin.gate_flops > 0
    assert [r["experience"] for r in plugin.gate_reports] == [1, 2]
    assert net.extractor_added[1:] == [r["choice"] == "expand" for r in plugin.gate_reports]
    assert len(plugin.params_per_experience) == 3
    assert _stream_acc(s.eval(bench.scenario.test_stream)) > 0.3


def test_pnn_refuses_class_incremental_and_checks_the_stream() -> None:
    with pytest.raises(GrowthConfigError, match="task-incremental only"):
        pnn_strategy("class-incremental", 64)
    with pytest.raises(GrowthConfigError, match="PNN adapter.*linear, mlp"):
        pnn_strategy("task-incremental", 64, adapter="conv")
    with pytest.raises(GrowthConfigError, match="share task label 0"):
        check_task_incremental(_digits().scenario.train_stream)
    check_task_incremental(_digits(task_incremental=True).scenario.train_stream)


def test_pnn_trains_on_a_task_incremental_stream() -> None:
    bench = _digits(task_incremental=True)
    torch.manual_seed(0)
    s = pnn_strategy("task-incremental", 64, hidden=16, train_mb_size=32, train_epochs=2,
                     optimizer_kwargs={"lr": 1e-2}, evaluator=_evaluator())
    for exp in bench.scenario.train_stream:
        s.train(exp)
    assert len(s.model.layers[0].columns) == 3
    # 3 tasks of 3-4 classes with task labels
    assert _stream_acc(s.eval(bench.scenario.test_stream)) > 0.6


def _task0_acc_per_experience(mask: bool) -> list[float]:
    """Task 0's test accuracy after each experience of a 5-task PNN run."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.models import PNN
    from avalanche.training import PNNStrategy
    from avalanche.training.plugins import EvaluationPlugin

    bench = build_benchmark("split-digits", n_experiences=5, flatten=True, seed=0,
                            task_incremental=True)
    torch.manual_seed(0)
    kw: dict[str, Any] = {"train_mb_size": 64, "train_epochs": 2, "eval_mb_size": 256,
                          "evaluator": EvaluationPlugin(accuracy_metrics(experience=True),
                                                        loggers=[])}
    if mask:
        s = pnn_strategy("task-incremental", 64, hidden=64, **kw)
        assert any(isinstance(p, MultiHeadPaddingMask) for p in s.plugins)
    else:  # the negative control: Avalanche's PNNStrategy as it comes
        model = PNN(num_layers=1, in_features=64, hidden_features_per_column=64)
        s = PNNStrategy(model=model, optimizer=torch.optim.Adam(model.parameters()), **kw)
    out = []
    for exp in bench.scenario.train_stream:
        s.train(exp)
        res = s.eval(bench.scenario.test_stream[:1])
        out.append(res["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000"])
    return out


def test_pnn_padding_mask_keeps_old_tasks_exactly() -> None:
    """PNN freezes a task's column and head, so its accuracy must not move at all; with
    Avalanche's zero-padded multi-head logits it does (the negative control)."""
    masked = _task0_acc_per_experience(mask=True)
    assert masked[0] > 0.9 and masked == [masked[0]] * 5, masked
    plain = _task0_acc_per_experience(mask=False)
    assert plain[0] == masked[0] and min(plain[1:]) < plain[0], plain


def test_pnn_padding_mask_refuses_a_model_without_heads() -> None:
    class _S:
        model = nn.Linear(2, 2)
        mb_output = torch.zeros(1, 2)
        mb_task_id = torch.zeros(1)

    with pytest.raises(GrowthConfigError, match="no multi-head classifier"):
        MultiHeadPaddingMask().after_forward(_S())


def test_pnn_padding_mask_refuses_a_bad_classifier_attr_at_construction() -> None:
    for bad in (None, "", 3):
        with pytest.raises(GrowthConfigError, match="classifier_attr"):
            MultiHeadPaddingMask(classifier_attr=bad)  # type: ignore[arg-type]


class _Batch:
    def __init__(self, out: torch.Tensor, tasks: list[int]) -> None:
        self.model = nn.Identity()
        self.mb_output = out
        self.mb_task_id = torch.tensor(tasks)


def test_task_logit_mask_keeps_the_task_columns_only() -> None:
    m = TaskLogitMask([[0, 1], [2, 3, 4]], 5)
    out = torch.randn(3, 5)
    b = _Batch(out.clone(), [0, 1, 0])
    m.after_eval_forward(b)
    low = torch.finfo(out.dtype).min
    assert torch.equal(b.mb_output[0, :2], out[0, :2]) and (b.mb_output[0, 2:] == low).all()
    assert torch.equal(b.mb_output[1, 2:], out[1, 2:]) and (b.mb_output[1, :2] == low).all()
    assert b.mb_output.argmax(1).tolist()[0] in (0, 1)
    with pytest.raises(GrowthConfigError, match=r"task labels \[2\] have no classes"):
        m.after_forward(_Batch(out.clone(), [2, 0, 0]))
    with pytest.raises(GrowthConfigError, match="returns 4 logits.*5 classes"):
        m.after_forward(_Batch(torch.zeros(1, 4), [0]))


@pytest.mark.parametrize(("args", "msg"), [
    (([], 5), "classes_per_task is empty"),
    (([[0, 5]], 5), r"task 0 has classes \[5\] outside \[0, 5\)"),
    (([[0, 1.5]], 5), "not integers"),
    (([[0]], 0), "n_classes=0"),
])
def test_task_logit_mask_refuses_bad_input(args: tuple[Any, ...], msg: str) -> None:
    with pytest.raises(GrowthConfigError, match=msg):
        TaskLogitMask(*args)


@pytest.mark.parametrize(("kw", "msg"), [
    ({"plugins": MultiHeadPaddingMask()}, "plugins must be a list"),
    ({"plugins": [object()]}, r"plugins \['object'\] are not Avalanche plugins"),
    ({"train_mb_size": 0}, "train_mb_size=0"),
    ({"train_epochs": -1}, "train_epochs=-1"),
    ({"optimizer_kwargs": {"lr": -1.0}}, "Adam rejected optimizer_kwargs"),
    ({"optimizer_kwargs": {"momentum": 0.9}}, "Adam rejected optimizer_kwargs"),
    ({"optimizer_cls": "adam"}, "optimizer_cls must be"),
])
def test_pnn_strategy_refuses_bad_arguments(kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(GrowthConfigError, match=msg):
        pnn_strategy("task-incremental", 64, **kw)


def test_check_task_incremental_refuses_a_non_stream() -> None:
    for bad in (None, 3, "train_stream"):
        with pytest.raises(GrowthConfigError, match="expected a stream"):
            check_task_incremental(bad)  # type: ignore[arg-type]


def test_pnn_stream_check_refuses_before_training() -> None:
    """pnn_strategy is told the scenario kind; its PNNStreamCheck verifies the stream
    itself and the input size before the first step (and the model is untouched)."""
    s = pnn_strategy("task-incremental", 64, hidden=8, train_mb_size=32, evaluator=_evaluator())
    assert isinstance(s.plugins[0], PNNStreamCheck)
    with pytest.raises(GrowthConfigError, match="experiences 0 and 1 share task label 0"):
        for exp in _digits().scenario.train_stream:  # class-incremental: task label 0 always
            s.train(exp)
    s = pnn_strategy("task-incremental", 63, hidden=8, train_mb_size=32, evaluator=_evaluator())
    before = copy.deepcopy(s.model.state_dict())
    with pytest.raises(GrowthConfigError, match="in_features=63.*pass in_features=64"):
        s.train(_digits(task_incremental=True).scenario.train_stream[0])
    after = s.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("kw", "msg"), [
    ({"strategy": "pnn"}, "task-incremental only"),
    ({"strategy": "pnn", "task_incremental": True}, "--growth off"),
    ({"strategy": "pnn", "task_incremental": True, "growth": "off", "model": "cnn"},
     "valid choices for --model with --strategy pnn: mlp"),
    ({"benchmark": "permuted-mnist", "task_incremental": True},
     "needs a class-incremental benchmark"),
    ({"strategy": "icarl2"}, "strategy"),
])
def test_runspec_refuses_bad_expansion_settings(kw: dict[str, Any], msg: str) -> None:
    from selfgrow.continual.runner import RunSpec

    with pytest.raises(GrowthConfigError, match=msg):
        RunSpec(**kw).validate()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["der", "pnn"])
def test_run_experiment_expansion_strategies(tmp_path: Path, strategy: str) -> None:
    from selfgrow.continual.runner import RunSpec, run_experiment

    kw: dict[str, Any] = {"growth": "auto"} if strategy == "der" else {
        "growth": "off", "task_incremental": True}
    spec = RunSpec(benchmark="split-digits", strategy=strategy, epochs=1, width=16,
                   probe_steps=3 if strategy == "der" else 0, **kw)
    _, s = run_experiment(spec, tmp_path, strategy, print_fn=lambda _: None, progress=False)
    for name, v in s["variants"].items():
        assert len(v["accuracy_matrix"]) == 5, name
        assert 0 <= v["final_avg_accuracy"] <= 1 and v["train_flops"] > 0
        assert v["final_model_config"], name
    if strategy == "der":
        assert set(s["variants"]) >= {"grown", "fixed_small"}
        assert s["variants"]["fixed_small"]["final_params"] > s["variants"]["fixed_small"][
            "initial_params"]  # plain DER adds an extractor per experience


def test_run_experiment_pnn_adds_one_column_per_trained_task(tmp_path: Path) -> None:
    """The runner evaluates PNN on the experiences seen so far: evaluating an unseen task
    would make Avalanche add (and freeze untrained) its column before it trains."""
    import itertools
    import re

    from selfgrow.continual.runner import RunSpec, run_experiment

    spec = RunSpec(benchmark="split-digits", strategy="pnn", epochs=1, width=16,
                   growth="off", task_incremental=True)
    lines: list[str] = []
    _, s = run_experiment(spec, tmp_path, "pnn", print_fn=lines.append, progress=False)
    params = [int(m.group(1)) for m in (re.search(r"params=(\d+)", x) for x in lines) if m]
    assert len(params) == 5 and all(b > a for a, b in itertools.pairwise(params)), params
    (v,) = s["variants"].values()
    assert v["final_model_config"]["columns"] == 5
    # frozen columns: each task keeps its accuracy once trained
    acc = v["accuracy_matrix"]
    assert all(acc[i][j] == acc[j][j] for i in range(5) for j in range(i + 1)), acc
