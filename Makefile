# The two entry points a newcomer needs (see README): `make run` and `make test`.
# Both install what they need first (scripts/bootstrap.sh is idempotent).
SHELL := /bin/bash
export YOLO_OFFLINE := 1
VENV := .venv/bin

.PHONY: run test test-fast bootstrap repro deploy-local report repro-check

bootstrap:
	scripts/bootstrap.sh

## Main job on the embedded defaults: synthetic data -> ... -> INT8 -> report (dvc repro), then a deploy
## to the `local` device group (this machine, no SSH) with an on-device benchmark, whose result the
## report then folds in (`dvc repro` re-runs only `report`); everything in ./mlflow.db.
run: bootstrap repro deploy-local report

report:
	source $(VENV)/activate && dvc repro report
	@echo "Report: reports/report.md (plots in reports/plots/); MLflow: mlflow ui --backend-store-uri sqlite:///mlflow.db"

repro:
	source $(VENV)/activate && dvc repro
	source $(VENV)/activate && dvc metrics show

deploy-local:
	source $(VENV)/activate && fab deploy --group local

## Every test, including the slow end-to-end `dvc repro` and the real-sshd fleet tests.
test:
	scripts/bootstrap.sh --with-sshd --with-browser
	source $(VENV)/activate && python -m pytest

## Unit tests only (no training, no sshd, no MLflow server or browser).
test-fast: bootstrap
	source $(VENV)/activate && python -m pytest -m "not slow and not ssh and not gpu and not server"

## Reproducibility check: `dvc repro` twice from clean on tiny params in two temp workspaces (the
## working tree, uncommitted edits included), dvc.lock hashes and metrics compared by the rules in
## params.yaml `repro_check` (README, "How reproducibility is checked"). Non-zero exit on a difference.
## REPRO_CHECK_ARGS passes options, e.g. `make repro-check REPRO_CHECK_ARGS="--stages data --from-head"`.
repro-check: bootstrap
	source $(VENV)/activate && python -m pipeline.tools.repro_check $(REPRO_CHECK_ARGS)
