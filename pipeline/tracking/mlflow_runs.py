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
from typing import Any, Iterator, Mapping, Sequence

from pipeline.config.params import params_hash
from pipeline.config.paths import repo_root
from pipeline.tracking.flatten import flatten

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "edge-defect-detection"
PIPELINE_RUN_ENV = "PIPELINE_RUN_ID"  # optional: groups the stage runs of one `dvc repro`
# The experiment's type for MLflow 3's UI: a model-training experiment (runs, metrics), not a GenAI
# one (traces, evaluations). MLflow 3.4's UI picks an experiment's tabs from this tag (untagged, it
# guesses and may ask the user to choose). 3.17's UI goes by its global "GenAI / Model training"
# switch instead (URL `?workflowType=machine_learning`, which the link the report stage prints
# carries); the tag still records what the experiment is.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# Lineage: every stage run tags the sha256 of what it consumed and produced as `<name>_sha256`
# (a file's sha256, a folder's tree hash). The same value on two runs links them: the run of the
# producing stage below is where the artifact came from. A device run carries the same tags, so
# from a device benchmark a person walks back engine -> ONNX -> weights -> dataset, each step with
# its params_hash and git_commit (`python -m pipeline.tools.lineage RUN_ID` does the walk).
LINEAGE_PRODUCERS: dict[str, str] = {
    "dataset_sha256": "data",
    "camera_frames_sha256": "camera",
    "camera_profiles_sha256": "camera_profile",
    "weights_sha256": "train",
    "onnx_sha256": "export",
    "calibration_camera_sha256": "calibrate",
    "calibration_train_sha256": "calibrate",
    "calibration_sha256": "calibrate",  # the set quantize used (equals one of the two above)
    "int8_sha256": "quantize",
    "trt_onnx_sha256": "quantize",
    "dynamic_sha256": "quantize",
}
# The tags a consumer copies from the run that produced its model (fleet manifests, device runs).
LINEAGE_CARRIED = tuple(LINEAGE_PRODUCERS) + ("params_hash", "git_commit", "pipeline_run")


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


def lineage_tags(**artifacts: Path | None) -> dict[str, str]:
    """`<name>_sha256` tags for the artifacts that exist: a file's sha256, a folder's tree hash.

    Names are those of LINEAGE_PRODUCERS without the suffix: `lineage_tags(dataset=data_dir,
    weights=pt)`. A missing path is left out (a stage run that fails early still gets a run).
    """
    from edge_runtime.fileio import sha256_file, tree_sha256

    tags: dict[str, str] = {}
    for name, path in artifacts.items():
        key = f"{name}_sha256"
        if key not in LINEAGE_PRODUCERS:
            raise ValueError(f"unknown lineage artifact '{name}': use one of "
                             f"{', '.join(k.removesuffix('_sha256') for k in LINEAGE_PRODUCERS)}")
        if path is None:
            continue
        if path.is_file():
            tags[key] = sha256_file(path)
        elif path.is_dir():
            tags[key] = tree_sha256(path, exclude_suffixes=(".cache",))
    return tags


def find_producer(client: Any, experiment_ids: Sequence[str], key: str, sha: str,
                  stage: str | None = None) -> Any | None:
    """The latest finished run of the stage that produces `key` and carries `key` = `sha`, or None."""
    stage = stage or LINEAGE_PRODUCERS.get(key)
    if not stage or not sha:
        return None
    # quantize names the set it used `calibration_sha256`; calibrate names each set it made.
    keys = ("calibration_camera_sha256", "calibration_train_sha256") if key == "calibration_sha256" else (key,)
    for k in keys:
        runs = client.search_runs(list(experiment_ids), f"tags.stage = '{stage}' and tags.{k} = '{sha}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            return runs[0]
    return None


def walk_lineage(run_id: str, client: Any | None = None) -> list[dict[str, Any]]:
    """Follow the lineage tags from one run (a device run, a stage run) back to the data stage.

    Returns one entry per run reached, nearest first: stage, run_id, git_commit, params_hash and
    the run's `*_sha256` tags. Links: `source_run_id` (a device run's producer), then every
    lineage tag whose producing stage ran with the same value.
    """
    import mlflow

    client = client or mlflow.MlflowClient(tracking_uri())
    exps = [e.experiment_id for e in client.search_experiments()]
    seen: set[str] = set()
    chain: list[dict[str, Any]] = []
    queue = [client.get_run(run_id)]
    while queue:
        run = queue.pop(0)
        if run.info.run_id in seen:
            continue
        seen.add(run.info.run_id)
        tags = run.data.tags
        chain.append({"stage": tags.get("stage", ""), "run_id": run.info.run_id, "run_name": run.info.run_name,
                      "git_commit": tags.get("git_commit", ""), "params_hash": tags.get("params_hash", ""),
                      "shas": {k: v for k, v in sorted(tags.items()) if k.endswith("_sha256")}})
        if tags.get("source_run_id"):
            queue.append(client.get_run(tags["source_run_id"]))
        for key, producer_stage in LINEAGE_PRODUCERS.items():
            if key in tags and producer_stage != tags.get("stage"):
                found = find_producer(client, exps, key, tags[key], producer_stage)
                if found is not None:
                    queue.append(found)
    return chain


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
    """Point mlflow at the tracking URI and experiment (created if missing, tagged as a model-training
    experiment: EXPERIMENT_KIND_TAG); return the experiment id."""
    uri = tracking_uri()
    check_server_reachable(uri)
    mlflow.set_tracking_uri(uri)
    name = experiment_name()
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        # An experiment made before the kind was tagged (or retagged in the UI) gets it back.
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            mlflow.MlflowClient(uri).set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # Keep artifacts beside the database instead of in whatever folder the stage runs from.
        artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=artifact_location,
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


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
            prefix = type(section).__name__.removesuffix("Params").lower()
            # Lists stay one param each (MLflow names allow no brackets), as they always have.
            params.update(flatten(section.model_dump(), prefix, lists=False))
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
