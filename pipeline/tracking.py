"""MLflow conventions: one experiment, one run per stage execution, lineage tags.

The tracking URI comes from `MLFLOW_TRACKING_URI`; without it, a SQLite file at the repository
root (`mlflow.db`, artifacts under `mlartifacts/`). Both are read inside functions, never at
import, so a test or a user can point a stage at another server by setting the variable.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.params import flatten, params_hash
from pipeline.paths import repo_root

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "edge-defect-detection"
PIPELINE_RUN_ENV = "PIPELINE_RUN_ID"  # optional: groups the stage runs of one `dvc repro`


def tracking_uri() -> str:
    """The MLflow tracking URI: `$MLFLOW_TRACKING_URI` or the repo-local SQLite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def experiment_name() -> str:
    """The pipeline's experiment: `$MLFLOW_EXPERIMENT_NAME` or `edge-defect-detection`."""
    return os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


def git_commit(cwd: Path | None = None) -> str:
    """The current git commit (with `-dirty` when the tree has changes), or `unknown`."""
    where = cwd or repo_root()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def sanitize_metric_name(name: str) -> str:
    """Turn an Ultralytics key like `metrics/mAP50-95(B)` into an MLflow-safe `mAP50-95`."""
    name = re.sub(r"\(B\)$", "", name)
    name = name.replace("metrics/", "").replace("train/", "train_").replace("val/", "val_")
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


class TrackingServerUnreachable(ConnectionError):
    """The http(s) MLflow tracking server in MLFLOW_TRACKING_URI did not answer."""


def check_server_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise `TrackingServerUnreachable` (naming the URI and the fix) if an http(s) server is down.

    MLflow's client retries a refused connection with backoff for minutes, silently, before it
    raises (over 2 min against a closed port), so a stage would hang instead of failing. One GET
    of the server's `/health` with a short timeout decides it first. Any HTTP answer, even an
    error status (a proxy asking for auth), counts as reachable: MLflow reports what follows.
    Non-http URIs (the SQLite default, file stores) are not checked.
    """
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    host = parts.netloc.rsplit("@", 1)[-1]  # never echo or send credentials embedded in the URI
    shown = f"{parts.scheme}://{host}{parts.path}"
    try:
        urllib.request.urlopen(f"{shown.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except OSError as e:  # URLError (refused, DNS), TimeoutError
        reason = getattr(e, "reason", e)
        raise TrackingServerUnreachable(
            f"MLflow tracking server {shown} (MLFLOW_TRACKING_URI) is not reachable: {reason}. "
            f"Start it (e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 "
            f"--port {parts.port or 5000}`), correct MLFLOW_TRACKING_URI, or unset it to log to the "
            f"local store sqlite:///{repo_root() / 'mlflow.db'}"
        ) from e


def _setup(mlflow: Any) -> str:
    """Point mlflow at the tracking URI and experiment; return the experiment id."""
    uri = tracking_uri()
    check_server_reachable(uri)
    mlflow.set_tracking_uri(uri)
    name = experiment_name()
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # Keep artifacts beside the database instead of in whatever folder the stage runs from.
        artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=artifact_location)


def experiment_id() -> str:
    """Point mlflow at the tracking URI and return the pipeline experiment's id (created if missing).

    For callers that log through `MlflowClient` (fleet deploys log one nested run per device).
    """
    import mlflow  # lazy, as everywhere in this module

    return _setup(mlflow)


@contextmanager
def stage_run(stage: str, *sections: Any, tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Open the one MLflow run of a stage execution, tagged with the lineage conventions.

    `sections` are the params dataclasses the stage used: they are logged as params (dotted
    keys) and hashed into the `params_hash` tag. The run ends FAILED if the body raises.
    """
    import mlflow  # lazy: importing mlflow costs seconds, and only stage runs need it

    experiment_id = _setup(mlflow)
    all_tags = {
        "stage": stage,
        "git_commit": git_commit(),
        "params_hash": params_hash(*sections) if sections else "",
    }
    if os.environ.get(PIPELINE_RUN_ENV):
        all_tags["pipeline_run"] = os.environ[PIPELINE_RUN_ENV]
    all_tags.update(tags or {})
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=all_tags) as run:
        params: dict[str, Any] = {}
        for section in sections:
            prefix = f"{type(section).__name__.removesuffix('Params').lower()}."
            params.update(flatten(section, prefix))
        if params:
            mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        yield run


def _param_value(v: Any) -> str:
    # MLflow params are strings of at most 6000 chars; lists and None get a stable JSON form.
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) or v is None else str(v)


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the finite numeric entries of `metrics` to the active run (names sanitized)."""
    import mlflow

    clean = {
        sanitize_metric_name(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    if clean:
        mlflow.log_metrics(clean, step=step)


def set_tags(tags: Mapping[str, str]) -> None:
    """Set tags on the active run (e.g. `model_sha256` once the stage has produced it)."""
    import mlflow

    mlflow.set_tags(dict(tags))


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    """Upload one file to the active run's artifacts."""
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)
