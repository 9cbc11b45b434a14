"""Nixery's Gunicorn worker: a threaded worker made safe for a public instance.

Gunicorn's `gthread` worker hands a connection to a thread as soon as a byte
arrives, and the thread then blocks until the headers are complete: twenty
clients sending headers a byte at a time hold every thread. This worker, on an
event loop of its own (nixery/threadloop.py, the same on every Gunicorn from 23
on), reads headers in that loop instead (non-blocking, up to
NIXERY_HEADER_TIMEOUT for the whole head), so a thread is only taken by a
request that is complete; slow and idle connections cost a socket and a buffer,
and a worker holds up to Gunicorn's `worker_connections` of them. It also

- parks requests that wait for another request's build (nixery/parking.py): the connection
  and its head are kept in the event loop, with no thread, and the request runs again when
  the build's lock is released, so any number of waiters leave the threads to everyone else,
- caps the connections of one client address (NIXERY_CLIENT_CONNECTIONS per worker; more get 429);
  from a trusted proxy (NIXERY_TRUSTED_PROXIES) the connection counts for the client its head
  names (nixery/clients.py), from the moment the head is read, and the proxy itself is not capped,
- gives every socket a thread uses a timeout (NIXERY_IO_TIMEOUT), so a client that stops
  reading a blob (or sending a body) loses its thread after that long,
- stops accepting while every thread is busy, so the other worker (or the kernel's
  backlog) takes new connections instead of a queue behind waiting builds,
- answers every error of its own and of Gunicorn's HTTP parser (400, 408, 414, 431, ...)
  with a registry JSON body, and
- on SIGTERM closes its listening sockets first, then lets running requests finish
  within the grace period, logging what it waits for; but when requests are in flight (a
  pull waiting for its build), it first goes on serving, without starting any build, until
  no request has been in flight for Gunicorn's keep-alive time: the waiting client's next
  requests (the manifest by digest, the blobs), on its kept-alive or on new connections, are
  answered by a lone instance too (a Docker container, a single pod, a systemd unit). When
  the master dies (the kernel sends SIGTERM then: nixery/threadloop.py), it stops listening
  at once, requests in flight or not.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import selectors
import socket
import threading
import time
from functools import partial
from typing import Any, Optional

from gunicorn.http import errors as http_errors

from .clients import TrustedProxies, head_headers
from .errors import RegistryError, internal_error
from .parking import ENVIRON_KEY, Parked, Parking
from .threadloop import BODY_ERRORS, Connection, ThreadLoopWorker

# Longest head read before the thread's parser takes over (and answers 414/431 as the limits say).
MAX_HEAD_BYTES = 64 * 1024
_WAIT_LOG_SECONDS = 5.0

# Gunicorn 23 has no ExpectationFailed (it ignores `Expect`): there, nothing is answered 417.
_EXPECTATION_FAILED = (http_errors.ExpectationFailed,) if hasattr(http_errors, "ExpectationFailed") else ()
# Gunicorn's parser errors, most specific first: (types, status, code).
_PARSER_ERRORS: tuple[tuple[tuple[type, ...], int, str], ...] = (
    ((http_errors.LimitRequestLine,), 414, "URI_TOO_LONG"),
    ((http_errors.LimitRequestHeaders,), 431, "HEADERS_TOO_LARGE"),
    ((http_errors.UnsupportedTransferCoding,), 501, "UNSUPPORTED"),
    (_EXPECTATION_FAILED, 417, "EXPECTATION_FAILED"),
    ((http_errors.ForbiddenProxyRequest,), 403, "DENIED"),
    ((http_errors.ParseException, *BODY_ERRORS), 400, "BAD_REQUEST"),
)
_REASONS = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 414: "URI Too Long",
            417: "Expectation Failed", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable"}


def error_response(error: RegistryError) -> bytes:
    """A whole HTTP/1.1 response carrying `error`'s JSON body; the connection closes after it."""
    body = error.body()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close",
               "Docker-Distribution-API-Version": "registry/2.0", **error.headers}
    head = f"HTTP/1.1 {error.status} {_REASONS.get(error.status, 'Error')}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    return head.encode("latin-1") + body


def parser_error(exc: BaseException) -> Optional[RegistryError]:
    """The registry error for a client's malformed request, or None for a server fault."""
    for kinds, status, code in _PARSER_ERRORS:
        if isinstance(exc, kinds):
            return RegistryError(status, code, f"bad request: {exc}"[:300])
    return None


# The first bytes of a TLS handshake record (content type 22, protocol version 3.x).
TLS_HANDSHAKE = b"\x16\x03"


class TimedSocket(socket.socket):
    """A client socket whose "blocking" mode has a timeout: a thread sets its socket
    blocking before reading and writing, and a blocking read or sendfile to a client that
    stopped reading would hold the thread for ever."""

    io_timeout: float = 30.0

    def setblocking(self, flag: bool) -> None:
        self.settimeout(self.io_timeout if flag else 0.0)


class NixeryConn(Connection):
    """A connection that tells its worker when it closes (to count connections per address)
    and carries the head read so far by the event loop; a parked request keeps its head
    (`last_head`) to run again, and when it first arrived."""

    def __init__(self, worker: "NixeryWorker", *args: Any):
        super().__init__(*args)
        self.worker = worker
        self.head: Optional[bytearray] = None
        self.head_deadline = 0.0
        self.released = False
        self.counted_as: Optional[str] = None  # the client address this connection counts for
        self.last_head = b""
        self.parking = Parking(0.0)
        self.parked: Optional[Parked] = None

    def close(self, graceful: bool = False) -> None:
        try:
            super().close(graceful)
        finally:
            self.worker.released(self)


class NixeryWorker(ThreadLoopWorker):
    """Settings come from the Gunicorn config's `nixery_*` attributes (server.py sets them)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.per_address: collections.Counter[str] = collections.Counter()
        self.reading: dict[NixeryConn, None] = {}  # connections whose head is being read, oldest first
        self.busy = 0
        self.serving: dict[NixeryConn, tuple[str, float]] = {}
        self.last_wait_log = 0.0
        # Stopping with requests in flight: still serving (their clients' next requests), and
        # since when nothing has been in flight (None: something is).
        self.draining = False
        self.quiet_since: Optional[float] = None
        # Parked requests by what they wait for (touched by the event loop only).
        self.parked: dict[str, list[NixeryConn]] = {}
        self.local = threading.local()  # the connection each thread serves
        config = self.app.config  # the NixeryServer's Config
        server = config.server
        self.limits = {"header_timeout": server.header_timeout, "client_connections": server.client_connections}
        self.proxies = TrustedProxies(server.trusted_proxies)
        TimedSocket.io_timeout = float(server.io_timeout)

    def load_wsgi(self) -> None:
        """The app, told in each request's environ that this worker can park it."""
        super().load_wsgi()
        app = self.wsgi

        def parkable(environ: dict, start_response: Any) -> Any:
            conn = getattr(self.local, "conn", None)  # None: not an HTTP/1 request of handle_request's
            if conn is not None:
                environ[ENVIRON_KEY] = conn.parking
            return app(environ, start_response)

        self.wsgi = parkable

    # -- accepting --------------------------------------------------------------------------

    def set_accept_enabled(self, enabled: bool) -> None:
        enabled = enabled and self.serves() and self.busy < self.cfg.threads
        super().set_accept_enabled(enabled)

    def accept(self, listener: Any) -> None:
        try:
            raw, addr = listener.accept()
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            raise
        client = TimedSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        address = addr[0] if isinstance(addr, tuple) else ""
        # A trusted proxy's connection counts for the client its head names, once it is read.
        trusted = self.proxies.trusts(address)
        if not trusted and self.per_address[address] >= self.limits["client_connections"]:
            self._answer_and_close(client, self._too_many_connections())
            return
        self.nr_conns += 1
        conn = NixeryConn(self, self.cfg, client, addr, listener.getsockname())
        if not trusted:
            self._count(conn, address)
        self._read_head(conn)

    def _too_many_connections(self) -> RegistryError:
        error = RegistryError(429, "TOOMANYREQUESTS",
                              f"this address has {self.limits['client_connections']} connections open already")
        error.headers["Retry-After"] = "1"
        return error

    def _count(self, conn: NixeryConn, address: str) -> None:
        self.per_address[address] += 1
        conn.counted_as = address

    def _uncount(self, conn: NixeryConn) -> None:
        address, conn.counted_as = conn.counted_as, None
        if address is None:
            return
        self.per_address[address] -= 1
        if self.per_address[address] <= 0:
            del self.per_address[address]

    def _count_client(self, conn: NixeryConn) -> bool:
        """Counts a trusted proxy's connection for the client its complete head names (each request
        of a kept-alive connection may be another client's); False when that client is over its cap,
        after answering 429 and closing."""
        peer = conn.client[0] if isinstance(conn.client, tuple) else ""
        if not self.proxies.trusts(peer):
            return True
        headers = head_headers(bytes(conn.head or b""), ("x-forwarded-for", "forwarded"))
        client = self.proxies.client(peer, headers["x-forwarded-for"], headers["forwarded"])
        if client == conn.counted_as:
            return True
        self._uncount(conn)
        if self.per_address[client] >= self.limits["client_connections"]:
            self.nr_conns -= 1
            self._answer_and_close(conn.sock, self._too_many_connections())
            self.released(conn)
            return False
        self._count(conn, client)
        return True

    @staticmethod
    def _answer_and_close(sock: socket.socket, error: RegistryError) -> None:
        try:
            sock.setblocking(False)
            sock.send(error_response(error))
        except OSError:
            pass
        sock.close()

    def released(self, conn: NixeryConn) -> None:
        if conn.released:
            return
        conn.released = True
        self._uncount(conn)

    # -- reading heads in the event loop ------------------------------------------------------

    def _read_head(self, conn: NixeryConn) -> None:
        conn.sock.setblocking(False)
        conn.head = bytearray()
        conn.head_deadline = time.monotonic() + self.limits["header_timeout"]
        self.reading[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_readable, conn))

    def _stop_reading(self, conn: NixeryConn) -> None:
        self.reading.pop(conn, None)
        self._unwatch(conn)

    def _on_head_readable(self, conn: NixeryConn, _sock: Any) -> None:
        try:
            data = conn.sock.recv(MAX_HEAD_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._stop_reading(conn)
            self.nr_conns -= 1
            conn.close()
            return
        conn.head += data
        if conn.head[:2] == TLS_HANDSHAKE:
            # A client trying TLS first on this plain-HTTP port (skopeo and Docker do on every pull):
            # it waits for the server's hello and sends no line the parser could refuse, so it is
            # answered at once. Logged through Gunicorn's error log, where QuietProbes keeps it quiet.
            self._stop_reading(conn)
            self.nr_conns -= 1
            self.log.warning("Invalid HTTP request line: a TLS handshake on this plain-HTTP port")
            try:
                conn.sock.send(error_response(RegistryError(400, "BAD_REQUEST", "this port speaks plain HTTP, not TLS")))
            except OSError:
                pass
            conn.close()
            return
        if b"\r\n\r\n" in conn.head or b"\n\n" in conn.head or len(conn.head) > MAX_HEAD_BYTES:
            self._stop_reading(conn)
            if self._count_client(conn):
                conn.parking = Parking(time.time(), stopping=not self.alive)
                self.enqueue_req(conn)

    def on_client_socket_readable(self, conn: NixeryConn, client: Any) -> None:
        """A kept-alive connection's next request: its head is read in the loop as well."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._read_head(conn)

    def murder_pending(self) -> None:
        """Runs once per loop: closes connections whose head is late (408) and, when
        stopping, says what the worker waits for."""
        now = time.monotonic()
        for conn in list(self.reading):
            if conn.head_deadline > now:
                break
            self._stop_reading(conn)
            self.nr_conns -= 1
            if conn.head:
                self._answer_and_close(conn.sock, RegistryError(
                    408, "REQUEST_TIMEOUT", f"request headers not received within {self.limits['header_timeout']}s"))
                self.released(conn)
            else:
                conn.close()
        if not self.alive:
            self._drain(now)
            if now - self.last_wait_log >= _WAIT_LOG_SECONDS:
                self._log_waiting(now)

    # -- threads ---------------------------------------------------------------------------

    def enqueue_req(self, conn: NixeryConn) -> None:
        self.busy += 1
        super().enqueue_req(conn)

    def finish_request(self, conn: NixeryConn, fs: Any) -> None:
        self.busy -= 1
        if conn.parked is not None:
            self._park(conn)
            return
        super().finish_request(conn, fs)

    def handle(self, conn: NixeryConn) -> Any:
        if conn.head is not None:
            head, conn.head = bytes(conn.head), None
            conn.last_head = head
            conn.init()
            conn.parser.unreader.unread(head)
        self.serving[conn] = ("request", time.monotonic())
        try:
            return super().handle(conn)
        finally:
            self.serving.pop(conn, None)

    def handle_request(self, req: Any, conn: NixeryConn) -> Any:
        self.serving[conn] = (f"{req.method} {req.path}", time.monotonic())
        self.local.conn = conn
        try:
            return super().handle_request(req, conn)
        except Parked as parked:
            conn.parked = parked  # no answer sent: finish_request parks the connection
            return False
        finally:
            self.local.conn = None

    # -- parked requests ---------------------------------------------------------------------

    def _park(self, conn: NixeryConn) -> None:
        """Keeps the connection, threadless, until what it waits for is over; one watcher thread
        per lock waited for (it sleeps in the kernel), whatever the number of waiters."""
        parked, conn.parked = conn.parked, None
        conn.sock.setblocking(False)
        waiting = self.parked.get(parked.key)
        if waiting is None:
            waiting = self.parked[parked.key] = []
            threading.Thread(target=self._watch, args=(parked,), name="parked", daemon=True).start()
        waiting.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_parked_readable, conn, parked.key))

    def _watch(self, parked: Parked) -> None:
        try:
            parked.wait()
        except OSError:
            self.log.exception("cannot wait for a build; running its waiters again")
        finally:
            self.method_queue.defer(self._wake, parked.key)

    def _wake(self, key: str) -> None:
        """Runs the requests parked on `key` again, each from its head, with a fresh parser."""
        for conn in self.parked.pop(key, []):
            self._unwatch(conn)
            conn.head = bytearray(conn.last_head)
            conn.parser = None
            conn.parking = dataclasses.replace(conn.parking, replayed=True)
            self.enqueue_req(conn)

    def _unwatch(self, conn: NixeryConn) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _on_parked_readable(self, conn: NixeryConn, key: str, _sock: Any) -> None:
        """A parked client that hangs up is let go; one that sends more (its next request) is left
        alone until its request runs again, its bytes waiting in the socket."""
        try:
            closed = conn.sock.recv(1, socket.MSG_PEEK) == b""
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            closed = True
        self._unwatch(conn)
        if closed:
            self.parked.get(key, []).remove(conn)
            self.nr_conns -= 1
            conn.close()

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """Gunicorn's error pages, as registry JSON bodies."""
        error = parser_error(exc)
        if error is None:
            self.log.exception("error handling request")
            error = internal_error(exc)
        else:
            self.log.warning("invalid request", extra={"client": (addr or ("",))[0], "status": error.status,
                                                       "reason": error.message})
        try:
            client.sendall(error_response(error))
        except OSError:
            pass

    # -- stopping --------------------------------------------------------------------------

    def handle_exit(self, sig: int, frame: Any) -> None:
        """An idle worker stops accepting at once (the loop closes its listening sockets); one
        with requests in flight serves on (`still_serving`) until it has been idle for the
        keep-alive time. Either way, requests in flight finish within the grace period."""
        if self.alive:
            # With the master gone (its death is this SIGTERM: nixery/threadloop.py), nothing would
            # replace this worker: it stops listening at once.
            self.draining = self._in_flight() and not self.orphaned()
            if self.draining:
                self.log.info("stopping: finishing requests in flight and serving their clients' next requests "
                              "(no new build) until none has come for the keep-alive time",
                              extra={"grace_period": self.cfg.graceful_timeout, "keepalive": self.cfg.keepalive})
            else:
                self.log.info("stopping: no new connections; finishing requests in flight",
                              extra={"grace_period": self.cfg.graceful_timeout})
        super().handle_exit(sig, frame)

    def still_serving(self) -> bool:
        return self.draining

    def _in_flight(self) -> bool:
        """Whether a request runs in a thread, waits parked, or has its head being read."""
        return self.busy > 0 or any(self.parked.values()) or bool(self.reading)

    def _drain(self, now: float) -> None:
        """Ends the serving of a stopping worker once nothing has been in flight for the keep-alive
        time (a client that got its manifest asks for the blobs at once; one that sends nothing
        for that long would have lost its kept-alive connection anyway)."""
        if not self.draining:
            return
        if self._in_flight():
            self.quiet_since = None
        elif self.quiet_since is None:
            self.quiet_since = now
        elif now - self.quiet_since >= self.cfg.keepalive:
            self.draining = False
            self.log.info("stopping: no request for the keep-alive time; no new connections")

    def _log_waiting(self, now: float) -> None:
        self.last_wait_log = now
        waiting = sorted(((what, round(now - since, 1)) for what, since in list(self.serving.values())),
                         key=lambda item: -item[1])
        if waiting:
            self.log.info("stopping: waiting for requests in flight",
                          extra={"requests": [f"{what} ({age}s)" for what, age in waiting[:20]],
                                 "count": len(waiting)})

