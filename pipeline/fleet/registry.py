"""MLflow model registry for deploys: a version per model sha256, an alias per device group.

After a `fab deploy --group G` in which every host of G went live, the registered model
`edge-defect-detector` (one for the fleet, whatever the variant: the aliases then answer "what
does group G run" in one place) gets:
- one version per distinct model file (tag `model_sha256`), created once and reused by every
  later deploy of the same bytes; its source is the file the producing pipeline run (quantize or
  export) logged, so the registry links to that run and its lineage;
- the alias `G` (e.g. `pis`, `jetsons`) moved to the version the group now runs.

A deploy that left some host of the group on its old release moves no alias: the group is then
mixed, and the alias keeps naming what the group last ran as a whole. A staged rollout that
stopped moves none either; the rerun that completes it does (hosts already on the release count). `--host` deploys and
dry runs move none either. Groups whose hosts run different files (mixed runtimes) get one alias
per runtime and precision: `G-tensorrt-fp16`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.fleet.inventory import Host
from pipeline.fleet.results import HostResult

REGISTERED_MODEL = "edge-defect-detector"


def alias_name(text: str) -> str:
    """An MLflow-legal alias (letters, digits, `_`, `-`) from a group name."""
    return re.sub(r"[^A-Za-z0-9_\-]", "-", text)


def group_aliases(results: Sequence[HostResult], hosts: Mapping[str, Host], group: str
                  ) -> tuple[dict[str, tuple[str, HostResult]], str]:
    """Which alias points at which model sha after a deploy of `group`, or why none moves.

    Returns ({alias: (model_sha256, a result that deployed it)}, reason-if-empty).
    """
    mine = [r for r in results if r.group == group]
    if not mine:
        return {}, f"no host of group '{group}' in this deploy"
    failed = [r.host for r in mine if not r.ok]
    if failed:
        return {}, f"not moved: {len(failed)} host(s) of '{group}' did not go live ({', '.join(failed)})"
    shas = {r.details.get("model_sha256", "") for r in mine}
    if "" in shas:
        return {}, "not moved: a host reported no model sha256"
    if len(shas) == 1:
        return {alias_name(group): (mine[0].details["model_sha256"], mine[0])}, ""
    out: dict[str, tuple[str, HostResult]] = {}
    for r in mine:
        h = hosts[r.host]
        alias = alias_name(f"{group}-{h.runtime}-{h.precision}")
        if alias in out and out[alias][0] != r.details["model_sha256"]:
            return {}, f"not moved: hosts of '{group}' with runtime {h.runtime}/{h.precision} run different models"
        out[alias] = (r.details["model_sha256"], r)
    return out, ""


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Detector versions deployed by `fab deploy`; "
                                                         "aliases name what each device group runs.")


def _artifact_folder_with(client: Any, run_id: str, file_name: str) -> str:
    """The artifact folder of `run_id` that holds `file_name` (quantize: models/int8/...), or ''.

    A version's source is a folder, not a file: `models:/NAME@alias` downloads a folder.
    """
    pending = [""]
    while pending:
        folder = pending.pop(0)
        for entry in client.list_artifacts(run_id, folder or None):
            if entry.is_dir and entry.path.count("/") < 2:
                pending.append(entry.path)
            elif Path(entry.path).name == file_name and folder:
                return folder
    return ""


def _version_for(client: Any, name: str, sha: str, r: HostResult, deploy_run_id: str,
                 models_dir: Path) -> Any:
    """The registry version of this model sha256: the existing one, or a new one."""
    existing = client.search_model_versions(f"name = '{name}' and tags.model_sha256 = '{sha}'")
    if existing:
        return sorted(existing, key=lambda v: int(v.version))[0]
    lineage = r.details.get("lineage") or {}
    file_name = str(lineage.get("model_file", ""))
    producer = str(lineage.get("mlflow_run_id", ""))
    source, run_id = "", ""
    folder = _artifact_folder_with(client, producer, file_name) if producer and file_name else ""
    if folder:  # the producing stage logged this very file: the version links to that run
        source, run_id = f"{client.get_run(producer).info.artifact_uri}/{folder}", producer
    else:
        # No pipeline run logged it (a hand-copied model): keep the bytes with the deploy run.
        local = models_dir / file_name
        if not file_name or not local.is_file():
            raise FileNotFoundError(f"cannot register model sha256 {sha[:12]}: no pipeline run logged it and "
                                    f"{local} is missing; run `dvc repro` so quantize/export log their models")
        client.log_artifact(deploy_run_id, str(local), artifact_path=f"registry/{sha[:12]}")
        source = f"{client.get_run(deploy_run_id).info.artifact_uri}/registry/{sha[:12]}"
        run_id = deploy_run_id
    tags = {"model_sha256": sha, "model_file": file_name, "model": str(lineage.get("model", "")),
            "runtime_code": r.runtime,
            **{k: str(v) for k, v in lineage.items() if k.endswith("_sha256") or k in ("git_commit", "params_hash")}}
    return client.create_model_version(name, source, run_id=run_id or None, tags=tags,
                                       description=f"{file_name} (sha256 {sha[:12]})")


def register_deploy(client: Any, run: Any, hosts: Mapping[str, Host], deploy_run_id: str,
                    models_dir: Path) -> dict[str, str]:
    """Register the deployed models and move the group aliases; returns {alias: version or reason}.

    Only a whole-group, non-dry-run deploy moves aliases (see the module docstring).
    """
    group = run.options.get("group") or ""
    if run.command != "deploy" or run.options.get("dry_run") or not group or run.options.get("host"):
        return {}
    name = REGISTERED_MODEL
    if run.options.get("rollout_stopped"):  # hosts not reached still run the old model: the group is mixed
        return {alias_name(group): "not moved: the staged rollout stopped before every host went live"}
    aliases, reason = group_aliases(run.results, hosts, group)
    if not aliases:
        return {alias_name(group): reason}
    _ensure_registered_model(client, name)
    moved: dict[str, str] = {}
    for alias, (sha, r) in sorted(aliases.items()):
        version = _version_for(client, name, sha, r, deploy_run_id, models_dir)
        client.set_registered_model_alias(name, alias, version.version)
        client.set_model_version_tag(name, version.version, f"last_deploy_run.{alias}", deploy_run_id)
        moved[alias] = str(version.version)
    return moved
