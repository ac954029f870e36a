"""Lineage of a run: the command and the git commit that produced it (MLflow's source tags and `git_commit`)."""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _git(*args: str) -> str:
    """`git <args>` in the package's folder (its checkout); "" when that is not a git checkout."""
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError) as error:
        log.debug("git %s: %s", " ".join(args), error)
        return ""
    if done.returncode:
        log.debug("git %s in %s: %s", " ".join(args), Path(__file__).parent, done.stderr.strip())
    return done.stdout.strip() if done.returncode == 0 else ""


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def program() -> str:
    """What started this process: `fastflow sweep`, `pytest`, `chaos.py`, ... (spawned workers inherit argv)."""
    argv = sys.argv or [""]
    path = Path(argv[0])
    if path.name == "fastflow" and len(argv) > 1:
        return f"fastflow {argv[1]}"
    if path.name in ("", "-c"):
        return "python"
    return path.parent.name if path.name == "__main__.py" else path.name


@functools.lru_cache(maxsize=1)
def lineage_tags() -> dict[str, str]:
    """MLflow's source tags (the runs table's Source and Version columns, the run page's Source) and `git_commit`:
    the command and the commit that produced a run, marked when the checkout had uncommitted changes."""
    commit = git_commit()
    tags = {"git_commit": commit, "mlflow.source.type": "LOCAL", "mlflow.source.name": program()}
    if commit != "unknown":
        dirty = " (uncommitted changes)" if _git("status", "--porcelain", "--untracked-files=no") else ""
        tags.update({"mlflow.source.git.commit": commit, "mlflow.source.name": f"{program()} @ {commit[:7]}{dirty}"})
    return tags
