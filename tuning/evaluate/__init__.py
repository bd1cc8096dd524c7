"""Scoring a trained run: metrics with CIs, slices, calibration, a run folder's files
(`run_layout`), predicting on photos and labelled eval sets."""
