"""The one command line every stage has: paths as options, hyper-parameters from params.yaml.

A stage declares its paths once (defaults from `pipeline.config.paths`, which `dvc.yaml` declares
as deps and outs); `--params` is added to every stage. Hyper-parameters are never options: they
live in `params.yaml` sections, loaded and validated by name.

    parse_args = stage_cli("export", __doc__, weights=paths.WEIGHTS, out=paths.ONNX_MODEL)
    args = parse_args(argv)
    base, p = stage_params(args, "base", "export")
    ...
    if __name__ == "__main__":
        sys.exit(run_stage(main))

`run_stage` is the exit-code rule of every stage: 0 done; 2 for bad input (the project's input
errors are ValueError subclasses -- ParamsError, DatasetError, ModelFileError, ... -- whose
message names the file, the key or line, and the fix); 1 for a failure of the work itself (a
RuntimeError: the accuracy gate, the export parity check). Either way the message is printed
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

from pipeline.config import paths
from pipeline.config.params import (
    BaseParams,
    BenchmarkParams,
    CalibrateParams,
    CameraParams,
    CameraProfileParams,
    DataParams,
    EvaluateParams,
    ExportParams,
    QuantizeParams,
    ReportParams,
    TrainParams,
    load_params,
)

# The params.yaml sections a stage may read, with the schema each is validated against.
SECTION_SCHEMAS: Mapping[str, type] = {
    "base": BaseParams, "data": DataParams, "train": TrainParams, "export": ExportParams, "camera": CameraParams,
    "camera_profile": CameraProfileParams, "calibrate": CalibrateParams, "quantize": QuantizeParams,
    "evaluate": EvaluateParams, "benchmark": BenchmarkParams, "report": ReportParams,
}

PathOption = Union[Path, "tuple[Path, str]"]  # a default, or (default, help text)
ArgsParser = Callable[[Union[Sequence[str], None]], argparse.Namespace]


def stage_cli(stage: str, doc: str | None, **options: PathOption) -> ArgsParser:
    """A `parse_args(argv)` for stage `stage`: one `--<name>` path option per keyword, plus `--params`.

    Keyword `epochs_csv=paths.TRAIN_EPOCHS` becomes `--epochs-csv` with that default; a
    `(default, help)` pair adds a help text. The description is the docstring's first line.
    """
    if "params" in options:
        raise ValueError(f"stage {stage}: --params is added to every stage; do not declare it")

    def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
        """The stage CLI: paths only (hyper-parameters live in params.yaml)."""
        ap = argparse.ArgumentParser(prog=f"python -m pipeline.stages.{stage}",
                                     description=(doc or stage).strip().splitlines()[0])
        for name, spec in options.items():
            default, help_text = spec if isinstance(spec, tuple) else (spec, None)
            ap.add_argument("--" + name.replace("_", "-"), type=Path, default=default, help=help_text)
        ap.add_argument("--params", type=Path, default=paths.PARAMS_FILE, help="the params file (default: %(default)s)")
        return ap.parse_args(argv)

    return parse_args


def stage_params(args: argparse.Namespace, *sections: str) -> tuple[Any, ...]:
    """The named params.yaml sections from `args.params`, each validated against its schema."""
    unknown = [s for s in sections if s not in SECTION_SCHEMAS]
    if unknown:
        raise ValueError(f"no params schema for section(s) {unknown}; known: {sorted(SECTION_SCHEMAS)}")
    return tuple(load_params(name, SECTION_SCHEMAS[name], args.params) for name in sections)


EXIT_INPUT, EXIT_FAILED = 2, 1


def run_stage(main: Callable[[], Any]) -> int:
    """Run a stage's `main()` as a command and return its exit code (see the module docstring)."""
    try:
        main()
    except ValueError as e:  # bad input: the message names the file and the fix (one line per problem)
        sys.stderr.write(f"error: {e}\n")
        return EXIT_INPUT
    except RuntimeError as e:  # the work failed (a gate, a parity check): said, not a traceback
        sys.stderr.write(f"failed: {e}\n")
        return EXIT_FAILED
    return 0
