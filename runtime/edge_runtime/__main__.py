"""The device CLI: ``python -m edge_runtime info | bench | run | serve | build-engine | health``.

This is a contract with the fleet code (pipeline/fleet): it runs with cwd = the runtime's source
tree on the device (``<deploy_dir>/runtime/<sha12>/``, holding ``edge_runtime/``), or from an
installed ``edge-defect-runtime``.

  info                                   device description JSON on stdout
  health --release DIR [--engines DIR]   verify files, one inference on the release's
                                         health_sample, sanity-check the output; JSON with
                                         at least {"ok", "problems", "latency_ms"}; exit 0 iff ok
  build-engine --release DIR --engines DIR
                                         JSON {"key", "path", "reused", "sha256", ...}; exit 2
                                         with "TensorRT not available" where it is missing
  bench --release DIR [--engines DIR] --out FILE [--warmup N] [--iterations N | --seconds S]
        [--soak-minutes M]               benchmark JSON written atomically to FILE, one-line
                                         summary on stdout
  run --release DIR --source SPEC [...]  the real-time loop; JSON summary on stdout at the end
  serve --deploy-dir D [...]             the detector as a service on <D>/current with
                                         <D>/service/service.json: /healthz, /metrics, live
                                         view, JSONL/MQTT/frame sample; exit 0 on SIGTERM

Every command takes ``--variant NAME``. Exit 2 = usage or environment error, with one line on
stderr naming the problem and the fix (no traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import latency as bench_mod
from .backends import TensorRTUnavailable, ensure_engine, gpu_name, import_tensorrt
from .detector import ReleaseError, default_engines_dir, load_detector, resolve_release, select_variant
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

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
PROG = "python -m edge_runtime"


class UsageError(ValueError):
    """Bad command-line arguments."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (the fleet logs stderr line by line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message}; see `{self.prog} --help`\n")
        sys.exit(EXIT_USAGE)


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
    cuda.init()
    ctx = cuda.Device(0).make_context()
    try:
        result = ensure_engine(release_dir / onnx_file, engines, manifest.precision, manifest.tensorrt.workspace_mb,
                               manifest.tensorrt.timing_cache, trt, gpu_name(cuda.Device(0)))
    finally:
        ctx.pop()
    print(json.dumps(result.to_json(), sort_keys=True))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """`bench`: write the benchmark document to --out atomically, print one summary line."""
    iterations = args.iterations
    if iterations is None and args.seconds is None and args.soak_minutes is None:
        iterations = 200
    doc = bench_mod.benchmark_release(args.release, args.engines, args.variant, args.warmup, iterations, args.seconds,
                                      args.soak_minutes, ThermalReader(args.thermal_root), args.sample_interval)
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


def cmd_supervise(args: argparse.Namespace) -> int:
    """`supervise`: run `serve` on the current release and keep it running (supervisor.py); exit 0 on SIGTERM."""
    from .supervisor import Supervisor, main_options, stop_supervisor

    if args.stop:
        print(json.dumps(stop_supervisor(args.deploy_dir), sort_keys=True))
        return EXIT_OK
    max_bytes = int(args.log_max_mb * 1024 * 1024) if args.log_max_mb is not None else None
    return Supervisor(main_options(args.deploy_dir, log_max_bytes=max_bytes, backoff_initial_s=args.backoff_initial_s,
                                   backoff_max_s=args.backoff_max_s, stable_after_s=args.stable_after_s,
                                   start_timeout_s=args.start_timeout_s, watchdog_s=args.watchdog_s,
                                   stop_timeout_s=args.stop_timeout_s,
                                   crash_loop_after=args.crash_loop_after)).run()

def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (one subcommand per verb)."""
    p = _Parser(prog=PROG, description="Device runtime for the edge defect detector.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sp: argparse.ArgumentParser, release: bool = True) -> None:
        if release:
            sp.add_argument("--release", required=True,
                            help="release folder (<deploy_dir>/current or releases/<sha12>)")
            sp.add_argument("--engines", help="TensorRT engine cache (default <deploy_dir>/engines)")
        sp.add_argument("--variant", help="model variant name from the manifest (default: the first)")
        sp.add_argument("--thermal-root", default="/", help=argparse.SUPPRESS)  # tests point this at a fake /sys

    sp = sub.add_parser("info", help="print the device description JSON")
    common(sp, release=False)
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("health", help="verify a release and run one inference on its sample")
    common(sp)
    sp.set_defaults(func=cmd_health)

    sp = sub.add_parser("build-engine", help="build or reuse the TensorRT engine")
    common(sp)
    sp.set_defaults(func=cmd_build_engine)

    sp = sub.add_parser("bench", help="benchmark a release; JSON to --out")
    common(sp)
    sp.add_argument("--out", required=True, type=Path, help="benchmark JSON file (written atomically)")
    sp.add_argument("--warmup", type=int, default=10, help="untimed iterations first (default 10)")
    window = sp.add_mutually_exclusive_group()
    window.add_argument("--iterations", type=int, help="steady-state iterations (default 200 when no window given)")
    window.add_argument("--seconds", type=float, help="steady-state duration in seconds")
    window.add_argument("--soak-minutes", type=float, help="long soak; reports latency drift per time window")
    sp.add_argument("--sample-interval", type=float, default=1.0, help="temperature sampling period, s")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("run", help="the real-time loop")
    common(sp)
    sp.add_argument("--source", required=True, help="camera index | video file | image folder | synthetic[:WxH]")
    sp.add_argument("--fps", type=float, help="pace the source (synthetic default 30; files default: as fast as read)")
    sp.add_argument("--max-frames", type=int, help="stop after this many captured frames")
    sp.add_argument("--seconds", type=float, help="stop after this many seconds")
    sp.add_argument("--jsonl", help="write one JSON line per handled frame to this file ('-' = stdout)")
    sp.add_argument("--draw", help="keep this JPEG updated with the latest annotated frame")
    sp.add_argument("--actuator", help="module:function called with every result")
    sp.add_argument("--no-adaptive", action="store_true", help="pin --variant; no thermal switching")
    sp.add_argument("--check-interval", type=float, default=1.0, help="thermal check period, s")
    sp.add_argument("--min-dwell", type=float, default=5.0, help="minimum seconds between thermal switches")
    sp.add_argument("--summary", help="also write the run summary JSON to this file")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("serve", help="run the detector as a service: HTTP health/metrics/live view, publishers")
    sp.add_argument("--deploy-dir", help="the deploy folder: serves <deploy-dir>/current with "
                                         "<deploy-dir>/service/service.json")
    sp.add_argument("--release", help="release folder (default <deploy-dir>/current)")
    sp.add_argument("--config", help="service.json (default <deploy-dir>/service/service.json)")
    sp.add_argument("--out-dir", help="where detections.jsonl goes (default <deploy-dir>/service)")
    sp.add_argument("--engines", help="TensorRT engine cache (default <deploy_dir>/engines)")
    sp.add_argument("--variant", help=argparse.SUPPRESS)  # service.json's `variant` decides
    sp.add_argument("--http-port", type=int, help="override service.json's http_port (0 = any free port)")
    sp.add_argument("--seconds", type=float, help="stop after this many seconds (tests, soaks)")
    sp.add_argument("--max-frames", type=int, help="stop after this many captured frames")
    sp.add_argument("--no-adaptive", action="store_true", help="no thermal switching")
    sp.add_argument("--summary", help="write the summary JSON here when the service stops")
    sp.add_argument("--thermal-root", default="/", help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_serve)
    sp = sub.add_parser("supervise", help="keep `serve` running where systemd is absent (restart, back-off)")
    sp.add_argument("--deploy-dir", required=True, help="the deploy folder (pidfile, state and serve.log in "
                                                        "<deploy-dir>/service/)")
    sp.add_argument("--stop", action="store_true", help="stop the running supervisor (and its serve) and exit")
    sp.add_argument("--log-max-mb", type=float, help="serve.log size cap per file, MB (default 5; one backup)")
    sp.add_argument("--backoff-initial-s", type=float, help="first restart delay (default 1; doubles per failure)")
    sp.add_argument("--backoff-max-s", type=float, help="restart delay cap (default 60)")
    sp.add_argument("--stable-after-s", type=float, help="healthy this long resets the back-off (default 30)")
    sp.add_argument("--start-timeout-s", type=float, help="healthy within this after a start, else restart "
                                                          "(default 120; 0 = no limit)")
    sp.add_argument("--watchdog-s", type=float, help="unhealthy this long after being healthy: restart "
                                                     "(default 60; 0 = off)")
    sp.add_argument("--stop-timeout-s", type=float, help="SIGTERM to SIGKILL delay when stopping serve (default 10)")
    sp.add_argument("--crash-loop-after", type=int, help="consecutive failures flagged as a crash loop (default 5)")
    sp.set_defaults(func=cmd_supervise)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TensorRTUnavailable as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_USAGE
    except (ValueError, OSError) as e:  # our errors are ValueError subclasses that name the fix
        sys.stderr.write(f"error: {e}\n".replace("\n", " ").rstrip() + "\n")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
