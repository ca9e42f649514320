"""Stage `data`: synthesize or import the defect dataset -> data/defects/ (YOLO layout).

`data.source` picks the source: `synthetic` (the embedded procedural steel-surface generator,
see `pipeline/imagesets/synthetic.py`), `yolo` (a YOLO-format folder) or `voc` (Pascal VOC XML, the layout
NEU-DET and GC10-DET ship in). Whatever the source, every image is decoded and every label line
validated before anything is written; the dataset is assembled in a temp folder and swapped in
at the end, so an error leaves the previous `data/defects/` untouched.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import cv2

from edge_runtime.fileio import atomic_write_json
from pipeline.config import paths
from pipeline.config.params import BaseParams, DataParams
from pipeline.config.stage_cli import run_stage, stage_cli, stage_params
from pipeline.imagesets.synthetic import CLASS_NAMES, GeneratorConfig, image_rng, render_image
from pipeline.imagesets.yolo import DatasetSummary, DatasetWriter, Sample, decode_image, import_voc, import_yolo
from pipeline.tracking.mlflow_runs import lineage_tags, log_metrics, set_tags, stage_run


@dataclass(frozen=True)
class DataResult:
    """What the stage wrote: the dataset folder and its summary."""

    out: Path
    summary: DatasetSummary


def synthesize(out: Path, p: DataParams, seed: int) -> DataResult:
    """Generate the synthetic dataset into `out`, deterministic from `seed`."""
    s = p.synthetic
    cfg = GeneratorConfig(s.image_size, s.max_defects, s.empty_fraction, s.small_fraction,
                          s.min_contrast, s.max_contrast, s.clutter)
    counts = {"train": s.train_images, "val": s.val_images, "test": s.test_images}
    with DatasetWriter(out, CLASS_NAMES) as writer:
        for split, n in counts.items():
            for i in range(n):
                img, boxes = render_image(image_rng(seed, split, i), cfg)
                ok, encoded = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, s.jpeg_quality])
                if not ok:
                    raise RuntimeError(f"OpenCV could not encode synthetic image {split}/{i} as JPEG")
                labels = [b.yolo(s.image_size, s.image_size) for b in boxes]
                writer.add(split, f"{split}_{i:05d}", encoded.tobytes(), ".jpg", labels)
            print(f"data: synthesized {n} {split} images", flush=True)
        summary = writer.commit()
    return DataResult(out, summary)


def import_dataset(out: Path, p: DataParams, seed: int) -> DataResult:
    """Import the real dataset at `p.import_dir` (YOLO or VOC) into `out`, validating everything."""
    root = Path(p.import_dir)
    if not root.is_dir():
        raise ValueError(f"data.import_dir '{root}' is not a folder; set it to the dataset's root in params.yaml")
    importer = import_yolo if p.source == "yolo" else import_voc
    names, samples = importer(root, p.val_fraction, p.test_fraction, seed)
    with DatasetWriter(out, names) as writer:
        for sample in samples:
            _add_sample(writer, sample)
        summary = writer.commit()
    print(f"data: imported {len(samples)} images of {len(names)} classes from {root}", flush=True)
    return DataResult(out, summary)


def _add_sample(writer: DatasetWriter, sample: Sample) -> None:
    decode_image(sample.image)  # raises with the file name if it does not decode
    writer.add(sample.split, sample.name, sample.image.read_bytes(), sample.image.suffix, sample.labels)


def build_dataset(out: Path, p: DataParams, base: BaseParams) -> DataResult:
    """Build `out` from the source chosen in `p` (the stage's compute, no MLflow, no metrics file)."""
    if p.source == "synthetic":
        return synthesize(out, p, base.seed)
    return import_dataset(out, p, base.seed)


parse_args = stage_cli(
    "data", __doc__,
    out=paths.DATASET_DIR,
    metrics=paths.DATA_METRICS,
    headline=paths.DATA_HEADLINE,
)


def main(argv: list[str] | None = None) -> None:
    """Run the stage: build the dataset, write per-class counts and its size (DVC metrics), log to MLflow."""
    args = parse_args(argv)
    base, p = stage_params(args, "base", "data")
    with stage_run("data", base, p, tags={"data_source": p.source}):
        result = build_dataset(args.out, p, base)
        metrics = result.summary.as_metrics()
        atomic_write_json(args.metrics, metrics)
        # DVC metrics: the dataset's size only; the per-split, per-class counts stay in args.metrics.
        atomic_write_json(args.headline, {"images_total": metrics["images_total"]})
        log_metrics({"images_total": metrics["images_total"], "instances_total": metrics["instances_total"]})
        set_tags(lineage_tags(dataset=args.out))
        for split, per_class in result.summary.instances.items():
            log_metrics({f"instances.{split}.{name}": n for name, n in per_class.items()})


if __name__ == "__main__":
    sys.exit(run_stage(main))
