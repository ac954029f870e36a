"""`fastflow ui`: the link is printed once the server answers, and SIGTERM stops the whole server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import mlflow_store


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow  # ~20 s: starts a real `mlflow ui`
def test_ui_link_after_the_server_answers_and_sigterm_stops_it(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store(tmp_path)}
    ui = subprocess.Popen([sys.executable, "-m", "fastflow.cli", "ui", "--port", str(port)], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = ui.stdout.readline()  # stdout holds only the link; the CLI gives up by itself if the server never answers
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            assert response.status == 200  # already answering when the link is printed
        assert line.startswith(f"MLflow UI: http://127.0.0.1:{port}/#/experiments/"), line
        assert line.strip().endswith("/runs?workflowType=machine_learning"), line
        server = _descendants(ui.pid)
        assert server
        ui.send_signal(signal.SIGTERM)  # to the CLI only, as a service manager or `kill` would
        assert ui.wait(timeout=60) == 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(pid) for pid in server):
            time.sleep(0.2)
        assert not [pid for pid in server if _alive(pid)]
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
    finally:  # on failure, leave no server behind (it runs in its own process group)
        for pid in _descendants(ui.pid) if ui.poll() is None else ():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)
