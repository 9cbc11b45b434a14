"""The event loop and thread pool under Nixery's Gunicorn worker (nixery/worker.py).

Gunicorn's own threaded worker (`gthread`) changed its design in each major version Nixery
runs on: 23.0 (Debian trixie's and NixOS stable's) hands connections to threads under a lock
and finishes them in the threads; 24 moved that into the event loop through a method queue,
with other signatures for `accept` and `finish_request`; 25 to 27 added parked connections, a
lingering close and HTTP/2. A subclass that reads request heads in the event loop would have to
reach into whichever of these is installed. This loop is Nixery's own instead, and rests only on
what is the same from Gunicorn 23 to 27: the base worker (signals, heartbeat, loading the app),
the HTTP/1 request parser and the WSGI response (tests/test_gunicorn_versions.py pins each name
used here and runs the worker's tests on 23.0.0, 26.0.0 and the newest 27).

Plain HTTP/1.x only: Nixery configures no TLS and no HTTP/2 in Gunicorn (a proxy in front
terminates them).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import queue
import selectors
import signal
import socket
import time
from concurrent import futures
from functools import partial
from typing import Any, Callable, Optional

from gunicorn import util
from gunicorn.http import RequestParser, wsgi
from gunicorn.http import errors as http_errors
from gunicorn.workers import base

# How much of a request body the application left unread is read and dropped before the
# connection is kept alive (the next request starts after it); past that, the connection closes.
MAX_DRAIN_BYTES = 64 * 1024

# Errors in a request's body: Gunicorn 23 makes a malformed chunk an OSError (without errno),
# 27 a parse error; either way the client's fault, answered as such (`handle_error`).
BODY_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(http_errors, name) for name in ("InvalidChunkSize", "ChunkMissingTerminator", "InvalidChunkExtension")
    if hasattr(http_errors, name))


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int) -> None:
    """Asks the kernel to send `sig` to this process when its parent exits (prctl(2)); the
    master is single-threaded, so its forking thread is the process."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


class MethodQueue:
    """Calls for the event loop from the threads and signal handlers, waking it through a pipe
    (the loop owns the poller and the connection lists, so nothing else touches them)."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[Callable[[], Any]] = queue.SimpleQueue()  # put() is reentrant
        self._read_fd = self._write_fd = -1

    def open(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)

    def fileno(self) -> int:
        return self._read_fd

    def defer(self, callback: Callable[..., Any], *args: Any) -> None:
        self._calls.put(partial(callback, *args))
        try:
            os.write(self._write_fd, b"\0")
        except OSError:  # the pipe is full: the loop is awake already
            pass

    def run_callbacks(self, _fileobj: Any) -> None:
        try:
            os.read(self._read_fd, 4096)
        except OSError:
            pass
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            call()

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class Connection:
    """A client's connection; Gunicorn's parser is made when a thread first reads from it."""

    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any):
        self.cfg = cfg
        self.sock = sock
        self.client = client
        self.server = server
        self.parser: Optional[RequestParser] = None
        self.timeout = 0.0  # when a kept-alive connection is closed
        self.sock.setblocking(False)

    def init(self) -> None:
        self.sock.setblocking(True)
        if self.parser is None:
            self.parser = RequestParser(self.cfg, self.sock, self.client)

    def buffered(self) -> bool:
        """Whether the parser holds bytes of a next request already (a pipelining client):
        the socket will not become readable for them."""
        return self.parser is not None and bool(self.parser.unreader.buf.getvalue())

    def close(self, graceful: bool = False) -> None:
        """Graceful: the response is followed by a FIN, and whatever the client sent meanwhile is
        drained without waiting (closing with unread bytes would reset the connection and could
        destroy the response before the client reads it). Gunicorn's own graceful close lingers up
        to 2 s for the client's FIN, which in the event loop would stall every connection."""
        if graceful:
            try:
                self.sock.shutdown(socket.SHUT_WR)
                self.sock.settimeout(0.0)
                for _ in range(16):
                    if not self.sock.recv(4096):
                        break
            except OSError:
                pass
        util.close(self.sock)


class ThreadLoopWorker(base.Worker):
    """One event loop (accepting, kept-alive connections, whatever a subclass waits for) and a
    pool of `threads` threads, each handling one complete request at a time.

    Subclasses provide `accept(listener)`, called when a listening socket is readable, and
    `on_client_socket_readable(conn, sock)`, when a kept-alive connection is; they hand
    connections to a thread with `enqueue_req`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tpool: Optional[futures.ThreadPoolExecutor] = None
        self.poller: Optional[selectors.BaseSelector] = None
        self.method_queue = MethodQueue()
        self.keepalived_conns: collections.deque[Connection] = collections.deque()
        self.max_keepalived = self.cfg.worker_connections - self.cfg.threads
        self.nr_conns = 0
        self.accepting = False

    def init_process(self) -> None:
        # The master's death is a SIGTERM at once (the loop would only see it within a second), and
        # a worker whose master is gone stops listening at once (`orphaned`): a restarted instance
        # must be able to bind the port, and nobody would replace this worker.
        die_with_parent(signal.SIGTERM)
        if self.orphaned():  # the master died before that
            self.alive = False
        self.tpool = futures.ThreadPoolExecutor(max_workers=self.cfg.threads)
        self.poller = selectors.DefaultSelector()
        self.method_queue.open()
        super().init_process()  # loads the app, then runs the loop

    def accept(self, listener: socket.socket) -> None:
        raise NotImplementedError

    def on_client_socket_readable(self, conn: Connection, client: Any) -> None:
        raise NotImplementedError

    def murder_pending(self) -> None:
        """Runs once every turn of the loop, for a subclass's own deadlines."""

    def still_serving(self) -> bool:
        """Once stopping (not `alive`), whether the worker still accepts connections and keeps them
        alive, asked once every turn of the loop: here never, a subclass may for a while."""
        return False

    def orphaned(self) -> bool:
        """Whether the master that started this worker is gone."""
        return os.getppid() != self.ppid

    def serves(self) -> bool:
        """Whether answered connections may be kept alive (the worker runs, or still serves)."""
        return self.alive or self.still_serving()

    # -- signals ----------------------------------------------------------------------------

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM: stop accepting; requests in flight finish within the grace period."""
        if self.alive:
            self.alive = False
            self.method_queue.defer(lambda: None)  # wakes the loop

    def handle_quit(self, sig: int, frame: Any) -> None:
        """SIGQUIT and SIGINT: stop now."""
        if self.tpool is not None:
            self.tpool.shutdown(wait=False)
        super().handle_quit(sig, frame)

    # -- the loop ---------------------------------------------------------------------------

    def set_accept_enabled(self, enabled: bool) -> None:
        if enabled == self.accepting:
            return
        for listener in self.sockets:
            if enabled:
                listener.setblocking(False)
                self.poller.register(listener, selectors.EVENT_READ, self.accept)
            else:
                self.poller.unregister(listener)
        self.accepting = enabled

    def _turn(self) -> None:
        """One turn of the loop: tell the master this worker lives, accept while there is room,
        and handle what is ready (for at most a second)."""
        self.notify()
        self.set_accept_enabled(self.nr_conns < self.cfg.worker_connections)
        self._dispatch(1.0)

    def _tidy(self) -> None:
        """Closes idle kept-alive connections and heads that took too long to arrive."""
        self.murder_keepalived()
        self.murder_pending()

    def run(self) -> None:
        self.poller.register(self.method_queue.fileno(), selectors.EVENT_READ, self.method_queue.run_callbacks)
        while self.alive:
            self._turn()
            if self.orphaned():
                self.log.info("Parent changed, shutting down: %s", self)
                self.alive = False
                break
            self._tidy()
        # Stopping: while a subclass says it still serves (`still_serving`) and the master lives, the
        # loop goes on as before; then nothing new is accepted (the listening sockets close, so a
        # connection made now is refused by the kernel, not left unanswered), idle kept-alive
        # connections close, and the requests in flight (and heads being read) get what is left of
        # the grace period.
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while self.still_serving() and not self.orphaned() and time.monotonic() < deadline:
            self._turn()
            self._tidy()
        self.set_accept_enabled(False)
        for listener in self.sockets:
            listener.close()
        self.murder_keepalived(force=True)
        while self.nr_conns > 0 and time.monotonic() < deadline:
            self.notify()
            self._dispatch(1.0)
            self.murder_pending()
        self.tpool.shutdown(wait=False)
        self.poller.close()
        self.method_queue.close()

    def _dispatch(self, timeout: float) -> None:
        try:
            events = self.poller.select(timeout)
        except OSError as e:
            if e.errno != errno.EINTR:
                raise
            return
        for key, _ in events:
            key.data(key.fileobj)

    def murder_keepalived(self, force: bool = False) -> None:
        """Closes kept-alive connections whose keep-alive time is over (all of them with force)."""
        now = time.monotonic()
        while self.keepalived_conns and (force or self.keepalived_conns[0].timeout <= now):
            conn = self.keepalived_conns.popleft()
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
            self.nr_conns -= 1
            conn.close()

    def enqueue_req(self, conn: Connection) -> None:
        done = self.tpool.submit(self.handle, conn)
        done.add_done_callback(lambda fs: self.method_queue.defer(self.finish_request, conn, fs))

    def finish_request(self, conn: Connection, fs: futures.Future) -> None:
        """In the loop, once a thread is done with a request: the connection is kept alive or closed."""
        keepalive = not fs.cancelled() and fs.exception() is None and fs.result()
        if not (keepalive and self.serves()):
            self.nr_conns -= 1
            conn.close(graceful=True)
        elif conn.buffered():
            self.enqueue_req(conn)
        else:
            conn.sock.setblocking(False)
            conn.timeout = time.monotonic() + self.cfg.keepalive
            self.keepalived_conns.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))

    # -- in a thread ------------------------------------------------------------------------

    def handle(self, conn: Connection) -> bool:
        """Reads and answers one request; True if the connection is to be kept alive."""
        req = None
        try:
            conn.init()
            req = next(conn.parser)
            if not req:
                return False
            return self.handle_request(req, conn) and self._drained(req)
        except http_errors.NoMoreData as e:
            self.log.debug("Ignored premature client disconnection. %s", e)
        except StopIteration as e:
            self.log.debug("Closing connection. %s", e)
        except BODY_ERRORS as e:  # OSErrors on Gunicorn 23
            self.handle_error(req, conn.sock, conn.client, e)
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.debug("Ignoring socket error: %s", e)
            else:
                self.log.exception("Socket error processing request.")
        except Exception as e:
            self.handle_error(req, conn.sock, conn.client, e)
        return False

    def handle_request(self, req: Any, conn: Connection) -> bool:
        """Runs the app for `req`; True if the response allows keeping the connection alive."""
        resp = None
        try:
            resp, environ = wsgi.create(req, conn.sock, conn.client, conn.server, self.cfg)
            environ["wsgi.multithread"] = True
            self.nr += 1
            if not self.serves() or not self.cfg.keepalive or len(self.keepalived_conns) >= self.max_keepalived:
                resp.force_close()
            respiter = self.wsgi(environ, resp.start_response)
            try:
                if isinstance(respiter, environ["wsgi.file_wrapper"]):
                    resp.write_file(respiter)
                else:
                    for item in respiter:
                        resp.write(item)
                resp.close()
            finally:
                if hasattr(respiter, "close"):
                    respiter.close()
            return not resp.should_close()
        except OSError:
            raise
        except Exception:
            if resp is not None and resp.headers_sent:
                # Too late for an error response: the connection is cut so the client sees one.
                self.log.exception("Error handling request")
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                raise StopIteration()
            raise

    @staticmethod
    def _drained(req: Any) -> bool:
        """Whether the body the app left unread is gone (read and dropped), so that the next
        request starts where the parser will look for it."""
        left = MAX_DRAIN_BYTES
        while left > 0:
            data = req.body.read(min(left, 8192))
            if not data:
                return True
            left -= len(data)
        return False

