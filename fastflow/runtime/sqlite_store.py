"""SQLite stores (the MLflow tracking store, the Optuna storage) checked before use and created once.

`open_sqlite(uri, kind, marker, open_store)` is the one way a process first opens a `sqlite:///` store:

- an existing file is checked first (`damage`: SQLite's header and `PRAGMA quick_check`, read-only, a fraction
  of a second for a store of megabytes; `not_a_store`): a truncated file, a file that is not a SQLite
  database, a malformed one, or one without the store's own tables (an empty 0-byte file, another
  application's database) is refused in one `StoreError` line (`faults.damaged_store`) and left exactly as
  it is — never turned into a fresh schema;
- opening (`open_store`, which makes the library create the schema on a new store) runs under an exclusive
  `fcntl.flock` on `<store>.lock` beside the database.

Why a lock rather than create-then-open with retry: MLflow creates its schema in many alembic migrations, each
its own transaction, so a second process that opens the store meanwhile sees a half-made schema and migrates
it again (`duplicate column name`); there is no error to retry on that leaves the store sound. With the lock,
exactly one process creates the schema; the others wait (seconds, once) and then find it complete. A lock held
by a process that dies is released by the kernel. In a folder where the lock file cannot be created (read-only)
no store can be created either, so opening goes on without it.
"""

from __future__ import annotations

import contextlib
import fcntl
import sqlite3
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

from fastflow.runtime.faults import damaged_store

T = TypeVar("T")
_HEADER = b"SQLite format 3\x00"


def sqlite_file(uri: str) -> Optional[Path]:
    """The database file of a `sqlite:///path` URI (query left out), or None for other URIs and in-memory ones."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?")[0]
    return None if path in ("", ":memory:") or path.startswith("file:") else Path(path)


def _truncation(path: Path, size: int) -> str:
    """'truncated (N of M bytes)' when the header promises more pages than the file holds, else ''."""
    with open(path, "rb") as handle:
        header = handle.read(100)
    if len(header) < 100 or not header.startswith(_HEADER):
        return ""
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    size_valid = header[24:28] == header[92:96]  # the in-header size is valid when it was written with the counter
    expected = page_size * pages
    return f"truncated ({size} of {expected} bytes)" if size_valid and size < expected else ""


def damage(path: Path) -> str:
    """What is wrong with the existing SQLite file `path` ('truncated (...)', 'file is not a database',
    'database disk image is malformed', 'malformed (...)'), or ''. Read-only: nothing is written to the file."""
    size = path.stat().st_size
    truncated = _truncation(path, size) if size else ""
    if truncated:
        return truncated
    try:
        with _read_only(path) as connection:
            verdict = [row[0] for row in connection.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as error:  # 'file is not a database', 'database disk image is malformed'
        return str(error)
    return "" if verdict == ["ok"] else f"malformed ({verdict[0]})"


def not_a_store(path: Path, marker: str) -> str:
    """Why the sound SQLite file `path` is not a store whose schema has the table `marker` (an empty 0-byte file,
    another application's database), or ''."""
    if path.stat().st_size == 0:
        return "empty (0 bytes), not a store"
    with _read_only(path) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    return "" if marker in tables else f"a SQLite database without the store's tables (no '{marker}' table)"


def _read_only(path: Path) -> contextlib.closing:
    return contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30))


@contextlib.contextmanager
def creation_lock(path: Path) -> Iterator[None]:
    """An exclusive `flock` on `<path>.lock` for the block (none where that file cannot be created)."""
    try:
        handle = open(path.with_name(path.name + ".lock"), "a")
    except OSError:  # a read-only or missing folder: no store can be created here, so no creation to serialise
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def open_sqlite(uri: str, kind: str, marker: str, open_store: Callable[[], T]) -> T:
    """`open_store()` for the store at `uri` (kind: 'MLflow tracking store' or 'Optuna storage'), after checking
    an existing database file and under the creation lock; other URIs are opened directly."""
    path = sqlite_file(uri)
    if path is None:
        return open_store()
    with creation_lock(path):
        if path.exists():
            damaged = damage(path)
            if damaged:
                raise damaged_store(kind, uri, damaged)
            foreign = not_a_store(path, marker)
            if foreign:
                raise damaged_store(kind, uri, foreign, recoverable=False)
        return open_store()


__all__ = ["sqlite_file", "damage", "not_a_store", "creation_lock", "open_sqlite"]
