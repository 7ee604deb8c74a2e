"""A real ``transformers serve`` process on loopback, for tests and benchmarks/perf_http.py.

The stub server (openai_stub_server.py) injects faults; this one proves compatibility: the
same OpenAI-compatible server a user would start, serving a local HF folder on a free
port. The server is pinned to the folder, so requests must name it as the model.

Threads: torch's default intra-op pool (one thread per core) makes this tiny model about
six times slower per request on a busy two-core machine than one thread does (measured:
2 vs 12 queries/s), so the server runs with one thread unless told otherwise.

Requests are counted from the server's own access log (uvicorn's
``"POST /v1/chat/completions HTTP/1.1" 200`` lines): what the server did, not what the
client believes it sent.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

#: Importable modules ``transformers serve`` needs (the ``serving`` extra plus torch).
SERVE_MODULES = ("torch", "fastapi", "uvicorn", "openai", "transformers")

_ACCESS = re.compile(r'"POST (/v1/[a-z/_]+) HTTP/[0-9.]+" (\d{3})')


def missing_serving_modules() -> list[str]:
    """The modules of SERVE_MODULES that cannot be imported here (empty when serving works)."""
    return [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(folder: Path, port: int) -> list[str]:
    """The ``transformers serve`` command line: the console script next to this interpreter,
    else the same entry point through ``python -c`` (a venv used without activating it)."""
    args = ["serve", "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "info", str(folder)]
    script = Path(sys.executable).parent / "transformers"
    if script.is_file():
        return [str(script), *args]
    if shutil.which("transformers"):
        return [shutil.which("transformers"), *args]
    return [sys.executable, "-c", "from transformers.cli.transformers import main; main()", *args]


class TransformersServer:
    """``with TransformersServer(folder, log) as srv: srv.url, srv.model, srv.requests()``."""

    def __init__(self, folder: str | Path, log_path: str | Path, *, threads: int = 1,
                 ready_timeout_s: float = 180.0):
        self.folder = Path(folder)
        self.log_path = Path(log_path)
        self.threads = threads
        self.ready_timeout_s = ready_timeout_s
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model(self) -> str:
        """The model name requests must carry (the server is pinned to the folder)."""
        return str(self.folder)

    def start(self) -> "TransformersServer":
        import httpx

        env = os.environ.copy()
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(self.threads)
        env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONUNBUFFERED="1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(serve_command(self.folder, self.port), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=str(self.log_path.parent),
                                     start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                self.stop()
                raise RuntimeError(f"transformers serve exited with {code}: {self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"transformers serve not ready after {self.ready_timeout_s:g} s:"
                                   f" {self.log_tail()}")
            time.sleep(0.25)

    def stop(self) -> None:
        """Terminate the server (its own process group: nothing else is signalled)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
            except ProcessLookupError:
                pass
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "TransformersServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def requests(self, path: str = "/v1/chat/completions") -> Counter:
        """Requests to ``path`` the server logged so far, by status code (``Counter``)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return Counter(int(code) for p, code in _ACCESS.findall(text) if p == path)
