"""The SQLite store and resuming: kill a benchmark subprocess mid-run and run it again."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

from attnkit.bench.store import Row, Store


def _row(sample: int, score: float = 1.0) -> Row:
    return Row(model="m", task="t", variant="v", method="full", config="{}", label="full", length=64,
               depth=0.5, sample=sample, score=score, metrics={"score": score, "answer": "x"})


def test_store_rows_and_environment(tmp_path):
    with Store(tmp_path) as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        store.start_run({"model": "m"}, command="attnkit bench")
        assert store.add(_row(0, 0.5))
        assert not store.add(_row(0, 0.9))  # same key: kept once, first value wins
        assert store.add(_row(1))
        assert store.count() == 2 and store.done_keys() == {_row(0).key, _row(1).key}
        run = store.runs()[0]
        env = run["environment"]
        for key in ("python", "torch", "cpu", "torch_threads", "git_commit"):
            assert key in env
    with Store(tmp_path) as store:  # reopened: rows persisted
        rows = store.rows()
        assert [r.score for r in rows] == [0.5, 1.0] and rows[0].metrics["answer"] == "x"


SCRIPT = textwrap.dedent('''
    import sys, time
    from dataclasses import dataclass
    from attnkit.bench import build, runner
    from attnkit.bench.tasks import Task, register_task

    LOG = sys.argv[2]

    @register_task("sleepy")
    class Sleepy(Task):
        needs_model = False

        @dataclass
        class Params:
            pause: float = 0.15

        def measure(self, ctx, case, method, spec):
            with open(LOG, "a") as f:
                f.write(f"{case.length} {case.sample} {method.label}\\n")
            time.sleep(spec.params.pause)
            return {"score": case.sample / 10}

    cfg = build.build_config({"tasks": {"sleepy": {}}, "methods": "full,streaming(sink=1,window=8)",
                               "lengths": [16, 32], "samples": 10})
    runner.run(cfg, sys.argv[1], command="test")
''')


def test_kill_and_resume(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text(SCRIPT)
    run_dir, log = tmp_path / "run", tmp_path / "measured.log"
    cmd = [sys.executable, str(script), str(run_dir), str(log)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    db = run_dir / "results.sqlite"
    deadline = time.time() + 120
    stored = 0
    while time.time() < deadline:
        if db.exists():
            try:
                with sqlite3.connect(db) as conn:
                    stored = conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.OperationalError:
                stored = 0
            if stored >= 6:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Store(run_dir) as store:
        first = {r.key: r.created for r in store.rows()}
    assert 6 <= len(first) < 40, "the run should be killed mid-way"

    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "resuming" in text and "[40/40]" in text  # plain progress lines without a TTY
    with Store(run_dir) as store:
        rows = store.rows()
        assert len(rows) == 40 == len({r.key for r in rows})
        kept = {r.key: r.created for r in rows if r.key in first}
        assert kept == first  # finished rows neither lost nor rewritten
        assert len(store.runs()) == 2
    measured = log.read_text().splitlines()
    # Every row measured once, plus at most the one that was running when killed.
    assert 40 <= len(measured) <= 41

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and "already" in again.stdout + again.stderr
    assert len(log.read_text().splitlines()) == len(measured)
