"""The DVC stages, one module each. Module name = `dvc.yaml` stage = `params.yaml` section.

Each is runnable alone (`python -m pipeline.stages.<name>`) and through `dvc repro`. A stage never
imports another stage: what two stages share lives in the packages beside this one.
"""
