"""A run's params, loss curves and evaluation metrics as an MLflow run (what `mlflow ui` charts)."""

from __future__ import annotations

import json
import time

from tunesmith.registry.run import EVAL_REPORT, Run

MAX_PARAM_LENGTH = 6000  # MLflow's limit for one param value


def track_run(registry, run: Run, tags: dict | None = None) -> str:
    """Log `run` to MLflow (a new MLflow run, or the one recorded in its manifest on this store); returns its id."""
    client = registry.client
    with registry.errors():
        run_id = recorded_run_id(registry, run)
        if run_id is None:
            created = client.create_run(registry.experiment_id(), run_name=run.name,
                                        tags={"tunesmith.run_dir": str(run.directory.resolve()), **(tags or {})})
            run_id = created.info.run_id
        elif tags:
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
        _log_batches(client, run_id, params(run), metrics(run))
        client.set_terminated(run_id)
    run.record("tracking", {"uri": registry.uri, "run_id": run_id, "weights_sha256": _weights(run)})
    return run_id


def recorded_run_id(registry, run: Run) -> str | None:
    """The MLflow run this run was tracked to earlier, if it is on the same store and still exists."""
    from mlflow.exceptions import MlflowException

    tracking = run.manifest.tracking or {}
    if tracking.get("uri") != registry.uri or not tracking.get("run_id") or tracking.get("weights_sha256") != _weights(run):
        return None  # another store, or the run was trained again since
    try:
        found = registry.client.get_run(tracking["run_id"])
    except MlflowException:
        return None
    return None if found.info.lifecycle_stage == "deleted" else tracking["run_id"]


def _weights(run: Run) -> str | None:
    return run.trained.weights_sha256 if run.is_trained else None


def params(run: Run) -> dict[str, str]:
    """The training config flattened to dotted keys, plus the data hash and base model."""
    flat: dict[str, str] = {"base_model": run.manifest.base_model.name, "data_hash": run.manifest.data.dataset_hash}
    if run.is_trained:
        _flatten("train", run.trained.config, flat)
        flat["train.method"] = run.trained.method
    return {k: v[:MAX_PARAM_LENGTH] for k, v in flat.items()}


def metrics(run: Run) -> list[tuple[str, float, int]]:
    """(key, value, step): both loss curves point by point, the final training metrics, evaluation results."""
    rows: list[tuple[str, float, int]] = []
    if run.is_trained:
        trained = run.trained
        rows += [("train_loss", p.loss, p.step) for p in trained.loss_curve]
        rows += [("validation_loss", p.loss, p.step) for p in trained.validation_curve]
        last = trained.loss_curve[-1].step if trained.loss_curve else 0
        rows += [(f"final.{k}", float(v), last) for k, v in trained.metrics.items() if isinstance(v, (int, float))]
    if (run.directory / EVAL_REPORT).is_file():
        for label, scores in run.evaluation_report().results.items():
            rows += [(f"eval.{label}.{k}", float(v), 0) for k, v in scores.items() if isinstance(v, (int, float))]
    return [(_metric_key(k), v, s) for k, v, s in rows if v == v]  # NaN is not loggable


def _log_batches(client, run_id: str, params: dict[str, str], metrics: list[tuple[str, float, int]]) -> None:
    from mlflow.entities import Metric, Param

    existing = client.get_run(run_id).data.params
    new_params = [Param(k, v) for k, v in params.items() if k not in existing]  # params are write-once
    now = int(time.time() * 1000)
    for start in range(0, len(new_params), 100):
        client.log_batch(run_id, params=new_params[start:start + 100])
    entries = [Metric(k, v, now, s) for k, v, s in metrics]
    for start in range(0, len(entries), 1000):
        client.log_batch(run_id, metrics=entries[start:start + 1000])


def _flatten(prefix: str, value, into: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, into)
    else:
        into[prefix] = value if isinstance(value, str) else json.dumps(value)


def _metric_key(key: str) -> str:
    """MLflow keys allow letters, digits, _ - . / and space."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)
