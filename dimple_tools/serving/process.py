"""`dimple-serve` in a subprocess on a free local port (the tests and the load script)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Optional


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`dimple-serve` in its own process group on 127.0.0.1 and a free port; `with ServerProcess(...) as s:`
    waits until /health answers and always kills the whole group (LitServe's workers included) at the end."""

    def __init__(self, *args: str, startup_timeout: float = 180, log_path: Optional[str] = None, env=None):
        self.port = free_port()
        self.args = [sys.executable, "-m", "dimple_tools.serving.server", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.startup_timeout, self.log_path, self.env = startup_timeout, log_path, env
        self.process = None
        self.base_url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env=self.env)
        finally:
            if self.log_path:
                log.close()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dimple-serve exited with {self.process.returncode} before it was ready"
                                   + (f" (log: {self.log_path})" if self.log_path else ""))
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"dimple-serve was not ready within {self.startup_timeout} s")

    def get(self, path: str, timeout: float = 10) -> str:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as response:
            return response.read().decode()

    def metric(self, name: str) -> int:
        match = re.search(rf"^dimple_{name}_total (\d+)$", self.get("/metrics"), re.MULTILINE)
        return int(match.group(1))

    def stop(self) -> None:
        """SIGTERM to the process group (LitServe's graceful shutdown), then SIGKILL to whatever is left."""
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        self.process = None

    def __exit__(self, *exc):
        self.stop()
