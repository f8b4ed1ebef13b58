"""Tracking: MLflow runs, the comparison report, its pictures and HTML page."""
