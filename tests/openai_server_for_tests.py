"""A loopback OpenAI-compatible server for the judge tests: a test subclasses `LoopbackServer` with what its
server answers (`post`, and `get` for `/v1/models`), and runs it with `with`: started on 127.0.0.1 at a free port
in a thread, shut down after."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def chat_reply(message: dict[str, Any], **choice: Any) -> dict[str, Any]:
    """A chat-completions response with one choice: the assistant's `message` (content, reasoning fields, ...)
    and any other fields of the choice (`logprobs`)."""
    return {
        "choices": [
            {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop", **choice}
        ]
    }


class LoopbackServer(ThreadingHTTPServer):
    """Answers GET with a one-model list and POST with `post(path, headers, body)`; both return (status, reply):
    a dict is sent as JSON, a string as it is (so a test can send a malformed body)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()  # the handlers run in threads: guard what a subclass records

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def get(self, path: str, headers: Any) -> tuple[int, dict[str, Any] | str]:
        return 200, {"data": [{"id": "judge"}]}

    def post(self, path: str, headers: Any, body: dict[str, Any]) -> tuple[int, dict[str, Any] | str]:
        raise NotImplementedError(f"{type(self).__name__} answers no POST")

    def __enter__(self) -> LoopbackServer:
        threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: LoopbackServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, code: int, body: dict[str, Any] | str) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(*self.server.get(self.path, self.headers))

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._send(*self.server.post(self.path, self.headers, body))
