"""A real ``xpnet serve`` process for the system tests: on 127.0.0.1, a free port the OS picks, stopped by the test."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START_LINE = re.compile(r"at http://127\.0\.0\.1:(\d+)/")


class ServeProcess:
    """``with ServeProcess(model, "--max-bytes", "5000") as server: httpx.get(server.url + "health")``."""

    def __init__(self, *args, start_timeout: float = 60.0):
        self.args = [str(a) for a in args]
        self.start_timeout = start_timeout
        self.lines: list[str] = []
        self.proc = None
        self.url = None
        self.returncode = None

    def __enter__(self) -> "ServeProcess":
        cmd = [sys.executable, "-c", "import sys; from xpnet.cli import main; sys.exit(main())", "serve",
               *self.args, "--host", "127.0.0.1", "--port", "0"]
        env = dict(os.environ, PYTHONPATH=str(ROOT), XPNET_BACKEND="numpy")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        started = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                m = START_LINE.search(line)
                if m and self.url is None:
                    self.url = f"http://127.0.0.1:{m.group(1)}/"
                    started.set()
            started.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        started.wait(self.start_timeout)
        if self.url is None:
            self.stop()
            raise RuntimeError(f"xpnet serve did not start: {''.join(self.lines)[-2000:]}")
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig=signal.SIGINT, timeout: float = 30.0) -> int:
        """Send ``sig``, wait for the exit (killed after ``timeout``): the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        self.returncode = self.proc.returncode
        return self.returncode

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
