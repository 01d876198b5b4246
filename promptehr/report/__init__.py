"""The quality report on generated patients, a module per group of figures: `fidelity`, `validity`,
`privacy`, `utility` (with `stats` they share), `quality` (generates the cohorts, gathers the figures,
logs them), `plots`. Validation metrics of the training loop live in `promptehr.metrics`."""

from promptehr.report.plots import plot_report
from promptehr.report.quality import log_quality_report, quality_report, run_quality_report

__all__ = ["log_quality_report", "plot_report", "quality_report", "run_quality_report"]
