"""The benchmark with KV-cache settings: --cache / --budgets parsing and errors, result
keys and resuming, the report's KV sections, and a tiny run on SmolLM2."""

from __future__ import annotations

import io
import sqlite3

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from attnkit.bench import build, parse, report, runner
from attnkit.bench.cli_commands import add_commands
from attnkit.bench.store import Row, Store, row_key
from attnkit.bench.tasks import TASKS, Section, Task, register_task

KVPRESS_SNAPKV = 'snapkv(window=64,kernel=5,pooling="avg")'


# --- parsing --------------------------------------------------------------------------------


def test_parse_budgets_tokens_and_percentages():
    budgets = parse.parse_budgets("128, 256,1k,25%,12.5%,10%,128")
    assert [b.text for b in budgets] == ["128", "256", "1024", "25%", "12.5%", "10%"]  # duplicates dropped
    assert budgets[0].kvcache_kwargs == {"budget": 128}
    assert budgets[3].kvcache_kwargs == {"ratio": 0.75}  # keep 25% = kvpress compression_ratio 0.75
    assert budgets[5].kvcache_kwargs == {"ratio": 0.9}
    assert parse.parse_budgets([128, "25%"]) == parse.parse_budgets("128,25%")


@pytest.mark.parametrize("bad", ["0", "-5", "0%", "100%", "150%", "abc", "x%", 0.25, True, "1.5"])
def test_budget_errors_say_what_a_budget_is(bad):
    with pytest.raises(ValueError, match="budgets") as info:
        parse.parse_budgets([bad])
    assert "positive integer" in str(info.value) and "0% and 100%" in str(info.value)


def test_parse_caches_labels_round_trip():
    snap, tova, ada = parse.parse_caches(
        f'full, {KVPRESS_SNAPKV}, tova, adakv(scorer="snapkv",scorer_config={{"window":64,"kernel":5,"pooling":"avg"}})')
    assert snap.name == "snapkv" and snap.kwargs == {"window": 64, "kernel": 5, "pooling": "avg"}
    assert snap.label == 'snapkv(kernel=5,pooling="avg",window=64)'
    assert parse.parse_caches(snap.label) == [snap] and tova.label == "tova"
    assert ada.kwargs["scorer_config"] == {"window": 64, "kernel": 5, "pooling": "avg"}
    assert parse.parse_caches(ada.label) == [ada]
    assert parse.parse_caches([{"name": "snapkv", "window": 64, "kernel": 5, "pooling": "avg"}]) == [snap]
    assert parse.parse_caches("full") == []  # the baseline is always measured


@pytest.mark.parametrize(("text", "needles"), [
    ("snapkvv", ["unknown KV-cache policy 'snapkvv'", "Did you mean 'snapkv'", "tova", "quantized"]),
    ("vertical_slash", ["unknown KV-cache policy", "prefill method", "--methods"]),
    ("snapkv(windw=64)", ["'windw'", "window=32"]),
    ("snapkv(budget=64)", ["--budgets", "'budget'"]),
    ("full(window=3)", ["'full' is the normal cache"]),
])
def test_cache_errors_list_valid_choices(text, needles):
    with pytest.raises(ValueError) as info:
        parse.parse_caches(text)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize(("data", "needles"), [
    ({"budgets": "128"}, ["budgets", "without a cache policy", "--cache"]),
    ({"caches": "snapkv"}, ["'snapkv' needs budgets", "--budgets"]),
    ({"caches": "quantized", "budgets": "128"}, ["'quantized'", "has no budget", "without --budgets"]),
    ({"tasks": ["perplexity"], "caches": "snapkv", "budgets": "128"}, ["kv_decode, niah", "perplexity"]),
    ({"tasks": {"fidelity": {"caches": ["snapkv"]}}}, ["tasks.fidelity", "'caches'", "kv_decode"]),
    ({"methods": "snapkv"}, ["cache policy", "prefill", "--cache snapkv"]),
])
def test_config_errors(data, needles):
    with pytest.raises(ValueError) as info:
        build.build_config(data)
    for needle in needles:
        assert needle in str(info.value)


def test_build_config_cache_runs_and_round_trip(tmp_path):
    cfg = build.build_config({
        "tasks": {"niah": {"lengths": [512]}, "perplexity": {}, "kv_decode": {"caches": ["streaming"],
                                                                            "budgets": [64]}},
        "caches": [KVPRESS_SNAPKV, "tova", "full"], "budgets": [128, "25%"],
    })
    niah, ppl, dec = cfg.tasks
    assert [None if r is None else r.label for r in niah.cache_runs()] == [
        None, 'snapkv(kernel=5,pooling="avg",window=64)@128', 'snapkv(kernel=5,pooling="avg",window=64)@25%',
        "tova@128", "tova@25%"]
    assert ppl.caches == [] and ppl.cache_runs() == [None]
    assert [r.label for r in dec.cache_runs()[1:]] == ["streaming@64"]
    assert niah.cache_runs()[2].kvcache_kwargs == {"ratio": 0.75, "window": 64, "kernel": 5, "pooling": "avg"}
    assert build.build_config(cfg.to_dict()).to_dict() == cfg.to_dict()
    quant = build.build_config({"caches": "quantized(bits=4)"}).tasks[0]
    assert [r.label for r in quant.cache_runs()[1:]] == ["quantized(bits=4)"]  # no budget, once
    y = tmp_path / "kv.yaml"
    y.write_text('tasks: [niah]\ncaches: ["snapkv(window=64,kernel=5,pooling=\\"avg\\")", tova]\n'
                 'budgets: [128, 256, "25%"]\n')
    from_file = build.build_config(parse.load_file(y)).tasks[0]
    assert [c.label for c in from_file.caches] == ['snapkv(kernel=5,pooling="avg",window=64)', "tova"]
    assert [b.text for b in from_file.budgets] == ["128", "256", "25%"]


def test_merge_cli_cache_budgets_haystack():
    data = build.merge_cli({"tasks": {"niah": {"caches": ["tova"], "budgets": [8]}}}, tasks="niah,kv_decode",
                            caches="snapkv", budgets="25%,10%", haystack="gpl3")
    cfg = build.build_config(data)
    for spec in cfg.tasks:
        assert [c.name for c in spec.caches] == ["snapkv"] and [b.text for b in spec.budgets] == ["25%", "10%"]
        assert spec.params.haystack == "gpl3"
    with pytest.raises(ValueError, match="--haystack"):
        build.merge_cli({}, tasks="model_speed", haystack="gpl3")


# --- keys, resuming and the report on a fake task (no model) ---------------------------------


@pytest.fixture()
def kv_echo():
    @register_task("kv_echo")
    class KVEcho(Task):
        needs_model = False
        uses_depth = True
        uses_cache = True
        score_name = "accuracy"
        section = Section(title="Retrieval accuracy", layout="retrieval")  # reported like niah

        def measure(self, ctx, case, method, spec, cache=None):
            keep = 100.0 if cache is None else (cache.budget.keep or 100 * cache.budget.tokens / case.length)
            return {"score": float(keep >= 50 or case.depth > 0.5), "prompt_tokens": case.length,
                    "kv_bytes": keep, "kv_full_bytes": 100.0}

    yield KVEcho
    TASKS.pop("kv_echo")


def test_keys_resume_and_report_with_a_fake_task(kv_echo, tmp_path):
    cfg = build.build_config({"tasks": ["kv_echo"], "lengths": [100], "depths": [0.25, 1.0],
                               "caches": "streaming(sink=2),snapkv", "budgets": "64,25%"})
    work = runner.plan(cfg)
    keys = [w.key for w in work]
    assert len(work) == 2 * (1 + 2 * 2) and len(set(keys)) == len(keys)
    base = [w for w in work if w.cache is None]
    # The normal-cache rows keep the key they had before cache settings existed.
    assert base[0].key == row_key("smollm2-135m", "kv_echo", "default", "full", "{}", 100, 0.25, 0)
    snap = next(w for w in work if w.cache is not None and w.cache.label == "snapkv@25%")
    assert snap.key.endswith("|snapkv|{}|25%") and snap.label == "snapkv@25%"
    stream = next(w for w in work if w.cache is not None and w.cache.cache.name == "streaming")
    assert '"sink": 2' in stream.key and stream.key.endswith("|64")

    buf = io.StringIO()
    first = runner.run(cfg, tmp_path, console=Console(file=buf, width=150))
    assert first.measured == 10 and first.failed == 0
    assert "[2/10] kv_echo L=100 depth=25% #0 streaming(sink=2)@64: accuracy=1" in buf.getvalue()
    assert runner.run(cfg, tmp_path, progress=False).measured == 0  # resumed: nothing to measure
    more = build.build_config({"tasks": ["kv_echo"], "lengths": [100], "depths": [0.25, 1.0],
                                "caches": "streaming(sink=2),snapkv", "budgets": "64,25%,10%"})
    assert runner.run(more, tmp_path, progress=False).measured == 4  # only the new budget
    with Store(tmp_path) as store:
        rows = store.rows()
    assert len(rows) == 14 and len(more.tasks[0].cache_runs()) == 7
    by = {(r.cache, r.budget, r.depth): r for r in rows}
    assert by[("snapkv", "10%", 0.25)].score == 0.0 and by[("", "", 0.25)].score == 1.0
    assert by[("streaming", "64", 1.0)].cache_config == '{"sink": 2}'

    md, page = report.write(tmp_path)
    text, html = md.read_text(), page.read_text()
    assert "## Accuracy with a compressed KV cache" in text
    assert "| cache | all tokens | 64 | 10% | 25% | n |" in text
    assert "| full cache | 1 | - | - | - | 2 |" in text
    assert "| snapkv | - | 1 (64% bytes) | 0.5 (10% bytes) | 0.5 (25% bytes) | 6 |" in text  # accuracy (bytes held)
    assert "accuracy vs KV budget" in html and '"dash":"dash"' in html
    # The ordinary retrieval table shows the normal cache only.
    assert "| method | 25% | 100% | mean | n |" in text and "| full | 1 | 1 | 1 | 2 |" in text


def test_old_database_gains_cache_columns(tmp_path):
    with sqlite3.connect(tmp_path / "results.sqlite") as conn:
        conn.execute("CREATE TABLE results (key TEXT PRIMARY KEY, run_id INTEGER, model TEXT NOT NULL, "
                     "task TEXT NOT NULL, variant TEXT NOT NULL, method TEXT NOT NULL, config TEXT NOT NULL, "
                     "label TEXT NOT NULL, length INTEGER NOT NULL, depth REAL, sample INTEGER NOT NULL, score REAL, "
                     "metrics TEXT NOT NULL, seconds REAL NOT NULL, created REAL NOT NULL)")
        old = Row(model="m", task="niah", variant="single", method="full", config="{}", label="full", length=64,
                  depth=0.5, sample=0, score=1.0)
        conn.execute("INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                     (old.key, 1, "m", "niah", "single", "full", "{}", "full", 64, 0.5, 0, 1.0, "{}", 1.0, 1.0))
    with Store(tmp_path) as store:
        assert store.done_keys() == {old.key}
        assert store.rows()[0].cache == "" and store.rows()[0].budget == ""
        assert store.add(Row(model="m", task="niah", variant="single", method="full", config="{}",
                             label="snapkv@8", length=64, depth=0.5, sample=0, score=0.0, cache="snapkv",
                             cache_config="{}", budget="8"))
        assert store.count() == 2


# --- the command line ----------------------------------------------------------------------------


@pytest.fixture()
def app():
    app = typer.Typer()

    @app.command()
    def version() -> None:
        print("0")

    add_commands(app)
    return app


@pytest.mark.parametrize(("args", "needles"), [
    (["--budgets", "128"], ["without a cache policy", "--cache"]),
    (["--cache", "snapkvv", "--budgets", "128"], ["unknown KV-cache policy", "snapkv", "tova"]),
    (["--cache", "snapkv", "--budgets", "120%"], ["outside (0%, 100%)"]),
    (["--cache", "quantized", "--budgets", "64"], ["has no budget"]),
    (["--cache", "snapkv"], ["needs budgets"]),
])
def test_cli_errors(app, tmp_path, args, needles):
    result = CliRunner().invoke(app, ["bench", "--tasks", "niah", *args, "--out", str(tmp_path / "r"), "--no-report"],
                                catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "r").exists()  # refused before anything ran
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text


# --- a tiny real run ---------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_cache_bench_on_smollm2(smollm2, tmp_path):
    cfg = build.build_config({
        "model": "smollm2-135m", "caches": "streaming,snapkv", "budgets": "64,25%",
        "tasks": {"niah": {"lengths": [512], "depths": [0.5, 0.9], "new_tokens": 16},
                  "kv_decode": {"lengths": [512], "caches": ["snapkv"], "budgets": [64], "decode_tokens": 2,
                                "warmup": 1}},
    })
    outcome = runner.run(cfg, tmp_path, progress=False, lm=smollm2)
    assert outcome.failed == 0, runner.errors(tmp_path)
    assert outcome.measured == 2 * 5 + 2
    again = runner.run(cfg, tmp_path, progress=False, lm=smollm2)
    assert again.measured == 0 and again.skipped == 12
    with Store(tmp_path) as store:
        rows = store.rows()
    niah = {(r.cache, r.budget, r.depth): r for r in rows if r.task == "niah"}
    assert niah[("", "", 0.5)].score == 1.0 and niah[("", "", 0.9)].score == 1.0  # the full cache finds it
    for (cache, budget, _), r in niah.items():
        assert r.key.count("|") == (10 if cache else 7)
        if cache:
            m = r.metrics
            assert 0 < m["kv_bytes"] < m["kv_full_bytes"] and m["kv_seen"] > m["prompt_tokens"]
            # prefill compressed to the budget; streaming also evicts while decoding, snapkv adds the new tokens
            kept = 64 if budget == "64" else m["prompt_tokens"] // 4
            assert m["kv_kept_max"] <= kept + (0 if cache == "streaming" else 16)
    dec = {r.cache: r.metrics for r in rows if r.task == "kv_decode"}
    full_bytes = 2 * 30 * 3 * (512 + 3) * 64 * 4  # K and V, 30 layers, 3 KV heads, 512 + 3 tokens, fp32
    assert dec[""]["kv_bytes"] == dec[""]["kv_full_bytes"] == full_bytes
    assert dec["snapkv"]["kv_full_bytes"] == full_bytes
    assert dec["snapkv"]["kv_bytes"] < full_bytes / 2 and dec["snapkv"]["kv_kept_mean"] <= 64 + 3
    assert dec[""]["decode_ms_per_token"] > 0 and dec["snapkv"]["decode_ms_per_token"] > 0
    # the normal cache's row also times transformers' own attention on the same cache
    assert dec[""]["transformers_decode_ms_per_token"] > 0 and dec[""]["decode_speedup_vs_transformers"] > 0
    assert "transformers_decode_ms_per_token" not in dec["snapkv"]
    md, page = report.write(tmp_path)
    text, html = md.read_text(), page.read_text()
    assert "| cache | all tokens | 64 | 25% | n |" in text and "| full cache | 1 | - | - | 2 |" in text
    assert "accuracy vs KV budget" in html and "KV-cache decode speed and memory" in text
    assert "| snapkv | 64 | 512 |" in text
    assert "| length | attnkit ms/token | transformers ms/token | attnkit speedup | n |" in text


def test_budget_below_always_kept_is_recorded_not_applicable(tmp_path):
    """A ratio budget below what the policy always keeps (snapkv's window of 32 at 10% of
    100 tokens) raises BudgetBelowAlwaysKept at prefill; the runner records the cell as
    not applicable (no failure, not retried) and the report still builds."""
    from attnkit import KVCache

    @register_task("kv_ratio")
    class KVRatio(Task):
        needs_model = False
        uses_depth = True
        uses_cache = True
        score_name = "accuracy"
        section = Section(title="Retrieval accuracy", layout="retrieval")

        def measure(self, ctx, case, method, spec, cache=None):
            if cache is not None:
                kv = KVCache(cache.cache.name, ratio=1 - cache.budget.keep / 100, **cache.cache.kwargs)
                kv.policy.check_budget(int(case.length * cache.budget.keep / 100), f"{cache.budget.text} of {case.length}")
            return {"score": 1.0, "prompt_tokens": case.length, "kv_bytes": 1.0, "kv_full_bytes": 1.0}

    try:
        cfg = build.build_config({"tasks": ["kv_ratio"], "lengths": [100], "depths": [0.5],
                                   "caches": "snapkv", "budgets": "50%,10%"})
        outcome = runner.run(cfg, tmp_path, progress=False)
        assert outcome.failed == 0 and outcome.measured == 3
        with Store(tmp_path) as store:
            rows = {r.budget: r for r in store.rows()}
        assert rows["10%"].score is None and "below the 32 tokens it always keeps" in rows["10%"].metrics["not_applicable"]
        assert rows["50%"].score == 1.0
        assert runner.run(cfg, tmp_path, progress=False).measured == 0  # recorded: not retried
        report.write(tmp_path)
    finally:
        TASKS.pop("kv_ratio")
