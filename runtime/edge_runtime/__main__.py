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
import json
import logging
import sys
from pathlib import Path
from typing import Any, List, Optional

from .exit_codes import EXIT_OK, EXIT_USAGE

PROG = "python -m edge_runtime"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (the fleet logs stderr line by line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message}; see `{self.prog} --help`\n")
        sys.exit(EXIT_USAGE)


def _command(name: str) -> Any:
    """The function `commands.<name>`, imported only when that command runs (see commands.py)."""
    def run(args: argparse.Namespace) -> int:
        from . import commands

        return int(getattr(commands, name)(args))
    run.__name__ = name
    return run


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
    sp.set_defaults(func=_command("cmd_info"))

    sp = sub.add_parser("health", help="verify a release and run one inference on its sample")
    common(sp)
    sp.set_defaults(func=_command("cmd_health"))

    sp = sub.add_parser("build-engine", help="build or reuse the TensorRT engine")
    common(sp)
    sp.set_defaults(func=_command("cmd_build_engine"))

    sp = sub.add_parser("bench", help="benchmark a release; JSON to --out")
    common(sp)
    sp.add_argument("--out", required=True, type=Path, help="benchmark JSON file (written atomically)")
    sp.add_argument("--warmup", type=int, default=10, help="untimed iterations first (default 10)")
    window = sp.add_mutually_exclusive_group()
    window.add_argument("--iterations", type=int, help="steady-state iterations (default 200 when no window given)")
    window.add_argument("--seconds", type=float, help="steady-state duration in seconds")
    window.add_argument("--soak-minutes", type=float, help="long soak; reports latency drift per time window")
    sp.add_argument("--sample-interval", type=float, default=1.0, help="temperature sampling period, s")
    sp.add_argument("--idle-seconds", type=float, default=2.0,
                    help="rest before the warm-up for the idle power figure, s (only where there are sensors)")
    sp.add_argument("--power-interval", type=float, default=0.1, help="power sampling period, s (default 10 Hz)")
    sp.set_defaults(func=_command("cmd_bench"))

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
    sp.set_defaults(func=_command("cmd_run"))

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
    sp.set_defaults(func=_command("cmd_serve"))
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
    except (ValueError, OSError) as e:  # our errors are ValueError subclasses that name the fix
        sys.stderr.write(f"error: {e}\n".replace("\n", " ").rstrip() + "\n")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
