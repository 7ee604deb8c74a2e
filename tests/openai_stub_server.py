"""A real loopback HTTP server speaking the OpenAI completions wire format, for tests.

Not a mock of the code under test: it is an actual ``ThreadingHTTPServer`` on 127.0.0.1
(port 0) that the HTTP oracle talks to over TCP. Each prompt text can carry a *script* of
misbehaviours consumed one per request (429 with Retry-After, 5xx, a response slower than
the client timeout, truncated or malformed JSON, a dropped connection, a 4xx, an answer of
a given shape such as the prompt echoed with chat markers) before it answers normally with
``answer_for(prompt)``. It counts attempts and successful answers per
prompt so tests can check that every success is paid exactly once.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def answer_for(text: str) -> str:
    """The stub's answer: one per prompt text, and never containing it (an answer that
    contains a long prompt is what HttpOracle rejects as an echo)."""
    return "ans:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class StubServer:
    def __init__(self, scripts: dict[str, list] | None = None, api_key: str | None = None,
                 delay_s: float = 0.0):
        self.scripts = {k: list(v) for k, v in (scripts or {}).items()}
        self.api_key = api_key
        self.delay_s = delay_s
        self.attempts: Counter = Counter()
        self.successes: Counter = Counter()
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code, body: bytes, headers=(), length=None):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                with stub.lock:
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    self._handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up: expected in timeout scripts
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

            def _handle(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                chat = self.path.endswith("/chat/completions")
                text = body["messages"][-1]["content"] if chat else body["prompt"]
                with stub.lock:
                    stub.bodies.append(body)
                    stub.paths.append(self.path)
                    stub.attempts[text] += 1
                    script = stub.scripts.get(text)
                    action = script.pop(0) if script else "ok"
                if stub.delay_s:
                    time.sleep(stub.delay_s)
                auth = self.headers.get("Authorization", "")
                if stub.api_key is not None and auth != f"Bearer {stub.api_key}":
                    msg = {"error": {"message": "invalid api key"}}
                    return self._send(401, json.dumps(msg).encode())
                kind, arg = (action if isinstance(action, tuple) else (action, None))
                if kind in ("ok", "content", "usage"):
                    # ("content", fmt): a 200 whose answer is fmt.format(prompt=, answer=), e.g.
                    # the prompt echoed in front of the answer with chat markers;
                    # ("usage", (prompt_tokens, completion_tokens)): the answer with a usage
                    content = answer_for(text) if kind != "content" else \
                        arg.format(prompt=text, answer=answer_for(text))
                    choice = ({"message": {"role": "assistant", "content": content}} if chat
                              else {"text": content})
                    data = {"id": "x", "choices": [{"index": 0, **choice, "finish_reason": "stop"}]}
                    if kind == "usage":
                        data["usage"] = {"prompt_tokens": arg[0], "completion_tokens": arg[1],
                                         "total_tokens": arg[0] + arg[1]}
                    payload = json.dumps(data)
                    self._send(200, payload.encode())
                    with stub.lock:
                        stub.successes[text] += 1
                elif kind == "429":
                    self._send(429, b'{"error": {"message": "slow down"}}',
                               headers=[("Retry-After", str(arg))] if arg is not None else [])
                elif kind == "status":
                    self._send(arg, b'{"error": {"message": "server trouble"}}')
                elif kind == "sleep":  # slower than the client's timeout
                    time.sleep(arg)
                    self._send(200, b'{"choices": [{"message": {"content": "late"}, "text": "late"}]}')
                elif kind == "truncated":  # well-framed body that is cut-off JSON
                    self._send(200, b'{"choices": [{"message": {"content": "par')
                elif kind == "malformed":
                    self._send(200, b"<html>not json</html>")
                elif kind == "nochoices":
                    self._send(200, b'{"object": "error"}')
                elif kind == "drop":  # promise more bytes than are sent, then hang up
                    self._send(200, b'{"choices": [', length=500)
                    self.wfile.flush()
                    self.close_connection = True
                elif kind == "echo_auth":  # a hostile 400 that echoes the credentials back
                    msg = {"error": {"message": f"bad request from {auth}"}}
                    self._send(400, json.dumps(msg).encode())
                else:  # pragma: no cover - test bug
                    raise ValueError(kind)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
