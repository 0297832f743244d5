"""Benchmark results in SQLite: ``RUN_DIR/results.sqlite``, WAL mode.

``results`` holds one row per (model, task, variant, method, config, length, depth,
sample[, cache, cache_config, budget]), committed as soon as it is measured; its ``key``
is those columns joined (the cache columns only for a KV-cache setting, so results with
the normal cache keep the keys they always had), so
an interrupted run that is started again skips finished rows (``done_keys``) and never
writes one twice (``INSERT OR IGNORE``). ``runs`` holds one row per invocation: the
config and the environment (versions, CPU, threads, git commit).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

DB_NAME = "results.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started REAL NOT NULL,
    finished REAL,
    command TEXT,
    config TEXT NOT NULL,
    environment TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    run_id INTEGER,
    model TEXT NOT NULL,
    task TEXT NOT NULL,
    variant TEXT NOT NULL,
    method TEXT NOT NULL,
    config TEXT NOT NULL,
    label TEXT NOT NULL,
    length INTEGER NOT NULL,
    depth REAL,
    sample INTEGER NOT NULL,
    score REAL,
    metrics TEXT NOT NULL,
    seconds REAL NOT NULL,
    created REAL NOT NULL,
    cache TEXT NOT NULL DEFAULT '',
    cache_config TEXT NOT NULL DEFAULT '',
    budget TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS results_task ON results (task, method);
CREATE TABLE IF NOT EXISTS errors (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT, run_id INTEGER, task TEXT, label TEXT, error TEXT, traceback TEXT, created REAL
);
"""


@dataclass
class Row:
    """One measurement. ``score`` is the task's headline number (accuracy, relative
    error, perplexity, prefill seconds); ``metrics`` holds all of them."""

    model: str
    task: str
    variant: str
    method: str
    config: str  # canonical JSON of the method config
    label: str  # method as written, e.g. streaming(sink=4,window=256)
    length: int
    depth: Optional[float]
    sample: int
    score: Optional[float] = None
    metrics: Optional[dict[str, Any]] = None
    seconds: float = 0.0
    created: float = 0.0
    cache: str = ""  # KV-cache policy name; "" = the normal cache (the full baseline)
    cache_config: str = ""  # canonical JSON of the policy's config
    budget: str = ""  # "512" (tokens per KV head and layer), "25%" (of the prompt kept) or ""

    @property
    def key(self) -> str:
        return row_key(self.model, self.task, self.variant, self.method, self.config, self.length, self.depth,
                       self.sample, self.cache, self.cache_config, self.budget)


def row_key(model: str, task: str, variant: str, method: str, config: str, length: int,
            depth: float | None, sample: int, cache: str = "", cache_config: str = "", budget: str = "") -> str:
    depth_text = "-" if depth is None else f"{depth:.4f}"
    parts = [model, task, variant, method, config, str(length), depth_text, str(sample)]
    if cache:
        parts += [cache, cache_config or "{}", budget or "-"]
    return "|".join(parts)


def stored_keys(run_dir: str | Path) -> set[str]:
    """Keys of the results stored in ``run_dir``, read-only (nothing is created): empty
    when it has no database yet (``attnkit bench --dry-run``)."""
    path = Path(run_dir) / DB_NAME
    if not path.is_file():
        return set()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    try:
        return {r[0] for r in conn.execute("SELECT key FROM results")}
    except sqlite3.OperationalError:  # no results table yet
        return set()
    finally:
        conn.close()


class Store:
    """The SQLite database of one run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / DB_NAME
        self.conn = sqlite3.connect(str(self.path), timeout=30.0)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(SCHEMA)
        columns = {r[1] for r in self.conn.execute("PRAGMA table_info(results)")}
        for name in ("cache", "cache_config", "budget"):  # databases written before KV-cache settings
            if name not in columns:
                self.conn.execute(f"ALTER TABLE results ADD COLUMN {name} TEXT NOT NULL DEFAULT ''")
        self.conn.commit()
        self.run_id: Optional[int] = None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- runs ---
    def start_run(self, config: dict[str, Any], command: Optional[str] = None,
                  environment: Optional[dict[str, Any]] = None) -> int:
        env = environment if environment is not None else collect_environment()
        cur = self.conn.execute(
            "INSERT INTO runs (started, command, config, environment) VALUES (?, ?, ?, ?)",
            (time.time(), command, json.dumps(config, default=str), json.dumps(env, default=str)),
        )
        self.conn.commit()
        self.run_id = int(cur.lastrowid)
        return self.run_id

    def finish_run(self) -> None:
        if self.run_id is not None:
            self.conn.execute("UPDATE runs SET finished = ? WHERE id = ?", (time.time(), self.run_id))
            self.conn.commit()

    def runs(self) -> list[dict[str, Any]]:
        cur = self.conn.execute("SELECT id, started, finished, command, config, environment FROM runs ORDER BY id")
        return [
            {"id": r[0], "started": r[1], "finished": r[2], "command": r[3],
             "config": json.loads(r[4]), "environment": json.loads(r[5])}
            for r in cur.fetchall()
        ]

    # --- results ---
    def done_keys(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT key FROM results")}

    def add(self, row: Row) -> bool:
        """Insert and commit one row; False when its key was already stored."""
        row.created = row.created or time.time()
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO results (key, run_id, model, task, variant, method, config, label, length, "
            "depth, sample, score, metrics, seconds, created, cache, cache_config, budget) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (row.key, self.run_id, row.model, row.task, row.variant, row.method, row.config, row.label, row.length,
             row.depth, row.sample, _finite(row.score), json.dumps(row.metrics or {}, default=_json_default),
             row.seconds, row.created, row.cache, row.cache_config, row.budget),
        )
        self.conn.commit()
        return cur.rowcount == 1

    def rows(self, task: Optional[str] = None) -> list[Row]:
        query = ("SELECT model, task, variant, method, config, label, length, depth, sample, score, metrics, "
                 "seconds, created, cache, cache_config, budget FROM results")
        args: tuple = ()
        if task is not None:
            query += " WHERE task = ?"
            args = (task,)
        query += " ORDER BY created"
        return [
            Row(model=r[0], task=r[1], variant=r[2], method=r[3], config=r[4], label=r[5], length=r[6],
                depth=r[7], sample=r[8], score=r[9], metrics=json.loads(r[10]), seconds=r[11], created=r[12],
                cache=r[13], cache_config=r[14], budget=r[15])
            for r in self.conn.execute(query, args)
        ]

    def score_of(self, key: str) -> tuple[bool, Optional[float]]:
        """(stored, score) of the row with ``key``: (False, None) when it is not stored."""
        found = self.conn.execute("SELECT score FROM results WHERE key = ?", (key,)).fetchone()
        return (False, None) if found is None else (True, found[0])

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])


def _finite(value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# --- environment -------------------------------------------------------------------------


def collect_environment() -> dict[str, Any]:
    """Versions, CPU, threads and git commit: what a reader needs to compare runs."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
        # 1 / 5 / 15-minute load average when the run started: timings from a busy machine are not comparable
        "load_average": " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for module in ("torch", "transformers", "numpy", "attnkit", "plotly"):
        try:
            mod = __import__(module)
            env[module] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - optional packages
            env[module] = None
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        env["cuda"] = torch.cuda.is_available()
        if env["cuda"]:
            env["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    env["git_commit"] = _git_commit()
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
