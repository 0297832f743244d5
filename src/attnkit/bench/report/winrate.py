"""Defaults that generalise: each sparse setting's per-layer win rate against the static
baseline (``streaming``) at equal density, and settings chosen on one model's layers
reported on another's (issue 17).

Per (model, setting, length, layer): the setting's relative error next to the baseline's
error at the same density *on that layer* (log-linear interpolation between the baseline
windows measured there; a layer where the setting's density lies outside them is not
compared). A win is a lower error. The win rate of a setting is wins / layers compared;
``median ratio`` is the median over layers of its error / the baseline's.

Held out: with rows of two or more models, each method's setting with the best win rate
on the *tuning* model (the first model measured; ties: lower median ratio; only settings
compared on at least half as many layers as the method's best-covered one) is reported on
the other models next to the method's default (the setting labelled by the bare method
name). A setting tuned on one model that still wins on the other generalises.
"""

from __future__ import annotations

import statistics
from typing import Any, Optional

from ..store import Row
from .aggregate import fmt, group
from .fidelity import BASELINE, baseline_error_at, dense
from .page import Report, Table

MIN_SHARE = 0.5  # a tuned choice must be compared on at least this share of the layers its method's best-covered setting was


def layer_verdicts(rows: list[Row]) -> list[dict[str, Any]]:
    """One dict per (model, label, length, layer) of a sparse setting with a baseline
    error at its density on that layer (see the module docstring)."""
    out = []
    by_layer = group([r for r in rows if r.metrics.get("density") is not None and r.metrics.get("rel_error") is not None],
                     lambda r: (r.model, r.length, r.variant))
    for (model, length, layer), rs in by_layer.items():
        points = [{"method": r.method, "length": length, "density": r.metrics["density"],
                   "rel_error": r.metrics["rel_error"]} for r in rs]
        for r in rs:
            if r.method in (BASELINE, "full") or dense(r.metrics):
                continue
            ref = baseline_error_at(points, length, r.metrics["density"])
            if ref is not None:
                out.append({"model": model, "method": r.method, "label": r.label, "length": length, "layer": layer,
                            "rel_error": r.metrics["rel_error"], "baseline_error": ref,
                            "better": r.metrics["rel_error"] < ref})
    return out


def win_rates(rows: list[Row]) -> list[dict[str, Any]]:
    """Per (model, label, length): layers compared, wins, win rate, median error ratio."""
    out = []
    for (model, method, label, length), vs in group(layer_verdicts(rows),
                                                    lambda v: (v["model"], v["method"], v["label"], v["length"])).items():
        wins = sum(v["better"] for v in vs)
        ratios = [v["rel_error"] / v["baseline_error"] for v in vs if v["baseline_error"] > 0]
        out.append({"model": model, "method": method, "label": label, "length": length, "layers": len(vs),
                    "wins": wins, "rate": wins / len(vs), "median_ratio": statistics.median(ratios) if ratios else None})
    return out


def _models_in_order(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(r.model for r in sorted(rows, key=lambda r: r.created)))


def _pooled(rates: list[dict[str, Any]], model: str, label: str) -> Optional[dict[str, Any]]:
    """A setting's rate on ``model`` pooled over its lengths (layers x lengths compared)."""
    own = [x for x in rates if x["model"] == model and x["label"] == label]
    if not own:
        return None
    layers = sum(x["layers"] for x in own)
    ratios = [x["median_ratio"] for x in own if x["median_ratio"] is not None]
    return {"layers": layers, "wins": sum(x["wins"] for x in own), "rate": sum(x["wins"] for x in own) / layers,
            "median_ratio": statistics.median(ratios) if ratios else None}


def held_out(rows: list[Row]) -> list[dict[str, Any]]:
    """Per method: the default's and the tuned setting's pooled rates on the tuning model
    and on each held-out model (see the module docstring); empty with one model."""
    models = _models_in_order(rows)
    if len(models) < 2:
        return []
    rates = win_rates(rows)
    tune, others = models[0], models[1:]
    out = []
    for method, rs in sorted(group([x for x in rates if x["model"] == tune], lambda x: x["method"]).items()):
        pooled = {label: _pooled(rates, tune, label) for label in dict.fromkeys(x["label"] for x in rs)}
        most = max(p["layers"] for p in pooled.values())
        # a setting compared on few layers (its density mostly outside the baseline's) is not a choice
        eligible = [label for label, p in pooled.items() if p["layers"] >= MIN_SHARE * most]
        tuned = max(eligible, key=lambda label: (pooled[label]["rate"], -(pooled[label]["median_ratio"] or 0.0)))
        for other in others:
            for role, label in (("default", method), ("tuned", tuned)):
                on_tune, on_other = pooled.get(label) or _pooled(rates, tune, label), _pooled(rates, other, label)
                out.append({"method": method, "role": role, "label": label, "tune_model": tune, "model": other,
                            "tune": on_tune, "held_out": on_other})
    return out


def _rate_text(p: Optional[dict[str, Any]]) -> str:
    if p is None:
        return "not compared (dense, or its density outside the baseline's)"
    return f"{p['wins']}/{p['layers']} ({100 * p['rate']:.0f}%), median ratio {fmt(p['median_ratio'])}"


def winrate_tables(rep: Report, rows: list[Row]) -> None:
    """The per-layer win-rate table and, with two or more models, the held-out table."""
    rates = win_rates(rows)
    if not rates:
        return
    t = Table(f"Per-layer win rate against {BASELINE} at equal density",
              ["model", "setting", "length", "layers compared", "wins", "win rate", "median error ratio"],
              note=f"On each layer separately: the setting's error vs {BASELINE}'s interpolated at the setting's "
                   "density on that layer; ratio < 1 is a win. Dense settings (>= 0.999) are not compared.")
    for x in sorted(rates, key=lambda x: (x["model"], x["method"], x["label"], x["length"])):
        t.add(x["model"], x["label"], x["length"], x["layers"], x["wins"], f"{100 * x['rate']:.0f}%",
              fmt(x["median_ratio"]))
    rep.table(t)
    held = held_out(rows)
    if held:
        t = Table("Chosen on one model, reported on another (held out)",
                  ["method", "setting", "which", "tuning model: win rate", "held-out model: win rate"],
                  note=f"'tuned': the method's setting with the best win rate on {held[0]['tune_model']} (every "
                       "layer and length measured there); 'default': the method's default. Only the held-out "
                       "column says whether the choice generalises.")
        for x in held:
            t.add(x["method"], x["label"], x["role"], f"{x['tune_model']}: {_rate_text(x['tune'])}",
                  f"{x['model']}: {_rate_text(x['held_out'])}")
        rep.table(t)
