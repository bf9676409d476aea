"""Evaluation: CTR metrics, metric writers for the workdir, progress logging, plots."""
