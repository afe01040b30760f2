"""A real local HTTP server standing in for the Hugging Face Hub, for the network's faults: one that reads each
request and never answers, one that closes each connection unanswered, and one that answers what it is told (JSON of
the wrong shape, HTML, an error status). Bound to 127.0.0.1 on a free port; `endpoint` is what HF_ENDPOINT takes."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable

# A request's path -> (status, content type, body).
Answer = Callable[[str], tuple[int, str, bytes]]


def json_answer(value, status: int = 200) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(value).encode()


class FakeHub:
    """`mode` is "silent" (read each request, never answer), "close" (accept, then close without a byte) or
    "answer" (answer each request with `answer(path)`). `on_request(path)` runs as each request arrives; `paths`
    lists them; `requested` is set at the first."""

    def __init__(
        self, mode: str, answer: Answer | None = None, on_request: Callable[[str], None] = lambda _path: None
    ) -> None:
        self.mode, self.answer, self.on_request = mode, answer, on_request
        self.paths: list[str] = []
        self.requested = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._connections: list[socket.socket] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *_exception) -> None:
        # close() alone leaves the port listening while the serving thread is blocked in accept() (the kernel keeps
        # the socket for that call), so a client would still connect; shutdown() wakes accept() and stops listening.
        with contextlib.suppress(OSError):  # already shut down: a test may end a server before its `with` does
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        for connection in self._connections:
            connection.close()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:  # closed by __exit__
                return
            if self.mode == "close":
                connection.close()
            else:
                self._connections.append(connection)
                threading.Thread(target=self._converse, args=(connection,), daemon=True).start()

    def _converse(self, connection: socket.socket) -> None:
        """Read the requests of one connection (kept alive between them), answering each unless silent."""
        try:
            reader = connection.makefile("rb")
            while path := self._read_request(reader):
                self.paths.append(path)
                self.on_request(path)
                self.requested.set()
                if self.mode == "silent":
                    continue  # the client waits for an answer that never comes
                status, content_type, body = self.answer(path)
                head = f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
                connection.sendall(head.encode() + body)
        except OSError:  # the client gave up, or __exit__ closed the connection
            return

    @staticmethod
    def _read_request(reader) -> str | None:
        """The path of the next request on the connection (its body read and dropped), or None at its end."""
        request_line = reader.readline().decode(errors="replace")
        if not request_line.strip():
            return None
        length = 0
        for line in iter(reader.readline, b"\r\n"):
            if not line:
                return None
            name, _, value = line.decode(errors="replace").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        reader.read(length)
        return request_line.split()[1]
