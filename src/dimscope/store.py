"""The run store: one SQLite database per run directory, in WAL mode.

Tables
------
``manifest``   key → JSON value (versions, config, probe hash, layers, metric definitions, sessions)
``scalars``    long format: step, wall_time, layer, metric, value, space, convention
               (``space`` is ``activation``, ``weight`` or ``training``; training scalars such as
               the loss have ``layer = ''``)
``spectra``    step, layer, space, convention, n_samples, n_features, centered, trace, values (float64)
``events``     step, wall_time, kind, layer, metric, payload (JSON): transitions, alerts, notes
``artifacts``  name → a numpy array, a DataFrame or a JSON object (analysis results for the report)

Commit policy: the writer commits at least every ``commit_every`` measurements or every
``commit_seconds`` seconds, whichever comes first, on :meth:`RunStore.close`, and when the
tracker's context exits with an exception. SQLite's WAL journal makes each commit durable against a
crash of the process (``synchronous=NORMAL``): a run killed with SIGKILL keeps every committed
measurement. Opening an existing run appends to it; ``overwrite=True`` starts it afresh.
"""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._validation import check_bool, check_choice, check_int
from .spectrum import Spectrum, ceiling

__all__ = ["RunStore", "Run", "open_run", "DB_NAME"]

DB_NAME = "dimscope.sqlite"
SPACES = ("activation", "weight", "training")  # what a stored value measures

_SCHEMA = """
CREATE TABLE IF NOT EXISTS manifest (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scalars (
    step INTEGER NOT NULL, wall_time REAL, layer TEXT NOT NULL, metric TEXT NOT NULL,
    value REAL, space TEXT NOT NULL, convention TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS scalars_lm ON scalars (metric, layer, space, convention, step);
CREATE TABLE IF NOT EXISTS spectra (
    step INTEGER NOT NULL, wall_time REAL, layer TEXT NOT NULL, space TEXT NOT NULL,
    convention TEXT NOT NULL, n_samples INTEGER, n_features INTEGER, centered INTEGER,
    trace REAL, n_values INTEGER, vals BLOB
);
CREATE INDEX IF NOT EXISTS spectra_l ON spectra (layer, space, convention, step);
CREATE TABLE IF NOT EXISTS measured (
    step INTEGER NOT NULL, wall_time REAL, layer TEXT NOT NULL, space TEXT NOT NULL, convention TEXT NOT NULL,
    n_samples INTEGER, n_features INTEGER, centered INTEGER, ceiling INTEGER, params TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS measured_k ON measured (layer, space, convention, step, wall_time);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, step INTEGER, wall_time REAL, kind TEXT NOT NULL,
    layer TEXT, metric TEXT, payload TEXT
);
CREATE TABLE IF NOT EXISTS artifacts (name TEXT PRIMARY KEY, kind TEXT NOT NULL, created REAL, meta TEXT, data BLOB);
"""


def _db_path(path: str | os.PathLike[str]) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"A run's path must be a str or os.PathLike (its folder, or its {DB_NAME} file). Got {path!r}.")
    if not str(path).strip():
        raise ValueError(f"A run's path must name its folder or its {DB_NAME} file. Got {str(path)!r}, which would be the current "
                         "directory; pass '.' to mean that.")
    p = Path(path)
    if p.suffix in (".sqlite", ".db") or p.is_file():
        return p
    return p / DB_NAME


_SQLITE_HEADER = b"SQLite format 3\x00"


_EMPTY = "it is an empty file"
_NO_TABLES = "it is a SQLite database without tables"


def _not_a_run(db: Path) -> str | None:
    """Why the existing file ``db`` is not a dimscope run's database (None when it is one). Read
    without writing: a file that is not a run is left as it was. An empty file, or a database with
    no tables yet, is what a writer creating the run leaves for a moment (``_EMPTY``, ``_NO_TABLES``)."""
    try:
        with open(db, "rb") as f:
            head = f.read(len(_SQLITE_HEADER))
    except OSError as e:
        return f"it cannot be read ({e})"
    if head != _SQLITE_HEADER:
        return _EMPTY if not head else "it is not a SQLite database"
    try:
        con, _ = _read_only(db)
        try:
            tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        return f"it is a damaged SQLite database ({e})"
    if not tables:
        return _NO_TABLES
    return None if "manifest" in tables else "it is a SQLite database without dimscope's tables"


def _wait_for_run(db: Path, seconds: float = 2.0) -> str | None:
    """:func:`_not_a_run`, giving a run that another process is creating (an empty file, no tables
    yet) ``seconds`` to appear."""
    deadline = time.monotonic() + seconds
    while True:
        why = _not_a_run(db)
        if why not in (_EMPTY, _NO_TABLES) or time.monotonic() >= deadline:
            return why
        time.sleep(0.05)


def _json(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, sort_keys=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def _connect(db: Path) -> sqlite3.Connection:
    con = sqlite3.connect(str(db), timeout=30.0, check_same_thread=False, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA busy_timeout=30000")
    except BaseException:
        con.close()
        raise
    return con


def _cannot_write(e: BaseException) -> bool:
    """Whether SQLite failed for want of write access (to the database, or to its directory, where a
    WAL reader keeps its ``-shm`` index): SQLITE_READONLY and its variants, SQLITE_CANTOPEN. A
    damaged file fails otherwise ("malformed", "not a database")."""
    return isinstance(e, sqlite3.OperationalError) and ("readonly" in str(e) or "unable to open" in str(e))


def _file_state(db: Path) -> tuple[int, int, bool]:
    """What changes when a writer opens or writes ``db``: its mtime and size, and whether a log exists."""
    st = db.stat()
    return st.st_mtime_ns, st.st_size, db.with_name(db.name + "-wal").exists()


def _read_only(db: Path) -> tuple[sqlite3.Connection, bool]:
    """A connection that only reads ``db``, and whether it is immutable. Where the reader cannot write
    the run's directory (a read-only mount, another user's run), SQLite reads a live run's log
    through its writer's index if it may read that, and cannot open a closed run's log at all: a run
    with no log left (closed by its writer) is then read as an immutable file, which is exact until a
    writer opens it again (:class:`Run` then reopens). A log that holds data without a readable index
    (a copy made while training ran) cannot be read without write access: a PermissionError says so."""
    uri = db.resolve().as_uri()
    con = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30.0, check_same_thread=False)
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return con, False
    except sqlite3.Error as e:
        con.close()
        if not _cannot_write(e):
            raise
        reason = str(e)
    wal = db.with_name(db.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise PermissionError(
            f"The run {db} cannot be read without write access to {db.parent}: its write-ahead log {wal.name} still holds "
            f"data (training may still be writing it), and SQLite cannot read that log here ({reason}). "
            "Open it from a place you can write, or copy the run directory after the writer has closed it."
        )
    return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=30.0, check_same_thread=False), True


def _connect_reader(db: Path) -> tuple[sqlite3.Connection, str]:
    """A reader's connection and its kind: ``"rw"`` (the writer's settings) where the run's directory
    can be written, else ``"ro"`` or ``"immutable"`` (:func:`_read_only`)."""
    try:
        return _connect(db), "rw"
    except sqlite3.Error as e:
        if not _cannot_write(e):
            raise
    con, immutable = _read_only(db)
    return con, "immutable" if immutable else "ro"


class RunStore:
    """Writer side of a run. Thread-safe (one lock around the connection).

    Parameters
    ----------
    path:
        The run directory (created if needed) or a ``.sqlite`` file.
    overwrite:
        Delete an existing run first. Without it, an existing run is appended to.
    commit_every, commit_seconds:
        The commit policy (see the module docstring).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        commit_every: int = 10,
        commit_seconds: float = 2.0,
    ) -> None:
        overwrite = check_bool(overwrite, "overwrite", owner="RunStore")  # "no" must not wipe a run
        self.db_path = _db_path(path)
        self.path = self.db_path.parent
        existed = self.db_path.exists()
        if existed:
            why = _not_a_run(self.db_path)
            # a run (or a file with nothing to lose: empty, no tables yet) is appended to; overwrite also
            # replaces a damaged run; never a file that was not a run
            if why is not None and why not in (_EMPTY, _NO_TABLES) and not (overwrite and why.startswith("it is a damaged")):
                raise ValueError(f"The run path {str(path)!r} names {self.db_path}, which is not a dimscope run: {why}. "
                                 "Give a new folder (or the folder of an existing run).")
        self.path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            if existed and self.db_path.name == DB_NAME:
                # the old run's folder: the exports and the report (page and figures) dimscope wrote there
                # describe the old run, not the new one; nothing else in the folder is touched, and a file
                # that cannot be removed is left (before the database is, so that nothing is lost half-way)
                stale = [self.path / "scalars.csv", self.path / "scalars.parquet"]
                page = self.path / "report" / "report.html"
                if page.is_file():  # the page and the figures it names (other files in report/ stay)
                    try:
                        named = set(re.findall(r"[\w.-]+\.png", page.read_text(errors="replace")))
                    except OSError:
                        named = set()
                    stale += [page, *(self.path / "report" / name for name in sorted(named))]
                for f in stale:
                    try:
                        f.unlink(missing_ok=True)
                    except OSError:
                        pass
            for suffix in ("", "-wal", "-shm"):
                f = Path(str(self.db_path) + suffix)
                if f.exists():
                    f.unlink()
        self.existed = self.db_path.exists()
        self.commit_every = commit_every
        self.commit_seconds = commit_seconds
        self._lock = threading.RLock()
        self._con = _connect(self.db_path)
        # all tables at once, so a reader never sees half a schema; IMMEDIATE takes the write lock up front
        # (a deferred transaction that must upgrade to add a missing table fails at once when another
        # process wrote in between, busy timeout or not)
        self._con.executescript("BEGIN IMMEDIATE;\n" + _SCHEMA + "COMMIT;\n")
        self._con.execute("BEGIN")
        self._pending = 0
        self._last_commit = time.monotonic()
        self.n_commits = 0
        self.closed = False
        self.on_commit: list[Any] = []

    # -- writing ----------------------------------------------------------------------------------
    def set_manifest(self, entries: Mapping[str, Any]) -> None:
        with self._lock:
            self._con.executemany(
                "INSERT OR REPLACE INTO manifest (key, value) VALUES (?, ?)",
                [(k, _json(v)) for k, v in entries.items()],
            )

    def get_manifest(self) -> dict[str, Any]:
        with self._lock:
            rows = self._con.execute("SELECT key, value FROM manifest").fetchall()
        return {k: json.loads(v) for k, v in rows}

    def add_scalars(self, rows: Iterable[tuple[int, float, str, str, float, str, str]]) -> None:
        """Rows of (step, wall_time, layer, metric, value, space, convention)."""
        with self._lock:
            self._con.executemany("INSERT INTO scalars VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def add_measured(self, rows: Iterable[tuple[int, float, str, str, str, int, int, bool, dict[str, Any] | str | None]]) -> None:
        """What one measurement's values of a layer were measured on: rows of (step, wall_time,
        layer, space, convention, n_samples, n_features, centered, params), with the step and
        wall_time of its scalar rows. The ceiling min(n - 1, d) (centered) or min(n, d) is derived;
        ``params`` (the metrics' parameters, e.g. ε) is stored as JSON. :meth:`Run.scalars` joins
        them to every value of that measurement (also when an appended session repeats a step)."""
        out = []
        for step, wall_time, layer, space, conv, n, d, centered, params in rows:
            js = params if isinstance(params, str) or params is None else _json(params)
            out.append((step, wall_time, layer, space, conv, int(n), int(d), int(bool(centered)), ceiling(n, d, centered), js))
        with self._lock:
            self._con.executemany("INSERT OR REPLACE INTO measured VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", out)

    def add_spectrum(
        self, step: int, wall_time: float, layer: str, spec: Spectrum, *, space: str, convention: str, top_k: int | None = None
    ) -> None:
        self.add_spectra([(step, wall_time, layer, spec, space, convention)], top_k=top_k)

    def add_spectra(self, items: Iterable[tuple[int, float, str, Spectrum, str, str]], *, top_k: int | None = None) -> None:
        """Many spectra in one statement: (step, wall_time, layer, spectrum, space, convention)."""
        rows = []
        for step, wall_time, layer, spec, space, convention in items:
            vals = spec.values if top_k is None else spec.values[:top_k]
            rows.append((
                int(step), wall_time, layer, space, convention, spec.n_samples, spec.n_features,
                int(spec.centered), float(spec.trace), len(vals), np.ascontiguousarray(vals, dtype="<f8").tobytes(),
            ))
        with self._lock:
            self._con.executemany("INSERT INTO spectra VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def add_event(
        self, step: int | None, kind: str, *, layer: str | None = None, metric: str | None = None,
        payload: Mapping[str, Any] | None = None, wall_time: float | None = None,
    ) -> None:
        with self._lock:
            self._con.execute(
                "INSERT INTO events (step, wall_time, kind, layer, metric, payload) VALUES (?, ?, ?, ?, ?, ?)",
                (None if step is None else int(step), wall_time if wall_time is not None else time.time(), kind, layer, metric, _json(payload or {})),
            )

    def clear_events(self, kind: str) -> None:
        with self._lock:
            self._con.execute("DELETE FROM events WHERE kind = ?", (kind,))

    def put_artifact(self, name: str, obj: Any, meta: Mapping[str, Any] | None = None) -> None:
        """Store a numpy array, a pandas DataFrame or a JSON-able object under ``name`` (replacing)."""
        if isinstance(obj, np.ndarray):
            buf = io.BytesIO()
            np.save(buf, obj, allow_pickle=False)
            kind, data = "ndarray", buf.getvalue()
        elif isinstance(obj, pd.DataFrame):
            kind, data = "dataframe", obj.to_json(orient="split").encode()
        else:
            kind, data = "json", _json(obj).encode()
        with self._lock:
            self._con.execute(
                "INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?)", (name, kind, time.time(), _json(meta or {}), data)
            )

    def measurement_done(self) -> bool:
        """Count one measurement; commit if the policy says so. Returns True if it committed."""
        self._pending += 1
        if self._pending >= self.commit_every or time.monotonic() - self._last_commit >= self.commit_seconds:
            self.commit()
            return True
        return False

    def commit(self) -> None:
        with self._lock:
            if self.closed:
                return
            self._con.execute("COMMIT")
            self._con.execute("BEGIN")
            self._pending = 0
            self._last_commit = time.monotonic()
            self.n_commits += 1
        for cb in list(self.on_commit):
            cb(self)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self._con.execute("COMMIT")
            self.closed = True
            self._con.close()

    def reader(self) -> Run:
        return Run(self.db_path)

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_MEASURED_COLUMNS = ("n_samples", "n_features", "centered", "ceiling", "params")


class Run:
    """Reader side of a run; safe to use while training is still writing it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.db_path = _db_path(path)
        if not self.db_path.exists():
            raise FileNotFoundError(f"No dimscope run at {str(path)!r} (expected {self.db_path}).")
        why = _wait_for_run(self.db_path)
        if why is not None:
            raise ValueError(f"{self.db_path} is not a dimscope run: {why}.")
        self.path = self.db_path.parent
        self._open()

    def _open(self) -> None:
        """Connect (see :func:`_connect_reader`); an immutable connection keeps the file's state to
        notice a writer (:meth:`_query`)."""
        self._conn, self._kind = _connect_reader(self.db_path)
        self._state = _file_state(self.db_path) if self._kind == "immutable" else None

    def _query(self, fn: Any) -> Any:
        """``fn(connection)``. A reader that cannot write the run's directory follows a writer too:
        an immutable connection is reopened once the file changes (a writer resumed the run), and a
        query retries, reopening, when SQLite cannot use the writer's index at that moment
        (SQLITE_READONLY_RECOVERY while the writer checkpoints, or the index gone when it closed)."""
        for attempt in range(50):
            if self._kind == "immutable" and _file_state(self.db_path) != self._state:
                self._reopen()
            try:
                return fn(self._conn)
            except sqlite3.OperationalError as e:
                if not _cannot_write(e) or attempt == 49:  # a reader never writes: this is about the index
                    raise
            time.sleep(min(0.002 * (attempt + 1), 0.05))
            self._reopen()
        raise AssertionError("unreachable")

    def _reopen(self) -> None:
        self._conn.close()
        self._open()

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        return self._query(lambda con: con.execute(sql, tuple(params)).fetchall())

    def _df(self, sql: str, params: Iterable[Any] = ()) -> pd.DataFrame:
        return self._query(lambda con: pd.read_sql_query(sql, con, params=list(params)))

    @property
    def manifest(self) -> dict[str, Any]:
        rows = self._rows("SELECT key, value FROM manifest")
        return {k: json.loads(v) for k, v in rows}

    @property
    def default_convention(self) -> str:
        return str(self.manifest.get("default_convention", "probe/centered"))

    @property
    def layers(self) -> list[str]:
        """The tracked layers: the latest session's (manifest) first, in its order, then any other
        layer with stored values (an appended session that tracked other layers hides none)."""
        m = list(self.manifest.get("layers") or [])
        if self._has_table("measured"):  # one row per layer and measurement: small, indexed by layer
            rows = self._rows("SELECT layer FROM measured GROUP BY layer ORDER BY MIN(rowid)")
        else:
            rows = self._rows("SELECT layer FROM scalars WHERE space != 'training' GROUP BY layer ORDER BY MIN(rowid)")
        return m + [r[0] for r in rows if r[0] not in m and r[0] != ""]

    @property
    def metrics(self) -> list[str]:
        """The names of the activation metrics this run records."""
        return [m for (m,) in self._rows("SELECT DISTINCT metric FROM scalars WHERE space = 'activation' ORDER BY metric")]

    @property
    def conventions(self) -> list[str]:
        rows = self._rows("SELECT DISTINCT convention FROM scalars WHERE space = 'activation'")
        return sorted(r[0] for r in rows)

    def scalars(self, space: str | None = None, convention: str | None = None) -> pd.DataFrame:
        """All scalars in long format (step, wall_time, layer, metric, value, space, convention),
        each measured value with what it was measured on: n_samples, n_features, centered, the
        ceiling min(n - 1, d) (or min(n, d) uncentered) and the metrics' parameters (``params``,
        JSON, e.g. ε of ``eps_rank``); these are empty for training scalars."""
        params: list[Any] = []
        where = []
        if space is not None:
            where.append("s.space = ?")
            params.append(check_choice(space, "space", SPACES, owner="Run.scalars"))
        if convention is not None:
            where.append("s.convention = ?")
            params.append(self._known_convention(convention))
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        if not self._has_table("measured"):  # a run written before the table existed
            df = self._df("SELECT * FROM scalars s" + cond + " ORDER BY s.step, s.rowid", params)
            for c in _MEASURED_COLUMNS:
                df[c] = None
            return df
        # a value and its description share the measurement's step and wall_time; only the
        # dimensionality metrics are described (not e.g. a probe accuracy stored beside them).
        # NOT INDEXED: the scalars are read in storage order, the description looked up by its index.
        from .metrics import METRICS

        sql = (
            "SELECT s.step, s.wall_time, s.layer, s.metric, s.value, s.space, s.convention, "
            + ", ".join(f"m.{c}" for c in _MEASURED_COLUMNS)
            + " FROM scalars s NOT INDEXED LEFT JOIN measured m ON m.layer = s.layer AND m.space = s.space"
            " AND m.convention = s.convention AND m.step = s.step AND m.wall_time = s.wall_time"
            " AND s.metric IN (" + ", ".join(f"'{k}'" for k in METRICS) + ")"
        )
        df = self._df(sql + cond + " ORDER BY s.step, s.rowid", params)
        df["value"] = df["value"].astype("float64")  # NaN is stored as NULL: an all-NaN column reads as objects
        return df

    def _convention(self, space: str, convention: str | None) -> str:
        """The convention asked for, else the run's default for activations and "weight" for weights."""
        check_choice(space, "space", SPACES, owner="Run")
        if convention is not None:
            return convention
        return self.default_convention if space == "activation" else "weight"

    def _known_convention(self, convention: str) -> str:
        """``convention`` if the run stores values under it, else a ValueError listing those it does."""
        sql = "SELECT DISTINCT convention FROM scalars" + (" UNION SELECT DISTINCT convention FROM spectra" if self._has_table("spectra") else "")
        known = {c for (c,) in self._rows(sql)} | {"weight", self.default_convention}
        for s in self.manifest.get("sessions", []):  # declared, maybe not measured yet (a live run)
            known |= {f"{m}/{c}" for m in s.get("modes", []) for c in s.get("conventions", [])}
        if convention not in known:
            known = sorted(c for c in known if c)
            raise ValueError(f"The 'convention' parameter of Run must be one this run stores: {', '.join(map(repr, known))}. "
                             f"Got {convention!r} instead.")
        return convention

    def _has_table(self, name: str) -> bool:
        return bool(self._rows("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)))

    def metric(self, name: str, layer: str | None = None, *, space: str = "activation", convention: str | None = None) -> pd.Series:
        """One metric of one layer as a Series indexed by training step.

        Training scalars (``loss``, ``grad_norm``, user scalars) take ``layer=None``.
        """
        check_choice(space, "space", SPACES, owner="Run.metric")
        if layer is None or space == "training":
            df = self._df(
                "SELECT step, value FROM scalars WHERE metric = ? AND space = 'training' ORDER BY step, rowid", [name]
            )
            label = name
        else:
            conv = self._convention(space, convention)
            df = self._df(
                "SELECT step, value FROM scalars WHERE metric = ? AND layer = ? AND space = ? AND convention = ? ORDER BY step, rowid",
                [name, layer, space, conv],
            )
            label = f"{layer}/{name}"
        if df.empty:
            known = self._rows("SELECT DISTINCT metric, layer, space, convention FROM scalars")
            where = f" convention {conv!r}" if layer is not None and space != "training" else ""
            raise KeyError(f"No values for metric {name!r} layer {layer!r} space {space!r}{where} in this run. Stored: {known[:30]}")
        s = df.drop_duplicates("step", keep="last").set_index("step")["value"].astype("float64")  # all-NaN (NULL) reads as objects
        s.name = label
        return s

    def training(self, name: str = "loss") -> pd.Series:
        """A training scalar (the loss, the gradient norm, a user scalar) indexed by step."""
        return self.metric(name, None, space="training")

    def spectra(self, layer: str, *, space: str = "activation", convention: str | None = None, limit: int | None = None) -> pd.Series:
        """The stored spectra of a layer: a Series of :class:`Spectrum` indexed by step, the latest
        of each step (of the first ``limit`` steps only, if given: a long run's spectra need not all be read)."""
        conv = self._convention(space, convention if convention is None else self._known_convention(convention))
        if limit is not None:
            limit = check_int(limit, "limit", min_value=1, owner="Run.spectra")
        where = "WHERE layer = ? AND space = ? AND convention = ?"
        rows = self._rows(
            f"SELECT step, n_samples, n_features, centered, trace, vals FROM spectra {where} "
            f"AND step IN (SELECT DISTINCT step FROM spectra {where} ORDER BY step LIMIT ?) ORDER BY step, rowid",
            (layer, space, conv, layer, space, conv, -1 if limit is None else limit),
        )
        if not rows and layer not in self.layers:
            raise KeyError(f"No layer {layer!r} in this run. Its layers: {self.layers}")
        data = {}
        for step, n, d, c, tr, blob in rows:
            data[int(step)] = Spectrum(np.frombuffer(blob, dtype="<f8").copy(), int(n), int(d), bool(c), float(tr))
        return pd.Series(data, dtype=object, name=layer)

    def recompute(self, metric: str, layer: str | None = None, *, space: str = "activation", convention: str | None = None, **params: Any) -> pd.DataFrame:
        """Recompute ``metric`` (with new parameters, e.g. ``eps=1e-2``) from the stored spectra.

        Returns a DataFrame with columns step, layer, value. Where spectra were stored truncated to
        their top K (``spectra=K``), a value the top K and the trace do not determine is NaN, with a
        warning: the stable rank always has its value, the ε-rank when fewer than K eigenvalues pass
        the threshold, the energy rank when the top K reach q·Σλ, the other metrics never.
        """
        from .metrics import check_metric_spec, compute_metrics

        if not isinstance(metric, str):
            raise TypeError(f"The 'metric' parameter of Run.recompute must be one metric's name. Got {metric!r} instead.")
        spec = check_metric_spec({metric: params}, owner="Run.recompute", name="metric")
        layers = [layer] if layer is not None else self.layers
        frames = []
        undetermined = 0
        for lay in layers:
            specs = self.spectra(lay, space=space, convention=convention)
            vals = [compute_metrics(s, spec)[metric] for s in specs.values]
            undetermined += sum(1 for s, v in zip(specs.values, vals) if s.truncated and np.isnan(v))
            frames.append(pd.DataFrame({"step": specs.index.astype(int), "layer": lay, "value": vals}))
        if undetermined:
            warnings.warn(
                f"dimscope: {undetermined} values of {metric!r} are NaN: the spectra were stored truncated to their top K "
                f"eigenvalues, which do not determine them (store spectra='all' to recompute any metric).",
                RuntimeWarning,
                stacklevel=2,
            )
        if not any(len(f) for f in frames):
            conv = self._convention(space, convention)
            stored = self._rows("SELECT DISTINCT layer, space, convention FROM spectra")
            raise KeyError(
                f"No stored spectra to recompute {metric!r} from for layer {layer if layer is not None else 'any'!r}, "
                f"space {space!r}, convention {conv!r} (a run written with spectra=None stores none). "
                f"Stored (layer, space, convention): {stored[:30]}"
            )
        return pd.concat(frames, ignore_index=True)

    def events(self, kind: str | None = None) -> pd.DataFrame:
        sql, params = "SELECT * FROM events", []
        if kind is not None:
            sql += " WHERE kind = ?"
            params.append(kind)
        df = self._df(sql + " ORDER BY id", params)
        df["payload"] = [json.loads(p) if p else {} for p in df["payload"]]
        return df

    def artifact(self, name: str, default: Any = KeyError) -> Any:
        row = next(iter(self._rows("SELECT kind, data FROM artifacts WHERE name = ?", (name,))), None)
        if row is None:
            if default is KeyError:
                raise KeyError(f"No artifact {name!r} in this run.")
            return default
        kind, data = row
        if kind == "ndarray":
            return np.load(io.BytesIO(data), allow_pickle=False)
        if kind == "dataframe":
            return pd.read_json(io.StringIO(data.decode()), orient="split", dtype=False, convert_dates=False)
        return json.loads(data.decode())

    def artifacts(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT name FROM artifacts ORDER BY name")]

    def export(self, out: str | os.PathLike[str], format: str = "csv") -> Path:
        """Write the scalars table to ``out`` as CSV or Parquet; returns the path written."""
        check_choice(format, "format", ("csv", "parquet"), owner="Run.export")
        out = Path(out)
        if out.is_file() and out.resolve() == self.db_path.resolve():
            out = out.parent  # the run named by its database file: export beside it, never over it
        if out.is_dir() or not out.suffix:
            out.mkdir(parents=True, exist_ok=True)
            out = out / f"scalars.{format}"
        elif out.suffix.lower() != f".{format}":
            raise ValueError(
                f"The 'out' parameter of Run.export must be a folder or a file ending in '.{format}' (format={format!r}). "
                f"Got {str(out)!r}."
            )
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
        df = self.scalars()
        if format == "csv":
            df.to_csv(out, index=False)
        else:
            df.to_parquet(out, index=False)
        return out

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_run(path: str | os.PathLike[str]) -> Run:
    """Open a run directory (or its ``.sqlite`` file) for reading."""
    return Run(path)
