"""Import Ultralytics confined to a work folder, with its own integrations switched off.

Ultralytics keeps a settings file in the user's config dir, writes `runs/` into the current
folder, tries to download fonts and assets, and opens its own MLflow run when mlflow is
installed. A stage wants none of that: its one MLflow run is opened by `pipeline.tracking.mlflow_runs`,
and everything Ultralytics writes goes into a temp folder the stage owns.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

# Integrations Ultralytics enables from its settings; `sync` is its usage analytics.
_INTEGRATIONS_OFF = ("mlflow", "dvc", "wandb", "comet", "clearml", "tensorboard", "raytune", "hub", "sync")


# Keys of Ultralytics' ONNX export metadata that change on every export (the export time): the
# stages drop them so the same weights export to the same bytes (DVC hash, repro check).
VOLATILE_ONNX_METADATA = ("date",)

def import_ultralytics(workdir: Path) -> ModuleType:
    """Return the `ultralytics` module with settings, runs and weights dirs under `workdir`.

    Set before the first import: `YOLO_CONFIG_DIR` (else settings land in ~/.config) and
    `YOLO_OFFLINE` (no update checks, no downloads). If Ultralytics was already imported in
    this process the env vars no longer matter, but the settings below still apply.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if "ultralytics" not in sys.modules:
        os.environ.setdefault("YOLO_CONFIG_DIR", str(workdir / "config"))
    os.environ["YOLO_OFFLINE"] = "1"
    import ultralytics
    from ultralytics.utils import SETTINGS

    updates: dict[str, object] = {k: False for k in _INTEGRATIONS_OFF if k in SETTINGS}
    updates.update(
        runs_dir=str(workdir / "runs"),
        weights_dir=str(workdir / "weights"),
        datasets_dir=str(workdir / "datasets"),
    )
    SETTINGS.update(updates)
    return ultralytics
