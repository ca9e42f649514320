"""Reproducibility check: `dvc repro` twice from clean on tiny params, the two dvc.lock files compared.

    python -m pipeline.tools.repro_check                 # every stage (what `make repro-check` and CI run)
    python -m pipeline.tools.repro_check --stages data   # `dvc repro data` only (and what it depends on)
    python -m pipeline.tools.repro_check --from-head     # the last commit, not the working tree
    python -m pipeline.tools.repro_check --compare A B   # only compare two finished workspaces

Each run gets its own fresh workspace: the repository's files (by default the working tree as it
is on disk, uncommitted edits included: a user checking a change wants *that* change checked;
`--from-head` takes the committed tree instead), `params.yaml` shrunk by `tiny_params`, a new git
repository committed with fixed dates (so anything that embeds the commit hash matches), and an
empty DVC cache of its own (no cache or run-cache reuse between the runs). After each repro,
`dvc status` in that workspace must be clean (every output declared, dvc.lock consistent).

What "the same" means comes from the `repro_check` section of params.yaml:

- a stage not listed anywhere there is **bit-exact**: every output hash in dvc.lock must match;
  a difference is shown with both hashes, the files that differ inside a folder, and for a
  metrics file (or a JSON out) the keys that moved;
- `tolerant_stages` produce measurements (latency, memory): their JSON documents, the declared
  metrics files and the JSON outs beside them (dvc.yaml keeps `metrics:` to the headline numbers
  and declares each stage's full record as an out), are compared key by key within `tolerances`
  (keys matching `ignore_metrics` are skipped); their other outputs are not compared;
- `tolerant_outputs` are single measurement files inside otherwise bit-exact stages;
- `choice` names a stage that picks by measured latency and the metrics key holding its pick.
  When both runs picked the same, that stage and every stage downstream of it are held to the
  rules above. When the picks differ, it is reported, and those stages are compared like
  tolerant stages (identity strings such as the pick's name or a model sha256 may then differ).

Exit status: 0 reproduced, 1 differences found (the report says which), 2 the check could not
run (a failed `dvc repro`, a bad params section, not a git repository).
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from pipeline.config.params import MetricTolerance, ReproCheckParams, load_params
from pipeline.config.paths import PARAMS_FILE, repo_root
from pipeline.tracking.flatten import flatten

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2
_MAX_LISTED_FILES = 10  # files named per differing folder; more are counted, not listed
# Fixed identity and dates for the workspace commits: both runs then get the same commit hash.
_GIT_ENV = {"GIT_AUTHOR_NAME": "repro-check", "GIT_AUTHOR_EMAIL": "repro-check@localhost",
            "GIT_COMMITTER_NAME": "repro-check", "GIT_COMMITTER_EMAIL": "repro-check@localhost",
            "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+0000", "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+0000"}


class ReproCheckError(RuntimeError):
    """The check could not run (as opposed to: it ran and found differences)."""


# --------------------------------------------------------------------------------------------
# Tiny params: the whole pipeline in a few minutes on 2 cores (the e2e test and this check).
# --------------------------------------------------------------------------------------------


def tiny_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` (a params.yaml mapping) shrunk so a full `dvc repro` runs in minutes on 2 cores.

    Sections that are absent are left out, so the function works on partial params too. The
    `repro_check` section itself is not changed.
    """
    p: dict[str, Any] = copy.deepcopy(dict(params))
    p["data"]["synthetic"].update(train_images=24, val_images=8, test_images=4, image_size=96)
    p["train"].update(imgsz=64, epochs=1, batch=8, nbs=8, workers=0, close_mosaic=0)
    if "camera_match" in p["train"]:  # both camera paths of train run, so the check holds them bit-exact
        p["train"]["camera_match"]["enabled"] = True
        p["train"]["camera_frames"] = True
    p["export"].update(imgsz=64, parity_images=2)
    if "quantize" in p:
        # Two candidates with different activation types (U8 vs S8: different kernels), timed over
        # 3 rounds. Measured at 64 px on this 2-core AVX2 host: U8S8 1.1-1.8 ms vs S8S8 4.4-12.6 ms, so
        # "the fastest" is the same run after run and the repro check holds quantize and evaluate bit-exact.
        # The first two candidates (near-identical configs, 2 timed runs) swapped places in 1 of 2 checks.
        cands = p["quantize"]["candidates"]
        other = next((c for c in cands[1:] if c.get("activation") != cands[0].get("activation")), None)
        p["quantize"].update(eval_images=8, latency_warmup=2, latency_runs=5, latency_rounds=3,
                             candidates=[cands[0], other] if other else cands[:2], max_map_drop=0.5)
    if "camera" in p:  # deployment-camera frames and calibration sets
        p["camera"]["synthetic"].update(scenes_per_camera=4, burst_length=3, labelled_images=6,
                                        labelled_train_images=3)
    if "camera_profile" in p:  # a few frames and references: the fit's cost grows with both
        p["camera_profile"].update(frames_per_camera=8, reference_images=8, render_images=4)
    if "calibrate" in p:
        p["calibrate"].update(imgsz=64, size=6)
    if "evaluate" in p:  # 64 = export.imgsz above; benchmark's 96 is exported in-run
        p["evaluate"].update(images=8)
    if "benchmark" in p:
        p["benchmark"].update(imgsz=[64, 96], warmup=1, runs=3, rounds=2, frames=2)
    return p


# --------------------------------------------------------------------------------------------
# Comparison (pure: two workspaces in, findings out)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """One output that did not reproduce: which stage, which path, both hashes, and why."""

    stage: str
    path: str
    hash1: str
    hash2: str
    details: tuple[str, ...] = ()  # files inside a folder, or metric keys that moved


@dataclass
class CheckResult:
    """Everything compared: failures, notes (expected differences), and how each stage was held."""

    differences: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    modes: dict[str, str] = field(default_factory=dict)  # stage -> bit-exact | tolerant | ...
    ran_on: str = ""  # train.device and the CPU: what "bit-exact" was shown for

    @property
    def ok(self) -> bool:
        """True when nothing differed beyond what params allow."""
        return not self.differences

    def render(self) -> str:
        """A readable report: per stage how it was compared, then each difference and each note."""
        lines = [f"repro-check: ran on {self.ran_on}"] if self.ran_on else []
        lines.append("repro-check: stages compared:")
        lines += [f"  {stage:<12} {mode}" for stage, mode in self.modes.items()]
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.ok:
            lines.append("repro-check: OK, both runs agree")
            return "\n".join(lines)
        lines.append(f"repro-check: FAILED, {len(self.differences)} output(s) differ between run 1 and run 2:")
        for d in self.differences:
            lines.append(f"  stage {d.stage}: {d.path}")
            lines.append(f"      run 1 {d.hash1}")
            lines.append(f"      run 2 {d.hash2}")
            lines += [f"      {detail}" for detail in d.details]
        return "\n".join(lines)


def read_lock(workspace: Path) -> dict[str, dict[str, Any]]:
    """The `stages` mapping of `workspace/dvc.lock`; a missing or malformed file is a ReproCheckError."""
    path = workspace / "dvc.lock"
    if not path.is_file():
        raise ReproCheckError(f"{path}: no dvc.lock; did `dvc repro` run in this workspace?")
    lock = yaml.safe_load(path.read_text())
    if not isinstance(lock, dict) or not isinstance(lock.get("stages"), dict):
        raise ReproCheckError(f"{path}: no `stages:` mapping; is it a DVC 3 lock file?")
    return lock["stages"]


def output_hashes(stage_lock: Mapping[str, Any]) -> dict[str, str]:
    """path -> content hash for one stage's outputs in dvc.lock (metrics and plots included)."""
    out: dict[str, str] = {}
    for o in stage_lock.get("outs", []):
        out[o["path"]] = str(o.get("md5") or o.get("etag") or o.get("checksum") or "")
    return out


def _declared(workspace: Path, *sections: str) -> dict[str, set[str]]:
    """stage -> the paths dvc.yaml declares under `sections` (string or `{path: {...}}` entries)."""
    path = workspace / "dvc.yaml"
    if not path.is_file():
        raise ReproCheckError(f"{path}: no dvc.yaml in the workspace")
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    return {name: {next(iter(e)) if isinstance(e, dict) else str(e) for s in sections for e in spec.get(s) or []}
            for name, spec in stages.items()}


def declared_metrics(workspace: Path) -> dict[str, set[str]]:
    """stage -> the metrics files dvc.yaml declares for it."""
    return _declared(workspace, "metrics")


_DOCUMENT_SUFFIXES = (".json", ".yaml", ".yml")  # what load_metrics reads


def compared_documents(workspace: Path) -> dict[str, set[str]]:
    """stage -> the files compared key by key: its declared metrics, and the JSON/YAML files among
    its outs and plots.

    dvc.yaml keeps `metrics:` to the headline numbers (so `dvc metrics show` fits a terminal) and
    declares each stage's full record (reports/benchmark/results.json, reports/<stage>/metrics.json)
    as an out. Both are held to the same rules here: where a number is declared does not decide
    whether it is checked.
    """
    docs = _declared(workspace, "outs", "plots")
    return {stage: files | {p for p in docs.get(stage, set()) if p.endswith(_DOCUMENT_SUFFIXES)}
            for stage, files in declared_metrics(workspace).items()}


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def downstream(lock: Mapping[str, Mapping[str, Any]], stage: str) -> set[str]:
    """`stage` and every stage that depends on its outputs, transitively (read from dvc.lock deps)."""
    reached = {stage}
    changed = True
    while changed:
        changed = False
        outs = [o["path"] for s in reached for o in lock.get(s, {}).get("outs", [])]
        for name, spec in lock.items():
            if name in reached:
                continue
            deps = [d["path"] for d in spec.get("deps", [])]
            if any(_under(d, o) or _under(o, d) for d in deps for o in outs):
                reached.add(name)
                changed = True
    return reached


def load_metrics(path: Path) -> dict[str, Any]:
    """Read a JSON or YAML metrics file, flattened; an unreadable file is a ReproCheckError."""
    if not path.is_file():
        raise ReproCheckError(f"{path}: metrics file listed in dvc.lock is missing from the workspace")
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ReproCheckError(f"{path}: not valid JSON/YAML ({e})") from e
    return flatten(raw)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def tolerance_for(key: str, tolerances: Sequence[MetricTolerance]) -> MetricTolerance | None:
    """The first tolerance whose glob matches `key`, or None (the value must then be equal)."""
    return next((t for t in tolerances if fnmatch.fnmatchcase(key, t.metrics)), None)


def within(a: float, b: float, tol: MetricTolerance | None) -> bool:
    """|a - b| <= max(abs_tol, rel_tol * max(|a|, |b|)); without a tolerance, a == b."""
    if math.isnan(a) and math.isnan(b):
        return True  # both runs produced "undefined" (e.g. no detections): that reproduced
    if tol is None:
        return a == b
    return abs(a - b) <= max(tol.abs_tol, tol.rel_tol * max(abs(a), abs(b)))


def compare_metrics(m1: Mapping[str, Any], m2: Mapping[str, Any], cfg: ReproCheckParams, *,
                    exact: bool = False, strings_may_differ: bool = False) -> tuple[list[str], list[str]]:
    """Compare two flattened metrics documents. Returns (moved, expected) lines.

    exact: every key must be equal (a bit-exact output: this only explains a hash difference).
    Otherwise keys matching `cfg.ignore_metrics` are skipped and numbers are held to
    `cfg.tolerances`. strings_may_differ: non-numeric differences go to `expected` (the runs made
    different measured choices, so names and model hashes may differ).
    """
    moved: list[str] = []
    expected: list[str] = []
    for key in sorted(set(m1) | set(m2)):
        if not exact and any(fnmatch.fnmatchcase(key, pat) for pat in cfg.ignore_metrics):
            continue
        if key not in m1 or key not in m2:
            moved.append(f"{key}: only in run {1 if key in m1 else 2}")
            continue
        a, b = m1[key], m2[key]
        if _is_number(a) and _is_number(b):
            tol = None if exact else tolerance_for(key, cfg.tolerances)
            if not within(float(a), float(b), tol):
                allowed = "must be equal" if tol is None else f"tolerance abs {tol.abs_tol:g} rel {tol.rel_tol:g}"
                moved.append(f"{key}: {a!r} -> {b!r} (diff {float(b) - float(a):+.6g}; {allowed})")
        elif a != b:
            line = f"{key}: {a!r} -> {b!r}"
            (expected if strings_may_differ and not exact else moved).append(line)
    return moved, expected


def folder_differences(dir1: Path, dir2: Path) -> list[str]:
    """Relative paths that differ between two folders (added, removed, changed), at most a few named."""
    def files(d: Path) -> dict[str, Path]:
        return {p.relative_to(d).as_posix(): p for p in sorted(d.rglob("*")) if p.is_file()} if d.is_dir() else {}

    f1, f2 = files(dir1), files(dir2)
    diffs = [f"only in run 1: {k}" for k in sorted(set(f1) - set(f2))]
    diffs += [f"only in run 2: {k}" for k in sorted(set(f2) - set(f1))]
    diffs += [f"changed: {k}" for k in sorted(set(f1) & set(f2)) if f1[k].read_bytes() != f2[k].read_bytes()]
    if len(diffs) > _MAX_LISTED_FILES:
        diffs = diffs[:_MAX_LISTED_FILES] + [f"... and {len(diffs) - _MAX_LISTED_FILES} more files"]
    return diffs


def choice_of(workspace: Path, cfg: ReproCheckParams) -> str | None:
    """The value of `choice.key` in `choice.metrics` of a workspace, or None when there is none."""
    if not cfg.choice.stage:
        return None
    path = workspace / cfg.choice.metrics
    if not path.is_file():
        return None
    metrics = load_metrics(path)
    if cfg.choice.key not in metrics:
        raise ReproCheckError(f"{path}: no key '{cfg.choice.key}'; repro_check.choice.key in params.yaml must "
                              "name the metrics key that holds the stage's pick")
    return str(metrics[cfg.choice.key])


def compare_runs(run1: Path, run2: Path, cfg: ReproCheckParams) -> CheckResult:
    """Compare the dvc.lock outputs of two workspaces that ran the same pipeline (see module doc)."""
    lock1, lock2 = read_lock(run1), read_lock(run2)
    metrics_files = declared_metrics(run1)
    documents = compared_documents(run1)
    result = CheckResult()
    unknown = sorted(set(cfg.tolerant_stages) - set(metrics_files))
    if unknown:  # a typo here makes that stage bit-exact, which fails loudly: a note is enough
        result.notes.append(f"repro_check.tolerant_stages lists {', '.join(unknown)}, not stage(s) in dvc.yaml")
    if cfg.choice.stage and cfg.choice.stage not in metrics_files:
        raise ReproCheckError(f"repro_check.choice.stage '{cfg.choice.stage}' is not a stage in dvc.yaml; "
                              "fix it in params.yaml (\"\" = no stage chooses by measurement)")

    choice_differs: set[str] = set()
    if cfg.choice.stage in lock1 and cfg.choice.stage in lock2:
        pick1, pick2 = choice_of(run1, cfg), choice_of(run2, cfg)
        if pick1 != pick2:
            choice_differs = downstream(lock1, cfg.choice.stage) | downstream(lock2, cfg.choice.stage)
            result.notes.append(
                f"stage {cfg.choice.stage} picked differently by measurement: run 1 '{pick1}', run 2 '{pick2}' "
                f"({cfg.choice.metrics}: {cfg.choice.key}); {', '.join(sorted(choice_differs))} are compared within "
                "tolerance instead of bit for bit")
        else:
            result.notes.append(f"stage {cfg.choice.stage} picked '{pick1}' in both runs: it and its downstream "
                                "stages are held to their usual rules")

    for stage in list(lock1) + [s for s in lock2 if s not in lock1]:
        if stage not in lock1 or stage not in lock2:
            result.modes[stage] = "missing"
            result.differences.append(Difference(stage, "(stage)", "ran" if stage in lock1 else "absent",
                                                 "ran" if stage in lock2 else "absent",
                                                 ("the stage is in one dvc.lock only",)))
            continue
        tolerant = stage in cfg.tolerant_stages or stage in choice_differs
        picked_apart = stage in choice_differs and stage not in cfg.tolerant_stages
        result.modes[stage] = "tolerant (pick differed)" if picked_apart else "tolerant" if tolerant else "bit-exact"
        outs1, outs2 = output_hashes(lock1[stage]), output_hashes(lock2[stage])
        for path in sorted(set(outs1) | set(outs2)):
            h1, h2 = outs1.get(path, "(absent)"), outs2.get(path, "(absent)")
            is_metrics = path in documents.get(stage, set()) or path == cfg.choice.metrics
            if not (tolerant or path in cfg.tolerant_outputs):
                if h1 != h2:
                    result.differences.append(Difference(stage, path, h1, h2, _explain(run1, run2, path, h1,
                                                                                         is_metrics, cfg)))
                continue
            if h1 == h2:
                continue
            # A measurement file that is not a JSON/YAML document is not compared (docs/reproducibility.md).
            if not is_metrics:
                if stage in choice_differs and stage not in cfg.tolerant_stages and path not in cfg.tolerant_outputs:
                    result.notes.append(f"{stage}: {path} differs (expected with a different pick)")
                continue
            if path not in outs1 or path not in outs2:
                result.differences.append(Difference(stage, path, h1, h2, ("output in one run only",)))
                continue
            moved, expected = compare_metrics(load_metrics(run1 / path), load_metrics(run2 / path), cfg,
                                              strings_may_differ=stage in choice_differs)
            if moved:
                result.differences.append(Difference(stage, path, h1, h2, tuple(moved)))
            result.notes += [f"{stage}: {path}: {line} (differs with the pick)" for line in expected]
    return result


def _explain(run1: Path, run2: Path, path: str, h1: str, is_metrics: bool, cfg: ReproCheckParams) -> tuple[str, ...]:
    """Why a bit-exact output differs: the files inside a folder, or the metric keys that moved."""
    p1, p2 = run1 / path, run2 / path
    if h1.endswith(".dir") or p1.is_dir() or p2.is_dir():
        return tuple(folder_differences(p1, p2))
    if is_metrics and p1.is_file() and p2.is_file():
        moved, _ = compare_metrics(load_metrics(p1), load_metrics(p2), cfg, exact=True)
        return tuple(moved)
    return ()


# --------------------------------------------------------------------------------------------
# Workspaces and runs
# --------------------------------------------------------------------------------------------


def _git(args: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=dict(env) if env else None)
    if proc.returncode != 0:
        raise ReproCheckError(f"git {' '.join(args)} in {cwd} failed: {proc.stderr.strip()}")
    return proc.stdout


def prepare_workspace(source: Path, dest: Path, *, from_head: bool) -> Path:
    """Fill `dest` with the repository at `source`, tiny params, a fresh git repo and an empty DVC cache.

    from_head=False copies the working tree (tracked files as they are on disk plus untracked files
    git does not ignore: uncommitted edits are checked); True takes the committed tree of HEAD.
    Git-ignored paths (DVC outputs, .venv, .dvc/cache, mlflow.db) never travel.
    """
    if not (source / ".git").exists():
        raise ReproCheckError(f"{source} is not a git repository; the check copies what git tracks. "
                              "Run it from the repository root (or pass --source)")
    dest.mkdir(parents=True, exist_ok=True)
    if from_head:
        with tempfile.TemporaryFile() as tar:
            proc = subprocess.run(["git", "-c", f"safe.directory={source}", "archive", "--format=tar", "HEAD"],
                                  cwd=source, stdout=tar, stderr=subprocess.PIPE, text=False)
            if proc.returncode != 0:
                raise ReproCheckError(f"git archive HEAD in {source} failed: {proc.stderr.decode().strip()} "
                                      "(--from-head needs at least one commit)")
            tar.seek(0)
            with tarfile.open(fileobj=tar) as archive:
                archive.extractall(dest, filter="data")
    else:
        # safe.directory: CI may run as root on a checkout another user owns; we only read it
        listing = _git(["-c", f"safe.directory={source}", "ls-files", "-z", "--cached", "--others",
                        "--exclude-standard"], source)
        for rel in sorted(filter(None, listing.split("\0"))):
            src = source / rel
            if not src.is_file() and not src.is_symlink():
                continue  # deleted in the working tree but not yet in the index: it is gone
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)
    params_path = dest / PARAMS_FILE
    params = yaml.safe_load(params_path.read_text())
    params_path.write_text(yaml.safe_dump(tiny_params(params), sort_keys=False))
    env = {**os.environ, **_GIT_ENV}
    _git(["init", "-q"], dest, env)
    _git(["add", "-A"], dest, env)
    _git(["commit", "-q", "--no-gpg-sign", "--no-verify", "-m", "repro-check workspace"], dest, env)
    # Pin the cache inside the workspace even if .dvc/config points at a shared cache: from clean.
    _dvc(["config", "--local", "cache.dir", str(dest / ".dvc" / "cache")], dest, run_env(dest))
    return dest


def run_env(workspace: Path) -> dict[str, str]:
    """Environment for a workspace's `dvc repro`: this Python's venv first, MLflow and Ultralytics local."""
    env = dict(os.environ)
    env.pop("PIPELINE_RUN_ID", None)  # each run its own pipeline id
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `python` in dvc.yaml
        # never into the user's (or the team's) tracking server: tiny runs are not results
        MLFLOW_TRACKING_URI=f"sqlite:///{workspace / 'mlflow.db'}",
        YOLO_CONFIG_DIR=str(workspace / ".yolo-config"),
        YOLO_OFFLINE="1",
    )
    return env


def _dvc(args: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=dict(env), capture_output=True, text=True)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-6000:]
        raise ReproCheckError(f"`dvc {' '.join(args)}` failed in {cwd} (exit {proc.returncode}); "
                              f"the pipeline itself is broken, not irreproducible. Last output:\n{out}")
    return proc.stdout + proc.stderr


def run_repro(workspace: Path, stages: Sequence[str]) -> float:
    """`dvc repro [stages]` from clean in `workspace`, then a clean `dvc status`; returns seconds taken."""
    env = run_env(workspace)
    start = time.monotonic()
    _dvc(["repro", "--no-run-cache", *stages], workspace, env)
    seconds = time.monotonic() - start
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--quiet", *stages], cwd=workspace, env=env,
                            capture_output=True, text=True)
    if status.returncode != 0:
        verbose = _dvc(["status", *stages], workspace, env)
        raise ReproCheckError(f"`dvc status` in {workspace} is not clean right after `dvc repro`: a stage writes "
                              f"or changes something dvc.yaml does not declare. dvc status says:\n{verbose}")
    return seconds


def check(source: Path, workdir: Path, cfg: ReproCheckParams, *, stages: Sequence[str] = (),
          from_head: bool = False, log: Callable[..., None] = print) -> CheckResult:
    """Two workspaces from `source` under `workdir`, `dvc repro` in each, their outputs compared."""
    runs = []
    for i in (1, 2):
        ws = prepare_workspace(source, workdir / f"run{i}", from_head=from_head)
        log(f"repro-check: run {i}: dvc repro {' '.join(stages) or '(all stages)'} in {ws}", flush=True)
        log(f"repro-check: run {i} took {run_repro(ws, stages):.0f} s", flush=True)
        runs.append(ws)
    result = compare_runs(runs[0], runs[1], cfg)
    result.ran_on = ran_on(runs[0] / PARAMS_FILE)
    return result


def ran_on(params_path: Path) -> str:
    """Where the check's training ran: `train.device` and this machine's CPU model and SIMD level.

    Training is bit-reproducible per CPU type on the CPU; on a GPU cuDNN kernels are not
    bit-exact (docs/reproducibility.md), so a check is only as wide as the device it ran on.
    """
    device = "cpu"
    try:
        device = str((yaml.safe_load(params_path.read_text()) or {}).get("train", {}).get("device", "cpu"))
    except (OSError, yaml.YAMLError):
        pass
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    simd = ", ".join(f for f in ("avx512_vnni", "avx2") if f in flags) or "no AVX2"
    return f"train.device={device}, {model} ({simd})"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.tools.repro_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="+", default=[], metavar="STAGE",
                    help="run `dvc repro STAGE...` (and what they depend on) instead of the whole pipeline")
    ap.add_argument("--source", type=Path, default=None, help="repository to check (default: this one)")
    ap.add_argument("--from-head", action="store_true",
                    help="check the committed tree (HEAD) instead of the working tree with its uncommitted edits")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="put the two workspaces here and keep them (default: a temp dir, removed afterwards)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("RUN1", "RUN2"),
                    help="only compare two workspaces that already ran `dvc repro`")
    ap.add_argument("--params", type=Path, default=None,
                    help="params file with the repro_check section (default: SOURCE/params.yaml)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; print the report; return the exit status (0 same, 1 different, 2 error)."""
    args = parse_args(argv)
    source = (args.source or repo_root()).resolve()
    try:
        cfg = load_params("repro_check", ReproCheckParams, args.params or source / PARAMS_FILE)
        if args.compare:
            result = compare_runs(args.compare[0], args.compare[1], cfg)
        elif args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            if any(args.workdir.iterdir()):
                raise ReproCheckError(f"--workdir {args.workdir} is not empty; runs must start from clean: "
                                      "give a new or empty folder")
            result = check(source, args.workdir.resolve(), cfg, stages=args.stages, from_head=args.from_head)
        else:
            with tempfile.TemporaryDirectory(prefix="repro-check-") as tmp:
                result = check(source, Path(tmp), cfg, stages=args.stages, from_head=args.from_head)
    except (ReproCheckError, ValueError) as e:
        print(f"repro-check: ERROR: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(result.render())
    return EXIT_OK if result.ok else EXIT_DIFFERENT


if __name__ == "__main__":
    sys.exit(main())
