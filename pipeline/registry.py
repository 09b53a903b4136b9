"""The checkpoint registry every stage shares: runs, lineage, metrics, published models, states.

One SQLite file (`registry.db`, WAL mode, busy timeout, one transaction per write) in the registry
home (`./runs`, `--home DIR` or `RLHF_HOME`). Files live beside it:

    HOME/runs/RUN_ID/model/          published model: a plain Hugging Face directory + manifest.json
    HOME/runs/RUN_ID/state/step-N/   resume state (only the same run reads it)
    HOME/data/                       generated data cache

A directory is committed by writing it under a temporary sibling name, flushing every file,
renaming it into place and writing `manifest.json` (sha256 of every file) last. A directory without
a valid manifest is never used. This module imports no torch, so `rlhf registry ls` stays fast.

A home can be moved or copied: the database stores the paths of its models relative to the home,
and a LoRA adapter whose base model lies in the home names it relative to the adapter's own
directory. Paths outside the home (a user's model directory) stay absolute. A home written before
paths were relative is upgraded once, when it is first opened for writing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError
from pipeline.guard import (ADAPTER_CONFIG, NOT_FOUND, NOT_FOUND_IN_FILE,
                            output_directory_problem, path_problem)

MANIFEST = "manifest.json"
PIPELINE_STAGE = "pipeline"  # the runs of `rlhf pipeline run`, whose summary names their stage runs
STATUSES = ("running", "completed", "failed", "interrupted")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # \Z: `$` would allow a final "\n"
# A hub model as users write it: `gpt2`, `org/name`, either with `@revision` (branch, tag, commit).
_HUB_RE = re.compile(r"^(?P<name>[A-Za-z0-9][\w.-]{0,95}(?:/[\w.-]{1,96})?)"
                     r"(?:@(?P<revision>[\w./-]{1,255}))?\Z")
# The database's `user_version`: 1 = model paths stored relative to the home (0: absolute).
RELATIVE_PATHS_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    status TEXT NOT NULL,
    config_json TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    data_fingerprint TEXT NOT NULL DEFAULT '',
    versions_json TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    pid INTEGER,
    host TEXT,
    model_path TEXT,
    files_json TEXT,
    summary_json TEXT NOT NULL DEFAULT '{}',
    pipeline_id TEXT
);
CREATE TABLE IF NOT EXISTS parents (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    parent_ref TEXT NOT NULL,
    parent_run TEXT,
    PRIMARY KEY (run_id, role)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics(run_id, name, step);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE
);
"""


@dataclass
class Run:
    """One row of the `runs` table, with its parents."""

    id: str
    stage: str
    status: str
    config: dict
    config_hash: str
    data_fingerprint: str
    versions: dict
    created_at: float
    updated_at: float
    model_path: str | None
    files: dict | None
    summary: dict
    pipeline_id: str | None
    pid: int | None = None
    host: str | None = None
    parents: dict[str, str] = field(default_factory=dict)      # role -> ref as given
    parent_runs: dict[str, str] = field(default_factory=dict)  # role -> run id (registry parents)

    def as_json(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k not in ("pid", "host")}
        return data


@dataclass
class Resolved:
    """What a reference points at: a local directory (maybe a registry run's) or a hub name."""

    path: str                 # a local directory, or a hub model/data set name
    run: Run | None = None    # the registry run, when the reference named one
    step: int | None = None   # set for RUN@step references (a resume state's model)
    revision: str | None = None  # a hub model's branch, tag or commit (`name@revision`)

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()

    @property
    def reference(self) -> str:
        """A reference that keeps naming the same model: the run id (and step), or the path or
        hub name (and revision)."""
        if self.run is None:
            return self.path + (f"@{self.revision}" if self.revision else "")
        return self.run.id + (f"@{self.step}" if self.step is not None else "")

    def verified_path(self) -> str:
        """The path, once a registry checkpoint (or any directory with a manifest) verified
        against its manifest; a plain directory or a hub name passes through."""
        path = Path(self.path)
        if self.run is not None:
            require_intact(path.parent if self.step is not None else path)
        elif path.is_dir() and (path / MANIFEST).exists():
            require_intact(path)
        return self.path


def default_home() -> Path:
    return Path(os.environ.get("RLHF_HOME") or "runs")


class Registry:
    """The registry at `home`. Opening it creates nothing: the first write (a run, an alias)
    creates the home and the database, so a command that only reads, or fails before it writes,
    leaves an empty home empty. `create=False` refuses a home without a database."""

    def __init__(self, home: str | Path | None = None, create: bool = True):
        self.home = Path(home) if home is not None else default_home()
        self.db_path = self.home / "registry.db"
        self._connection: sqlite3.Connection | None = None
        self._blank: sqlite3.Connection | None = None
        problem = path_problem(self.db_path, "file")
        if problem not in (NOT_FOUND["file"], NOT_FOUND_IN_FILE):
            self._connection = self._connect()  # which says what is wrong with a bad one
        elif not create:
            raise UserError(f"no registry at {self.home}; run a stage first or pass --home DIR")
        else:
            problem = output_directory_problem(self.home)
            if problem:
                raise UserError(f"registry home {self.home} is not writable ({problem}); pass "
                                f"--home DIR or set RLHF_HOME to a writable directory")

    @property
    def _db(self) -> sqlite3.Connection:
        """The database; before it exists, an empty one in memory that reads find nothing in."""
        if self._connection is None and self.db_path.exists():  # another process created it
            self._connection = self._connect()
        if self._connection is not None:
            return self._connection
        if self._blank is None:
            self._blank = sqlite3.connect(":memory:", isolation_level=None)
            self._blank.row_factory = sqlite3.Row
            self._blank.executescript(SCHEMA)
        return self._blank

    # -- set-up -------------------------------------------------------------------------------
    def _ensure_home(self) -> None:
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            probe = self.home / f".write-probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise UserError(f"registry home {self.home} is not writable ({err.strerror}); "
                            f"pass --home DIR or set RLHF_HOME to a writable directory")

    def _connect(self) -> sqlite3.Connection:
        problem = path_problem(self.db_path, "file")
        if problem and problem != NOT_FOUND["file"]:  # a new registry's file does not exist yet
            raise UserError(f"{self.db_path} cannot be used as a registry (it {problem}); pass "
                            f"--home DIR for another registry")
        if output_directory_problem(self.home) and problem is None:
            return self._connect_read_only()
        db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            # Reads the file header: a file that is not a database fails before the lock file
            # below is created beside it.
            db.execute("PRAGMA schema_version")
            db.execute("PRAGMA busy_timeout = 60000")
            db.execute("PRAGMA foreign_keys = ON")
            # Switching a new database to WAL needs an exclusive lock that SQLite does not wait
            # for (busy timeout or not), so two processes opening a new registry at once would
            # fail with "database is locked": the set-up runs under a file lock, one at a time.
            with open(self.home / ".setup.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    db.execute("PRAGMA journal_mode = WAL")
                db.executescript(SCHEMA)
                if db.execute("PRAGMA user_version").fetchone()[0] < RELATIVE_PATHS_VERSION:
                    self._make_paths_relative(db)
        except sqlite3.DatabaseError as err:
            db.close()
            if output_directory_problem(self.home):  # SQLite needs to write beside the file
                raise self._unwritable(err) from None
            raise UserError(f"{self.db_path} cannot be used as a registry ({err}); restore it "
                            f"from a backup or pass --home DIR for another registry") from None
        return db

    def _make_paths_relative(self, db: sqlite3.Connection) -> None:
        """Upgrade a home whose database stores absolute model paths (`HOME/runs/ID/model`),
        wherever the home was then, and whose adapters name their base by absolute path."""
        old_homes, changed = set(), 0
        db.execute("BEGIN IMMEDIATE")
        for row in db.execute("SELECT id, model_path FROM runs WHERE model_path LIKE '/%'"):
            stored = Path(row["model_path"])
            if stored.parts[-3:] == ("runs", row["id"], "model"):
                old_homes.add(stored.parents[2])
                db.execute("UPDATE runs SET model_path = ? WHERE id = ?",
                           (f"runs/{row['id']}/model", row["id"]))
                changed += 1
        for config_file in self.home.glob(f"runs/*/**/{ADAPTER_CONFIG}"):
            rewritten = _relocate_adapter_base(config_file.parent, old_homes, self.home)
            for path, digest in rewritten.items():
                _refresh_manifest_entry(path, digest)
            changed += bool(rewritten)
        for row in db.execute("SELECT id FROM runs WHERE files_json IS NOT NULL"):
            manifest = self.home / "runs" / row["id"] / "model" / MANIFEST
            if manifest.is_file():  # the record of its files follows a rewritten adapter config
                db.execute("UPDATE runs SET files_json = ? WHERE id = ?",
                           (json.dumps(json.loads(manifest.read_text())["files"]), row["id"]))
        db.execute(f"PRAGMA user_version = {RELATIVE_PATHS_VERSION}")
        db.execute("COMMIT")
        if changed:
            print(f"registry {self.home}: {changed} stored path(s) made relative to the home, so "
                  f"it can be moved or copied (a one-time upgrade)", file=sys.stderr)

    def _stored_path(self, path: Path) -> str:
        """How the database stores a path in the home: relative to it."""
        return path.resolve().relative_to(self.home.resolve()).as_posix()

    def _absolute(self, stored: str | None) -> str | None:
        """A stored path as a usable one (an old read-only home's paths are absolute already)."""
        if stored is None or Path(stored).is_absolute():
            return stored
        return str(self.home.resolve() / stored)

    def _connect_read_only(self) -> sqlite3.Connection:
        """A registry in a home this process cannot write: readable, and every write is refused
        (`_write` says so in one line). Reading a WAL database needs its shared-memory file
        beside it, which cannot be created here, so the file is read as immutable: a snapshot,
        as no process of this user can change it."""
        try:
            db = sqlite3.connect(f"{self.db_path.resolve().as_uri()}?mode=ro&immutable=1", uri=True,
                                 timeout=60, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA schema_version")
        except sqlite3.DatabaseError as err:
            raise self._unwritable(err) from None
        return db

    def close(self) -> None:
        for connection in (self._connection, self._blank):
            if connection is not None:
                connection.close()

    @contextmanager
    def _write(self):
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front (no upgrade
        deadlock). The first write creates the home and the database."""
        if self._connection is None:
            self._ensure_home()
            self._connection = self._connect()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:  # a read-only file or disk, a full disk
            raise self._unwritable(err) from None
        try:
            yield self._db
        except sqlite3.OperationalError as err:
            self._db.execute("ROLLBACK")
            raise self._unwritable(err) from None
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _unwritable(self, err: sqlite3.OperationalError) -> UserError:
        return UserError(f"cannot write the registry {self.db_path}: {err}; free space on that "
                         f"disk or make it writable, then run the same command again")

    def run_dir(self, run_id: str) -> Path:
        check_name(run_id, "run id")
        return self.home / "runs" / run_id

    def data_dir(self) -> Path:
        return self.home / "data"

    # -- runs ---------------------------------------------------------------------------------
    def create_run(self, stage: str, config: dict, config_hash: str, *, parents: dict[str, Resolved],
                   data_fingerprint: str = "", versions: dict | None = None,
                   pipeline_id: str | None = None) -> Run:
        run_id = f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        now = time.time()
        with self._write() as db:
            db.execute(
                "INSERT INTO runs (id, stage, status, config_json, config_hash, data_fingerprint,"
                " versions_json, created_at, updated_at, pid, host, pipeline_id)"
                " VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, stage, json.dumps(config, ensure_ascii=False), config_hash,
                 data_fingerprint, json.dumps(versions or {}), now, now, os.getpid(),
                 socket.gethostname(), pipeline_id))
            for role, parent in parents.items():
                db.execute("INSERT INTO parents VALUES (?, ?, ?, ?)",
                           (run_id, role, parent.reference, parent.run.id if parent.run else None))
        return self.get(run_id)

    def get(self, run_id: str) -> Run:
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise UserError(f"no run '{run_id}' in the registry at {self.home}; "
                            f"see `rlhf registry ls`")
        return self._to_run(row)

    def _to_run(self, row: sqlite3.Row) -> Run:
        parents = self._db.execute(
            "SELECT role, parent_ref, parent_run FROM parents WHERE run_id = ?", (row["id"],)
        ).fetchall()
        status = row["status"]
        if status == "running" and not _process_alive(row["pid"], row["host"]):
            status = "interrupted"  # its process is gone: it was killed, not finished
        return Run(
            id=row["id"], stage=row["stage"], status=status, config=json.loads(row["config_json"]),
            config_hash=row["config_hash"], data_fingerprint=row["data_fingerprint"],
            versions=json.loads(row["versions_json"]), created_at=row["created_at"],
            updated_at=row["updated_at"], model_path=self._absolute(row["model_path"]),
            files=json.loads(row["files_json"]) if row["files_json"] else None,
            summary=json.loads(row["summary_json"]), pipeline_id=row["pipeline_id"],
            pid=row["pid"], host=row["host"],
            parents={p["role"]: p["parent_ref"] for p in parents},
            parent_runs={p["role"]: p["parent_run"] for p in parents if p["parent_run"]})

    def runs(self, stage: str | None = None, pipeline_id: str | None = None) -> list[Run]:
        query, args = "SELECT * FROM runs WHERE 1=1", []
        if stage:
            query += " AND stage = ?"
            args.append(stage)
        if pipeline_id:
            query += " AND pipeline_id = ?"
            args.append(pipeline_id)
        rows = self._db.execute(query + " ORDER BY created_at, id", args).fetchall()
        return [self._to_run(row) for row in rows]

    def find_matching(self, stage: str, config_hash: str, data_fingerprint: str | None,
                      parents: dict[str, Resolved],
                      statuses: tuple[str, ...] = ("completed", "interrupted", "failed"),
                      ) -> Run | None:
        """The newest run of `stage` with the same config, data and parents and one of
        `statuses` (for reuse or resume); `data_fingerprint=None` matches any data."""
        wanted = {role: (p.run.id if p.run else p.reference) for role, p in parents.items()}
        for run in reversed(self.runs(stage)):
            if run.config_hash != config_hash or data_fingerprint not in (None,
                                                                          run.data_fingerprint):
                continue
            have = {role: run.parent_runs.get(role, ref) for role, ref in run.parents.items()}
            if have == wanted and run.status in statuses:
                return run
        return None

    def stage_runs(self, run: Run, order: list[str]) -> dict[str, Run]:
        """The stage runs behind a run, by stage, in `order`: a pipeline's own stages, or a
        stage run and its registry ancestors."""
        if run.stage == PIPELINE_STAGE:
            found = {name: self.get(entry["run"])
                     for name, entry in run.summary.get("stages", {}).items()}
        else:
            found = {}
            pending = [run]
            while pending:
                current = pending.pop()
                found.setdefault(current.stage, current)
                pending += [self.get(parent) for parent in current.parent_runs.values()]
        return {name: found[name] for name in order if name in found}

    def set_status(self, run_id: str, status: str, summary: dict | None = None) -> None:
        assert status in STATUSES
        with self._write() as db:
            db.execute("UPDATE runs SET status = ?, updated_at = ?, pid = ? WHERE id = ?",
                       (status, time.time(), os.getpid(), run_id))
            if summary is not None:
                db.execute("UPDATE runs SET summary_json = ? WHERE id = ?",
                           (json.dumps(summary, ensure_ascii=False), run_id))

    def claim(self, run_id: str) -> None:
        """Mark an interrupted run as running again in this process (resume).

        Checked and set in one transaction: of two processes resuming the same run at once, the
        second is refused instead of both writing its states.
        """
        with self._write() as db:
            row = db.execute("SELECT pid, host, status FROM runs WHERE id = ?",
                             (run_id,)).fetchone()
            if row["status"] == "running" and row["pid"] != os.getpid() \
                    and _process_alive(row["pid"], row["host"]):
                raise UserError(f"run {run_id} is already running in process {row['pid']} on "
                                f"{row['host']}; wait for it to finish, or pass --restart to "
                                f"train a new run")
            db.execute("UPDATE runs SET status = 'running', updated_at = ?, pid = ? WHERE id = ?",
                       (time.time(), os.getpid(), run_id))

    def update_summary(self, run_id: str, values: dict) -> None:
        with self._write() as db:
            row = db.execute("SELECT summary_json FROM runs WHERE id = ?", (run_id,)).fetchone()
            summary = json.loads(row["summary_json"])
            summary.update(values)
            db.execute("UPDATE runs SET summary_json = ?, updated_at = ? WHERE id = ?",
                       (json.dumps(summary, ensure_ascii=False), time.time(), run_id))

    def log_metrics(self, run_id: str, step: int, values: dict[str, float]) -> None:
        now = time.time()
        with self._write() as db:
            db.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?)",
                           [(run_id, step, name, float(v), now) for name, v in values.items()])

    def truncate_metrics(self, run_id: str, after_step: int) -> None:
        """Drop metrics logged after a resume state: the resumed run logs them again."""
        with self._write() as db:
            db.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", (run_id, after_step))

    def metrics(self, run_id: str) -> dict[str, list[tuple[int, float]]]:
        series: dict[str, list[tuple[int, float]]] = {}
        for row in self._db.execute(
                "SELECT step, name, value FROM metrics WHERE run_id = ? ORDER BY rowid", (run_id,)):
            series.setdefault(row["name"], []).append((row["step"], row["value"]))
        return series

    # -- published models ---------------------------------------------------------------------
    def publish(self, run_id: str, write_files, summary: dict | None = None) -> Path:
        """Write the run's model with `write_files(tmp_dir)`, commit it, and mark the run completed."""
        final = self.run_dir(run_id) / "model"
        if final.exists() and self.get(run_id).status != "completed":
            # An earlier attempt of this run was killed after committing its model but before
            # recording it here; nothing references that directory, and the rerun replaces it.
            shutil.rmtree(final)
        files = commit_directory(final, write_files, home=self.home)
        with self._write() as db:
            db.execute("UPDATE runs SET model_path = ?, files_json = ?, status = 'completed',"
                       " updated_at = ?, summary_json = ? WHERE id = ?",
                       (self._stored_path(final), json.dumps(files), time.time(),
                        json.dumps(summary or {}, ensure_ascii=False), run_id))
        return final

    # -- references ---------------------------------------------------------------------------
    def resolve(self, ref: str, *, stage: str | None = None) -> Resolved:
        """Resolve run id, `STAGE:latest`, `REF@step`, alias, a path, or a hub name (`gpt2`,
        `org/name`, `name@revision`). A hub name is not looked up here (no network); the guard
        checks it before a model loads."""
        if not ref or "\x00" in ref:
            raise UserError("empty or invalid reference; use a run id, STAGE:latest, an alias or a path")
        before_at, _, after_at = ref.rpartition("@")
        # The run need not be completed: REF@step is how one reaches an interrupted run's states.
        stepped = self.lookup(before_at) if before_at else None
        if stepped is not None and after_at.isascii() and after_at.isdigit():
            return self._state_ref(stepped, int(after_at))
        if stepped is not None:
            raise UserError(f"'{ref}': after a run, @ takes a step number (a committed state), "
                            f"e.g. {stepped.id}@100")
        if before_at.endswith(":latest"):
            raise UserError(f"'{ref}': no completed {before_at.split(':')[0]} run in the "
                            f"registry at {self.home}; see `rlhf registry ls`")
        if before_at and path_problem(Path(before_at), "any") is None:
            raise UserError(f"'{ref}': @step works only on registry runs (a run id, "
                            f"STAGE:latest or an alias); see `rlhf registry ls`")
        run = self.lookup(ref)
        if run is not None and run.stage == PIPELINE_STAGE:  # a pipeline means its final model
            final = run.summary.get("final_run")
            if not final:
                raise UserError(f"pipeline {run.id} has not finished (status {run.status}); "
                                f"`rlhf resume {run.id}` continues it")
            run = self.get(final)
        if run is not None:
            if run.status != "completed" or not run.model_path:
                raise UserError(f"run {run.id} has no published model (status {run.status}); "
                                f"resume it with `rlhf resume {run.id}` or use REF@step")
            return Resolved(run.model_path, run)
        problem = path_problem(Path(ref), "directory")
        if problem is None:
            return self._directory_ref(Path(ref).resolve())
        if problem.startswith("is a file"):
            raise UserError(f"'{ref}' is a file; a model reference must be a directory, a run id, "
                            f"STAGE:latest or an alias")
        if problem != NOT_FOUND["directory"] and not problem.startswith("is a name too long"):
            raise UserError(f"'{ref}' {problem}; a model reference must be a directory, a run "
                            f"id, STAGE:latest or an alias")
        if ref == ":latest":
            raise UserError("':latest' names no stage; write STAGE:latest, e.g. sft:latest")
        if ref.endswith(":latest"):
            raise UserError(f"no completed {ref.split(':')[0]} run in the registry at {self.home}; "
                            f"run `rlhf run {ref.split(':')[0]}` first or pass a path")
        hub = hub_model(ref)
        if hub is not None:
            return hub
        raise UserError(f"reference '{ref}' is not a run id, alias, STAGE:latest, directory or hub "
                        f"name; see `rlhf registry ls`")

    def lookup(self, ref: str) -> Run | None:
        if ref.endswith(":latest"):
            stage = ref[: -len(":latest")]
            if not stage:
                return None
            done = [r for r in self.runs(stage) if r.status == "completed"]
            return done[-1] if done else None
        if not _NAME_RE.match(ref):
            return None
        row = self._db.execute("SELECT run_id FROM aliases WHERE name = ?", (ref,)).fetchone()
        return self._find(row["run_id"] if row else ref)

    def _find(self, run_id: str) -> Run | None:
        found = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self._to_run(found) if found else None

    def _directory_ref(self, directory: Path) -> Resolved:
        """A directory; one of this home's published models or resume states means its run,
        so lineage records the run, not a path into the home."""
        try:
            parts = directory.relative_to(self.home.resolve()).parts
        except ValueError:
            return Resolved(str(directory))
        run = self._find(parts[1]) if len(parts) > 1 and parts[0] == "runs" else None
        if run is not None and parts[2:] == ("model",) and run.status == "completed":
            return Resolved(run.model_path, run)
        step = re.fullmatch(r"step-(\d+)", parts[3]) if len(parts) == 5 else None
        if run is not None and step and parts[2::2] == ("state", "model"):
            return self._state_ref(run, int(step.group(1)))
        return Resolved(str(directory))

    def _state_ref(self, run: Run, step: int) -> Resolved:
        model_dir = self.run_dir(run.id) / "state" / f"step-{step}" / "model"
        if not (model_dir.parent / MANIFEST).exists():
            have = [s for s, _ in list_states(self.run_dir(run.id))]
            raise UserError(f"run {run.id} has no committed state at step {step}; "
                            f"states: {have or 'none'}")
        return Resolved(str(model_dir.resolve()), run, step)

    def set_alias(self, name: str, ref: str) -> None:
        check_name(name, "alias")
        run = self.lookup(ref)
        if run is None:
            raise UserError(f"no run '{ref}' to alias; see `rlhf registry ls`")
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?)", (name, run.id))

    def children(self, run_id: str) -> list[str]:
        rows = self._db.execute("SELECT run_id FROM parents WHERE parent_run = ?", (run_id,))
        pipeline_children = self._db.execute("SELECT id FROM runs WHERE pipeline_id = ?", (run_id,))
        return sorted({r[0] for r in rows} | {r[0] for r in pipeline_children})

    def lineage(self, run_id: str) -> dict:
        """The run and its ancestors as a nested dict (role -> parent tree)."""
        run = self.get(run_id)
        tree = {"id": run.id, "stage": run.stage, "status": run.status, "parents": {}}
        for role, ref in run.parents.items():
            parent_run = run.parent_runs.get(role)
            tree["parents"][role] = self.lineage(parent_run) if parent_run else {"path": ref}
        return tree

    def remove(self, run_id: str, force: bool = False) -> None:
        run = self.get(run_id)
        dependants = self.children(run.id)
        if dependants and not force:
            raise UserError(f"run {run.id} is a parent of {', '.join(dependants)}; "
                            f"remove those first or pass --force")
        with self._write() as db:
            db.execute("UPDATE parents SET parent_run = NULL WHERE parent_run = ?", (run.id,))
            db.execute("DELETE FROM runs WHERE id = ?", (run.id,))
        shutil.rmtree(self.run_dir(run.id), ignore_errors=True)

    def verify(self, run_id: str | None = None) -> list[str]:
        """Problems found in published models and resume states (empty list = all intact)."""
        runs = [self.get(run_id)] if run_id else self.runs()
        problems = []
        for run in runs:
            if run.model_path:
                problems += [f"{run.id}: {p}" for p in directory_problems(Path(run.model_path))]
            for _, state_dir in list_states(self.run_dir(run.id)):
                problems += [f"{run.id}: {p}" for p in directory_problems(state_dir)]
        return problems


def open_registry(home: str | Path | None) -> Registry | None:
    """The registry at `home` if one exists there (reading a plain directory needs none)."""
    path = Path(home) if home else default_home()
    missing = path_problem(path / "registry.db", "file") in (NOT_FOUND["file"], NOT_FOUND_IN_FILE)
    return None if missing else Registry(path, create=False)


def resolve_model(registry: Registry | None, ref: str) -> Resolved:
    """A model reference as `Registry.resolve` reads it; without a registry only a directory or
    a hub name can mean a model."""
    if registry is not None:
        return registry.resolve(ref)
    if path_problem(Path(ref), "directory") is None:
        return Resolved(str(Path(ref).resolve()))
    hub = None if Path(ref).exists() else hub_model(ref)
    if hub is not None:
        return hub
    raise UserError(f"'{ref}' is not a model directory and there is no registry to look it "
                    f"up in; pass --home DIR or a model directory")


def hub_model(ref: str) -> Resolved | None:
    """`gpt2`, `org/name` or either with `@revision` as a hub model; None for anything else."""
    match = _HUB_RE.match(ref)
    return Resolved(match["name"], revision=match["revision"]) if match else None


def check_name(name: str, what: str) -> str:
    """Names that become paths must stay inside the registry home (no '../', '/', NUL)."""
    if not _NAME_RE.match(name or ""):
        raise UserError(f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-' "
                        f"(at most 64, not starting with '.')")
    return name


def _process_alive(pid: int | None, host: str | None) -> bool:
    if pid is None:
        return False
    if host != socket.gethostname():
        return True  # another machine's process cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _is_not_zombie(pid)


def _is_not_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


# -- committed directories ------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_directory(final: Path, write_files, home: Path | None = None) -> dict[str, str]:
    """Atomically create `final`: temp sibling → files → fsync → rename → manifest last.

    Returns the manifest's {relative path: sha256}. If `final` exists without a valid manifest (a
    crash mid-commit) it is replaced; a committed `final` is never overwritten. A LoRA adapter
    written in it whose base model lies in the registry `home` names that base relative to itself.
    """
    tmp = final.parent / f".tmp-{final.name}-{secrets.token_hex(4)}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        # A process killed mid-commit leaves its temporary directory behind; one writer owns
        # `final` (its run, or the data lock), so any older temporary sibling of it is debris.
        for stale in final.parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        write_files(tmp)
        if home is not None:
            for adapter_dir in [tmp, *tmp.glob("*/")]:
                _relocate_adapter_base(adapter_dir, {home.resolve()}, home,
                                       final / adapter_dir.relative_to(tmp))
        _fsync_tree(tmp)
        if final.exists():
            if not directory_problems(final):
                raise UserError(f"{final} is already committed; refusing to overwrite it")
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        files = {str(p.relative_to(final)): sha256_file(p)
                 for p in sorted(final.rglob("*")) if p.is_file()}
        write_manifest(final, files)
    except OSError as err:  # a full or read-only disk: the previous checkpoints stay usable
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {final}: {err.strerror or err}; free space on that disk or "
                        f"make it writable, then run the same command again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def adapter_base(adapter_dir: Path) -> str | None:
    """The base model a LoRA adapter directory names (None when it names none): a relative path
    is taken from the adapter's directory, as the registry writes it; a hub name stays a name."""
    try:
        named = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not named or not isinstance(named, str):
        return None
    inside = adapter_dir / named
    return str(inside.resolve()) if not Path(named).is_absolute() and inside.is_dir() else named


def _relocate_adapter_base(adapter_dir: Path, old_homes: set[Path], home: Path,
                           location: Path | None = None) -> dict[Path, str]:
    """Rewrite an adapter's absolute base path that lies in one of `old_homes` (where this home
    is or was) as a path relative to `location` (where the adapter directory is, or will be once
    renamed), in its config and in the model card peft writes beside it. Returns the files
    rewritten, each with its sha256 before."""
    config_file = adapter_dir / ADAPTER_CONFIG
    if not config_file.is_file():
        return {}
    config = json.loads(config_file.read_text())
    base = config.get("base_model_name_or_path") or ""
    old_home = next((old for old in old_homes
                     if Path(base).is_absolute() and Path(base).is_relative_to(old)), None)
    if old_home is None:
        return {}
    moved = home.resolve() / Path(base).relative_to(old_home)
    relative = os.path.relpath(moved, (location or adapter_dir).resolve())
    before = {path: sha256_file(path) for path in (config_file, adapter_dir / "README.md")
              if path.is_file()}
    config["base_model_name_or_path"] = relative
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = adapter_dir / "README.md"
    if card in before:
        card.write_text(card.read_text(encoding="utf-8").replace(base, relative), encoding="utf-8")
    return before


def _refresh_manifest_entry(path: Path, old_digest: str) -> None:
    """Record a rewritten file's new sha256 in the manifest of the committed directory holding
    it, if that manifest recorded the old one (a file that did not verify stays unverified)."""
    for directory in path.parents:
        manifest = directory / MANIFEST
        if manifest.is_file():
            files = json.loads(manifest.read_text())["files"]
            name = path.relative_to(directory).as_posix()
            if files.get(name) == old_digest:
                files[name] = sha256_file(path)
                write_manifest(directory, files)
            return


def write_manifest(directory: Path, files: dict[str, str]) -> None:
    tmp = directory / f".{MANIFEST}.tmp"
    with open(tmp, "w") as handle:
        json.dump({"files": files, "created": time.time()}, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(tmp, directory / MANIFEST)
    fsync_dir(directory)


def directory_problems(directory: Path) -> list[str]:
    """Every problem with a committed directory, each naming the file; [] when intact."""
    manifest = directory / MANIFEST
    if not directory.is_dir():
        return [f"{directory} is missing"]
    if not manifest.is_file():
        return [f"{manifest} is missing (the directory was never committed or was tampered with)"]
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return [f"{manifest} is not a valid manifest"]
    problems = []
    for rel, digest in files.items():
        path = directory / rel
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path} does not match its sha256 in the manifest (corrupted or replaced)")
    return problems


def require_intact(directory: Path) -> None:
    """Refuse to load a registry checkpoint that fails verification, naming the bad file."""
    problems = directory_problems(directory)
    if problems:
        raise UserError(f"checkpoint {directory} failed verification: {problems[0]}; "
                        f"run `rlhf registry verify` for details")


def list_states(run_dir: Path) -> list[tuple[int, Path]]:
    """Committed-looking state directories of a run, newest first."""
    state_root = run_dir / "state"
    if not state_root.is_dir():
        return []
    found = []
    for path in state_root.iterdir():
        match = re.fullmatch(r"step-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)
