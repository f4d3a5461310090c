"""Export a finished run to MLflow, as ``mlflow.dspy.autolog(log_compiles=True)`` logs an
in-process ``compile``: so a dspex run sits beside the user's other DSPy runs.

What is logged, in MLflow's DSPy conventions:

- params: the optimizer's options and the compile arguments that are plain values (as
  autolog logs ``get_params()`` and the compile inputs), ``lm_params`` (the task LM's
  settings as JSON, secrets left out), plus ``optimizer``, ``program`` and ``metric``;
- metrics: each trial's score under DSPy's keys ``eval_full`` / ``eval_minibatch`` with
  autolog's step (the count of that kind so far), ``best_score`` per trial (its progression),
  and the run's usage (``usage.calls``, ``usage.total_tokens``, ``usage.cost``...);
- one nested run per trial (``eval_full_3``...: its parameters and its score as ``eval``),
  as autolog nests each evaluation;
- artifacts: ``best_model.json`` (the best program, the JSON of DSPy's ``module.save``),
  ``trials.json`` and ``dspex_run.json`` (the run's record).

MLflow's client (``MlflowClient``) is used, not the fluent API, so the notebook's own active
MLflow run is left alone. MLflow is an optional extra: ``pip install 'dspex-jupyter[mlflow]'``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..core.errors import OptionalDependencyMissing, RunNotFinished
from ..core.history import (
    TERMINAL_STATUSES,
    RunHistory,
    RunRecord,
    default_history,
    run_fields,
    trials_of,
)

DEFAULT_EXPERIMENT = "dspex"
# autolog's own exclusions for LM settings (mlflow.dspy.util.EXCLUDE_LM_PARAMS), on top of
# dspex's secret scrubbing.
EXCLUDED_LM_PARAMS = {"api_key", "api_base", "azure_ad_token", "client_secret", "azure_password"}
_STATUS = {"completed": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
_BATCH = 100  # MLflow takes at most 100 params or tags and 1000 metrics per batch


def _mlflow() -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise OptionalDependencyMissing(
            "exporting to MLflow needs MLflow, which is not installed here",
            hint="pip install 'dspex-jupyter[mlflow]' (MLflow's client, mlflow-skinny)",
        ) from None
    return MlflowClient


def to_mlflow(
    run: Any,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    *,
    trial_runs: bool = True,
    history: RunHistory | None = None,
) -> str:
    """Log a finished run to MLflow; return the MLflow run id.

    ``run`` is a run handle, a ``RunRecord`` or a run id from the run history.
    ``tracking_uri`` defaults to MLflow's own (``MLFLOW_TRACKING_URI``...), ``experiment``
    to ``$MLFLOW_EXPERIMENT_NAME`` or "dspex". Each call logs a new MLflow run. ``history``:
    where a run id is looked up (default: this user's, in ``$DSPEX_HOME``)."""
    record, trials = export_view(run, history)
    if record.status not in TERMINAL_STATUSES:
        raise RunNotFinished(f"run {record.run_id} is still {record.status}")
    client = _mlflow()(tracking_uri=tracking_uri)
    experiment_id = _experiment_id(client, experiment)
    parent = client.create_run(
        experiment_id,
        start_time=_ms(record.created),
        tags=_tags(record),
        run_name=f"{record.optimizer or 'dspex'} {record.run_id}",
    ).info.run_id
    _log_batches(client, parent, params=_params(record), metrics=_metrics(record, trials))
    if trial_runs:
        _log_trial_runs(client, experiment_id, parent, record, trials)
    if record.best_program:
        client.log_dict(parent, _program_document(record.best_program), "best_model.json")
    client.log_dict(parent, trials, "trials.json")
    client.log_dict(parent, {**record.to_json(), "best_program": None}, "dspex_run.json")
    client.set_terminated(parent, _STATUS[record.status], end_time=_ms(record.updated))
    return parent


# ---- what is exported ----------------------------------------------------------------
def export_view(
    run: Any, history: RunHistory | None = None
) -> tuple[RunRecord, list[dict[str, Any]]]:
    """The run's record and trials: from a live handle's own events and result, else from
    the run history."""
    if isinstance(run, str | RunRecord):
        history = history or default_history()
        record = history.get(run) if isinstance(run, str) else run
        return record, history.trials(record.run_id)
    events = list(getattr(run, "events", None) or [])
    times = [e["time"] for e in events if isinstance(e.get("time"), int | float)]
    fields = run_fields(run)
    record = RunRecord(
        run_id=run.run_id,
        **{k: v for k, v in fields.items() if k != "run_id"},
        created=min(times, default=0.0),
        updated=max(times, default=0.0),
    )
    if record.status == "completed":  # the handle takes the result a moment after the event
        record.best_program = getattr(run.result(timeout=60), "state", None)
    trials = [trial for event in events for trial in trials_of(event)]
    if not record.trials:  # the run handle counts MIPROv2's trials only
        record.trials = max((int(t["number"]) for t in trials), default=0)
    return record, _last_per_number(trials)


def _last_per_number(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One trial per (number, eval), the newest (as the history keeps them): a step redone
    after a resume counts once."""
    newest = {(t["number"], t["eval"]): t for t in trials}
    return [t for t in trials if newest[(t["number"], t["eval"])] is t]


def _experiment_id(client: Any, name: str | None) -> str:
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


def _tags(record: RunRecord) -> dict[str, str]:
    tags = {
        "dspex.run_id": record.run_id,
        "dspex.optimizer": record.optimizer,
        "dspex.status": record.status,
        "dspex.pool": record.pool,
        "dspex.notebook": record.notebook,
        "dspex.checkpoint_dir": record.checkpoint_dir,
        "dspex.host": record.host,
        "mlflow.source.name": record.notebook or "dspex-jupyter",
        "mlflow.source.type": "NOTEBOOK" if record.notebook else "LOCAL",
    }
    if record.error:
        tags["dspex.error"] = record.error
    return {k: str(v) for k, v in tags.items() if v}


def _param_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool | int | float | str):
        text = str(value)
    else:
        text = json.dumps(value, sort_keys=True, default=str)
    return text[:_MAX_PARAM_LENGTH]


def _params(record: RunRecord) -> dict[str, str]:
    """Optimizer options and compile arguments by their own names (autolog's), then the
    program, metric and LM they ran with."""
    config = record.config or {}
    params: dict[str, Any] = {"optimizer": record.optimizer}
    for part in ("optimizer", "compile"):
        section = config.get(part)
        if isinstance(section, dict):
            params.update(section)
    for part in ("program", "metric"):
        entry = config.get(part) or {}
        if isinstance(entry, dict):
            params[part] = entry.get("ref") or entry.get("class") or entry.get("kind")
    lm = _lm_params(config.get("task_lm"))
    if lm:
        params["lm_params"] = json.dumps(lm, sort_keys=True)
    values = {str(k): _param_value(v) for k, v in params.items()}
    return {k: v for k, v in values.items() if v is not None}


def _lm_params(spec: Any) -> dict[str, Any]:
    """The task LM's settings as autolog's ``lm_params`` has them (no keys, no api_base)."""
    if not isinstance(spec, dict):
        return {}
    settings = spec.get("state") or spec.get("settings") or {}
    if not settings and spec.get("model"):
        settings = {"model": spec["model"]}
    return {k: v for k, v in settings.items() if k not in EXCLUDED_LM_PARAMS}


def _metrics(record: RunRecord, trials: list[dict[str, Any]]) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp ms, step) for each trial and the run's totals."""
    metrics = []
    counts: dict[str, int] = {}
    for position, trial in enumerate(trials):
        stamp = _ms(trial.get("time") or record.updated)
        key = f"eval_{trial.get('eval') or 'full'}"
        if isinstance(trial.get("score"), int | float):
            metrics.append((key, float(trial["score"]), stamp, counts.get(key, 0)))
        counts[key] = counts.get(key, 0) + 1
        if isinstance(trial.get("best_score"), int | float):
            metrics.append(("best_score", float(trial["best_score"]), stamp, position))
    end = _ms(record.updated)
    if record.best_score is not None:
        metrics.append(("best_score", float(record.best_score), end, len(trials)))
    for key, value in sorted((record.usage or {}).items()):
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.append((f"usage.{key}", float(value), end, 0))
    metrics.append(("trials", float(record.trials or len(trials)), end, 0))
    return metrics


def _log_trial_runs(
    client: Any,
    experiment_id: str,
    parent: str,
    record: RunRecord,
    trials: list[dict[str, Any]],
) -> None:
    """One nested run per trial, named as autolog names its evaluation runs."""
    counts: dict[str, int] = {}
    for trial in trials:
        key = f"eval_{trial.get('eval') or 'full'}"
        step = counts.get(key, 0)
        counts[key] = step + 1
        stamp = _ms(trial.get("time") or record.updated)
        child = client.create_run(
            experiment_id,
            start_time=stamp,
            tags={"mlflow.parentRunId": parent, "dspex.run_id": record.run_id},
            run_name=f"{key}_{step}",
        ).info.run_id
        params = {"trial": trial.get("number"), **(trial.get("params") or {})}
        values = {str(k): _param_value(v) for k, v in params.items()}
        score = trial.get("score")
        _log_batches(
            client,
            child,
            params={k: v for k, v in values.items() if v is not None},
            metrics=[("eval", float(score), stamp, 0)] if isinstance(score, int | float) else [],
        )
        client.set_terminated(child, "FINISHED", end_time=stamp)


def _log_batches(
    client: Any, run_id: str, *, params: dict[str, str], metrics: list[tuple[str, float, int, int]]
) -> None:
    from mlflow.entities import Metric, Param

    param_list = [Param(k, v) for k, v in params.items()]
    metric_list = [Metric(k, v, t, s) for k, v, t, s in metrics]
    for start in range(0, max(len(param_list), len(metric_list)), _BATCH):
        client.log_batch(
            run_id,
            metrics=metric_list[start : start + _BATCH],
            params=param_list[start : start + _BATCH],
        )


def _program_document(state: dict[str, Any]) -> dict[str, Any]:
    """The JSON ``module.save("best_model.json")`` writes: the state plus DSPy's
    dependency versions, so ``program.load()`` reads the downloaded artifact."""
    try:
        from dspy.utils.saving import get_dependency_versions

        versions = get_dependency_versions()
    except ImportError:  # exporting from a history without DSPy installed
        versions = {}
    return {**state, "metadata": {"dependency_versions": versions}}


def _ms(epoch: float | None) -> int:
    return int((epoch or 0.0) * 1000)
