"""Secrets out of everything the harness writes or prints: one function, used for params, tags, artifacts,
checkpoints and terminal lines.

A URI's password (`scheme://user:PASSWORD@host`) and credential-like query parameters
(`?password=...`, `&token=...`, ...) become `***`. Pure string work: no I/O, no project imports.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s?#]*):(?P<secret>[^@\s/?#]+)@")
_QUERY = re.compile(r"(?P<key>[?&;](?:[A-Za-z0-9_.\-]*(?:password|passwd|pwd|secret|token|api[_\-]?key|"
                    r"access[_\-]?key|auth|credential|signature|sig)[A-Za-z0-9_.\-]*)=)(?P<value>(?!\*\*\*)[^&;#\s'\"]+)",
                    re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with URI passwords and credential query parameters replaced by `***`."""
    if not isinstance(text, str) or ("://" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['key']}{MASK}", text)


def redact_values(value: Any) -> Any:
    """`redact` applied to every string inside nested dicts, lists and tuples (keys kept)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(item) for item in value)
    return value


__all__ = ["redact", "redact_values", "MASK"]
