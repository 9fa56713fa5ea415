"""Reproducible experiments: each a function that trains, measures and returns a run."""
