"""`where_full_succeeds`: methods are measured only on the cases `full` solves (issue 17)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from attnkit.bench import build, runner
from attnkit.bench.store import Store
from attnkit.bench.tasks import TASKS, Task, register_task
from attnkit.bench.tasks.base import PASS_MARK

MEASURED: list[tuple[int, str]] = []


@pytest.fixture(autouse=True, scope="module")
def graded_task():
    @register_task("graded_fake")
    class Graded(Task):
        """`full` solves even samples only; every other method scores 1 wherever it runs."""

        needs_model = False
        score_name = "accuracy"
        pass_mark = PASS_MARK

        @dataclass
        class Params:
            pass

        def measure(self, ctx, case, method, spec):
            MEASURED.append((case.sample, method.label))
            if method.name == "full":
                return {"score": 1.0 if case.sample % 2 == 0 else 0.25}
            return {"score": 1.0}

    @register_task("timed_fake")
    class Timed(Task):
        needs_model = False
        score_name = "seconds"

        def measure(self, ctx, case, method, spec):
            MEASURED.append((case.sample, "timed " + method.label))
            return {"score": 0.1}

    yield
    TASKS.pop("graded_fake")
    TASKS.pop("timed_fake")


def config(where: bool, methods: str = "streaming(sink=1,window=8),full") -> build.BenchConfig:
    return build.build_config({"tasks": {"graded_fake": {}, "timed_fake": {}}, "methods": methods,
                               "lengths": [16], "samples": 4, "where_full_succeeds": where})


def test_methods_run_only_where_full_succeeds(tmp_path):
    MEASURED.clear()
    outcome = runner.run(config(True), tmp_path, progress=False)
    graded = [(s, m) for s, m in MEASURED if not m.startswith("timed")]
    # full first in each case (listed second), the method only on samples 0 and 2
    assert graded == [(0, "full"), (0, "streaming(sink=1,window=8)"), (1, "full"), (2, "full"),
                      (2, "streaming(sink=1,window=8)"), (3, "full")]
    assert sum(m.startswith("timed") for _, m in MEASURED) == 8  # an unscored task: every method, every case
    assert outcome.not_compared == 2 and outcome.failed == 0
    with Store(tmp_path) as store:
        stored = {(r.sample, r.label) for r in store.rows("graded_fake")}
    assert (1, "streaming(sink=1,window=8)") not in stored and (2, "streaming(sink=1,window=8)") in stored
    # resuming measures nothing new: the skipped cases stay skipped
    MEASURED.clear()
    again = runner.run(config(True), tmp_path, progress=False)
    assert MEASURED == [] and again.not_compared == 2 and again.measured == 0


def test_without_the_option_every_case_runs(tmp_path):
    MEASURED.clear()
    outcome = runner.run(config(False), tmp_path, progress=False)
    assert outcome.not_compared == 0
    assert sum(m == "streaming(sink=1,window=8)" for _, m in MEASURED) == 4


def test_option_needs_full_and_a_boolean():
    with pytest.raises(ValueError, match="does not measure `full`"):
        config(True, methods="streaming(sink=1,window=8)")
    with pytest.raises(ValueError, match="where_full_succeeds: must be true or false"):
        build.build_config({"tasks": ["graded_fake"], "where_full_succeeds": "yes"})
