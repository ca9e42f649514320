"""The work behind the device CLI's commands (``python -m edge_runtime ...``, see ``__main__.py``).

Kept apart from the argument parser so that `supervise`, which runs for as long as the device
does, never imports numpy, OpenCV or ONNX Runtime: it only starts and watches `serve`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import latency as bench_mod
from .backends import TensorRTUnavailable, ensure_engine, gpu_name, import_tensorrt
from .detector import ReleaseError, default_engines_dir, load_detector, resolve_release, select_variant
from .exit_codes import EXIT_FAIL, EXIT_OK, UsageError
from .fileio import atomic_write_json
from .manifest import Manifest, ManifestError, load_manifest, verify_files
from .postprocess import check_output, postprocess_one
from .realtime import DrawHandler, JsonLinesHandler, RealtimeLoop, load_actuator, open_source, summary_line
from .service import (
    Service,
    config_path,
    format_summary,
    install_signal_handlers,
    open_detectors,
    release_of,
    resolve_outputs,
)
from .service_config import load_service_config
from .sysinfo import describe_device
from .thermal import ThermalReader


def _engines_dir(release_dir: Path, engines: Optional[str]) -> Optional[Path]:
    return Path(engines) if engines else default_engines_dir(release_dir)


def cmd_info(args: argparse.Namespace) -> int:
    """Print the device description (plus a thermal snapshot) as JSON."""
    desc = describe_device()
    desc["thermal"] = ThermalReader(args.thermal_root).snapshot().to_json()
    print(json.dumps(desc, sort_keys=True))
    return EXIT_OK


def health_check(release: str, engines: Optional[str], variant: Optional[str]) -> Dict[str, Any]:
    """Verify the release and run one inference on its health sample; never raises for a broken
    release (that is a result), only for usage/environment errors (missing folder, no TensorRT)."""
    import cv2

    release_dir = resolve_release(release)
    report: Dict[str, Any] = {"ok": False, "problems": [], "latency_ms": None, "release_dir": str(release_dir)}
    problems: List[str] = report["problems"]
    try:
        manifest = load_manifest(release_dir)
    except ManifestError as e:
        problems.append(str(e))
        return report
    v = select_variant(manifest, variant)
    report.update(release=manifest.release, backend=manifest.backend, precision=manifest.precision, variant=v.name)
    problems.extend(verify_files(manifest, release_dir))
    sample = manifest.health_sample()
    if sample is None:
        problems.append("release has no file with role health_sample; redeploy with a sample image")
    if problems:
        return report  # never run models from a damaged release
    image = cv2.imread(str(release_dir / sample), cv2.IMREAD_COLOR)
    if image is None:
        problems.append(f"health sample {sample} is not a readable image")
        return report
    try:
        detector = load_detector(release_dir, manifest, v, _engines_dir(release_dir, engines))
    except TensorRTUnavailable:
        raise
    except ValueError as e:  # BackendError / PostprocessError: the release's model is unusable
        problems.append(str(e))
        return report
    try:
        t0 = time.perf_counter()
        out, lb = detector.infer_raw(image)
        output_problems = check_output(out, detector.spec)
        dets = None
        if not output_problems:  # decode only an output that has the declared shape and sane values
            dets = postprocess_one(out[0], detector.spec, detector.conf, detector.iou, detector.max_det, lb)
        report["latency_ms"] = round((time.perf_counter() - t0) * 1000.0, 3)
        report["output_shape"] = list(out.shape)
        problems.extend(output_problems)
        report["detections"] = len(dets) if dets is not None else None
        report["backend_info"] = detector.describe()
    except ValueError as e:
        problems.append(f"inference failed: {e}")
    finally:
        detector.backend.close()
    report["ok"] = not problems
    return report


def cmd_health(args: argparse.Namespace) -> int:
    """`health`: JSON report on stdout; exit 0 iff ok."""
    report = health_check(args.release, args.engines, args.variant)
    print(json.dumps(report, sort_keys=True))
    return EXIT_OK if report["ok"] else EXIT_FAIL


def cmd_build_engine(args: argparse.Namespace) -> int:
    """`build-engine`: build or reuse the TensorRT engine for the release's variant."""
    release_dir = resolve_release(args.release)
    manifest = load_manifest(release_dir)
    v = select_variant(manifest, args.variant)
    trt, cuda = import_tensorrt()  # first: on a device without TensorRT that is THE answer
    engines = _engines_dir(release_dir, args.engines)
    if engines is None:
        raise UsageError(f"no --engines given and {release_dir} is not under <deploy_dir>/releases; pass --engines DIR")
    if manifest.precision == "int8":
        if v.trt_onnx_file is None:
            raise ReleaseError(f"variant '{v.name}' has no trt_onnx_file (symmetric-QDQ ONNX) for an INT8 engine; "
                               "redeploy with the quantize stage's TensorRT model")
        onnx_file = v.trt_onnx_file
    else:
        onnx_file = v.model_file
    if manifest.tensorrt is None:
        raise ReleaseError("manifest has no tensorrt settings (workspace_mb); redeploy for a TensorRT device group")
    # TensorRT without BuilderFlag.FP16 (11) builds FP16 from the variant's FP16 ONNX instead (plan_build).
    fp16_onnx = release_dir / v.fp16_onnx_file if v.fp16_onnx_file else None
    cuda.init()
    ctx = cuda.Device(0).make_context()
    try:
        result = ensure_engine(release_dir / onnx_file, engines, manifest.precision, manifest.tensorrt.workspace_mb,
                               manifest.tensorrt.timing_cache, trt, gpu_name(cuda.Device(0)), fp16_onnx)
    finally:
        ctx.pop()
    print(json.dumps(result.to_json(), sort_keys=True))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """`bench`: write the benchmark document to --out atomically, print one summary line."""
    iterations = args.iterations
    if iterations is None and args.seconds is None and args.soak_minutes is None:
        iterations = 200
    thermal = ThermalReader(args.thermal_root)
    # Power rails are read under the same root as the thermal zones (tests point it at a recorded /sys).
    if not (args.idle_seconds >= 0 and args.power_interval > 0):
        raise ValueError(f"--idle-seconds {args.idle_seconds} must be >= 0 and --power-interval "
                         f"{args.power_interval} > 0")
    doc = bench_mod.benchmark_release(args.release, args.engines, args.variant, args.warmup, iterations, args.seconds,
                                      args.soak_minutes, thermal, args.sample_interval,
                                      power=bench_mod.PowerReader(args.thermal_root, thermal.runner),
                                      idle_s=args.idle_seconds, power_interval_s=args.power_interval)
    atomic_write_json(args.out, doc)
    print(bench_mod.summary_line(doc))
    return EXIT_OK


def _loop_handlers(args: argparse.Namespace, manifest: Manifest, stack: ExitStack) -> List[Any]:
    """`run`'s result handlers: JSONL (stdout or a file), the drawn frame, the actuator hook."""
    handlers: List[Any] = []
    if args.jsonl == "-":
        handlers.append(JsonLinesHandler(sys.stdout, manifest.class_names))
    elif args.jsonl:
        handlers.append(JsonLinesHandler(stack.enter_context(open(args.jsonl, "a", encoding="utf-8")),
                                         manifest.class_names))
    if args.draw:
        handlers.append(DrawHandler(Path(args.draw), manifest.class_names))
    if args.actuator:
        handlers.append(load_actuator(args.actuator))
    return handlers


def cmd_run(args: argparse.Namespace) -> int:
    """`run`: the real-time loop over --source; JSON summary on stdout at the end."""
    release_dir = resolve_release(args.release)
    manifest = load_manifest(release_dir)
    source = open_source(args.source, args.fps, args.max_frames)
    with ExitStack() as stack:
        stack.callback(source.close)
        detectors, governor, start = open_detectors(release_dir, manifest, args.variant,
                                                    _engines_dir(release_dir, args.engines), not args.no_adaptive,
                                                    args.thermal_root, args.check_interval, args.min_dwell)
        for d in detectors.values():
            stack.callback(d.backend.close)
        loop = RealtimeLoop(detectors, source, _loop_handlers(args, manifest, stack), governor, start.name,
                            max_seconds=args.seconds, class_names=manifest.class_names)
        summary = loop.run()
    summary.update(release=manifest.release, backend=manifest.backend, precision=manifest.precision,
                   adaptive=governor is not None)
    if args.summary:
        atomic_write_json(args.summary, summary)
    sys.stderr.write(summary_line(summary) + "\n")
    print(json.dumps({"summary": summary}, sort_keys=True))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """`serve`: the detector as a service (HTTP, publishers, frame sample) until SIGTERM."""
    deploy_dir = Path(args.deploy_dir).resolve() if args.deploy_dir else None
    release_dir = release_of(deploy_dir, args.release)
    config = load_service_config(config_path(deploy_dir, args.config))
    if args.http_port is not None:
        config = dataclasses.replace(config, http_port=args.http_port)
    engines = Path(args.engines) if args.engines else default_engines_dir(release_dir)
    service = Service(release_dir, config, resolve_outputs(deploy_dir, args.out_dir), engines, args.thermal_root,
                      max_seconds=args.seconds, max_frames=args.max_frames, adaptive=not args.no_adaptive)
    install_signal_handlers(service)
    host, port = service.start_http()
    sys.stderr.write(f"serve: release {service.manifest.release} on {config.source}; "
                     f"http://{host}:{port}/ (healthz, metrics)\n")
    sys.stderr.flush()
    summary = service.run()
    sys.stderr.write(format_summary(summary) + "\n")
    if args.summary:
        atomic_write_json(args.summary, summary)
    return EXIT_OK
