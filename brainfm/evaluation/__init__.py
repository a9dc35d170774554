"""Anomaly-detection metrics and reports."""
