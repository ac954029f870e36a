"""Errors in one line: a library's message cut at a sentence's end, and faults of the stores (MLflow tracking
store, Optuna storage) named with the store and what to do.

Pure string and exception work: no I/O, no imports of MLflow, SQLAlchemy or Optuna (their exceptions are
recognised by their messages and causes), so the CLI can use it without the slow imports.
"""

from __future__ import annotations

import contextlib
import errno
import re
from typing import Iterator, Optional

from fastflow.runtime.redact import redact

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def first_sentence(text: str, limit: int = 300) -> str:
    """The first sentence of the first non-empty line of `text` (a library's multi-line message); a sentence
    longer than `limit` ends at a word boundary with '...'. Terminal colour codes are dropped."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    end = _SENTENCE_END.search(line)
    sentence = line[:end.end()] if end else line
    if len(sentence) <= limit:
        return sentence
    return sentence[:limit].rsplit(" ", 1)[0] + " ..."


def describe(error: BaseException) -> str:
    """`error` as one line: its first sentence, or its type when it has no message."""
    return first_sentence(str(error)) or type(error).__name__


class StoreError(RuntimeError):
    """A store failed (disk full, read-only, unreachable): one line naming the store and what to do."""


# fault -> (phrases of SQLite, OSError, requests and urllib3 messages; errno values; what to do)
_FAULTS = {
    "disk full": (("database or disk is full", "no space left on device", "disk quota exceeded"),
                  (errno.ENOSPC, errno.EDQUOT), "free space on its disk and re-run; what was logged before is kept"),
    "read-only": (("attempt to write a readonly database", "read-only file system", "permission denied"),
                  (errno.EROFS, errno.EACCES, errno.EPERM), "make it writable, or point {variable} at a writable store"),
    "cannot be opened": (("unable to open database file",), (),
                         "check that its folder exists and is writable, or point {variable} elsewhere"),
    "damaged": (("database disk image is malformed", "file is not a database", "malformed database schema"), (),
                "{recover}"),
    "unreachable": (("max retries exceeded", "connection refused", "failed to establish a new connection",
                     "name or service not known", "read timed out", "connection aborted", "remote end closed"), (),
                    "start the server (or fix the URI, {variable}) and re-run"),
}
_VARIABLES = {"MLflow tracking store": "MLFLOW_TRACKING_URI", "Optuna storage": "OPTUNA_STORAGE"}
_RECOVER = ("left as it is; restore it from a backup, or recover what it holds with `sqlite3 {file} \".recover\" | "
            "sqlite3 {new}` and point {variable} at sqlite:///{new}, or point {variable} at another store")


def _recover_advice(uri: str, variable: str) -> str:
    """What to do about a damaged SQLite store at `uri`: restore, `.recover` into a new file, or another store."""
    file = uri.removeprefix("sqlite:///").split("?")[0] if uri.startswith("sqlite:///") else "FILE"
    stem, dot, suffix = file.rpartition(".")
    new = f"{stem}-recovered.{suffix}" if dot and "/" not in suffix else f"{file}-recovered"
    return _RECOVER.format(file=redact(file), new=redact(new), variable=variable)


def damaged_store(kind: str, uri: str, problem: str, recoverable: bool = True) -> StoreError:
    """One line for a store file refused before use (`sqlite_store`): the store (URI redacted), what is wrong and
    what to do. `recoverable`: a damaged store (recover it); else a file that never was one (empty, foreign)."""
    variable = _VARIABLES.get(kind, "MLFLOW_TRACKING_URI / OPTUNA_STORAGE")
    advice = (_recover_advice(uri, variable) if recoverable else
              f"left as it is; restore the store from a backup, remove the file if no store was meant to be there, "
              f"or point {variable} at another store")
    return StoreError(f"{kind} {redact(uri)}: {problem}; {advice}")


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions it was raised from or during, innermost last."""
    found: list[BaseException] = []
    while error is not None and error not in found:
        found.append(error)
        error = error.__cause__ or error.__context__
    return found


def _store_of(chain: list[BaseException]) -> str:
    """Which store a fault comes from, by the libraries in its chain (MLflow wraps its SQLAlchemy and HTTP errors)."""
    modules = {type(e).__module__.split(".")[0] for e in chain}
    if "mlflow" in modules or modules & {"requests", "urllib3"}:
        return "MLflow tracking store"
    if modules & {"optuna", "sqlalchemy"}:
        return "Optuna storage"
    return ""


def fault_of(error: BaseException) -> str:
    """The store fault behind `error` ('disk full', 'read-only', 'cannot be opened', 'damaged', 'unreachable')
    or ''."""
    for link in _chain(error):
        text = str(link).lower()
        for fault, (phrases, numbers, _) in _FAULTS.items():
            if any(phrase in text for phrase in phrases) or (isinstance(link, OSError) and link.errno in numbers):
                return fault
    return ""


def store_error(error: BaseException, stores: dict[str, str]) -> Optional[StoreError]:
    """`error` as one `StoreError` line when a store fault caused it, else None. `stores`: the URI of each store
    in use ('MLflow tracking store', 'Optuna storage'); a file the fault happened on is named instead."""
    fault = fault_of(error)
    chain = _chain(error)
    kind = _store_of(chain)
    if not fault or (not kind and fault != "disk full"):  # e.g. an unreadable input file: not a store's fault
        return None
    files = [link.filename for link in chain if isinstance(link, OSError) and link.filename]
    if kind and kind in stores:
        where = f"{kind} {redact(stores[kind])}"
    elif files:
        where = f"file {redact(files[-1])}"
    else:
        where = " / ".join(f"{name} {redact(uri)}" for name, uri in stores.items()) or "a store"
    detail = redact(describe(chain[-1]))  # each part on its own: a masked query value would swallow a ':' after it
    variable = _VARIABLES.get(kind, "MLFLOW_TRACKING_URI / OPTUNA_STORAGE")
    recover = _recover_advice(stores.get(kind, ""), variable)
    advice = _FAULTS[fault][2].format(variable=variable, recover=recover)
    return StoreError(f"{where}: {fault} ({detail}); {advice}")


@contextlib.contextmanager
def guard(stores: dict[str, str]) -> Iterator[None]:
    """Raise a store fault inside as one `StoreError` line (`store_error`); other errors pass unchanged."""
    try:
        yield
    except StoreError:
        raise
    except Exception as error:
        fault = store_error(error, stores)
        if fault is None:
            raise
        raise fault from None


__all__ = ["first_sentence", "describe", "StoreError", "fault_of", "store_error", "guard", "damaged_store"]
