"""A local OTLP/HTTP receiver that accepts every export and keeps nothing.

    python -m bench._otlp_sink PORT COUNTS

Answers each POST (``/v1/traces``) 200 with an empty protobuf body, as a collector
does, and writes how many requests and bytes it took to COUNTS on SIGTERM, so the
benchmark can check that spans were really sent.
"""

from __future__ import annotations

import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType


class Sink(BaseHTTPRequestHandler):
    requests = 0
    received = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        with Sink.lock:
            Sink.requests += 1
            Sink.received += length
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    port, counts = int(sys.argv[1]), Path(sys.argv[2])
    server = ThreadingHTTPServer(("127.0.0.1", port), Sink)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        counts.write_text(f"{Sink.requests} {Sink.received}\n")
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
