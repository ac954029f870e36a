"""`fastflow ui`: the MLflow UI for the local store, on 127.0.0.1, as one stoppable process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from fastflow.tracking.store import LOCAL_STORE, experiment_url, tracking_uri


@dataclass
class UiServer:
    process: subprocess.Popen
    url: str  # the runs table in MLflow's machine-learning layout
    health_url: str


def start_ui(port: int, experiment: str) -> UiServer:
    """Start `mlflow ui` in its own session (process group), so stopping it stops its workers too."""
    uri = tracking_uri()
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]  # one local user: 1 worker starts ~4x faster on 2 cores
    if uri.startswith("sqlite:"):
        command += ["--default-artifact-root", (LOCAL_STORE / "artifacts").resolve().as_uri()]
    url = experiment_url(experiment, port)
    process = subprocess.Popen(command, start_new_session=True, stdout=_stderr_fd(),  # our stdout: the link only
                               env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    return UiServer(process, url, f"http://127.0.0.1:{port}/health")


def _stderr_fd():
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced stderr (e.g. captured)
        return subprocess.DEVNULL


def wait_until_answers(server: UiServer, timeout: float = 300.0, interval: float = 0.5) -> bool:
    """Poll the server's /health until it answers 200 (True), the process exits or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.process.poll() is None:
        try:
            with urllib.request.urlopen(server.health_url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(interval)
    return False


def stop_ui(server: UiServer, grace: float = 10.0) -> None:
    """SIGTERM to the server's whole process group, SIGKILL after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(server.process.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.process.wait(timeout=wait)
            _wait_group_gone(server.process.pid, wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_group_gone(pgid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)


__all__ = ["UiServer", "start_ui", "wait_until_answers", "stop_ui"]
