"""Per-layer win rate against streaming at equal density, and the held-out choice of
settings across models (issue 17), on hand-made fidelity rows."""

from __future__ import annotations

import json

import pytest

from attnkit.bench import report
from attnkit.bench.report.winrate import held_out, layer_verdicts, win_rates
from attnkit.bench.store import Row, Store

WINDOWS = ((0.05, 0.5), (0.2, 0.2), (0.8, 0.05))  # streaming: (density, rel. error) on every layer


def _row(model: str, layer: int, label: str, density: float, error: float, created: float) -> Row:
    return Row(model=model, task="fidelity", variant=f"layer{layer}", method=label.split("(")[0], config=json.dumps({"l": label}),
               label=label, length=4096, depth=None, sample=0, score=error,
               metrics={"rel_error": error, "density": density}, created=created)


def _rows() -> list[Row]:
    rows, t = [], 0.0
    for model, layers in (("tune-model", (0, 1, 2, 3)), ("other-model", (5, 11))):
        for layer in layers:
            t += 1
            rows += [_row(model, layer, f"streaming(window={i})", d, e, t) for i, (d, e) in enumerate(WINDOWS)]
            rows.append(_row(model, layer, "full", 1.0, 0.0, t))
            # at density 0.2 streaming's error is 0.2 on every layer
            rows.append(_row(model, layer, "vs", 0.2, 0.1 if layer != 3 else 0.3, t))  # default: wins 3/4 on tune
            rows.append(_row(model, layer, "vs(k=8)", 0.2, 0.15, t))  # wins 4/4 on tune
            rows.append(_row(model, layer, "vs(k=9999)", 1.0, 0.0, t))  # dense: never compared
            rows.append(_row(model, layer, "vs(k=1)", 0.01, 0.9, t))  # below the windows measured: not compared
            if model == "other-model":
                rows[-3].metrics["rel_error"] = 0.25 if layer == 5 else 0.1  # the tuned choice wins 1/2 held out
    return rows


def test_layer_verdicts_compare_each_layer_at_the_settings_density():
    verdicts = layer_verdicts(_rows())
    assert {v["label"] for v in verdicts} == {"vs", "vs(k=8)"}  # dense and out-of-range settings left out
    one = next(v for v in verdicts if v["label"] == "vs" and v["layer"] == "layer3")
    assert one["baseline_error"] == pytest.approx(0.2) and not one["better"]


def test_win_rates_per_model_and_setting():
    rates = {(x["model"], x["label"]): x for x in win_rates(_rows())}
    assert rates[("tune-model", "vs")]["wins"] == 3 and rates[("tune-model", "vs")]["layers"] == 4
    assert rates[("tune-model", "vs(k=8)")]["rate"] == 1.0
    assert rates[("tune-model", "vs")]["median_ratio"] == pytest.approx(0.5)
    assert rates[("other-model", "vs(k=8)")]["wins"] == 1


def test_held_out_reports_the_setting_tuned_on_the_first_model_on_the_other():
    held = {x["role"]: x for x in held_out(_rows())}
    assert held["tuned"]["label"] == "vs(k=8)" and held["tuned"]["tune_model"] == "tune-model"
    assert held["tuned"]["model"] == "other-model" and held["tuned"]["held_out"]["rate"] == 0.5
    assert held["default"]["label"] == "vs" and held["default"]["held_out"]["rate"] == 1.0


def test_report_shows_both_tables(tmp_path):
    with Store(tmp_path) as store:
        store.start_run({"model": "tune-model"}, command="attnkit bench")
        for r in _rows():
            store.add(r)
    md = report.build(tmp_path).markdown()
    assert "Per-layer win rate against streaming at equal density" in md
    assert "| tune-model | vs(k=8) | 4096 | 4 | 4 | 100% | 0.75 |" in md
    assert "Chosen on one model, reported on another (held out)" in md
    assert "| vs | vs(k=8) | tuned | tune-model: 4/4 (100%), median ratio 0.75 | other-model: 1/2 (50%)" in md
    assert "**tune-model**" in md and "**other-model**" in md  # one fidelity table per model
