"""The stages' exit-code rule (`pipeline.config.stage_cli.run_stage`), through the real command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import REPO

from pipeline.config.stage_cli import run_stage
from pipeline.imagesets.yolo import DatasetError


def test_bad_params_exit_2_with_the_problem_and_no_traceback(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["trian"] = doc.pop("train")
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(doc, sort_keys=False))
    p = subprocess.run([sys.executable, "-m", "pipeline.stages.data", "--params", str(bad), "--out",
                        str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"), "--headline",
                        str(tmp_path / "h.json")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and p.stderr.startswith("error: ") and "trian" in p.stderr, p.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()  # nothing written


@pytest.mark.parametrize("error, code, prefix", [
    (DatasetError("labels/x.txt line 3: class 9 >= 6 classes; fix the label"), 2, "error: labels/x.txt line 3"),
    (RuntimeError("accuracy gate: no candidate within 0.01 mAP"), 1, "failed: accuracy gate"),
])
def test_run_stage_maps_input_errors_to_2_and_failures_to_1(capsys: pytest.CaptureFixture[str],
                                                            error: Exception, code: int, prefix: str) -> None:
    def main() -> None:
        raise error

    assert run_stage(main) == code
    assert capsys.readouterr().err.startswith(prefix)


def test_run_stage_keeps_the_traceback_of_a_bug() -> None:
    def main() -> None:
        raise KeyError("a bug, not an input error")

    with pytest.raises(KeyError):
        run_stage(main)
    assert run_stage(lambda: None) == 0
