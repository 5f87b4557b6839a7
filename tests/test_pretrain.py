"""selfgrow.pretrain: grow_and_train on real text (tiny shapes), its schedules, FLOP
accounting, LR schedules, search, auto, run directories and bad inputs."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from selfgrow.control.policies import PolicyContext, SkipReason
from selfgrow.data import load_shakespeare
from selfgrow.errors import GrowthConfigError, IncompatibleModelError
from selfgrow.inspect_run import format_summary, load_run
from selfgrow.models.transformer import GrowableTransformer, TransformerConfig
from selfgrow.pretrain import (
    SCHEDULES,
    Shape,
    flops_to_reach,
    grow_and_train,
    growth_steps,
    load_pretrained,
    lr_multiplier,
    parse_shape,
    plan_stages,
)
from selfgrow.pretrain.auto import TowardTarget
from selfgrow.runs import FlopMeter, flop_counter

TARGET = (2, 32, 2, 32)
BUDGET = 5e9  # about 70 optimizer steps of 512 tokens at the target


@pytest.fixture(scope="module")
def corpus():
    return load_shakespeare()


def _run(corpus, strategy, tmp_path=None, **kw):
    args = dict(strategy=strategy, target=TARGET, budget_flops=BUDGET, data=corpus,
                tokens_per_step=512, n_evals=4, eval_windows=8, rewarm_steps=5,
                runs_dir=tmp_path, progress=False, tensorboard=tmp_path is not None)
    args.update(kw)
    start = args.pop("model_or_config", None)
    return grow_and_train(start, **args)


# --- schedules -------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", SCHEDULES)
def test_every_schedule_reaches_the_target_within_the_budget(corpus, strategy, tmp_path):
    res = _run(corpus, strategy, tmp_path, **({"ligo_steps": 5} if strategy == "ligo" else {}))
    s = res.summary
    assert s["final_shape"] == str(Shape(*TARGET))
    assert res.model.config.n_layers == TARGET[0] and res.model.config.d_model == TARGET[1]
    # the budget is spent and not overspent by more than one step
    per_step = s["flops"] / s["steps"]
    assert BUDGET <= s["flops"] <= BUDGET + 3 * per_step
    assert math.isfinite(s["final_val_loss"]) and s["final_val_loss"] < math.log(256)
    n = 0 if strategy == "scratch" else (2 if strategy == "compound" else 1)
    assert len(s["growths"]) == n and s["n_growths"] == n
    rec = load_run(res.run_dir)
    assert len(rec.growths) == n
    assert (res.run_dir / "tb").is_dir() and any((res.run_dir / "tb").iterdir())
    assert "final: shape" in format_summary(s)
    for g in rec.growths:
        assert g.trigger.get("signal") in ("schedule", "loss_plateau", "deadline")


def test_ligo_fits_then_materialises_and_its_flops_count(corpus, tmp_path):
    """The ligo schedule fits the operator on the training loss (the held-out loss of the
    grown model does not rise), charges the fitting FLOPs to the budget and leaves a plain
    model of the target shape that load_pretrained rebuilds."""
    res = _run(corpus, "ligo", tmp_path, ligo_steps=10)
    s = res.summary
    g = s["growths"][0]
    assert g["op"] == "ligo" and g["ligo"]["steps"] == 10
    assert (g["from"], g["to"]) == ("1,32,2,32", "2,32,2,32")
    assert g["ligo"]["loss_final"] <= g["ligo"]["loss_init"]
    assert g["ligo"]["flops"] > 0 and "LiGO fitted 10 steps" in g["reason"]
    assert "LiGO fit: 10 steps" in format_summary(s)
    assert BUDGET <= s["flops"]  # fitting FLOPs are part of what was spent
    assert s["ligo_settings"] == {"steps": 10, "lr": 1e-2}
    ev = load_run(res.run_dir).growths[0]
    assert ev.action["op"] == "ligo"
    assert ev.action["config"]["data"]["coefficients"]["depth"]  # the learned operator
    again = load_pretrained(res.run_dir)
    assert again.config == res.model.config
    assert not any("ligo" in n for n, _ in res.model.named_parameters())
    with pytest.raises(GrowthConfigError, match="ligo_steps=100 would spend"):
        _run(corpus, "ligo", ligo_steps=100)  # the default fit is most of this tiny budget
    res0 = _run(corpus, "ligo", ligo_steps=0)
    assert res0.summary["growths"][0]["ligo"]["kept"] == "init"
    assert res0.summary["steps"] > s["steps"]  # the fit's FLOPs bought fewer training steps


def test_a_start_config_is_not_grown_in_place(corpus):
    """The caller's config is the start of every run it is passed to (regression: a run grew
    the passed config object, so a second seed started at the target)."""
    start = TransformerConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, d_ff=128,
                              max_seq_len=32)
    before = dataclasses.asdict(start)
    r1 = _run(corpus, "gstack", model_or_config=start)
    assert dataclasses.asdict(start) == before
    r2 = _run(corpus, "gstack", model_or_config=start, seed=1)
    assert r1.summary["start"] == r2.summary["start"] == "1,32,2,32"


def test_function_preserving_growth_has_no_spike_and_plain_stack_has_one(corpus):
    fp = _run(corpus, "compound").summary["growths"]
    # compound: width (exact, symmetric noise) and function-preserving depth
    assert all(abs(g["spike"]) < 1e-3 for g in fp), fp
    gs = _run(corpus, "gstack").summary["growths"][0]
    assert gs["op"] == "g_stack" and abs(gs["spike"]) > 1e-3


def test_compound_grows_sequence_length_as_a_data_warm_up(corpus):
    res = _run(corpus, "compound")
    rows = res.summary["curve"]
    assert rows[0]["eval_seq_len"] == TARGET[3] // 2
    assert rows[-1]["eval_seq_len"] == TARGET[3]
    # constant tokens per step: the early (short) steps used twice the batch
    assert res.summary["tokens"] == res.summary["steps"] * 512


def test_same_settings_are_bitwise_reproducible(corpus):
    a = _run(corpus, "gstack").summary
    b = _run(corpus, "gstack").summary
    assert a["final_val_loss"] == b["final_val_loss"] and a["steps"] == b["steps"]


def test_search_counts_its_own_flops_and_logs_the_winner(corpus, tmp_path):
    res = _run(corpus, "search", tmp_path, search_ops=("g_stack", "function_preserving_stack"),
               search_horizon=0.05)
    s = res.summary
    assert s["search"]["winner"] in ("g_stack", "function_preserving_stack")
    assert s["flops_overhead"] > 0 and s["flops_overhead"] == s["search"]["flops"]
    # total spend (own steps + losers) is the budget: the winner trained less itself
    assert s["flops"] >= BUDGET and s["flops_training"] < BUDGET
    ev = load_run(res.run_dir).growths
    assert len(ev) == 1 and "search:" in ev[0].reason
    with pytest.raises(GrowthConfigError, match="search_horizon"):
        _run(corpus, "search", search_horizon=0.5)
    with pytest.raises(GrowthConfigError, match="search operator"):
        _run(corpus, "search", search_ops=("bogus",))


def test_search_can_compare_ligo_with_a_depth_operator(corpus):
    res = _run(corpus, "search", search_ops=("g_stack", "ligo"), search_horizon=0.05,
               ligo_steps=3)
    s = res.summary
    assert {r["op"] for r in s["search"]["rounds"]} == {"g_stack", "ligo"}
    assert s["search"]["winner"] in ("g_stack", "ligo")
    assert s["flops_overhead"] > 0
    with pytest.raises(GrowthConfigError, match="ligo_steps=100 would spend"):
        _run(corpus, "search", search_ops=("g_stack", "ligo"))


def test_auto_grows_without_hand_set_steps(corpus):
    res = _run(corpus, "auto", auto_deadline=0.5)
    g = res.summary["growths"]
    assert len(g) == 1 and g[0]["progress"] <= 0.55
    assert g[0]["trigger"]["signal"] in ("loss_plateau", "deadline")


# --- auto policy, scripted -------------------------------------------------------------------
def _policy(p=0.3):
    from selfgrow.ops.depth import GStackConfig
    from selfgrow.ops.width import WidenDModelConfig

    prog = {"p": p}
    pol = TowardTarget([("depth", [GStackConfig()]), ("width", [WidenDModelConfig()])],
                       lambda: prog["p"], start=0.1, deadline=0.6)
    return pol, prog


def test_toward_target_decides_when_and_what():
    pol, prog = _policy()
    ctx = PolicyContext(step=10, n_params=1)
    flat = {"loss_plateau": {"triggered": True, "value": 0.001, "threshold": 0.01}}
    assert pol.decide({"loss_plateau": {"triggered": False}}, ctx)[0] is None
    d, _ = pol.decide(flat, ctx)
    assert d.go and d.trigger["dimension"] == "depth"
    sat = {**flat, "gradient_saturation": {"triggered": True, "layers": ["layers.0.ffn.up"]}}
    d, why = pol.decide(sat, ctx)
    assert d.trigger["dimension"] == "width" and "saturation" in why
    pol.notify(d, 10, applied=True)
    assert [k for k, _ in pol.remaining] == ["depth"]
    prog["p"] = 0.05
    d, _ = pol.decide(flat, ctx)
    assert d.blocked == SkipReason.WARMUP
    prog["p"] = 0.7  # deadline: grows without a plateau
    d, why = pol.decide({}, ctx)
    assert d.go and d.trigger["signal"] == "deadline" and "deadline" in why
    pol.notify(d, 11, applied=True)
    assert pol.decide(flat, ctx)[0] is None


# --- FLOPs, LR, helpers ----------------------------------------------------------------------
def test_flop_counter_counts_cpu_attention():
    m = GrowableTransformer(TransformerConfig(d_model=32, n_heads=2, d_ff=64, max_seq_len=16))
    x = torch.randint(0, 256, (2, 16))
    with flop_counter() as fc:
        m(x).sum().backward()
    ops = {str(k) for k in fc.get_flop_counts()["Global"]}
    assert any("scaled_dot_product" in o for o in ops), ops
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as plain:
        m(x).sum().backward()
    assert fc.get_total_flops() > plain.get_total_flops()  # the stock counter misses it


def test_flop_meter_keys_by_input_shape():
    m = GrowableTransformer(TransformerConfig(d_model=32, n_heads=2, d_ff=64, max_seq_len=16))

    def loss(model, x, y):
        return model(x).sum()

    meter = FlopMeter(loss)
    meter.add(m, torch.zeros(4, 8, dtype=torch.long), None)
    meter.add(m, torch.zeros(2, 16, dtype=torch.long), None)
    assert len(meter.flops_per_sample) == 2
    meter.add_flops(10.0)
    assert meter.extra == 10.0
    with pytest.raises(ValueError):
        meter.add_flops(float("nan"))


def test_lr_schedules():
    assert lr_multiplier("wsd", 0.5) == 1.0
    assert lr_multiplier("wsd", 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier("wsd", 0.9) == pytest.approx(0.5)
    assert lr_multiplier("cosine", 1.0, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier("cosine", 0.01, warmup=0.02) == pytest.approx(0.5)


def test_flops_to_reach_interpolates():
    curve = [{"flops": 0, "val_loss": 3.0}, {"flops": 10, "val_loss": 2.0},
             {"flops": 20, "val_loss": 1.0}]
    assert flops_to_reach(curve, 1.5) == pytest.approx(15.0)
    assert flops_to_reach(curve, 0.5) is None
    assert flops_to_reach(curve, 3.0) == 0


def test_growth_steps_between_shapes_are_exact_operators():
    from selfgrow.ops import grow_
    from selfgrow.pretrain import config_for

    base = TransformerConfig()
    src = config_for(Shape(1, 16, 1, 8), base, 16, 4)
    dst = config_for(Shape(2, 32, 2, 16), base, 16, 4)
    steps = growth_steps(src, dst)
    names = [type(s).name for s in steps]
    assert names == ["widen_d_model", "heads_clone", "ffn_net2wider",
                     "function_preserving_stack", "extend_positions"]
    from selfgrow.ops.compound import CompoundGrowConfig

    torch.manual_seed(0)
    m = GrowableTransformer(src)
    x = torch.randint(0, 256, (2, 8))
    m.eval()
    before = m(x)
    grow_(m, CompoundGrowConfig(steps=steps))
    assert torch.allclose(m(x), before, atol=1e-5)
    assert Shape.of(m.config) == Shape(2, 32, 2, 16)
    with pytest.raises(GrowthConfigError, match="whole multiple"):
        growth_steps(config_for(Shape(1, 32, 2, 8), base, 16, 4),  # d_model 32 -> 48
                     config_for(Shape(1, 48, 3, 8), base, 16, 4))
    with pytest.raises(GrowthConfigError, match="depth operator"):
        growth_steps(src, dst, "bogus")


def test_load_pretrained_rebuilds_the_grown_model(corpus, tmp_path):
    res = _run(corpus, "gstack", tmp_path, n_evals=1)
    m = load_pretrained(res.run_dir)
    x = torch.randint(0, 256, (2, 16))
    res.model.eval()
    m.eval()
    assert torch.equal(m(x), res.model(x))
    cfg = json.loads((res.run_dir / "model_config.json").read_text())
    assert cfg["n_layers"] == TARGET[0]
    with pytest.raises(GrowthConfigError, match="not a finished"):
        load_pretrained(tmp_path)


# --- bad inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"strategy": "bogus"}, "strategy"),
    ({"budget_flops": None}, "exactly one"),
    ({"budget_seconds": 5.0}, "exactly one"),
    ({"budget_flops": -1.0}, "budget_flops"),
    ({"target": "4,64"}, "four positive integers"),
    ({"target": (2, 30, 4, 32)}, "multiple of n_heads"),
    ({"lr_schedule": "step"}, "lr_schedule"),
    ({"warmup": 0.9, "decay": 0.2}, "exceed"),
    ({"data": "wikipedia"}, "data"),
    ({"grow_at": 1.5}, "increasing fractions"),
    ({"lr": 0.0}, "lr"),
    ({"tokens_per_step": 0}, "tokens_per_step"),
])
def test_bad_inputs_raise_project_errors_before_writing(corpus, tmp_path, kw, match):
    with pytest.raises(GrowthConfigError, match=match):
        _run(corpus, kw.pop("strategy", "gstack"), tmp_path / "runs", **kw)
    assert not (tmp_path / "runs").exists()


def test_bad_start_models(corpus):
    with pytest.raises(IncompatibleModelError, match="GrowableTransformer"):
        _run(corpus, "gstack", model_or_config=torch.nn.Linear(2, 2))
    with pytest.raises(GrowthConfigError, match="not the target"):
        _run(corpus, "scratch", model_or_config=TransformerConfig(
            n_layers=1, d_model=32, n_heads=2, d_ff=128, max_seq_len=32))
    with pytest.raises(GrowthConfigError, match="head_dim"):
        _run(corpus, "gstack", model_or_config=TransformerConfig(
            n_layers=1, d_model=32, n_heads=4, d_ff=128, max_seq_len=32))
    with pytest.raises(GrowthConfigError, match="already is the target"):
        _run(corpus, "gstack", model_or_config=TransformerConfig(
            n_layers=2, d_model=32, n_heads=2, d_ff=128, max_seq_len=32))


def test_shapes_and_plans():
    assert parse_shape("4, 64, 2, 128") == Shape(4, 64, 2, 128)
    with pytest.raises(GrowthConfigError):
        parse_shape("4,64,2,x")
    t = Shape(4, 64, 2, 64)
    plan = plan_stages("compound", Shape(2, 32, 1, 32), t, 0.3)
    assert [s for _, s in plan][-1] == t and len(plan) == 2
    plan = plan_stages("gstack", Shape(1, 64, 2, 64), t, [0.2, 0.4, 0.6])
    assert [s.n_layers for _, s in plan] == [2, 3, 4]
    with pytest.raises(GrowthConfigError, match="not the target"):
        plan_stages("compound", Shape(2, 32, 1, 32), t,
                    stages=[(0.2, (2, 64, 2, 64))])


def test_cli_pretrain_runs_and_rejects_bad_values(tmp_path, capsys):
    from selfgrow.cli import main

    rc = main(["pretrain", "--schedule", "gstack", "--target", "2,32,2,32",
               "--budget-flops", "4e9", "--tokens-per-step", "512", "--runs-dir",
               str(tmp_path), "--no-progress", "--no-tensorboard"])
    out = capsys.readouterr().out
    assert rc == 0 and "final: shape 2,32,2,32" in out and "run directory" in out
    assert main(["inspect", str(tmp_path / "pretrain-gstack")]) == 0
    assert "g_stack" in capsys.readouterr().out
    for bad in (["--grow-at", "1.2"], ["--budget-flops", "-3"], ["--stages", "0.2"],
                ["--schedule", "bogus"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as e:
            main(["pretrain", *bad, "--runs-dir", str(tmp_path / "x")])
        assert e.value.code == 2
    capsys.readouterr()
    assert main(["pretrain", "--target", "4,64", "--runs-dir", str(tmp_path / "x")]) == 2
    assert "LAYERS,D_MODEL,HEADS,SEQ_LEN" in capsys.readouterr().err
    assert main(["pretrain", "--schedule", "gstack", "--ligo-steps", "5", "--runs-dir",
                 str(tmp_path / "x")]) == 2
    assert "--ligo-steps" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_search_is_hardware_aware(corpus, monkeypatch):
    from selfgrow.errors import InsufficientMemoryError
    from selfgrow.pretrain import search

    meas = search.measure_shape(TransformerConfig(d_model=32, n_heads=2, d_ff=128,
                                                  max_seq_len=32), 512, 32,
                                torch.device("cpu"), steps=1)
    assert meas["seconds_per_step"] > 0 and meas["peak_bytes"] > 0
    # a width that is not a multiple of 64 is rounded to the fastest measured multiple
    res = _run(corpus, "search", target=(2, 40, 2, 32), search_ops=("g_stack",),
               budget_flops=2e9)
    rounding = res.summary["search_settings"]["width_rounding"]
    assert rounding["requested_d_model"] == 40
    assert rounding["chosen_d_model"] in (40, 48, 64)
    assert set(rounding["seconds_per_step"]) == {"40", "48", "64"}
    assert Shape.of(res.summary["final_shape"]).d_model == rounding["chosen_d_model"]
    # a grown shape that does not fit the device is never tried
    monkeypatch.setattr(search, "available_memory", lambda dev: 1)
    with pytest.raises(InsufficientMemoryError, match="never tried"):
        _run(corpus, "search", search_ops=("g_stack",))
