"""How gendertune runs: the command line, stage configs, atomic outputs and the Ray runtime.

The stage packages (data_prep, models, tuning) hold the work; this package holds what every
stage shares about *running* it, on one machine or on a Ray cluster.
"""
