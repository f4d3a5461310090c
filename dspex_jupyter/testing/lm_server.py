"""A loopback, OpenAI-compatible chat-completions server that answers with the SIMULATED LM.

Tests, tutorials and benchmarks point DSPy's own client at it, unchanged::

    with SimulatedLMServer(api_key="sk-test") as server:
        lm = dspy.LM("openai/arithmetic", api_base=server.url, api_key="sk-test")

so a run goes through real HTTP (DSPy's native engine posts to ``/v1/chat/completions``)
while the answers are those of ``SimulatedEngine``: the model name picks the simulated task
(``arithmetic``, ``sentiment``, ``capitals``; ``generic`` for none). No real model is called.

It also plays the provider's bad days on demand: wrong keys (401), rate limits (429 with
``Retry-After``), server errors (500/503), latency, a hung connection, going down
(connection refused) and coming back on the same port.

Why the standard library's ``ThreadingHTTPServer``: this is a test fixture that must run in
any environment dspex runs in, so it takes no extra dependency, and a thread per connection
lets a hung request block only itself. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dspy.lm15 import Config, Message, Request, TextPart

from dspex_jupyter.testing.simulated import SimulatedEngine
from dspex_jupyter.testing.tasks import TASK_NAMES

__all__ = ["SimulatedLMServer"]

HOST = "127.0.0.1"
GENERIC_MODEL = "generic"
MODELS: tuple[str, ...] = (*TASK_NAMES, GENERIC_MODEL)

# OpenAI-style error bodies per status: (type, code, message).
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Bad request (injected by the simulated server)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "forbidden", "Forbidden (injected by the simulated server)."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    408: ("timeout", None, "Request timed out (injected by the simulated server)."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached (simulated server)."),
    500: ("server_error", None, "The server had an error (injected by the simulated server)."),
    502: ("server_error", None, "Bad gateway (injected by the simulated server)."),
    503: ("server_error", None, "The server is overloaded (injected by the simulated server)."),
    504: ("timeout", None, "Gateway timeout (injected by the simulated server)."),
}
CONTEXT_LENGTH_CODE = "context_length_exceeded"
# Counters for a server run in another process (``python -m``): not an OpenAI route.
STATS_PATH = "/v1/dspex/stats"


@dataclass(frozen=True)
class Injection:
    """One failure answer queued by ``fail_next``."""

    status: int
    retry_after: float | None = None
    code: str | None = None
    message: str | None = None


def _error_body(status: int, code: str | None = None, message: str | None = None) -> bytes:
    kind, default_code, default_message = _ERRORS.get(
        status, ("server_error", None, f"HTTP {status} (injected by the simulated server).")
    )
    error = {
        "message": message or default_message,
        "type": kind,
        "param": None,
        "code": code if code is not None else default_code,
    }
    return json.dumps({"error": error}).encode()


def _text_of(content: Any) -> str:
    """Text of an OpenAI message ``content``: a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return ""


def request_from_openai(body: Mapping[str, Any], task_model: str) -> Request:
    """The simulated engine's Request for an OpenAI chat-completions JSON body."""
    system: list[str] = []
    messages: list[Message] = []
    for item in body.get("messages") or []:
        role = str(item.get("role", "user"))
        text = _text_of(item.get("content"))
        if role in ("system", "developer") and not messages:
            system.append(text)
        elif role in ("user", "assistant"):
            messages.append(Message(role=role, parts=(TextPart(text),)))
    stop = body.get("stop")
    config = Config(
        max_tokens=body.get("max_tokens") or body.get("max_completion_tokens"),
        temperature=body.get("temperature"),
        top_p=body.get("top_p"),
        stop=tuple(stop) if isinstance(stop, list) else ((stop,) if stop else ()),
        seed=body.get("seed"),
    )
    return Request(
        model=task_model,
        messages=tuple(messages),
        system="\n\n".join(system) or None,
        config=config,
    )


def _task_of(model: str) -> str | None:
    """The simulated model a request names, or None when there is no such model."""
    name = model.removeprefix("simulated/")
    return name if name in MODELS else None


class _HTTPServer(ThreadingHTTPServer):
    """Keeps every open connection so going down can cut them (keep-alive ones included)."""

    daemon_threads = True
    allow_reuse_address = True  # come back on the same port despite TIME_WAIT

    def __init__(self, owner: SimulatedLMServer, port: int) -> None:
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__((HOST, port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Registered here, on the accepting thread, so a cut never misses a new connection.
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-answer is normal here; stay quiet."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real providers and DSPy's client use
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and
        # the client's delayed ACK add ~40 ms to every answer (real servers set it too).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr (tests read their own output)."""

    def do_GET(self) -> None:
        owner = self.server.owner
        if self.path.rstrip("/") == STATS_PATH and owner._authorized(
            self.headers.get("Authorization")
        ):
            self._send(200, json.dumps(owner.stats()).encode())
        elif self.path.rstrip("/") != "/v1/models":
            self._send(404, _error_body(404, "not_found", f"no route {self.path}"))
        elif not owner._authorized(self.headers.get("Authorization")):
            self._send(401, _error_body(401))
        else:
            data = [{"id": m, "object": "model", "owned_by": "dspex-simulated"} for m in MODELS]
            self._send(200, json.dumps({"object": "list", "data": data}).encode())

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, _error_body(404, "not_found", f"no route {self.path}"))
            return
        outcome = self.server.owner._answer(raw, self.headers.get("Authorization"))
        if outcome is None:  # going down or stopped while this request waited: no answer
            self.close_connection = True
            return
        status, body, headers = outcome
        self._send(status, body, headers)

    def _send(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.close_connection = True


class SimulatedLMServer:
    """OpenAI-compatible loopback server answering with ``SimulatedEngine`` (offline).

    ``api_key`` is the only bearer key accepted; ``seed`` and ``base_accuracy`` go to the
    simulated engine; ``port=0`` takes a free port. ``requests`` counts chat-completion
    requests as they arrive (failed, rate-limited and hung ones included).
    """

    def __init__(
        self,
        api_key: str = "sk-test",
        *,
        seed: int = 0,
        base_accuracy: float | None = None,
        port: int = 0,
        latency_s: float = 0.0,
    ) -> None:
        self.api_key = api_key
        self.seed = seed
        self.base_accuracy = base_accuracy
        self._port = port
        self._latency = latency_s
        self._engines = {
            m: SimulatedEngine(
                task=None if m == GENERIC_MODEL else m, seed=seed, base_accuracy=base_accuracy
            )
            for m in MODELS
        }
        self._cond = threading.Condition()
        self._requests = 0
        self._statuses: Counter[int] = Counter()
        self._retry_after_sent = 0.0
        self._injections: deque[Injection] = deque()
        self._rate_limit_every = 0
        self._rate_limit_retry_after: float | None = None
        self._rate_limit_count = 0
        self._gate: threading.Event | None = None  # set while hanging: requests wait on it
        self._hung = 0
        self._down = threading.Event()  # set while down or stopped
        self._stopped = False
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> SimulatedLMServer:
        """Listen on 127.0.0.1 (a free port unless one was given) from a background thread."""
        with self._cond:
            if self._httpd is not None:
                return self
            self._stopped = False
        self._listen()
        return self

    def _listen(self) -> None:
        httpd = _HTTPServer(self, self._port)
        self._port = httpd.server_address[1]
        thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"simulated-lm-server:{self._port}",
            daemon=True,
        )
        with self._cond:
            self._httpd, self._thread = httpd, thread
            self._down.clear()
        thread.start()

    def _close(self) -> None:
        with self._cond:
            httpd, thread = self._httpd, self._thread
            self._httpd = self._thread = None
            self._down.set()
            gate, self._gate = self._gate, None
            if gate is not None:
                gate.set()  # wake hung requests: they see "down" and drop
                # ...on their own handler threads: wait until they have, so "stopped"
                # means nothing hangs any more.
                self._cond.wait_for(lambda: self._hung == 0, timeout=5)
            self._cond.notify_all()
        if httpd is None:
            return
        httpd.shutdown()  # stop accepting
        httpd.cut_connections()  # open keep-alive and hung connections: reset
        httpd.server_close()  # the listening socket: connection refused from now on
        if thread is not None:
            thread.join()

    def stop(self) -> None:
        """Stop listening, cut every connection, answer nothing more (idempotent)."""
        with self._cond:
            self._stopped = True
        self._close()

    def __enter__(self) -> SimulatedLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the server has not started; call start()")
        return self._port

    @property
    def url(self) -> str:
        """The ``api_base`` for ``dspy.LM``: ``http://127.0.0.1:PORT/v1``."""
        return f"http://{HOST}:{self.port}/v1"

    # -- failure injection -----------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        count: int = 1,
        retry_after: float | None = None,
        *,
        code: str | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``count`` chat requests with HTTP ``status`` (OpenAI error body).

        ``retry_after`` adds a ``Retry-After`` header (seconds); ``code`` sets the error
        code, e.g. ``"context_length_exceeded"`` with status 400.
        """
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._cond:
            self._injections.extend(
                [Injection(status, retry_after, code, message) for _ in range(count)]
            )

    def rate_limit_every(self, n: int, retry_after: float | None = 1.0) -> None:
        """Answer every ``n``-th chat request with 429 and ``Retry-After`` (0 turns it off)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._cond:
            self._rate_limit_every = n
            self._rate_limit_retry_after = retry_after
            self._rate_limit_count = 0

    def set_latency(self, seconds: float) -> None:
        """Added before every answer, imitating a remote provider's round trip."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        with self._cond:
            self._latency = seconds

    def hang(self) -> None:
        """Accept new requests and never answer them, until ``release()`` or ``stop()``."""
        with self._cond:
            if self._gate is None:
                self._gate = threading.Event()

    def release(self) -> None:
        """Answer the hung requests and stop hanging."""
        with self._cond:
            gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    def go_down(self) -> None:
        """Stop listening and reset open connections: clients get connection refused."""
        self._close()

    def come_back(self) -> None:
        """Listen again on the same port after ``go_down()``."""
        with self._cond:
            if self._stopped:
                raise RuntimeError("the server was stopped; start a new one")
            if self._httpd is not None:
                return
        self._listen()

    # -- counters ---------------------------------------------------------------------------

    @property
    def requests(self) -> int:
        """Chat-completion requests received so far (every outcome counts)."""
        with self._cond:
            return self._requests

    @property
    def hung(self) -> int:
        """Requests waiting now in hang mode."""
        with self._cond:
            return self._hung

    @property
    def statuses(self) -> dict[int, int]:
        """How many answers of each HTTP status were sent."""
        with self._cond:
            return dict(self._statuses)

    @property
    def retry_after_sent(self) -> float:
        """Sum of the ``Retry-After`` seconds sent so far (what a polite client waits)."""
        with self._cond:
            return self._retry_after_sent

    def stats(self) -> dict[str, Any]:
        """The counters as plain JSON (also served at ``/v1/dspex/stats``)."""
        with self._cond:
            return {
                "requests": self._requests,
                "statuses": {str(k): v for k, v in self._statuses.items()},
                "retry_after_sent": self._retry_after_sent,
            }

    def reset_counts(self) -> None:
        """Zero the counters (requests, statuses, Retry-After sum, rate-limit phase)."""
        with self._cond:
            self._requests = 0
            self._statuses.clear()
            self._retry_after_sent = 0.0
            self._rate_limit_count = 0

    def wait_for_requests(self, n: int, timeout: float) -> bool:
        """Block until ``requests >= n`` (True) or ``timeout`` seconds pass (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._requests >= n, timeout)

    def wait_for_hung(self, n: int, timeout: float) -> bool:
        """Block until ``n`` requests are hung (True) or ``timeout`` seconds pass (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._hung >= n, timeout)

    # -- answering (handler threads) --------------------------------------------------------

    def _authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )

    def _answer(
        self, raw: bytes, authorization: str | None
    ) -> tuple[int, bytes, dict[str, str]] | None:
        with self._cond:
            self._requests += 1
            gate, latency = self._gate, self._latency
            if gate is not None:
                self._hung += 1
            self._cond.notify_all()
        if gate is not None:
            gate.wait()  # woken by release() (answer) or by going down (drop)
            with self._cond:
                self._hung -= 1
                self._cond.notify_all()
        if latency and self._down.wait(latency):
            return None
        if self._down.is_set():
            return None
        status, body, headers = self._outcome(raw, authorization)
        with self._cond:
            self._statuses[status] += 1
            if "Retry-After" in headers:
                self._retry_after_sent += float(headers["Retry-After"])
        return status, body, headers

    def _outcome(self, raw: bytes, authorization: str | None) -> tuple[int, bytes, dict[str, str]]:
        if not self._authorized(authorization):
            return 401, _error_body(401), {}
        with self._cond:
            injection = self._injections.popleft() if self._injections else None
            if injection is None and self._rate_limit_every:
                self._rate_limit_count += 1
                if self._rate_limit_count % self._rate_limit_every == 0:
                    injection = Injection(429, self._rate_limit_retry_after)
        if injection is not None:
            headers = {}
            if injection.retry_after is not None:
                headers["Retry-After"] = f"{injection.retry_after:g}"
            body = _error_body(injection.status, injection.code, injection.message)
            return injection.status, body, headers
        try:
            payload = json.loads(raw or b"{}")
        except ValueError:
            return 400, _error_body(400, "invalid_json", "The body is not valid JSON."), {}
        if not isinstance(payload, dict):
            return 400, _error_body(400, "invalid_json", "The body must be a JSON object."), {}
        model = str(payload.get("model", ""))
        task = _task_of(model)
        if task is None:
            message = f"The model `{model}` does not exist (simulated models: {', '.join(MODELS)})."
            return 404, _error_body(404, "model_not_found", message), {}
        if payload.get("stream"):
            return 400, _error_body(400, "unsupported", "Streaming is not simulated."), {}
        return 200, self._completion(payload, task), {}

    def _completion(self, payload: Mapping[str, Any], task: str) -> bytes:
        response = self._engines[task].complete(request_from_openai(payload, task))
        text = response.message.parts[0].text if response.message.parts else ""
        n = max(1, int(payload.get("n") or 1))
        usage = response.usage
        body = {
            "id": f"chatcmpl-{response.id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(payload.get("model")),
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
                for i in range(n)
            ],
            "usage": {
                "prompt_tokens": usage.input_tokens,
                "completion_tokens": usage.output_tokens * n,
                "total_tokens": usage.input_tokens + usage.output_tokens * n,
            },
        }
        return json.dumps(body).encode()


def main(argv: list[str] | None = None) -> int:
    """Serve from its own process (benchmarks: the client's process then shares its GIL
    with nothing): prints the URL on stdout, serves until stdin closes or a signal."""
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="python -m dspex_jupyter.testing.lm_server")
    parser.add_argument("--key", default="sk-test", help="the bearer key it accepts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    parser.add_argument("--rate-limit-every", type=int, default=0)
    parser.add_argument("--retry-after", type=float, default=None)
    args = parser.parse_args(argv)
    server = SimulatedLMServer(args.key, seed=args.seed, port=args.port, latency_s=args.latency)
    server.rate_limit_every(args.rate_limit_every, retry_after=args.retry_after)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with server:
        print(server.url, flush=True)
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C in a terminal: stop quietly
            done.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
