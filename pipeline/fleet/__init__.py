"""Fleet deploys over SSH (Fabric): inventory, content-addressed pushes, remote steps, results.

A library of plain functions. `fabfile.py` holds only thin `@task` wrappers over `runner`.
Never imports torch, ultralytics or dvc (a deploy must start in a second); mlflow and onnx are
imported lazily inside the functions that need them.

Modules:
  inventory   load + validate inventory.yaml into frozen Host records
  connection  SSH connections with strict host-key checking; a local connection for `local` hosts
  remote      the stdlib helper run on the device (`python -c`), and the device CLI invocation
  artifacts   resolve the files each host gets and build its release manifest
  steps       one function per deploy step; each checks state before acting (safe to re-run);
              `activate` runs verify, engine, health, switch and bench in one SSH command
  runner      run steps on many hosts in parallel, collect per-host results, print the table
  mlflow_log  one MLflow run per fleet command, one nested run per device
  fab_cli     `fab`'s own parse errors (unknown task or option) exit 2 like other usage errors
"""
