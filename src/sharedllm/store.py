"""The adapter store: a SQLite index plus content-addressed adapter files, crash-safe by construction.

Layout under the store folder:
    index.sqlite                  users (name, sha256 of their bearer token) and adapters (user -> file sha256, meta)
    adapters/ab/abcdef....safetensors   the exact bytes each user uploaded, named by their sha256
    admin_token                   generated admin token (mode 0600) when SHAREDLLM_ADMIN_TOKEN is unset
    shared/<sha256>.safetensors   shared bases of jointly compressed LoRAs (PUT /v1/shared/SHA; quant/lora_joint.py),
                                  content-addressed, written once, never indexed or swept

Writes go file first (temp, fsync, rename, fsync dir), index second (one SQLite transaction), so an index row
never names a missing file. Deletes go index first, file second. A crash can therefore leave only a stray temp
file or an unreferenced adapter file; `open` sweeps both (`check` reports them without touching anything).
The store knows nothing about models: validating bytes against a base is the server's job.

Several processes may open one store (`sharedllm serve --workers N`, or servers started by hand): SQLite in WAL
mode serialises index writes, and every mutation of files plus index (put, delete, bulk import, the startup
sweep, creating the admin token) holds an exclusive `flock` on `<store>/lock`, so one process's sweep never
removes a file another is about to index, and a replaced file is never unlinked under a concurrent upload of the
same bytes. Reads take no lock: an index row only ever names a complete file.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic import fsync_dir, write_bytes_atomic
from .errors import SharedLLMError

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
    user TEXT PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE,
    sha256 TEXT NOT NULL, bytes INTEGER NOT NULL, meta TEXT NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS adapters_sha ON adapters(sha256);
"""
ADMIN_ENV = "SHAREDLLM_ADMIN_TOKEN"
MIN_ADMIN_TOKEN = 32
SUFFIX = ".safetensors"


@dataclass(frozen=True)
class AdapterRecord:
    user: str
    sha256: str
    bytes: int
    meta: dict
    updated: float

    def to_json(self) -> dict:
        return {"user": self.user, "sha256": self.sha256, "bytes": self.bytes, "updated": self.updated,
                **{k: self.meta.get(k) for k in ("method", "scheme", "params", "base_fingerprint")},
                "meta": self.meta}


INDEX_META = ("method", "scheme", "params", "base_fingerprint", "layout", "format_version", "version")


def _compact(meta: dict) -> str:
    """The few metadata fields the index keeps per row (the full metadata stays in the file's header)."""
    return json.dumps({k: meta[k] for k in INDEX_META if k in meta}, separators=(",", ":"))


@contextlib.contextmanager
def store_lock(root):
    """Exclusive across processes (flock on <root>/lock) for the duration of a store mutation."""
    Path(root).mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(str(Path(root) / "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def new_token() -> str:
    return "sk-" + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class AdapterStore:
    """Thread-safe: one SQLite connection behind a lock (the index is tiny and every query is a point lookup)."""

    def __init__(self, root, sweep: bool = True):
        self.root = Path(root)
        self.files = self.root / "adapters"
        for d in (self.root, self.files):  # private: tokens' hashes and every user's adapter live here
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        self._lock = threading.RLock()
        index = self.root / "index.sqlite"
        os.close(os.open(index, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite gives -wal/-shm the same mode
        os.chmod(index, 0o600)
        self._db = sqlite3.connect(str(index), check_same_thread=False, isolation_level=None, timeout=30)
        with store_lock(self.root):  # serve --workers N opens one store N times at once: switching a fresh index to
            self._db.execute("PRAGMA journal_mode=WAL")  # WAL takes SQLite's exclusive lock, which busy waits skip
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
        self.swept = self.sweep() if sweep else {}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- files -------------------------------------------------------------------------------------------
    def path_of(self, sha: str) -> Path:
        return self.files / sha[:2] / f"{sha}{SUFFIX}"

    def _write_file(self, data: bytes, sync_dir: bool = True) -> str:
        sha = sha256_hex(data)
        path = self.path_of(sha)
        if not (path.is_file() and path.stat().st_size == len(data)):
            fresh = not path.parent.exists()
            path.parent.mkdir(mode=0o700, exist_ok=True)
            write_bytes_atomic(path, data, sync_dir=sync_dir)
            if fresh:
                fsync_dir(self.files)
        return sha

    def _unlink_if_unreferenced(self, sha: str) -> None:
        if self._db.execute("SELECT 1 FROM adapters WHERE sha256=? LIMIT 1", (sha,)).fetchone() is None:
            path = self.path_of(sha)
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)

    @property
    def shared(self):
        """The folder of shared-bases files (created by the first put_shared)."""
        return self.root / "shared"

    def put_shared(self, sha: str, data: bytes) -> Path:
        """Store a shared-bases file as shared/<sha>.safetensors (the caller has verified sha and content)."""
        with self._lock, store_lock(self.root):
            fresh = not self.shared.exists()
            self.shared.mkdir(mode=0o700, exist_ok=True)
            if fresh:
                fsync_dir(self.root)
            path = self.shared / f"{sha}{SUFFIX}"
            if not (path.is_file() and path.stat().st_size == len(data)):
                write_bytes_atomic(path, data)
            return path

    def read(self, sha: str) -> bytes:
        data = self.path_of(sha).read_bytes()
        if sha256_hex(data) != sha:
            raise SharedLLMError(f"adapter file {self.path_of(sha)} is corrupt (sha256 does not match its name)")
        return data

    # ---- users -------------------------------------------------------------------------------------------
    def create_user(self, name: str, token: str | None = None) -> str:
        """Create a user and return their bearer token (only its sha256 is stored): a new one, or `token` (a
        caller that must record the token durably before the user exists, e.g. `adapt --store`; from `new_token`)."""
        token = token or new_token()
        with self._lock:
            try:
                self._db.execute("INSERT INTO users VALUES (?, ?, ?)", (name, token_hash(token), time.time()))
            except sqlite3.IntegrityError:
                raise SharedLLMError(f"user {name!r} already exists") from None
        return token

    def user_exists(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone() is not None

    def user_for_token(self, token: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT name FROM users WHERE token_sha256=?", (token_hash(token),)).fetchone()
        return row[0] if row else None

    # ---- adapters ----------------------------------------------------------------------------------------
    def put(self, user: str, data: bytes, meta: dict) -> AdapterRecord:
        """Store `data` as `user`'s adapter (replacing any previous one) once the bytes are durable on disk."""
        with self._lock, store_lock(self.root):
            if not self.user_exists(user):
                raise SharedLLMError(f"no user {user!r}")
            sha = self._write_file(data)
            old = self.get(user)
            rec = AdapterRecord(user, sha, len(data), json.loads(_compact(meta)), time.time())
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT OR REPLACE INTO adapters VALUES (?, ?, ?, ?, ?)",
                             (user, sha, len(data), _compact(meta), rec.updated))
            self._db.execute("COMMIT")
            if old and old.sha256 != sha:
                self._unlink_if_unreferenced(old.sha256)
            return rec

    def get(self, user: str) -> AdapterRecord | None:
        with self._lock:
            row = self._db.execute("SELECT user, sha256, bytes, meta, updated FROM adapters WHERE user=?",
                                   (user,)).fetchone()
        return AdapterRecord(row[0], row[1], row[2], json.loads(row[3]), row[4]) if row else None

    def delete(self, user: str) -> AdapterRecord | None:
        """Remove the index row, then the file (unless another user uploaded identical bytes)."""
        with self._lock, store_lock(self.root):
            old = self.get(user)
            if old is None:
                return None
            self._db.execute("DELETE FROM adapters WHERE user=?", (user,))
            self._unlink_if_unreferenced(old.sha256)
            return old

    def users(self, limit: int = 1000, only: str | None = None) -> tuple[list[tuple], int]:
        """([(name, created, adapter record or None)] for the first `limit` users by name (or just user `only`),
        how many users that selection has in all)."""
        where, args = ("WHERE u.name = ?", (only,)) if only is not None else ("", ())
        with self._lock:
            rows = self._db.execute(
                "SELECT u.name, u.created, a.sha256, a.bytes, a.meta, a.updated FROM users u "
                f"LEFT JOIN adapters a ON a.user = u.name {where} ORDER BY u.name LIMIT ?", (*args, limit)).fetchall()
            total = self._db.execute(f"SELECT COUNT(*) FROM users u {where}", args).fetchone()[0]
        return [(n, c, AdapterRecord(n, sha, size, json.loads(meta), upd) if sha else None)
                for n, c, sha, size, meta, upd in rows], total

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM adapters").fetchone()[0]

    def total_bytes(self) -> int:
        """Bytes of the distinct adapter files the index names."""
        with self._lock:
            row = self._db.execute("SELECT SUM(bytes) FROM (SELECT DISTINCT sha256, bytes FROM adapters)").fetchone()
        return row[0] or 0

    def put_many(self, items: list[tuple[str, bytes, dict]]) -> int:
        """Bulk import (fleet tools): new users with adapters, every file durable before one index transaction."""
        with self._lock, store_lock(self.root):
            return self._put_many(items)

    def _put_many(self, items: list[tuple[str, bytes, dict]]) -> int:
        shas = [self._write_file(data, sync_dir=False) for _, data, _ in items]
        for d in {self.path_of(sha).parent for sha in shas}:
            fsync_dir(d)
        now = time.time()
        self._db.execute("BEGIN IMMEDIATE")
        for (user, data, meta), sha in zip(items, shas):
            self._db.execute("INSERT OR IGNORE INTO users VALUES (?, ?, ?)",
                             (user, token_hash(secrets.token_urlsafe(32)), now))
            self._db.execute("INSERT OR REPLACE INTO adapters VALUES (?, ?, ?, ?, ?)",
                             (user, sha, len(data), _compact(meta), now))
        self._db.execute("COMMIT")
        return len(items)

    # ---- crash recovery ----------------------------------------------------------------------------------
    def check(self, sizes: bool = True) -> dict:
        """Compare files with index rows; change nothing. A healthy store has every list empty.
        sizes=False skips the per-file stat (the startup sweep needs only names: one directory listing)."""
        with self._lock:
            rows = dict(self._db.execute("SELECT sha256, bytes FROM adapters").fetchall())  # distinct files
            n_rows = self._db.execute("SELECT COUNT(*) FROM adapters").fetchone()[0]
        on_disk, temps = self._listing()
        missing = sorted(s for s in rows if s not in on_disk)
        wrong_size = sorted(s for s, n in rows.items()
                            if sizes and s in on_disk and os.stat(on_disk[s]).st_size != n)
        orphans = sorted(p for s, p in on_disk.items() if s not in rows)
        return {"rows": n_rows, "files": len(on_disk), "temp_files": temps, "orphan_files": orphans,
                "missing_files": missing, "wrong_size": wrong_size}

    def _listing(self) -> tuple[dict[str, str], list[str]]:
        """(sha256 -> path of every adapter file, paths of everything else) under adapters/."""
        on_disk, other = {}, []
        for shard in os.scandir(self.files):
            if not shard.is_dir():
                other.append(shard.path)
                continue
            for e in os.scandir(shard.path):
                if e.name.endswith(SUFFIX) and not e.name.startswith("."):
                    on_disk[e.name[: -len(SUFFIX)]] = e.path
                else:
                    other.append(e.path)
        return on_disk, sorted(other)

    def sweep(self) -> dict:
        """Remove stray temp files and unreferenced adapter files left by a crash; report what was found."""
        with self._lock, store_lock(self.root):
            report = self.check(sizes=False)
            for p in report["temp_files"] + report["orphan_files"]:
                if os.path.isfile(p):  # never a directory someone put there
                    os.unlink(p)
        return report


def admin_token(root) -> tuple[str, str]:
    """(token, where): from $SHAREDLLM_ADMIN_TOKEN, else read or generate `<store>/admin_token` (mode 0600)."""
    env = os.environ.get(ADMIN_ENV)
    if env:
        if len(env) < MIN_ADMIN_TOKEN:
            raise SharedLLMError(f"${ADMIN_ENV} is {len(env)} characters; use at least {MIN_ADMIN_TOKEN} "
                                 f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        return env, f"${ADMIN_ENV}"
    path = Path(root) / "admin_token"
    with store_lock(root):
        if not path.is_file():
            _new_admin_token(path)
    os.chmod(path, 0o600)
    return path.read_text().strip(), str(path)


def _new_admin_token(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path) + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("adm-" + secrets.token_urlsafe(32) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(str(path) + ".tmp", path)
    fsync_dir(path.parent)
