"""Stage `train`: Ultralytics YOLOv8n on data/defects -> models/yolov8n.pt.

Trains from `train.model` (`yolov8n.yaml`: from scratch, no download; a user with internet can
set `yolov8n.pt`). Every hyper-parameter comes from params.yaml. Ultralytics runs in a temp
folder on a copy of the dataset (it writes label caches next to the labels, which would modify
the `data` stage's output), with its own MLflow callback off: this stage's one MLflow run gets
the params, one metric point per epoch, the final val metrics and the weights.

The saved checkpoint is normalised (no timestamp, no temp paths) so that a deterministic
training run produces byte-identical weights.
"""

from __future__ import annotations

import csv
import io
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from pipeline.config import paths
from pipeline.config.params import BaseParams, TrainParams
from pipeline.config.stage_cli import run_stage, stage_cli, stage_params
from pipeline.config.ultralytics_env import import_ultralytics
from pipeline.imagesets import near_duplicates
from pipeline.imagesets.camera_augment import CameraAugment, load_profiles, wrap_dataset
from pipeline.imagesets.yolo import DatasetError, iter_split_files
from pipeline.tracking.mlflow_runs import (
    lineage_tags,
    log_artifact,
    log_metrics,
    sanitize_metric_name,
    set_tags,
    stage_run,
)

# Columns of the per-epoch curve (reports/train/epochs.csv), in Ultralytics' key names.
EPOCH_COLUMNS = (
    "train/box_loss", "train/cls_loss", "train/dfl_loss",
    "metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)",
    "val/box_loss", "val/cls_loss", "val/dfl_loss",
)


@dataclass(frozen=True)
class TrainResult:
    """Final validation metrics of the best epoch and the per-epoch curve."""

    precision: float
    recall: float
    map50: float
    map50_95: float
    best_epoch: int
    epochs: list[dict[str, float]]
    seconds: float


def model_spec(p: TrainParams, workdir: Path) -> str:
    """What to hand `YOLO()`: the model param, or a variant yaml with another activation.

    The variant is Ultralytics' own yolov8 yaml (same scale, same layers) with `activation`
    set, so only the activation differs from the standard model.
    """
    if p.activation == "SiLU":
        return p.model
    import re

    import yaml
    from ultralytics.utils import ROOT

    match = re.fullmatch(r"yolov8([nslmx])\.yaml", Path(p.model).name)
    if not match:
        raise ValueError(f"train.activation {p.activation} needs train.model yolov8<n|s|m|l|x>.yaml, got {p.model}")
    cfg = yaml.safe_load((ROOT / "cfg/models/v8/yolov8.yaml").read_text())
    cfg.update(scale=match.group(1), activation=f"torch.nn.{p.activation}()")
    variant = workdir / f"yolov8{match.group(1)}-{p.activation.lower()}.yaml"
    variant.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(variant)


def _train_kwargs(p: TrainParams, base: BaseParams) -> dict[str, Any]:
    kw = p.model_dump()
    for own in ("model", "activation", "camera_match", "camera_frames"):
        kw.pop(own)
    # amp stays off on a GPU too: mixed precision changes the weights' numerics, and the INT8
    # gate and the repro check compare against FP32 training.
    kw.update(seed=base.seed, deterministic=True, plots=False, amp=False,
              val=True, patience=p.epochs)  # no early stop: the run length is the param
    return kw


def camera_matched_trainer(augment: CameraAugment) -> type:
    """Ultralytics' DetectionTrainer whose training dataset renders images through `augment`.

    A subclass passed as `YOLO.train(trainer=...)` is Ultralytics' own extension point; for
    multi-GPU DDP Ultralytics pickles the trainer class (cloudpickle), so this one travels too.
    """
    from ultralytics.models.yolo.detect import DetectionTrainer

    class CameraMatchedTrainer(DetectionTrainer):  # type: ignore[misc]
        def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None) -> Any:
            dataset = super().build_dataset(img_path, mode, batch)
            if mode == "train":
                wrap_dataset(dataset, augment)
            return dataset

    return CameraMatchedTrainer


def _epoch_rows_from_csv(results_csv: Path) -> list[dict[str, float]]:
    """Per-epoch rows from Ultralytics' results.csv (DDP trains in a subprocess: no callbacks here)."""
    rows = []
    with results_csv.open(newline="") as f:
        for rec in csv.DictReader(f):
            rec = {k.strip(): v for k, v in rec.items()}
            row = {"epoch": float(rec["epoch"])}
            for col in EPOCH_COLUMNS:
                if rec.get(col, "").strip():
                    row[sanitize_metric_name(col)] = round(float(rec[col]), 6)
            rows.append(row)
    return rows


def _epoch_row(trainer: Any) -> dict[str, float]:
    row = {"epoch": float(trainer.epoch + 1)}
    values = {**trainer.label_loss_items(trainer.tloss, prefix="train"), **trainer.metrics}
    for col in EPOCH_COLUMNS:
        if col in values:
            row[sanitize_metric_name(col)] = round(float(values[col]), 6)
    return row


def normalize_checkpoint(src: Path, dataset_yaml: str) -> bytes:
    """Re-save an Ultralytics checkpoint without its timestamp and temp-folder paths.

    Ultralytics stamps `date` and records the run's absolute paths in `train_args` and
    `model.args`; both would make every training run's bytes unique. The model itself (EMA
    weights, FP16, as Ultralytics ships them) is kept as is, so `YOLO(path)` loads it normally.
    """
    import torch

    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    drop = {"project", "name", "save_dir"}

    def clean(args: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in dict(args).items() if k not in drop}
        if "data" in out:
            out["data"] = dataset_yaml
        return out

    model = ckpt["model"]
    if hasattr(model, "args"):
        model.args = clean(model.args)
    normalized = {
        "model": model,
        "ema": None,
        "optimizer": None,
        "updates": None,
        "epoch": -1,
        "best_fitness": ckpt.get("best_fitness"),
        "train_args": clean(ckpt.get("train_args", {})),
        "train_metrics": ckpt.get("train_metrics"),
        "version": ckpt.get("version"),
        "date": None,
    }
    buf = io.BytesIO()
    torch.save(normalized, buf)
    return buf.getvalue()


def camera_augment(p: TrainParams, profiles: Path) -> CameraAugment | None:
    """The camera-matched augmentation `train.camera_match` asks for, or None when it is off."""
    m = p.camera_match
    if not m.enabled:
        return None
    return CameraAugment(load_profiles(profiles), m.probability, m.strength, m.jitter, p.imgsz)


def add_camera_frames(dataset: Path, camera_labelled: Path) -> int:
    """Copy the labelled camera frames' train split into the training split of the YOLO folder `dataset`.

    Refuses (DatasetError naming both files) a frame that is a copy or a near-duplicate of a
    frame of the camera evaluation split, which would make the camera mAP measure memory.
    Returns the number of frames added.
    """
    pairs = list(iter_split_files(camera_labelled, "train"))
    if not pairs:
        raise DatasetError(f"train.camera_frames is on but {camera_labelled / 'images' / 'train'} has no frames: set "
                           "camera.synthetic.labelled_train_images (synthetic) or camera.labelled_train_fraction "
                           "(ingest) and re-run the camera stage, or set train.camera_frames: false")
    frames = [image for image, _ in pairs]
    held_out = [image for image, _ in iter_split_files(camera_labelled, "val")]
    near_duplicates.check_disjoint(frames, held_out, near_duplicates.SAME_SCENE_BITS, what="camera evaluation")
    for image, label in pairs:
        if not label.is_file():
            raise DatasetError(f"{image} has no label file {label}; re-run the camera stage (dvc repro camera)")
        shutil.copyfile(image, dataset / "images" / "train" / f"camera_{image.name}")
        shutil.copyfile(label, dataset / "labels" / "train" / f"camera_{image.stem}.txt")
    return len(frames)


def train(dataset_yaml: Path, weights_out: Path, p: TrainParams, base: BaseParams,
          augment: CameraAugment | None = None, camera_labelled: Path | None = None) -> TrainResult:
    """Train YOLOv8n on the dataset described by `dataset_yaml`; write weights to `weights_out`.

    `augment` (see `camera_augment`) renders training images through the deployment cameras;
    `camera_labelled` (with train.camera_frames) adds its train split (`add_camera_frames`).
    """
    if not dataset_yaml.is_file():
        raise ValueError(f"{dataset_yaml} not found; run the data stage first (dvc repro data)")
    import torch

    torch.set_num_threads(base.threads)
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="train-") as tmp:
        work = Path(tmp)
        ultralytics = import_ultralytics(work)
        # Train on a copy: Ultralytics writes labels/*.cache beside the labels it reads.
        data_copy = work / "dataset"
        shutil.copytree(dataset_yaml.parent, data_copy)
        if p.camera_frames:
            n = add_camera_frames(data_copy, camera_labelled or paths.CAMERA_LABELLED)
            print(f"train: + {n} labelled camera frames (checked disjoint from the camera evaluation split)",
                  flush=True)
        model = ultralytics.YOLO(model_spec(p, work))

        def on_fit_epoch_end(trainer: Any) -> None:
            # Ultralytics fires this once more in final_eval, for best.pt, with the epoch
            # bumped past the last one: the curve keeps each epoch's own validation only.
            if trainer.epoch >= trainer.epochs:
                return
            row = _epoch_row(trainer)
            rows.append(row)
            log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

        def on_pretrain_routine_start(trainer: Any) -> None:
            # Ultralytics' select_device() sets torch threads to cpu_count - 1 (1 on a 2-core
            # machine): put back the thread count from params, measured ~1.6x faster here.
            torch.set_num_threads(base.threads)

        model.add_callback("on_pretrain_routine_start", on_pretrain_routine_start)
        model.add_callback("on_fit_epoch_end", on_fit_epoch_end)
        start = time.monotonic()
        trainer_cls = camera_matched_trainer(augment) if augment is not None else None
        model.train(data=str(data_copy / "dataset.yaml"), project=str(work / "runs"), name="train",
                    exist_ok=True, trainer=trainer_cls, **_train_kwargs(p, base))
        seconds = time.monotonic() - start
        trainer = model.trainer
        if not rows:
            rows = _epoch_rows_from_csv(Path(trainer.save_dir) / "results.csv")
        best = Path(trainer.best)
        if not best.is_file():
            raise RuntimeError(f"Ultralytics finished without writing {best}; see its log above")
        atomic_write_bytes(weights_out, normalize_checkpoint(best, str(dataset_yaml)))
        final = trainer.validator.metrics  # final_eval() validated best.pt on the val split
        box = final.box
        best_row = max(rows, key=lambda r: 0.1 * r.get("mAP50", 0) + 0.9 * r.get("mAP50-95", 0))
    return TrainResult(
        precision=float(box.mp), recall=float(box.mr), map50=float(box.map50), map50_95=float(box.map),
        best_epoch=int(best_row["epoch"]), epochs=rows, seconds=seconds,
    )


def write_epochs_csv(rows: list[dict[str, float]], path: Path) -> None:
    """Write the per-epoch curve for `dvc plots` (one row per epoch, fixed column order)."""
    columns = ["epoch"] + [sanitize_metric_name(c) for c in EPOCH_COLUMNS]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "epoch": int(row["epoch"])})
    atomic_write_text(path, buf.getvalue())


parse_args = stage_cli(
    "train", __doc__,
    data=paths.DATASET_YAML,
    profiles=(paths.CAMERA_PROFILES, "camera profiles (stage camera_profile), read when train.camera_match.enabled"),
    camera_labelled=(paths.CAMERA_LABELLED, "labelled camera frames (stage camera), read when train.camera_frames"),
    out=paths.WEIGHTS,
    metrics=paths.TRAIN_METRICS,
    epochs_csv=paths.TRAIN_EPOCHS,
)


def main(argv: list[str] | None = None) -> None:
    """Run the stage: train, write weights + metrics + per-epoch curve, log one MLflow run."""
    args = parse_args(argv)
    base, p = stage_params(args, "base", "train")
    augment = camera_augment(p, args.profiles)  # a missing profile fails before any training
    tags = {"train_device": str(p.device), **lineage_tags(dataset=args.data.parent)}
    if augment is not None:
        tags.update(camera_match=", ".join(c.id for c in augment.cameras),
                    **lineage_tags(camera_profiles=args.profiles))
    with stage_run("train", base, p, tags=tags):
        result = train(args.data, args.out, p, base, augment, args.camera_labelled)
        metrics = {
            "precision": round(result.precision, 6),
            "recall": round(result.recall, 6),
            "mAP50": round(result.map50, 6),
            "mAP50-95": round(result.map50_95, 6),
            "best_epoch": result.best_epoch,
            "epochs": len(result.epochs),
        }
        # Wall time goes to MLflow only: in the DVC metrics file it would change every run.
        atomic_write_json(args.metrics, metrics)
        write_epochs_csv(result.epochs, args.epochs_csv)
        log_metrics({**{f"final_{k}": v for k, v in metrics.items()}, "train_seconds": result.seconds})
        set_tags({"model_sha256": sha256_file(args.out), **lineage_tags(weights=args.out)})
        log_artifact(args.out, "weights")
        print(f"train: val mAP50 {result.map50:.3f}, mAP50-95 {result.map50_95:.3f} "
              f"in {result.seconds / 60:.1f} min -> {args.out}", flush=True)


if __name__ == "__main__":
    sys.exit(run_stage(main))
