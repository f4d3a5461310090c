"""The run history: every optimization run of this user, in ``$DSPEX_HOME/runs.sqlite3``.

One row per run id, updated as the run goes (started, each trial's best score, completed,
failed or cancelled), plus one row per trial, so ``dspex runs`` and ``%dspex runs --all``
list, filter and compare runs of every notebook and day, and ``load_program(run_id)`` gives
a run's best program back in one call.

SQLite from the standard library, as optuna's RDB storage and MLflow's local store use a
database rather than files: several notebooks write at once. WAL mode lets readers go on
while one writes; every write is one short ``BEGIN IMMEDIATE`` transaction that waits
(``busy_timeout``) instead of failing with "database is locked". The file is private (0600
in a 0700 folder) and holds no secrets: configs are scrubbed as checkpoints are.

Run handles record themselves through ``record_run_event`` (a background writer thread, so
the manager's event loop never waits on the disk); a recording failure warns once and never
disturbs a run.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import difflib
import json
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import scrub_secrets
from .errors import HistoryError, NoBestProgram, RunNotFound

DB_FILE = "runs.sqlite3"
SCHEMA_VERSION = 2  # 2: the sweeps table (a version-1 file gains it on first use)
BUSY_TIMEOUT_MS = 30_000  # a writer holds the lock for milliseconds; wait, never fail
TERMINAL_STATUSES = ("completed", "failed", "cancelled")
# Event kinds that change what a run's row says; the rest (candidates, checkpoints, logs...)
# stay in the run's own checkpoint folder. "phase" and "progress" events, many per run,
# update it only when the status changes, or at most once a second.
RECORDED_KINDS = frozenset({"status", "trial", "complete", "error", "cancelled", "budget"})
PROGRESS_EVERY_S = 1.0  # "progress" events (GEPA...) update the row at most this often

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    optimizer TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'starting',
    config TEXT NOT NULL DEFAULT '{}',
    usage TEXT NOT NULL DEFAULT '{}',
    cost REAL,
    best_score REAL,
    trials INTEGER NOT NULL DEFAULT 0,
    best_program TEXT,
    error TEXT,
    checkpoint_dir TEXT,
    notebook TEXT,
    pool TEXT,
    host TEXT,
    pid INTEGER,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs (created);
CREATE TABLE IF NOT EXISTS trials (
    run_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    eval TEXT NOT NULL,
    score REAL,
    best_score REAL,
    params TEXT NOT NULL DEFAULT '{}',
    time REAL,
    PRIMARY KEY (run_id, number, eval)
);
CREATE TABLE IF NOT EXISTS sweeps (
    sweep_id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'running',
    configs TEXT NOT NULL DEFAULT '[]',
    runs TEXT NOT NULL DEFAULT '[]',
    budget TEXT NOT NULL DEFAULT '{}',
    folder TEXT,
    pool TEXT,
    notebook TEXT,
    host TEXT,
    pid INTEGER,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sweeps_by_name ON sweeps (name);
"""
# Columns a caller may set, with how each is stored (JSON columns are dumped).
_COLUMNS = {
    "optimizer": "text",
    "status": "text",
    "config": "json",
    "usage": "json",
    "cost": "real",
    "best_score": "real",
    "trials": "int",
    "best_program": "json",
    "error": "text",
    "checkpoint_dir": "text",
    "notebook": "text",
    "pool": "text",
    "host": "text",
    "pid": "int",
}
_TEXT_SEARCHED = ("run_id", "optimizer", "notebook", "pool", "checkpoint_dir", "config",
                  "best_program", "error", "host")  # fmt: skip

log = logging.getLogger("dspex_jupyter")


def history_path(home: str | Path | None = None) -> Path:
    """``$DSPEX_HOME/runs.sqlite3`` (``~/.dspex`` without DSPEX_HOME)."""
    from .envs import _as_home

    return _as_home(home) / DB_FILE


def _json(value: Any) -> str:
    # default=: a compile argument that is not JSON (a teacher program...) is named, not lost
    return json.dumps(value, sort_keys=True, default=lambda o: f"<{type(o).__name__}>")


# ---- records ---------------------------------------------------------------------------
@dataclass
class RunRecord:
    """One run as the history holds it."""

    run_id: str
    optimizer: str = ""
    status: str = "starting"
    config: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    cost: float | None = None
    best_score: float | None = None
    trials: int = 0
    best_program: dict[str, Any] | None = None
    error: str | None = None
    checkpoint_dir: str | None = None
    notebook: str | None = None
    pool: str | None = None
    host: str | None = None
    pid: int | None = None  # the notebook's (or script's) process that recorded it last
    created: float = 0.0
    updated: float = 0.0

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> RunRecord:
        return cls(**_decoded(row, _COLUMNS))

    @property
    def instructions(self) -> dict[str, str]:
        """Each predictor's instruction in the best program (empty before one exists)."""
        state = self.best_program or {}
        if isinstance(state.get("signature"), dict):  # a lone Predict's state is flat
            state = {"self": state}
        return {
            name: str((part.get("signature") or {}).get("instructions", ""))
            for name, part in state.items()
            if isinstance(part, dict) and name != "metadata"
        }

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def shown_status(self) -> str:
        """The status, or "lost" for a run still marked going whose process on this machine
        has gone (its notebook was closed or killed mid-run; resume it from its folder)."""
        if self.done or self.pid is None or self.host != socket.gethostname():
            return self.status
        import psutil

        return self.status if psutil.pid_exists(self.pid) else "lost"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def format_time(epoch: float | None) -> str:
    """Local time to the minute, "2026-11-30 18:55", as a terminal table shows it."""
    if not epoch:
        return "-"
    return dt.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M")


def parse_since(value: Any) -> float | None:
    """``since`` as an epoch: a number, a datetime/date, or ISO text ("2026-11-01",
    "2026-11-01T08:00"); a date means its local midnight."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day).timestamp()
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value.strip()).timestamp()
        except ValueError:
            pass
    from .errors import InvalidSpec

    raise InvalidSpec(
        f"since={value!r} is not a date",
        hint="give a date or time such as 2026-11-01 or 2026-11-01T08:00",
    )


# ---- the store ---------------------------------------------------------------------------
class RunHistory:
    """The run history database. Each call opens its own short connection, so one object
    may be used from any thread, and several processes share the file safely."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else history_path()

    def __repr__(self) -> str:
        return f"<RunHistory {self.path}>"

    # ---- connections ---------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self, *, write: bool) -> Iterator[sqlite3.Connection | None]:
        """A connection (None when reading a history that does not exist yet); a write is
        one immediate transaction, committed on success and rolled back on error."""
        if not write and not self.path.exists():
            yield None
            return
        if write:
            self._create_file()
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._prepare(conn)
            if not write:
                yield conn
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        finally:
            conn.close()

    def _create_file(self) -> None:
        """The folder 0700 and the file 0600 before SQLite opens it: SQLite gives its WAL
        and shared-memory files the database file's permissions."""
        from .envs import _ensure_dir

        if self.path.exists():
            return
        _ensure_dir(self.path.parent)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """WAL mode and the schema, once per file (user_version says which schema)."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise HistoryError(
                f"{self.path} was written by a newer dspex-jupyter (history schema {version}, "
                f"this one reads {SCHEMA_VERSION})",
                hint="upgrade dspex-jupyter, or set DSPEX_HOME to keep a separate history",
            )
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                # one statement at a time: executescript() would commit this transaction
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                _add_missing_run_columns(conn)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _error(self, exc: sqlite3.Error) -> HistoryError:
        return HistoryError(f"the run history {self.path} cannot be used: {exc}")

    # ---- writing -------------------------------------------------------------------
    def record(
        self, run_id: str, *, trial_rows: Sequence[dict[str, Any]] = (), **fields: Any
    ) -> None:
        """Create or update run ``run_id`` with ``fields`` (columns of RunRecord; those not
        given keep their value) and add or replace its ``trial_rows`` (number, eval, score,
        best_score, params, time; one per number and eval)."""
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
        unknown = set(fields) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown run history fields: {', '.join(sorted(unknown))}")
        if "usage" in fields and "cost" not in fields:  # the cost column follows the usage
            fields["cost"] = (fields["usage"] or {}).get("cost")
        values = {name: _stored(name, value) for name, value in fields.items()}
        now = time.time()
        sql = _upsert_sql("runs", "run_id", list(values))
        with self._connect(write=True) as conn:
            assert conn is not None
            conn.execute(sql, [run_id, *values.values(), now, now])
            conn.executemany(
                "INSERT OR REPLACE INTO trials (run_id, number, eval, score, best_score, params,"
                " time) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [_trial_row(run_id, trial) for trial in trial_rows],
            )

    def remove(self, run_id: str) -> None:
        """Forget a run (its checkpoint folder stays where it is)."""
        record = self.get(run_id)
        with self._connect(write=True) as conn:
            assert conn is not None
            conn.execute("DELETE FROM trials WHERE run_id = ?", (record.run_id,))
            conn.execute("DELETE FROM runs WHERE run_id = ?", (record.run_id,))

    # ---- reading -------------------------------------------------------------------
    def runs(
        self,
        *,
        optimizer: str | None = None,
        status: str | None = None,
        notebook: str | None = None,
        since: Any = None,
        text: str | None = None,
        limit: int | None = None,
    ) -> list[RunRecord]:
        """Runs, newest first. ``optimizer`` and ``status`` match whole names (any case),
        ``notebook`` and ``text`` any part (``text`` searches ids, notebooks, pools,
        configs, instructions and errors), ``since`` a date or time (see parse_since)."""
        where, args = [], []
        if optimizer:
            where.append("lower(optimizer) = lower(?)")
            args.append(optimizer)
        lost = bool(status) and status.lower() == "lost"  # computed: see shown_status
        if lost:
            where.append(f"status NOT IN ({', '.join('?' * len(TERMINAL_STATUSES))})")
            args.extend(TERMINAL_STATUSES)
        elif status:
            where.append("lower(status) = lower(?)")
            args.append(status)
        if notebook:
            where.append("notebook LIKE ? ESCAPE '\\'")
            args.append(f"%{_like(notebook)}%")
        start = parse_since(since)
        if start is not None:
            where.append("created >= ?")
            args.append(start)
        if text:
            where.append("(" + " OR ".join(f"{c} LIKE ? ESCAPE '\\'" for c in _TEXT_SEARCHED) + ")")
            args.extend([f"%{_like(text)}%"] * len(_TEXT_SEARCHED))
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise ValueError(f"limit must be a whole number, got {limit!r}")
        sql = "SELECT * FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC, run_id"
        if limit is not None and not lost:
            sql += f" LIMIT {max(0, limit)}"
        with self._connect(write=False) as conn:
            if conn is None:
                return []
            records = [RunRecord.from_row(row) for row in conn.execute(sql, args)]
        if lost:
            records = [r for r in records if r.shown_status == "lost"][:limit]
        return records

    def count(self) -> int:
        """How many runs the history holds."""
        with self._connect(write=False) as conn:
            return 0 if conn is None else conn.execute("SELECT count(*) FROM runs").fetchone()[0]

    def get(self, run_id: str) -> RunRecord:
        """The run of that id, or of a unique prefix of it (as git takes short hashes)."""
        with self._connect(write=False) as conn:
            rows = []
            if conn is not None and isinstance(run_id, str) and run_id:
                rows = conn.execute(
                    "SELECT * FROM runs WHERE run_id = ? OR run_id LIKE ? ESCAPE '\\' "
                    "ORDER BY run_id = ? DESC, created DESC LIMIT 6",
                    (run_id, f"{_like(run_id)}%", run_id),
                ).fetchall()
        if rows and (rows[0]["run_id"] == run_id or len(rows) == 1):
            return RunRecord.from_row(rows[0])
        if rows:
            ids = ", ".join(row["run_id"] for row in rows[:5])
            raise RunNotFound(
                f"run id {run_id!r} is ambiguous in the run history", hint=f"runs: {ids}..."
            )
        raise RunNotFound(f"no run {run_id!r} in the run history ({self.path})")

    def trials(self, run_id: str) -> list[dict[str, Any]]:
        """A run's trials in order: number, eval ("full"/"minibatch"), score, best_score,
        params, time."""
        record = self.get(run_id)
        with self._connect(write=False) as conn:
            assert conn is not None
            rows = conn.execute(
                "SELECT number, eval, score, best_score, params, time FROM trials "
                "WHERE run_id = ? ORDER BY time, number, eval",
                (record.run_id,),
            ).fetchall()
        return [{**dict(row), "params": json.loads(row["params"])} for row in rows]

    def compare(self, run_ids: Sequence[str]) -> list[RunRecord]:
        """The runs of ``run_ids``, in that order (see ``config_differences`` and
        ``instruction_diff`` for what differs)."""
        if len(run_ids) < 2:
            from .errors import InvalidSpec

            raise InvalidSpec("compare needs at least two runs", hint="give two or more run ids")
        return [self.get(run_id) for run_id in run_ids]

    # ---- sweeps ----------------------------------------------------------------------
    def record_sweep(self, sweep_id: str, **fields: Any) -> None:
        """Create or update sweep ``sweep_id`` with ``fields`` (columns of SweepRecord;
        those not given keep their value)."""
        unknown = set(fields) - set(_SWEEP_COLUMNS)
        if unknown:
            raise ValueError(f"unknown sweep fields: {', '.join(sorted(unknown))}")
        values = {
            name: _json(scrub_secrets(value)) if _SWEEP_COLUMNS[name] == "json" else value
            for name, value in fields.items()
        }
        now = time.time()
        sql = _upsert_sql("sweeps", "sweep_id", list(values))
        with self._connect(write=True) as conn:
            assert conn is not None
            conn.execute(sql, [sweep_id, *values.values(), now, now])

    def sweeps(self, *, limit: int | None = None) -> list[SweepRecord]:
        """Sweeps, newest first."""
        sql = "SELECT * FROM sweeps ORDER BY created DESC, sweep_id"
        if limit is not None:
            sql += f" LIMIT {max(0, int(limit))}"
        with self._connect(write=False) as conn:
            return [] if conn is None else [SweepRecord.from_row(r) for r in conn.execute(sql)]

    def get_sweep(self, key: str) -> SweepRecord:
        """The sweep of that id (or unique id prefix), else the newest sweep of that name."""
        with self._connect(write=False) as conn:
            rows = []
            if conn is not None and isinstance(key, str) and key:
                rows = conn.execute(
                    "SELECT * FROM sweeps WHERE sweep_id = ? OR sweep_id LIKE ? ESCAPE '\\' "
                    "OR name = ? ORDER BY sweep_id = ? DESC, name = ? DESC, created DESC LIMIT 6",
                    (key, f"{_like(key)}%", key, key, key),
                ).fetchall()
        exact = [r for r in rows if r["sweep_id"] == key or r["name"] == key]
        if exact:
            return SweepRecord.from_row(exact[0])
        if len(rows) == 1:
            return SweepRecord.from_row(rows[0])
        if rows:
            ids = ", ".join(row["sweep_id"] for row in rows[:5])
            raise RunNotFound(
                f"sweep {key!r} is ambiguous in the run history", hint=f"sweeps: {ids}..."
            )
        raise RunNotFound(
            f"no sweep {key!r} in the run history ({self.path})",
            hint="give a sweep's id or name as dspex.sweep(..., name=) set it",
        )


# Sweep columns a caller may set (JSON ones are dumped).
_SWEEP_COLUMNS = {
    "name": "text",
    "status": "text",
    "configs": "json",
    "runs": "json",
    "budget": "json",
    "folder": "text",
    "pool": "text",
    "notebook": "text",
    "host": "text",
    "pid": "int",
}


@dataclass
class SweepRecord:
    """One sweep as the history holds it: its configs, and per config the run started
    for it (``runs``: index, label, run_id, checkpoint_dir, status)."""

    sweep_id: str
    name: str = ""
    status: str = "running"
    configs: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    budget: dict[str, Any] = field(default_factory=dict)
    folder: str | None = None
    pool: str | None = None
    notebook: str | None = None
    host: str | None = None
    pid: int | None = None
    created: float = 0.0
    updated: float = 0.0

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> SweepRecord:
        return cls(**_decoded(row, _SWEEP_COLUMNS))


def _add_missing_run_columns(conn: sqlite3.Connection) -> None:
    """An older file's runs table gains the columns added since (NULL in its rows), as a
    migration would: CREATE TABLE IF NOT EXISTS leaves an existing table as it is."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    types = {"text": "TEXT", "json": "TEXT", "real": "REAL", "int": "INTEGER"}
    for name, kind in _COLUMNS.items():
        if name not in have:
            conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {types[kind]}")


def _decoded(row: sqlite3.Row, columns: dict[str, str]) -> dict[str, Any]:
    """A row's values with its JSON columns parsed."""
    values = dict(row)
    for name, kind in columns.items():
        if kind == "json" and values.get(name) is not None:
            values[name] = json.loads(values[name])
    return values


def _upsert_sql(table: str, key: str, names: list[str]) -> str:
    """Insert a row keyed by ``key`` or update only the given columns of the row there: a
    writer never clears what another notebook wrote to the columns it did not name."""
    columns = [key, *names, "created", "updated"]
    updates = ", ".join(f"{name} = excluded.{name}" for name in [*names, "updated"])
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        f" ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )


def _like(text: str) -> str:
    """``text`` matched literally inside a LIKE pattern."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _stored(name: str, value: Any) -> Any:
    kind = _COLUMNS[name]
    if value is None:
        return None
    if kind == "json":
        return _json(scrub_secrets(value))
    if kind == "real":
        return float(value)
    if kind == "int":
        return int(value)
    return str(value)


def _trial_row(run_id: str, trial: dict[str, Any]) -> tuple[Any, ...]:
    def number(value: Any) -> float | None:
        return (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )

    return (
        run_id,
        int(trial.get("number", 0)),
        str(trial.get("eval") or "full"),
        number(trial.get("score")),
        number(trial.get("best_score")),
        _json(trial.get("params") or {}),
        number(trial.get("time")),
    )


# ---- comparing runs ------------------------------------------------------------------
def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"auto": "light"}}`` -> ``{"optimizer.auto": "light"}``."""
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value} if prefix else {}


def config_differences(records: Sequence[RunRecord]) -> dict[str, list[Any]]:
    """The config settings whose values differ between the runs: key -> value per run."""
    flats = [flatten(record.config) for record in records]
    keys = sorted({key for flat in flats for key in flat})
    return {
        key: [flat.get(key) for flat in flats]
        for key in keys
        if len({_json(flat.get(key)) for flat in flats}) > 1
    }


def instruction_diff(first: RunRecord, second: RunRecord) -> list[str]:
    """A unified diff of the two runs' best instructions, predictor by predictor."""
    a, b = first.instructions, second.instructions
    lines: list[str] = []
    for name in sorted(set(a) | set(b)):
        if a.get(name) == b.get(name):
            continue
        lines += difflib.unified_diff(
            (a.get(name) or "").splitlines(),
            (b.get(name) or "").splitlines(),
            f"{first.run_id}/{name}",
            f"{second.run_id}/{name}",
            lineterm="",
        )
    return lines


def demos_of(record: RunRecord) -> dict[str, list[dict[str, Any]]]:
    """Each predictor's demos in the run's best program (empty before one exists)."""
    state = record.best_program or {}
    if isinstance(state.get("signature"), dict):
        state = {"self": state}
    return {
        name: [d for d in part.get("demos") or [] if isinstance(d, dict)]
        for name, part in state.items()
        if isinstance(part, dict) and name != "metadata"
    }


def _demo_lines(demos: list[dict[str, Any]]) -> list[str]:
    """One line per demo, its fields in order ("question: 1+1 | answer: 2")."""
    return [
        " | ".join(f"{k}: {' '.join(str(v).split())}" for k, v in demo.items() if k != "augmented")
        for demo in demos
    ]


def program_diff(first: RunRecord, second: RunRecord) -> list[str]:
    """A unified diff of the two runs' best programs: instructions, then demos (one line
    each), predictor by predictor."""
    lines = instruction_diff(first, second)
    a, b = demos_of(first), demos_of(second)
    for name in sorted(set(a) | set(b)):
        left, right = _demo_lines(a.get(name, [])), _demo_lines(b.get(name, []))
        if left == right:
            continue
        lines += difflib.unified_diff(
            left,
            right,
            f"{first.run_id}/{name}/demos",
            f"{second.run_id}/{name}/demos",
            lineterm="",
        )
    return lines


# ---- recording run handles -------------------------------------------------------------
def current_notebook() -> str | None:
    """The notebook this kernel runs: ipykernel's ``__session__`` (JupyterLab and Notebook
    7 set it to the notebook's path), VS Code's ``__vsc_ipynb_file__``, or the server's
    ``JPY_SESSION_NAME``; None in a terminal or a script."""
    with contextlib.suppress(Exception):
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            for key in ("__session__", "__vsc_ipynb_file__"):
                value = shell.user_ns.get(key)
                if isinstance(value, str) and value:
                    return value
    return os.environ.get("JPY_SESSION_NAME") or None


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """What a run was configured with (optimizer options, compile arguments, program,
    metric and LM references), without secrets, ids, paths or the initial program state."""
    config = {k: v for k, v in spec.items() if k not in ("run_id", "checkpoint_dir")}
    program = config.get("program")
    if isinstance(program, dict) and "state" in program:
        config["program"] = {k: v for k, v in program.items() if k != "state"}
    return scrub_secrets(config)


def optimizer_of(run: Any) -> str:
    """The run's optimizer name: the handle's ``optimizer`` (a display name), else its
    run.json's teleprompter, else MIPROv2 (runs that predate other optimizers)."""
    name = getattr(run, "optimizer", None)
    if isinstance(name, str) and name:
        return name
    teleprompter = (getattr(run, "spec", None) or {}).get("teleprompter") or {}
    return str(teleprompter.get("name") or "MIPROv2")


def best_score_of(run: Any) -> float | None:
    metrics = getattr(run, "metrics", None) or {}
    best = metrics.get("best_score")
    if best is None:
        best = (metrics.get("progress") or {}).get("best_score")
    return best if isinstance(best, int | float) and not isinstance(best, bool) else None


def run_fields(run: Any) -> dict[str, Any]:
    """A run handle's row as it stands now (public attributes only)."""
    metrics = getattr(run, "metrics", None) or {}
    usage = metrics.get("usage") or {}
    pool = getattr(run, "pool", None)
    error = getattr(run, "error", None)
    fields = {
        "optimizer": optimizer_of(run),
        "status": getattr(run, "status", None) or "starting",
        "config": run_config(getattr(run, "spec", None) or {}),
        "usage": usage,
        "cost": usage.get("cost"),
        "best_score": best_score_of(run),
        "trials": metrics.get("trials") or None,
        "checkpoint_dir": str(getattr(run, "checkpoint_dir", "") or "") or None,
        "notebook": current_notebook(),
        "pool": getattr(pool, "name", None) or getattr(run, "pool_name", None),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "error": str(error).splitlines()[0] if error else None,
    }
    # A value not known yet (a resumed run before its first trial) keeps the stored one;
    # an error stays only while the run is failed (a resumed run goes on without it).
    known = {k: v for k, v in fields.items() if v is not None and v != {}}
    if known["status"] != "failed":
        known["error"] = None
    return known


def trial_of(event: dict[str, Any]) -> dict[str, Any]:
    return {
        "number": event.get("number", 0),
        "eval": event.get("eval") or "full",
        "score": event.get("score"),
        "best_score": event.get("best_score"),
        "params": event.get("params") or {},
        "time": event.get("time"),
    }


# The "progress" event that closes one unit of an optimizer's search, as that optimizer's
# trial: (the field that numbers it, the field with its own score, what it evaluated).
# MIPROv2 sends "trial" events of its own; these adapters report steps as progress
# (runtime/gepa.py, copro.py, simba.py, bootstrap_rs.py; generic.py per dspy.Evaluate).
PROGRESS_TRIALS: dict[str, tuple[str, str | None, str]] = {
    "GEPA": ("iteration", None, "full"),  # its accepted proposal's score: see below
    "COPRO": ("step", None, "full"),
    "SIMBA": ("step", "step_best", "minibatch"),
    "BootstrapFewShotWithRandomSearch": ("step", "score", "full"),
}
GENERIC_TRIAL = ("evaluations", None, "full")  # any other optimizer: each dspy.Evaluate
# Progress fields that are no trial parameter (bookkeeping, or the scores themselves).
_NOT_PARAMS = {"seq", "time", "kind", "optimizer", "phase", "best_score", "usage", "proposal"}


def trials_of(event: dict[str, Any]) -> list[dict[str, Any]]:
    """The trial rows an event holds: a "trial" event's, or the one of a "progress" event
    that closes a step of GEPA, COPRO, SIMBA, BootstrapFewShotWithRandomSearch or an
    optimizer without an adapter (one row per ``dspy.Evaluate``), so every optimizer's
    runs list trials in the history and log per-trial metrics to MLflow."""
    kind = event.get("kind")
    if kind == "trial":
        return [trial_of(event)]
    if kind != "progress" or event.get("optimizer") == "MIPROv2":  # it sends "trial"s
        return []
    numbered, scored, evaluated = PROGRESS_TRIALS.get(str(event.get("optimizer")), GENERIC_TRIAL)
    number = event.get(numbered)
    if isinstance(number, bool) or not isinstance(number, int):
        return []  # a progress event between steps (metric calls counted, say)
    score = event.get(scored) if scored else None
    params = {
        k: v
        for k, v in event.items()
        if k not in _NOT_PARAMS and k != scored and isinstance(v, str | int | float | bool)
    }
    proposal = event.get("proposal")
    if isinstance(proposal, dict):  # GEPA: this iteration's proposal and its fate
        params["accepted"] = bool(proposal.get("accepted"))
        if proposal.get("accepted") and isinstance(proposal.get("score"), int | float):
            score = proposal["score"]
    return [
        {
            "number": number,
            "eval": evaluated,
            "score": score,
            "best_score": event.get("best_score"),
            "params": params,
            "time": event.get("time"),
        }
    ]


class HistoryWriter:
    """Writes run handles' rows on a thread of its own, in the order they were asked for.
    ``flush`` waits for what was asked so far (tests, ``load_program`` right after a run)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Path, str, dict[str, Any], list[Any]]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._warned = False
        self._progress_at: dict[str, float] = {}
        self._statuses: dict[str, str] = {}  # the status last recorded on a "phase" event
        # Followed runs whose final row is not asked for yet: id -> (run, asked)
        self._finals: dict[int, tuple[Any, threading.Event]] = {}

    def submit(self, path: Path, run_id: str, fields: dict[str, Any], trials: list[Any]) -> None:
        with self._lock:
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="dspex-run-history", daemon=True
                )
                self._thread.start()
        self._queue.put((path, run_id, fields, trials))

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every row asked for so far is written, the final rows of followed
        runs that have ended included (``run.result()`` returns a moment before its row
        is asked for); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            finals = list(self._finals.values())
        for run, asked in finals:
            if getattr(run, "done", False):
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                asked.wait(left)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0, left)

    def expect_final(self, run: Any) -> threading.Event:
        asked = threading.Event()
        with self._lock:
            self._finals[id(run)] = (run, asked)
        return asked

    def final_asked(self, run: Any, asked: threading.Event) -> None:
        with self._lock:
            self._finals.pop(id(run), None)
        asked.set()

    def _loop(self) -> None:
        while True:
            path, run_id, fields, trials = self._queue.get()
            try:
                RunHistory(path).record(run_id, trial_rows=trials, **fields)
            except Exception as exc:  # the run goes on; the history misses this update
                self.warn(exc)
            finally:
                with self._lock:
                    self._pending -= 1
                    self._lock.notify_all()

    def warn(self, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning("dspex: a run could not be recorded in the run history: %s", exc)

    def status_changed(self, run_id: str, status: str) -> bool:
        if self._statuses.get(run_id) == status:
            return False
        self._statuses[run_id] = status
        return True

    def wants_progress(self, run_id: str) -> bool:
        now = time.monotonic()
        if now - self._progress_at.get(run_id, 0.0) < PROGRESS_EVERY_S:
            return False
        self._progress_at[run_id] = now
        return True


writer = HistoryWriter()
atexit.register(writer.flush, 5.0)


def record_run_event(run: Any, event: dict[str, Any]) -> None:
    """Record what ``event`` changed about ``run`` (called by the run handle for each of
    its events, after applying it). Never raises: the run matters more than its record."""
    try:
        kind = event.get("kind")
        trials = trials_of(event)
        if kind == "progress" and not trials:  # a step's progress is always a trial row
            if not writer.wants_progress(run.run_id):
                return
        elif kind == "phase":  # many per run: only the one that makes it "running"
            if not writer.status_changed(run.run_id, run.status):
                return
        elif kind not in RECORDED_KINDS and not trials:
            return
        fields = run_fields(run)
        if trials and kind == "progress":  # the run handle counts MIPROv2's trials only
            fields["trials"] = max(int(fields.get("trials") or 0), trials[0]["number"])
        writer.submit(history_path(), run.run_id, fields, trials)
    except Exception as exc:
        writer.warn(exc)


def record_run_result(run: Any, result: Any) -> None:
    """Record a finished run's best program (``result.state``, the ``dump_state()`` of
    the optimized program) with the run's final row. Never raises."""
    try:
        fields = run_fields(run)
        state = getattr(result, "state", None)
        if isinstance(state, dict):
            fields["best_program"] = state
        writer.submit(history_path(), run.run_id, fields, [])
    except Exception as exc:
        writer.warn(exc)


def follow_run(run: Any) -> None:
    """Record ``run`` from now on (the run handle calls this once when it starts or
    resumes): each event that changes its row, then its final row with the best program
    once the handle has the result. A thread waits for the end, because a run can also end
    without a last event (its kernel died for good). Never raises."""
    try:
        run.on_event(lambda event: record_run_event(run, event))
        asked = writer.expect_final(run)
        threading.Thread(
            target=_record_when_done,
            args=(run, asked),
            name="dspex-run-history-final",
            daemon=True,
        ).start()
    except Exception as exc:
        writer.warn(exc)


def _record_when_done(run: Any, asked: threading.Event) -> None:
    try:
        result = run.result(timeout=None)
    except Exception:  # failed or cancelled: its final row, without a program
        result = None
    try:
        record_run_result(run, result)
    finally:
        writer.final_asked(run, asked)


def default_history() -> RunHistory:
    """This user's history, with this process's pending writes in it."""
    writer.flush()
    return RunHistory()


# ---- loading a run's best program --------------------------------------------------------
def load_program(run_id: str, program: Any = None, *, trusted_modules: Sequence[str] = ()) -> Any:
    """The best program of run ``run_id`` (or a unique prefix of it) as a ``dspy.Module``,
    in one call: its stored state loaded into a copy of ``program``, or, without one, into
    the program rebuilt from the run's reference (DSPy's own classes always; an import path
    only from a checkpoint folder your key signed and from trusted modules, as resume)."""
    record = default_history().get(run_id)
    if not record.best_program:
        raise NoBestProgram(f"run {record.run_id} has no best program (it is {record.status})")
    import dspy

    if program is None:
        program = _rebuild_program(record, trusted_modules)
    if not isinstance(program, dspy.Module):
        raise TypeError(f"program must be a dspy.Module, got {type(program).__name__}")
    fresh = program.deepcopy()
    fresh.load_state(record.best_program)
    return fresh


def _rebuild_program(record: RunRecord, trusted_modules: Sequence[str]) -> Any:
    from ..checkpoint import (
        CheckpointDir,
        CheckpointError,
        ForbiddenReferenceError,
        import_reference,
        read_json_checked,
        trusted_module_roots,
    )

    spec = (record.config or {}).get("program") or {}
    if spec.get("kind") == "dspy" and spec.get("class") and spec.get("signature"):
        import dspy

        cls = import_reference(spec["class"], ("dspy",), "program class")
        if not (isinstance(cls, type) and issubclass(cls, dspy.Module)):
            raise ForbiddenReferenceError(
                f"program class {spec['class']!r} is not a dspy.Module subclass",
                hint=f"pass the program: load_program({record.run_id!r}, MyProgram())",
            )
        return cls(spec["signature"])
    if spec.get("kind") == "ref" and record.checkpoint_dir:
        from ..trust import verify_checkpoint

        folder = CheckpointDir(record.checkpoint_dir)
        verdict = verify_checkpoint(folder)
        if not verdict.trusted:
            raise HistoryError(
                f"run {record.run_id}'s program is named by its checkpoint folder, which "
                f"dspex will not import from: {verdict.reason}",
                hint=f"pass the program: load_program({record.run_id!r}, MyProgram()), or "
                f"`dspex trust {record.checkpoint_dir}` if you wrote it",
            )
        try:
            signed = read_json_checked(folder.run_file).get("program") or {}
        except CheckpointError as exc:
            raise HistoryError(f"run {record.run_id}'s checkpoint cannot be read: {exc}") from None
        import dspy

        roots = trusted_module_roots(tuple(trusted_modules))
        obj = import_reference(signed.get("ref"), roots, "program")
        if isinstance(obj, type) and issubclass(obj, dspy.Module):
            obj = obj()
        if isinstance(obj, dspy.Module):
            return obj
        raise ForbiddenReferenceError(
            f"program reference {signed.get('ref')!r} names a {type(obj).__name__}, "
            "not a dspy.Module",
            hint=f"pass the program: load_program({record.run_id!r}, MyProgram())",
        )
    raise HistoryError(
        f"run {record.run_id}'s program was defined in a notebook: the history holds its "
        "optimized state, not its code",
        hint=f"pass an instance of it: load_program({record.run_id!r}, MyProgram())",
    )
