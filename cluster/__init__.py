"""Running on one machine or a Ray cluster: the Ray runtime, a bounded Ray-task runner, atomic
and shared storage (local paths and object-store URIs), MLflow tracking, job submission and the
cluster manifests.

The stage packages (data_prep, models, tuning) hold the work; this package holds what every
stage shares about *running* it. The command line is `gendertune.cli`.
"""
