"""Anomaly-detection metrics and reports."""

from brainfm.evaluation.metrics import MetricAccumulator, dice, size_bin, size_bin_names
from brainfm.evaluation.report import protocol_lines, render_markdown, write_report

__all__ = [
    "MetricAccumulator",
    "dice",
    "protocol_lines",
    "render_markdown",
    "size_bin",
    "size_bin_names",
    "write_report",
]
