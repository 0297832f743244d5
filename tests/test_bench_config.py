"""Benchmark configuration: method strings, lengths, files, and errors that name the field."""

from __future__ import annotations

import pytest

from attnkit.bench import build, parse


def test_parse_methods():
    specs = parse.parse_methods("full, streaming(sink=4,window=256), sliding_window( window = 128 )")
    assert [s.name for s in specs] == ["full", "streaming", "sliding_window"]
    assert specs[1].kwargs == {"sink": 4, "window": 256}
    assert specs[1].label == "streaming(sink=4,window=256)"
    assert parse.parse_method(specs[1].label) == specs[1]
    assert specs[0].label == "full" and specs[0].config_json == "{}"


def test_dense_layers_is_a_model_field_not_a_method_field():
    spec = parse.parse_method("vertical_slash(dense_layers=10,vertical_size=500)")
    assert spec.dense_layers == 10 and spec.method_config == {"vertical_size": 500}
    assert spec.kwargs == {"dense_layers": 10, "vertical_size": 500}  # what attnkit.patch receives
    assert parse.parse_method(spec.label) == spec
    assert parse.parse_method("vertical_slash(dense_layers=0)") == parse.parse_method("vertical_slash")
    with pytest.raises(ValueError, match="dense_layers"):
        parse.parse_method("vertical_slash(dense_layers=-2)")


def test_parse_methods_mapping_form():
    specs = parse.parse_methods([{"name": "streaming", "sink": 2, "window": 64}, "full"])
    assert specs[0] == parse.parse_method("streaming(window=64,sink=2)")


@pytest.mark.parametrize(("text", "needle"), [
    ("streamin", "streaming"),                    # unknown method: close match listed
    ("streaming(sinks=4)", "sink=4, window="),    # unknown field: valid fields listed
    ("streaming(sink=a)", "sink"),                # wrong type names the field
    ("streaming(sink=4", "unbalanced"),
    ("streaming(4)", "field=value"),
    ("", "empty"),
])
def test_method_errors_name_the_problem(text, needle):
    with pytest.raises((ValueError, TypeError), match=needle.replace("(", r"\(")):
        parse.parse_methods(text)


def test_lengths_and_depths():
    assert parse.parse_lengths("1k,2k,1.5k,4096") == [1024, 2048, 1536, 4096]
    assert parse.parse_depths("0,0.5,1") == [0.0, 0.5, 1.0]
    assert parse.parse_depths("0%,50%,100%") == [0.0, 0.5, 1.0]
    assert parse.parse_depths([0, 25, 100]) == [0.0, 0.25, 1.0]
    with pytest.raises(ValueError, match="lengths: '2q'"):
        parse.parse_lengths("2q")
    with pytest.raises(ValueError, match="depths"):
        parse.parse_depths("-0.5")


def test_build_config_per_task_sections():
    cfg = build.build_config({
        "methods": "full,streaming(window=64)", "lengths": ["1k"], "samples": 2,
        "tasks": {"niah": {"depths": [0, 1], "variants": ["single", "multikey"]},
                  "fidelity": {"lengths": [512], "layers": [0, 3], "methods": ["full"]}},
    })
    niah, fid = cfg.tasks
    assert niah.lengths == [1024] and niah.depths == [0.0, 1.0] and niah.samples == 2
    assert niah.params.variants == ["single", "multikey"]
    assert fid.lengths == [512] and fid.params.layers == [0, 3] and [m.name for m in fid.methods] == ["full"]
    assert [m.name for m in cfg.methods()] == ["full", "streaming"]
    assert build.build_config(cfg.to_dict() | {"tasks": cfg.to_dict()["tasks"]}).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(("data", "needles"), [
    ({"modle": "x"}, ["'modle'", "allowed fields", "model", "methods"]),
    ({"tasks": ["niah", "nope"]}, ["'nope'", "allowed", "fidelity", "perplexity"]),
    ({"tasks": {"niah": {"variant": ["single"]}}}, ["tasks.niah", "'variant'", "variants", "depths"]),
    ({"tasks": {"niah": {"variants": ["double"]}}}, ["tasks.niah.variants", "'double'", "single, multikey"]),
    ({"tasks": {"niah": {"haystack": "web"}}}, ["tasks.niah.haystack", "licenses, noise"]),
    ({"samples": 0}, ["samples", ">= 1"]),
    ({"methods": ["snapkv"]}, ["cache policy", "prefill"]),
])
def test_config_errors_name_field_and_allowed_values(data, needles):
    with pytest.raises(ValueError) as info:
        build.build_config(data)
    for needle in needles:
        assert needle in str(info.value)


def test_config_files(tmp_path):
    y = tmp_path / "sweep.yaml"
    y.write_text("methods: ['full', 'streaming(sink=4, window=256)']\nlengths: [2k]\n"
                 "tasks:\n  niah: {depths: [0, 50, 100]}\n  perplexity: {}\n")
    cfg = build.build_config(parse.load_file(y))
    assert cfg.tasks[0].depths == [0.0, 0.5, 1.0] and cfg.tasks[1].name == "perplexity"
    t = tmp_path / "sweep.toml"
    t.write_text('methods = ["full"]\nlengths = ["1k"]\n[tasks.fidelity]\nlayers = [1]\n')
    assert build.build_config(parse.load_file(t)).tasks[0].params.layers == [1]
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  niah: {colour: red}\n")
    with pytest.raises(ValueError, match="'colour'"):
        build.build_config(parse.load_file(bad))


def test_cli_overrides_preset():
    data = build.merge_cli(build.QUICK, tasks="niah", methods="full", lengths="1k", samples=3)
    cfg = build.build_config(data)
    assert [t.name for t in cfg.tasks] == ["niah"]
    assert cfg.tasks[0].lengths == [1024] and cfg.tasks[0].samples == 3 and cfg.tasks[0].depths == [0.25, 0.75]
    assert [m.label for m in cfg.tasks[0].methods] == ["full"] and cfg.model == "gemma3-270m"
    assert build.build_config(build.QUICK).tasks  # the preset itself is valid


def test_max_cases_is_the_prefix_of_the_full_plan():
    """--max-cases N: each task's first N cases, those a full run measures first, in order."""
    from attnkit.bench import runner

    cfg = build.build_config({"tasks": {"niah": {}, "fidelity": {"lengths": [512]}},
                              "methods": "full,streaming(window=64)", "depths": [0, 0.5, 1], "samples": 2})
    full, short = runner.plan(cfg), runner.plan(cfg, max_cases=2)
    for spec in cfg.tasks:
        mine = [w.key for w in full if w.spec is spec]
        assert [w.key for w in short if w.spec is spec] == mine[:2 * len(spec.methods)]
    assert [w.key for w in runner.plan(cfg, max_cases=100)] == [w.key for w in full]


def test_dry_run_plan_counts_stored_results_and_writes_nothing(tmp_path):
    """The dry-run plan: counts per task, results already stored (read-only), the first case."""
    from attnkit.bench import dryrun, runner
    from attnkit.bench.store import Row, Store

    cfg = build.build_config({"tasks": ["niah"], "lengths": "1k", "depths": "0,1", "caches": "snapkv,tova",
                              "budgets": "25%,10%"})
    text = dryrun.describe(cfg, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert "task niah: 2 cases x 1 methods x 5 cache settings = 10 measurements, 0 already stored" in text
    assert "caches: snapkv, tova" in text and "budgets: 25%, 10%" in text
    assert "first case: task niah, variant='single', length=1024, depth=0.0" in text
    w = runner.plan(cfg)[0]
    with Store(tmp_path / "old") as store:
        store.add(Row(model=cfg.model, task="niah", variant=w.case.variant, method="full", config=w.method.config_json,
                      label=w.label, length=w.case.length, depth=w.case.depth, sample=0, score=1.0, metrics={},
                      seconds=0.1))
    assert "10 measurements, 1 already stored" in dryrun.describe(cfg, tmp_path / "old")
