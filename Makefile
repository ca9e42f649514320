# The two entry points a newcomer needs (README, first screen): `make run` and `make test`.
# Both install what they need first (scripts/bootstrap.sh is idempotent).
SHELL := /bin/bash
export YOLO_OFFLINE := 1
VENV := .venv/bin

.PHONY: run test test-fast lint bootstrap repro deploy-local report repro-check experiments

bootstrap:
	scripts/bootstrap.sh

## Main job on the embedded defaults: synthetic data -> ... -> INT8 -> report (dvc repro), then a deploy
## to the `local` device group (this machine, no SSH) with an on-device benchmark, whose result the
## report then folds in (`dvc repro` re-runs only `report`); everything in ./mlflow.db.
run: bootstrap repro deploy-local report

## The report with the latest device results folded in; ends with its headline table and where the
## report, its plots and the MLflow UI are. The stage's own output is not shown here (it would print
## the table a second time, and an up-to-date stage prints nothing); errors still reach stderr.
## `dvc metrics show` has the dozen headline numbers too.
report:
	source $(VENV)/activate && dvc repro --quiet report >/dev/null
	@source $(VENV)/activate && python -c 'import sys; from pipeline.stages.report import print_headline; sys.exit(print_headline())'

repro:
	source $(VENV)/activate && dvc repro

deploy-local:
	source $(VENV)/activate && fab deploy --group local

## Lint: ruff over the repository (config in pyproject.toml), and vermin: the device runtime must
## not need more than Python 3.8 (JetPack 5). Either failing fails `make test`.
lint: bootstrap
	source $(VENV)/activate && ruff check .
	source $(VENV)/activate && vermin --target=3.8- --violations --eval-annotations --no-tips -q runtime/edge_runtime

## Every test, including the slow end-to-end `dvc repro` and the real-sshd fleet tests; lint first.
test:
	scripts/bootstrap.sh --with-sshd --with-browser --with-mqtt
	$(MAKE) --no-print-directory lint
	source $(VENV)/activate && python -m pytest

## Unit tests only (no training, no sshd, no MLflow server or browser).
test-fast: bootstrap
	source $(VENV)/activate && python -m pytest -m "not slow and not ssh and not gpu and not server"

## Reproducibility check: `dvc repro` twice from clean on tiny params in two temp workspaces (the
## working tree, uncommitted edits included), dvc.lock hashes and metrics compared by the rules in
## params.yaml `repro_check` (docs/reproducibility.md). Non-zero exit on a difference.
## REPRO_CHECK_ARGS passes options, e.g. `make repro-check REPRO_CHECK_ARGS="--stages data --from-head"`.
repro-check: bootstrap
	source $(VENV)/activate && python -m pipeline.tools.repro_check $(REPRO_CHECK_ARGS)

## DVC experiments side by side, narrow enough for a terminal: only the params and metrics that
## differ between them (dependency hashes dropped). `dvc exp run -S train.epochs=30` makes one.
experiments: bootstrap
	source $(VENV)/activate && dvc exp show --only-changed --drop '/' --no-pager
