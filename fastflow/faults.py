"""Errors in one line: a library's message cut at a sentence's end, and faults of the stores (MLflow tracking
store, Optuna storage) named with the store and what to do.

Pure string and exception work: no I/O, no imports of MLflow, SQLAlchemy or Optuna (their exceptions are
recognised by their messages and causes), so the CLI can use it without the slow imports.
"""

from __future__ import annotations

import errno
import re
from typing import Optional

from .redact import redact

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


__all__ = ["first_sentence", "describe"]
