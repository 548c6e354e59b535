"""Evaluation: metrics computed over a split, returned as plain dicts for results.json."""
