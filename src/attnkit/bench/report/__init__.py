"""Reports of a run directory: ``report.md`` (tables) and a self-contained ``report.html``
(tables + plots), one section per task as its ``Task.section`` declares.

- ``document``: ``build`` / ``write`` / ``summary_json``, the order of sections;
- ``layouts``: the layouts a section names (``table``, ``retrieval``, ``fidelity``,
  ``speed``, ``kv_decode``) and the figures each draws;
- ``aggregate``: grouping rows, means, labels, number formats;
- ``page``: the page model and its Markdown / HTML rendering (escaping);
- ``fidelity``, ``pareto``, ``retrieval``, ``speed``: the layouts and analyses;
- ``kvbytes``: KV-cache accuracy against the bytes held; ``timing``: timing noise;
- ``multiples``: line figures, small multiples beyond a few methods;
- ``style``: decade ticks on log axes, one colour per method, complete legends;
- ``svg``: figures as SVG files.
"""

from __future__ import annotations

from .document import build, summary_json, write
from .fidelity import baseline_error_at, equal_density_comparison, fidelity_points
from .pareto import pareto_points
from .svg import figure_slug, write_svgs

__all__ = [
    "baseline_error_at",
    "build",
    "equal_density_comparison",
    "fidelity_points",
    "figure_slug",
    "pareto_points",
    "summary_json",
    "write",
    "write_svgs",
]
