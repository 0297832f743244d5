"""The report's "best method per family" table (issue 17), on hand-made rows."""

from __future__ import annotations

from attnkit.bench import report
from attnkit.bench.report.best import best_by_family
from attnkit.bench.store import Row, Store


def _row(label: str, score: float, depth: float, length: int = 4096, cache: str = "", budget: str = "",
         **metrics: float) -> Row:
    method = "full" if cache else label.split("(")[0]
    return Row(model="m", task="niah", variant="niah_single_2", method=method, config="{}",
               label=f"{cache}@{budget}" if cache else label, length=length, depth=depth, sample=0, score=score,
               metrics={"score": score, **metrics}, cache=cache, budget=budget)


def _rows() -> list[Row]:
    rows = []
    for depth, full_ok in ((0.1, 1.0), (0.5, 1.0), (0.9, 0.0)):  # full fails the last case
        rows.append(_row("full", full_ok, depth, generate_seconds=10.0))
        # static: streaming loses one solved case; dynamic: two tie, block_topk is faster
        rows.append(_row("streaming", 1.0 if depth != 0.5 else 0.0, depth, generate_seconds=3.0))
        rows.append(_row("vertical_slash", 1.0, depth, generate_seconds=6.0))
        rows.append(_row("block_topk", 1.0 if depth != 0.9 else 0.0, depth, generate_seconds=5.0))
        for cache, held, acc in (("snapkv", 250, 1.0), ("tova", 200, 1.0), ("tokenselect", 1020, 1.0),
                                 ("quest", 100, 0.0)):
            rows.append(_row("", acc, depth, cache=cache, budget="25%", kv_bytes=held, kv_full_bytes=1000))
    rows.append(_row("moba", 1.0, 0.1, generate_seconds=1.0))  # one solved case only: not compared
    return rows


def test_best_per_family_on_the_cases_full_solves():
    best = {(e["family"], e["budget"]): e for e in best_by_family(_rows())}
    assert best[("dynamic_sparse", "")]["label"] == "block_topk"  # ties vertical_slash where full solves; faster
    assert best[("dynamic_sparse", "")]["accuracy"] == 1.0 and best[("dynamic_sparse", "")]["cases"] == 2
    assert best[("dynamic_sparse", "")]["candidates"] == 2  # moba measured one of the two cases
    assert best[("static_sparse", "")]["label"] == "streaming" and best[("static_sparse", "")]["accuracy"] == 0.5
    kv = best[("kv_cache", "25%")]
    assert kv["label"] == "tova@25%" and kv["kv_share"] == 0.2  # tokenselect holds 102%: never best


def test_best_section_in_the_report(tmp_path):
    with Store(tmp_path) as store:
        store.start_run({"model": "m"}, command="attnkit bench")
        for r in _rows():
            store.add(r)
    md = report.build(tmp_path).markdown()
    assert "## Best method per family" in md
    assert "| dynamic_sparse | - | 4096 | block_topk | 1 | 5 s | 2 | 2 |" in md
    assert "| kv_cache | 25% | 4096 | tova@25% | 1 | 1.91e-04 MiB (20% of full) | 2 | 3 |" in md
