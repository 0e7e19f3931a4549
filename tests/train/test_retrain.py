"""``worker retrain`` end to end with a tiny model: registry, gate, evaluate, predict, models,
MLflow, sweep, tuner and the TensorBoard plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.cli import main
from model.registry import ModelRegistry
from tests.train.conftest import serves
from train import fit as fit_mod
from train.sources import synthetic_frame


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_retrain_writes_promotes_and_evaluates(
    tmp_path: Path, retrain_args: Callable[..., list[str]], synthetic_csv: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    code, out, err = run(retrain_args("--horizon", "2"), capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["promoted"] is True and "first version" in result["reason"]
    models = tmp_path / "models"
    reg = ModelRegistry(models)
    version = result["version"]
    assert reg.current() == version
    vdir = models / version
    for name in ("model.safetensors", "config.json", "model.onnx", "canary.json", "metrics.json",
                 "manifest.json", "forecast.png"):  # fmt: skip
        assert (vdir / name).is_file(), name
    stored = json.loads((vdir / "metrics.json").read_text())
    assert stored["version"] == version and stored["horizon"] == 2
    assert stored["training"]["epochs"] >= 1 and stored["data"]["series"] == 2
    loaded = reg.load(backend="onnx")  # every check of the worker passes
    assert loaded.config.horizon == 2 and loaded.config.hidden_size == 16
    assert loaded.config.calendar_year is False  # 400 hours: less than a year (auto)
    # AR skip on (a new config), interval scale fitted on validation, stored and in the graph.
    cal = stored["calibration"]
    assert loaded.config.ar_skip is True and cal["fitted"] is True
    assert loaded.config.interval_scale == cal["interval_scale"] > 0
    assert stored["training"]["config"]["interval_scale"] == cal["interval_scale"]
    run_dir = Path(result["run_dir"])
    assert (run_dir / "evaluation.json").is_file() and (run_dir / "forecast.png").is_file()
    assert list((run_dir / "checkpoints").glob("event-forecaster-epoch=00-val_loss=*.ckpt"))

    # `worker evaluate` prints the contract's JSON for the serving version, same numbers.
    code, out, err = run(["evaluate", "--data", str(synthetic_csv), "--model-dir", str(models)],
                         capsys)  # fmt: skip
    assert code == 0, err
    ev = json.loads(out)
    assert ev["version"] == version and ev["horizon"] == 2
    assert ev["points"] == stored["points"]
    for method in ("model", "persistence", "seasonal_naive"):
        assert ev["metrics"][method]["mae"] == pytest.approx(stored["metrics"][method]["mae"])
    assert ev["metrics"]["persistence"]["coverage_80"] is None

    # `worker predict`: one forecast object per full window, or per series with --latest.
    out_file = tmp_path / "pred.jsonl"
    code, out, err = run(["predict", "--data", str(synthetic_csv), "--model-dir", str(models),
                          "--out", str(out_file)], capsys)  # fmt: skip
    assert code == 0, err
    lines = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert len(lines) == 2 * (400 - 48 + 1)
    f = lines[0]
    assert set(f) == {"schema_version", "series_id", "ts", "horizon", "target_ts", "mean", "std",
                      "lower", "upper", "model_version", "emitted_at"}  # fmt: skip
    assert f["horizon"] == 2 and len(f["mean"]) == 2 and f["model_version"] == version
    assert all(s > 0 for s in f["std"]) and f["lower"]["95"][0] <= f["lower"]["80"][0]
    assert f["target_ts"][0] == pytest.approx(f["ts"] + 3600)
    code, _, _ = run(["predict", "--data", str(synthetic_csv), "--model-dir", str(models),
                      "--out", str(out_file), "--latest"], capsys)  # fmt: skip
    assert code == 0 and len(out_file.read_text().splitlines()) == 2


def _worse(fit_model: Callable[..., object]) -> Callable[..., object]:
    """Wrap fit_model so the trained network's mean is pushed far off (a clearly worse model)."""

    def wrapped(*args: object, **kwargs: object) -> object:
        result, trainer = fit_model(*args, **kwargs)  # type: ignore[misc]
        with torch.no_grad():
            result.module.net.head.bias[0] += 25.0  # loc is in window-std units
        return result, trainer

    return wrapped


def test_gate_keeps_a_worse_model_aside_and_force_overrides(
    tmp_path: Path, retrain_args: Callable[..., list[str]], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    code, out, _ = run(retrain_args(), capsys)
    first = json.loads(out)["version"]
    reg = ModelRegistry(tmp_path / "models")
    assert reg.current() == first

    monkeypatch.setattr(fit_mod, "fit_model", _worse(fit_mod.fit_model))
    code, out, err = run(retrain_args(), capsys)
    assert code == 0, err
    second = json.loads(out)
    assert second["promoted"] is False and "not better" in second["reason"]
    assert reg.current() == first  # the serving version stays
    assert second["version"] in [v.name for v in reg.versions()]  # written, for inspection
    gate = json.loads((tmp_path / "models" / second["version"] / "metrics.json").read_text())[
        "gate"
    ]
    assert gate["serving_version"] == first and gate["promote"] is False

    code, out, _ = run(retrain_args("--force"), capsys)
    third = json.loads(out)
    assert third["promoted"] is True and "--force" in third["reason"]
    assert reg.current() == third["version"]

    # A model of another horizon cannot be compared: kept aside without --force.
    monkeypatch.undo()
    code, out, _ = run(retrain_args("--horizon", "3"), capsys)
    fourth = json.loads(out)
    assert fourth["promoted"] is False and "not comparable" in fourth["reason"]

    # models list / promote / rollback / prune
    code, out, _ = run(["models", "list", "--model-dir", str(tmp_path / "models")], capsys)
    assert code == 0 and out.count("\n") == 5 and f"* {third['version']}" in out
    code, out, _ = run(["models", "rollback", "--model-dir", str(tmp_path / "models")], capsys)
    assert code == 0 and reg.current() == first
    code, out, _ = run(["models", "promote", fourth["version"], "--model-dir",
                        str(tmp_path / "models")], capsys)  # fmt: skip
    assert code == 0 and reg.current() == fourth["version"]
    code, out, _ = run(["models", "prune", "--keep", "1", "--model-dir",
                        str(tmp_path / "models")], capsys)  # fmt: skip
    removed = json.loads(out)["removed"]
    # Kept: the newest (also CURRENT) and the rollback target (first, promoted before it).
    assert removed == [second["version"], third["version"]]
    assert reg.current() == fourth["version"] and reg.load().version == fourth["version"]
    code, out, err = run(["models", "promote", "nope", "--model-dir", str(tmp_path / "models")],
                         capsys)  # fmt: skip
    assert code == 1 and "nope" in err


def test_mlflow_file_store_gets_metrics_artifacts_and_a_registered_model(
    tmp_path: Path, retrain_args: Callable[..., list[str]], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    # MLflow 3 opens its file store only with this opt-in; without it the flag is refused.
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    code, _, err = run(retrain_args("--mlflow-tracking-uri", uri), capsys)
    assert code == 2 and "MLFLOW_ALLOW_FILE_STORE" in err
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    code, out, err = run(retrain_args("--mlflow-tracking-uri", uri, "--mlflow-experiment", "t"),
                         capsys)  # fmt: skip
    assert code == 0, err
    version = json.loads(out)["version"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("t")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.data.tags["eventcast.version"] == version
    assert r.data.tags["eventcast.promoted"] == "true"
    assert r.data.metrics["test_model_mae"] > 0 and "test_persistence_mae" in r.data.metrics
    assert "val_loss" in r.data.metrics  # Lightning's logger: training curves
    assert r.data.params["config/hidden_size"] == "16"  # hyperparameters
    files = {a.path for a in client.list_artifacts(r.info.run_id, "model")}
    assert {"model/manifest.json", "model/model.onnx", "model/metrics.json"} <= files
    (mv,) = client.search_model_versions("name='eventcast-forecaster'")
    assert mv.run_id == r.info.run_id and mv.tags["eventcast.version"] == version


def test_mlflow_sqlite_store_works_offline_without_the_file_store_opt_in(
    tmp_path: Path, retrain_args: Callable[..., list[str]], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """DESIGN's other offline store: ``sqlite:///`` (tracking and model registry in one file)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out, err = run(retrain_args("--mlflow-tracking-uri", uri, "--mlflow-experiment", "s"),
                         capsys)  # fmt: skip
    assert code == 0, err
    version = json.loads(out)["version"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (r,) = client.search_runs([client.get_experiment_by_name("s").experiment_id])
    assert r.data.tags["eventcast.version"] == version
    assert r.data.metrics["test_model_mae"] > 0
    (mv,) = client.search_model_versions("name='eventcast-forecaster'")
    assert mv.run_id == r.info.run_id and mv.tags["eventcast.version"] == version


def test_sweep_keeps_the_best_trial(
    tmp_path: Path, retrain_args: Callable[..., list[str]], capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    code, out, err = run(retrain_args("--sweep", "2", "--train-windows-per-epoch", "128"), capsys)
    assert code == 0, err
    version = json.loads(out)["version"]
    stored = json.loads((tmp_path / "models" / version / "metrics.json").read_text())
    sweep = stored["sweep"]
    assert len(sweep["trials"]) == 2
    done = [t for t in sweep["trials"] if t["state"] == "COMPLETE"]
    assert min(t["value"] for t in done) == pytest.approx(sweep["best_val_loss"])
    cfg = stored["training"]["config"]
    assert cfg["hidden_size"] == sweep["best_params"]["hidden_size"]
    assert cfg["distribution"] == sweep["best_params"]["distribution"]
    # The chosen trial's model exports and serves (issue 21: it failed the parity check).
    served = serves(tmp_path / "models", version)
    assert served["training"]["config"]["hidden_size"] == cfg["hidden_size"]
    print(f"sweep: worst export difference {served['parity']:.2e}")


def test_tuner_csv_logger_and_tensorboard_forecast_plots(
    tmp_path: Path, retrain_args: Callable[..., list[str]], capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    argv = retrain_args("--lr-find", "--scale-batch-size", "--plot-every-n-epochs", "1")
    argv[argv.index("--logger") + 1] = "tensorboard,csv"
    code, out, err = run(argv, capsys)
    assert code == 0, err
    result = json.loads(out)
    cfg = result["training"]["config"]
    assert cfg["learning_rate"] != pytest.approx(1e-3)  # the finder's suggestion
    assert cfg["batch_size"] >= 32
    served = serves(tmp_path / "models", result["version"])  # the tuned model serves
    assert served["training"]["batch_size"] == cfg["batch_size"]
    run_dir = Path(result["run_dir"])
    assert (run_dir / "csv" / "metrics.csv").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "val/forecast" in tags["images"] and "test/forecast" in tags["images"]
    assert "val_loss" in tags["scalars"] and any("lr" in t for t in tags["scalars"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--precision", "8-bits"], "--precision"),
        (["--time-budget", "soon"], "--time-budget"),
        (["--strategy", "deepspeed"], "deepspeed"),
        (["--lr-find", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"], "--lr-find"),
        (
            ["--sweep", "2", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"],
            "--sweep",
        ),
        (["--hidden-size", "15"], "attention_heads"),
        (
            ["--accelerator", "gpu"] if not torch.cuda.is_available() else ["--devices", "99"],
            "--accelerator",
        ),
    ],
)
def test_bad_settings_exit_2_naming_the_setting(
    retrain_args: Callable[..., list[str]], capsys: pytest.CaptureFixture[str],
    extra: list[str], message: str,
) -> None:  # fmt: skip
    code, _, err = run(retrain_args(*extra), capsys)
    assert code == 2 and message in err


def test_yaml_sections_set_flags_and_typos_are_refused(
    tmp_path: Path, retrain_args: Callable[..., list[str]], capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from deploy.cli import settings as cli_settings

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model:\n  horizon: 6\n  distribution: student_t\n  attention_heads: 4\n"
        "training:\n  time_budget: 2m\n  accumulate_grad_batches: 2\n  gradient_clip_val: 0.5\n"
        "hardware:\n  precision: bf16-mixed\n  devices: 1\n"
    )
    s = cli_settings(retrain_args("--config", str(cfg), "--horizon", "3"), environ={})
    assert s.model.horizon == 3  # the flag wins
    assert s.model.distribution == "student_t" and s.model.attention_heads == 4
    assert s.model.ar_skip is True and s.model.interval_scale == 1.0  # new-config defaults
    assert s.training.time_budget == 120 and s.training.max_time.total_seconds() == 120
    assert s.training.accumulate_grad_batches == 2 and s.training.gradient_clip_val == 0.5
    assert s.hardware.precision == "bf16-mixed" and s.hardware.lightning_devices == 1
    # calendar_year: undecided (the data's span decides, see the test below) unless set.
    assert s.model.calendar_year is False and s.calendar_year_auto is True
    s = cli_settings(retrain_args("--config", str(cfg), "--calendar-year"), environ={})
    assert s.model.calendar_year is True and s.calendar_year_auto is False
    s = cli_settings(retrain_args("--config", str(cfg), "--no-calendar-year"), environ={})
    assert s.model.calendar_year is False and s.calendar_year_auto is False
    for value, auto in (("auto", True), ("false", False)):
        cfg.write_text(f"model:\n  calendar_year: {value}\n")
        args = cli_settings(retrain_args("--config", str(cfg)), environ={})
        assert args.calendar_year_auto is auto
    cfg.write_text("model:\n  calendar_year: sometimes\n")
    code, _, err = run(retrain_args("--config", str(cfg)), capsys)
    assert code == 2 and "calendar_year" in err
    args = cli_settings(
        retrain_args(), environ={"EVENTCAST_PATIENCE": "7", "EVENTCAST_MAX_EPOCHS": "9"}
    )
    s = args
    assert s.training.patience == 7 and s.training.max_epochs == 1  # the flag wins over env
    cfg.write_text("training:\n  max_epoch: 3\n")
    code, _, err = run(retrain_args("--config", str(cfg)), capsys)
    assert code == 2 and "training.max_epoch" in err


def test_year_channels_default_to_on_for_a_year_of_data(
    tmp_path: Path, retrain_args: Callable[..., list[str]], capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Neither the YAML nor a flag decides ``calendar_year``: 400 days of data turn the year
    channels on (every phase of the year is in the data); ``--no-calendar-year`` keeps them off."""
    data = tmp_path / "daily.csv"
    synthetic_frame(n_series=1, length=400, spacing=86400.0, seed=2).to_csv(data, index=False)
    for extra, expected in (((), True), (("--no-calendar-year",), False)):
        models = tmp_path / f"models-{expected}"
        code, _, err = run(retrain_args(*extra, data=data, model_dir=models), capsys)
        assert code == 0, err
        config = ModelRegistry(models).load(backend="onnx").config
        assert config.calendar_year is expected
        assert config.input_size == 1 + config.calendar_channels


def test_memory_mapped_training(
    tmp_path: Path, retrain_args: Callable[..., list[str]], capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    code, out, err = run(retrain_args("--mmap-dir", str(tmp_path / "mm")), capsys)
    assert code == 0, err
    version = json.loads(out)["version"]
    store = tmp_path / "mm" / version
    assert (store / "arrays.json").is_file()
    values = np.load(store / "values.npy", mmap_mode="r")
    assert values.shape == (800,)
    # The store itself is a valid --data source, opened memory-mapped.
    code, out, err = run(retrain_args(data=store), capsys)
    assert code == 0, err


def test_evaluate_and_predict_without_a_model_exit_3(
    tmp_path: Path, synthetic_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (
        ["evaluate", "--data", str(synthetic_csv), "--model-dir", str(tmp_path / "empty")],
        ["predict", "--data", str(synthetic_csv), "--model-dir", str(tmp_path / "empty"),
         "--out", str(tmp_path / "p.jsonl")],
    ):  # fmt: skip
        code, _, err = run(argv, capsys)
        assert code == 3 and "worker retrain" in err
    code, _, err = run(["evaluate", "--model-dir", str(tmp_path)], capsys)
    assert code == 2 and "--data" in err


def test_seasons_auto_fits_a_hybrid_that_the_gate_scores_against_the_plain_network(
    tmp_path: Path, retrain_args: Callable[..., list[str]], synthetic_csv: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """``--seasons auto`` on 400 hourly points at horizon 6: the data's seasons are a day and a
    week; a week cannot be learnt from 280 training points, so the hybrid keeps the day (its own
    6-step forecast is half persistence's error), with coefficients fitted for the horizon, stored
    in the version's config (the worker's loader accepts it), and the state's level as one more
    input channel (ONNX export, int8 and canary with it). The gate scores the plain serving
    version with its own inputs on the same windows."""
    models = tmp_path / "models"
    code, out, err = run(retrain_args("--horizon", "6"), capsys)
    assert code == 0, err
    plain = json.loads(out)["version"]
    code, out, err = run(retrain_args("--horizon", "6", "--seasons", "auto", "--force"), capsys)
    assert code == 0, err
    result = json.loads(out)
    stored = json.loads((models / result["version"] / "metrics.json").read_text())
    info = stored["seasons"]
    assert info["data_seasons"] == [24, 168] and info["seasons"] == [24]
    assert info["spacing_s"] == 3600.0 and 0 < info["smoother_mae"] < 0.8 * info["persistence_mae"]
    config = ModelRegistry(models).load(result["version"], backend="onnx").config
    assert config.seasons == (24,) and config.season_spacing_s == 3600.0
    plain_config = ModelRegistry(models).load(plain, backend="onnx").config
    assert config.level_channel and config.input_size == plain_config.input_size + 1
    assert (config.season_alpha, list(config.season_gammas)) == (info["alpha"], info["gammas"])
    assert "held-out MAE" in result["reason"]  # compared with the plain version, not refused
    # `worker evaluate --versus`: the plain network beside the hybrid, on the same windows.
    code, out, err = run(
        ["evaluate", "--data", str(synthetic_csv), "--model-dir", str(models), "--version",
         result["version"], "--versus", plain, "--peer-origins", "0"], capsys,
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads(out)["metrics"]
    assert metrics["model"]["mae"] == stored["metrics"]["model"]["mae"]
    plain_stored = json.loads((models / plain / "metrics.json").read_text())
    assert metrics[f"model@{plain}"]["mae"] == pytest.approx(
        plain_stored["metrics"]["model"]["mae"], rel=1e-9
    )
    # A hybrid without the level channel (saved before it, or `season_level: false`) against
    # the serving one with it: the same seasons, other inputs; each scored with its own.
    no_level = tmp_path / "no-level.yaml"
    no_level.write_text("model:\n  season_level: false\n")
    code, out, err = run(
        retrain_args("--horizon", "6", "--seasons", "auto", "--config", str(no_level)), capsys
    )
    assert code == 0, err
    assert "held-out MAE" in json.loads(out)["reason"]
    for bad in ("24,168", "0", "168,24", "daily"):
        code, _, err = run(retrain_args("--seasons", bad), capsys)
        assert code == 2 and "--seasons" in err, (bad, err)


def test_seasons_auto_drops_a_season_no_series_can_warm_up() -> None:
    """Every 20th hour missing: no training series has 24 gap-free hours, so the day cannot warm
    up and ``auto`` falls back to the plain network (saying why); asked for by name, it is an
    error naming --seasons."""
    from model.config import as_config
    from model.errors import ConfigError
    from train.data import SeriesArrays
    from train.seasons import seasonal_config

    frame = synthetic_frame(n_series=2, length=2000, spacing=3600.0, seed=3)
    frame = frame[frame.groupby("series_id").cumcount() % 20 != 19]
    arrays = SeriesArrays.from_frame(frame)
    config, info = seasonal_config(arrays, as_config(), "auto")
    assert config.seasons == () and info["seasons"] == []
    assert [d["season"] for d in info["dropped"]] == [168, 24]
    with pytest.raises(ConfigError, match="--seasons"):
        seasonal_config(arrays, as_config(), (24,))
    whole = SeriesArrays.from_frame(synthetic_frame(n_series=2, length=2000, seed=3))
    config, info = seasonal_config(whole, as_config(horizon=6), "auto")
    # (the week's indices, learnt from 12 cycles of a weak weekly wave, cost more than they
    # bring: the day alone forecasts better, test_seasons_auto_keeps_only_the_seasons_the_data_have)
    assert config.seasons == (24,) and "dropped" not in info
    assert [d["seasons"] for d in info["subsets"]] == [[24], [24, 168]]
    # Named seasons are kept even where their smoother is not MIN_GAIN better than persistence.
    config, info = seasonal_config(whole, as_config(), (24, 168))
    assert config.seasons == (24, 168) and info["smoother_mae"] > 0.8 * info["persistence_mae"]


def test_seasons_auto_keeps_only_the_seasons_the_data_have() -> None:
    """Hourly series with a daily cycle and slow AR(1) 'weather' (temperatures: no weekly
    cycle). The week, kept with a fitted γ, only carries last week's weather at each hour into the
    forecast: ``auto`` keeps the day alone (seattle-temps' h24 hybrid lost to the plain network
    with both, docs/training.md). The same series plus a weekday/weekend step keep both. Each
    choice is scored on the same points (after the warm-up of both)."""
    import pandas as pd

    from model.config import as_config
    from train.data import SeriesArrays
    from train.seasons import seasonal_config

    rng = np.random.default_rng(11)
    n = 24 * 7 * 12
    t = 1_700_000_000.0 - 1_700_000_000.0 % 604_800 + 3600.0 * np.arange(n)
    weather = np.zeros(n)
    for i in range(1, n):
        weather[i] = 0.98 * weather[i - 1] + rng.normal(0, 0.3)
    day = 5 * np.sin(2 * np.pi * (t % 86_400) / 86_400)
    weekend = np.where((t // 86_400 + 4) % 7 >= 5, 4.0, 0.0)  # (1970-01-01 was a Thursday)
    walk = np.cumsum(rng.normal(0, 1, n)) + 0.2 * day
    cases = ((10 + day + weather, [24]), (10 + day + weather + weekend, [24, 168]), (walk, []))
    for values, want in cases:
        arrays = SeriesArrays.from_frame(pd.DataFrame({"series_id": "s", "ts": t, "value": values}))
        config, info = seasonal_config(arrays, as_config(horizon=24), "auto")
        assert info["seasons"] == want and list(config.seasons) == want, info
        tried = {tuple(d["seasons"]): d["smoother_mae"] for d in info["subsets"]}
        assert set(tried) == {(24,), (24, 168)}  # the shortest, then with each longer one
        assert tried[tuple(want or (24,))] == min(tried.values()) == info["smoother_mae"]
    # A random walk with a faint daily wave: persistence forecasts it as well as the best seasons
    # (their error not MIN_GAIN of persistence's): the plain network.
    assert "persistence" in info["reason"]
