#!/usr/bin/env bash
# Create .venv and install the project with everything the pipeline and the tests need.
# Idempotent: re-runs are quick when pyproject.toml has not changed (stamp file in .venv).
# Usage: scripts/bootstrap.sh [--with-sshd] [--with-browser] [--with-mqtt]
#   --with-sshd     also installs the OpenSSH server the fleet tests start as simulated devices, and
#                   ethtool, with which benchmarks/fleet.py moves the links' packet processing out of
#                   the simulated devices' CPU quotas
#   --with-browser  also installs Debian's Chromium + chromedriver, which the MLflow UI test drives
#                   headless (a browser download by Playwright/Selenium cannot work offline)
#   --with-mqtt     also installs Debian's mosquitto, the MQTT broker the runtime's MQTT publisher tests start
# System packages are installed only when missing (apt-get as root, else via sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_SSHD=0
WITH_BROWSER=0
WITH_MQTT=0
for arg in "$@"; do
  case "$arg" in
    --with-sshd) WITH_SSHD=1 ;;
    --with-browser) WITH_BROWSER=1 ;;
    --with-mqtt) WITH_MQTT=1 ;;
    *) echo "bootstrap: unknown option '$arg' (options: --with-sshd, --with-browser, --with-mqtt)" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "bootstrap: Python 3.11 is required (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

apt_packages=()
if [[ $WITH_SSHD -eq 1 ]] && ! command -v sshd >/dev/null 2>&1 && [[ ! -x /usr/sbin/sshd ]]; then
  echo "bootstrap: will install openssh-server (fleet tests run real sshd test hosts)"
  apt_packages+=(openssh-server openssh-client)
fi
optional_packages=()  # a failed install of these is a warning: what needs them says so when they are missing
if [[ $WITH_SSHD -eq 1 ]] && ! command -v ethtool >/dev/null 2>&1 && [[ ! -x /usr/sbin/ethtool ]]; then
  echo "bootstrap: will install ethtool (the fleet benchmark's shaped links: threaded NAPI)"
  optional_packages+=(ethtool)
fi
if [[ $WITH_BROWSER -eq 1 ]] && { ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; }; then
  echo "bootstrap: will install chromium + chromium-driver (the MLflow UI test drives headless Chromium)"
  apt_packages+=(chromium chromium-driver)
fi
if [[ $WITH_MQTT -eq 1 ]] && ! command -v mosquitto >/dev/null 2>&1 && [[ ! -x /usr/sbin/mosquitto ]]; then
  echo "bootstrap: will install mosquitto (the MQTT publisher tests run a real broker on 127.0.0.1)"
  apt_packages+=(mosquitto)
fi
if [[ ${#apt_packages[@]} -gt 0 || ${#optional_packages[@]} -gt 0 ]]; then
  if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq || [[ ${#apt_packages[@]} -eq 0 ]]
fi
if [[ ${#apt_packages[@]} -gt 0 ]]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi
if [[ ${#optional_packages[@]} -gt 0 ]]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${optional_packages[@]}" >/dev/null ||
    echo "bootstrap: could not install ${optional_packages[*]}; continuing without" >&2
fi

[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
stamp=.venv/.bootstrap-$(cat pyproject.toml runtime/pyproject.toml | sha256sum | cut -c1-16)
if [[ ! -f "$stamp" ]]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch/torchvision are pinned in pyproject.toml to the CPU-capable builds this machine
  # class has on disk; a newer torch would be a multi-GB download.
  # The device runtime first-class beside the workstation package, which depends on it.
  .venv/bin/python -m pip install -q -e ./runtime -e '.[test,lint]'
  rm -f .venv/.bootstrap-*
  touch "$stamp"
fi
echo "bootstrap: .venv ready ($(.venv/bin/python -c 'import torch, ultralytics, onnxruntime, mlflow, dvc.version as d; print(f"torch {torch.__version__}, ultralytics {ultralytics.__version__}, onnxruntime {onnxruntime.__version__}, mlflow {mlflow.__version__}, dvc {d.__version__}")'))"
