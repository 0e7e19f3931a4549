"""MLflow: the held-out metrics, the version's files and a registered model version.

Lightning's ``MLFlowLogger`` already logs the hyperparameters and the training curves into its
run; this adds, into the same run, the evaluation report (``test_<method>_<metric>``), the model
version folder as artifacts (``model/``) and a version of the registered model
(``--mlflow-model-name``) pointing at them, tagged with the eventcast version name and whether it
was promoted. Works against any tracking URI, including an offline ``file:`` or ``sqlite:///``
store.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from train.retrain import RetrainResult
    from train.settings import RetrainSettings

log = logging.getLogger(__name__)


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``test_<method>_<metric>`` for every finite number of the report's ``metrics``, plus the
    quality ratios."""
    out: dict[str, float] = {}
    for method, values in (report.get("metrics") or {}).items():
        for name, v in (values or {}).items():
            if isinstance(v, int | float) and math.isfinite(v):
                out[f"test_{method}_{name}"] = float(v)
    q = report.get("quality") or {}
    for key in ("mae_ratio", "mae_vs_linear_ar"):
        if isinstance(q.get(key), int | float) and math.isfinite(q[key]):
            out[f"test_{key}"] = float(q[key])
    return out


def log_to_mlflow(
    settings: RetrainSettings, loggers: list[Any], result: RetrainResult, version_dir: Path
) -> str:
    """Log ``result`` into the MLflow run of the Lightning logger (or a new run) and register
    the model version; returns the MLflow run id. MLflow errors propagate (a tracking server
    that was asked for and fails is a failed retrain, after the version was written)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    lg = settings.logging
    client = MlflowClient(tracking_uri=lg.mlflow_tracking_uri, registry_uri=lg.mlflow_tracking_uri)
    run_id = None
    own_run = False
    for logger in loggers:
        if type(logger).__name__ == "MLFlowLogger":
            run_id = logger.run_id
            break
    if run_id is None:
        exp = client.get_experiment_by_name(lg.mlflow_experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(lg.mlflow_experiment)
        run_id = client.create_run(exp_id, run_name=result.version).info.run_id
        own_run = True
    report = result.report
    for key, value in flat_metrics(report).items():
        client.log_metric(run_id, key, value)
    tags = {
        "eventcast.version": str(result.version),
        "eventcast.promoted": str(result.promoted).lower(),
        "eventcast.gate": result.reason[:5000],
        "eventcast.horizon": str(report.get("horizon")),
    }
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    client.log_artifacts(run_id, str(version_dir), artifact_path="model")
    name = lg.mlflow_model_name
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="eventcast LSTM+attention forecaster")
    artifact_uri = client.get_run(run_id).info.artifact_uri
    mv = client.create_model_version(
        name, source=f"{artifact_uri}/model", run_id=run_id, tags=tags,
        description=f"eventcast version {result.version}",
    )  # fmt: skip
    if own_run:
        client.set_terminated(run_id)
    log.info("MLflow: run %s, registered %s version %s", run_id, name, mv.version)
    return run_id
