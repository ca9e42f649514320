#!/usr/bin/env bash
# Create .venv and install the project with everything the pipeline and the tests need.
# Idempotent: re-runs are quick when pyproject.toml has not changed (stamp file in .venv).
# Usage: scripts/bootstrap.sh [--with-sshd]   (--with-sshd also installs the OpenSSH server
# the fleet tests start as simulated devices)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "bootstrap: Python 3.11 is required (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

if [[ "${1:-}" == "--with-sshd" ]] && ! command -v sshd >/dev/null 2>&1 && [[ ! -x /usr/sbin/sshd ]]; then
  echo "bootstrap: installing openssh-server (fleet tests run real sshd test hosts)"
  if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openssh-server openssh-client >/dev/null
fi

[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
stamp=.venv/.bootstrap-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f "$stamp" ]]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch/torchvision are pinned in pyproject.toml to the CPU-capable builds this machine
  # class has on disk; a newer torch would be a multi-GB download.
  .venv/bin/python -m pip install -q -e '.[test]'
  rm -f .venv/.bootstrap-*
  touch "$stamp"
fi
echo "bootstrap: .venv ready ($(.venv/bin/python -c 'import torch, ultralytics, onnxruntime, mlflow, dvc.version as d; print(f"torch {torch.__version__}, ultralytics {ultralytics.__version__}, onnxruntime {onnxruntime.__version__}, mlflow {mlflow.__version__}, dvc {d.__version__}")'))"
