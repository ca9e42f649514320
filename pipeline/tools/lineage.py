"""Walk an MLflow run's lineage back to the data: `python -m pipeline.tools.lineage RUN_ID`.

Start from any run (a device run of `fab deploy`, a `report` summary, a stage run) and print
every run it descends from — quantize, export, train, data, calibrate, camera — with each run's
git commit, params hash and the sha256 tags that link them (see `tracking.LINEAGE_PRODUCERS`).
Not a stage: it reads MLflow only and writes nothing.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipeline.tracking.mlflow_runs import tracking_uri, walk_lineage


def format_chain(chain: list[dict[str, Any]]) -> str:
    """A readable block per run: stage, run id and name, commit, params hash, sha256 tags."""
    lines: list[str] = []
    for step in chain:
        lines.append(f"{step['stage'] or '?':<18} run {step['run_id']}  ({step['run_name']})")
        lines.append(f"{'':<18} git {step['git_commit'] or '-'}  params_hash {step['params_hash'] or '-'}")
        for key, value in step["shas"].items():
            lines.append(f"{'':<18} {key} {value[:16]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the lineage of one run (as text, or JSON with --json)."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.tools.lineage", description=__doc__.splitlines()[0])
    ap.add_argument("run_id", help="any MLflow run id (device run, report summary, stage run)")
    ap.add_argument("--json", action="store_true", help="print the chain as JSON")
    args = ap.parse_args(argv)
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        chain = walk_lineage(args.run_id, mlflow.MlflowClient(tracking_uri()))
    except MlflowException as e:
        raise SystemExit(f"lineage: run '{args.run_id}' not found in {tracking_uri()} ({e.message}); "
                         "check MLFLOW_TRACKING_URI and the run id (MLflow UI: run page, 'Run ID')") from e
    print(json.dumps(chain, indent=2) if args.json else format_chain(chain))


if __name__ == "__main__":
    main()
