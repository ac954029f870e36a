"""Real faults for the tests and `make chaos`: a tracking server that can be stopped and restarted, and a store
folder on a small (or read-only) file system.

- `MlflowServer`: `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts) in its own process group, on a
  fixed port so that clients find it again after `stop()` and `start()`.
- `run_on_small_disk`: runs a shell script with a folder mounted as a tmpfs of a given size (or read-only) in a
  private mount namespace (`unshare --user --map-root-user --mount`: no root needed where user namespaces are
  allowed); the folder's contents are copied in before and copied out to another folder afterwards.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<port> over `<folder>/server.db` and `<folder>/artifacts`."""

    def __init__(self, folder: Path, port: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, seconds: float = 180) -> None:
        """Start and wait until /health answers."""
        command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
                   "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1"]
        log = open(self.folder / "server.log", "a")
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.process.returncode}; see {self.folder / 'server.log'}")
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).read()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer on {self.uri} within {seconds} s")

    def stop(self) -> None:
        """Stop the server's whole process group (SIGTERM, then SIGKILL) and wait until the port refuses."""
        if self.process is None or self.process.poll() is not None:
            return
        for signum, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # workers of the group that outlived the leader
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "MlflowServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def small_disk_available() -> bool:
    """Whether `unshare` can mount a tmpfs here (user namespaces allowed)."""
    try:
        done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                               "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=64k "
                               "tmpfs /tmp"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def run_on_small_disk(folder: Path, size_kb: int, script: str, out: Path, env: dict | None = None,
                      read_only: bool = False, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the shell `script` while `folder` is a tmpfs of `size_kb` KB (its contents copied in), read-only when
    `read_only`; then copy the folder's contents to `out`. `$STORE` in the script is the folder; the script may
    grow the disk with `mount -o remount,size=<n>k "$STORE"` (space freed)."""
    folder, out = Path(folder).resolve(), Path(out).resolve()
    seed = out.with_name(out.name + "-seed")
    out.mkdir(parents=True, exist_ok=True)
    wrapper = f"""set -u
STORE={shlex.quote(str(folder))}
rm -rf {shlex.quote(str(seed))} && cp -a "$STORE" {shlex.quote(str(seed))}
mount -t tmpfs -o size={size_kb}k tmpfs "$STORE"
cp -a {shlex.quote(str(seed))}/. "$STORE"/
{'mount -o remount,ro "$STORE"' if read_only else ''}
( {script}
)
code=$?
cp -a "$STORE"/. {shlex.quote(str(out))}/
rm -rf {shlex.quote(str(seed))}
exit $code
"""
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", wrapper], env=env,
                          capture_output=True, text=True, timeout=timeout)


__all__ = ["MlflowServer", "free_port", "small_disk_available", "run_on_small_disk"]
