"""A fault-injecting HTTP reverse proxy for tests against an S3 endpoint (e.g. moto's server).

Point s3fs / botocore / delta-rs at ``proxy.url`` instead of the upstream endpoint, then make a
share of requests fail (``error_rate``), or all of them for a while (``outage``, ``down``).
A failure is either a 503 SlowDown with S3's XML error body, or a TCP reset without a response.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import unquote, urlsplit

# Per-connection headers (RFC 9110 section 7.6.1): they describe one hop, so they are not
# forwarded. The body is re-framed with Content-Length on the way up and the response re-framed
# on the way down. Expect is answered by the proxy itself (100 Continue), so it goes too.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}
FAULT_KINDS = ("503", "reset")
COPY_CHUNK = 64 * 1024

SLOWDOWN_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    "<Resource>{resource}</Resource><RequestId>{request_id}</RequestId>"
    "<HostId>fault-proxy</HostId></Error>"
)


class FaultProxy:
    """Reverse proxy in front of ``upstream`` that injects S3-style faults.

    Attributes, all changeable while requests are in flight:
      error_rate   share of eligible requests that fail (0.0 .. 1.0), drawn from ``seed(n)``.
      fault_methods  set of HTTP methods eligible for random faults; None means all.
      fault_paths  predicate on the URL-decoded request path (no query); None means all.
      fault_kinds  kinds to draw from, 50/50 by default: "503" (SlowDown) and "reset" (RST).
    ``outage(s)`` and ``down()`` fail every request regardless of the filters above.
    Counters: requests, faults, bytes_sent_to_client (response body bytes), by_method,
    by_fault (per kind); zero them with ``reset_counts()``.
    """

    def __init__(self, upstream: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        # One lock guards the RNG, the fault settings as read together, and the counters.
        self._lock = threading.Lock()
        self._rng = random.Random(0)
        self.error_rate = 0.0
        self.fault_methods: set[str] | None = None
        self.fault_paths: Callable[[str], bool] | None = None
        self.fault_kinds: tuple[str, ...] = FAULT_KINDS
        self._down_until = 0.0  # time.monotonic() deadline of outage()
        self._down_depth = 0  # nesting depth of down() blocks
        self.reset_counts()
        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True  # idle keep-alive connections must not block exit
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fault-proxy",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- fault controls --------------------------------------------------------------------

    @property
    def error_rate(self) -> float:
        return self._error_rate

    @error_rate.setter
    def error_rate(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"error_rate must be within [0, 1], got {value}")
        self._error_rate = float(value)

    def seed(self, n: int) -> None:
        with self._lock:
            self._rng = random.Random(n)

    def outage(self, seconds: float) -> None:
        """Fail every request for the next ``seconds`` (replaces a running outage)."""
        with self._lock:
            self._down_until = time.monotonic() + seconds

    @contextlib.contextmanager
    def down(self) -> Iterator[FaultProxy]:
        """Fail every request while inside the block; blocks may nest."""
        with self._lock:
            self._down_depth += 1
        try:
            yield self
        finally:
            with self._lock:
                self._down_depth -= 1

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = 0
            self.faults = 0
            self.bytes_sent_to_client = 0
            self.by_method: Counter[str] = Counter()
            self.by_fault: Counter[str] = Counter()

    # -- used by the handler threads -------------------------------------------------------

    def _decide(self, method: str, path: str) -> str | None:
        """Count the request and return the fault kind to inject, or None to forward it."""
        with self._lock:
            self.requests += 1
            self.by_method[method] += 1
            if self._down_depth > 0 or time.monotonic() < self._down_until:
                hit = True
            else:
                eligible = (self.fault_methods is None or method in self.fault_methods) and (
                    self.fault_paths is None or self.fault_paths(path)
                )
                # Draw only for eligible requests so a seed gives the same fault sequence
                # whatever the unrelated traffic in between.
                hit = eligible and self._rng.random() < self._error_rate
            if not hit:
                return None
            kind = self._rng.choice(self.fault_kinds)
            self.faults += 1
            self.by_fault[kind] += 1
            return kind

    def _sent(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_sent_to_client += nbytes


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so clients keep connections alive, as they do against real S3; every response
    # therefore carries a Content-Length or chunked framing.
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest output clean

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        # Read the whole request body first: a 503 then leaves the connection reusable.
        body = self._read_body()
        kind = proxy._decide(self.command, unquote(urlsplit(self.path).path))
        try:
            if kind == "reset":
                self._reset()
            elif kind == "503":
                self._slowdown(proxy)
            else:
                self._forward(proxy, body)
        except ConnectionError:
            self.close_connection = True  # the client went away mid-response; nothing to do

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _handle

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            # HTTP chunked framing is undone here; an aws-chunked Content-Encoding inside it
            # (with its signatures and trailers) is left intact for the upstream to decode.
            parts = []
            while True:
                size = int(self.rfile.readline(65537).split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # HTTP trailers: dropped, none are meaningful to S3
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length is not None else None

    def _reset(self) -> None:
        # SO_LINGER on with timeout 0 makes close() send RST instead of FIN, as a dropped
        # connection does. The fd only really closes once rfile (a makefile ref) closes too.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.rfile.close()
        self.connection.close()

    def _slowdown(self, proxy: FaultProxy) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        xml = SLOWDOWN_XML.format(resource=urlsplit(self.path).path, request_id=request_id)
        body = b"" if self.command == "HEAD" else xml.encode()
        self.send_response(503, "Slow Down")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", request_id)
        self.end_headers()
        self._write(proxy, body)

    def _forward(self, proxy: FaultProxy, body: bytes | None) -> None:
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            # Path and Host go up exactly as the client sent them, so a SigV4 signature (which
            # covers both) stays valid; http.client must not add its own Host or Accept-Encoding.
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    upstream.putheader(name, value)
            if body is not None:
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
        except OSError as exc:
            upstream.close()
            self._bad_gateway(proxy, exc)
            return
        try:
            self._relay(proxy, response)
        finally:
            upstream.close()

    def _relay(self, proxy: FaultProxy, response: http.client.HTTPResponse) -> None:
        # send_response_only: the upstream's own Server and Date headers are passed through.
        self.send_response_only(response.status, response.reason)
        has_body = self.command != "HEAD" and response.status not in (204, 304)
        length = response.getheader("Content-Length")
        chunked = has_body and length is None  # upstream chunked or close-delimited
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if not has_body:
            return
        while block := response.read(COPY_CHUNK):
            self._write(proxy, block, chunked=chunked)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _bad_gateway(self, proxy: FaultProxy, exc: OSError) -> None:
        body = f"upstream unreachable: {exc}".encode()
        self.send_response(502)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._write(proxy, body)

    def _write(self, proxy: FaultProxy, data: bytes, *, chunked: bool = False) -> None:
        if not data:
            return
        if chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(data)
        proxy._sent(len(data))
