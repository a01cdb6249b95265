"""A loopback TCP proxy that can fail like a network: drop, blackhole or throttle (test fixture).

``NetProxy(target_host, target_port)`` listens on 127.0.0.1 (a free port) and forwards each connection
to the target with two pump threads. Its ``mode`` can be switched at any time:

- ``"pass"``: forward bytes as they come (``throttle`` bytes/s per direction if set, shared by all
  connections: a token bucket, so a checkpoint upload takes ``size / throttle`` seconds);
- ``"drop"``: reset every open connection and every new one at once (a refused or dying endpoint:
  clients see ``ConnectionResetError`` / "server disconnected");
- ``"blackhole"``: accept connections but forward nothing in either direction (a partitioned network or
  a hung gateway: clients only notice through their own timeouts).

``outage(mode, seconds)`` switches to ``mode`` and back to ``"pass"`` after ``seconds`` (a timer thread).
Everything binds to 127.0.0.1; ``close()`` stops every thread.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator

__all__ = ["NetProxy", "TokenBucket"]

_CHUNK = 16 << 10


class TokenBucket:
    """``rate`` bytes/s with a burst of one chunk; ``take(n)`` sleeps until n bytes may pass."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, n: int) -> None:
        rate = self.rate
        if not rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + n / rate
            wait = start - now
        if wait > 0:
            time.sleep(wait)


class NetProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.up = TokenBucket(None)  # client -> server
        self.down = TokenBucket(None)  # server -> client
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.connections = 0
        self._acceptor = threading.Thread(target=self._accept_loop, name="netproxy-accept", daemon=True)
        self._acceptor.start()

    # ------------------------------------------------------------------ control
    def set_mode(self, mode: str) -> None:
        if mode not in ("pass", "drop", "blackhole"):
            raise ValueError(f"mode {mode!r}")
        self.mode = mode
        if mode == "drop":
            with self._lock:
                conns = list(self._conns)
            for s in conns:
                _reset(s)

    def throttle(self, bytes_per_second: float | None) -> None:
        self.up.rate = bytes_per_second
        self.down.rate = bytes_per_second

    def outage(self, mode: str, seconds: float) -> threading.Timer:
        self.set_mode(mode)
        timer = threading.Timer(seconds, self.set_mode, args=("pass",))
        timer.daemon = True
        timer.start()
        return timer

    @contextlib.contextmanager
    def mode_for(self, mode: str) -> Iterator[None]:
        self.set_mode(mode)
        try:
            yield
        finally:
            self.set_mode("pass")

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            _reset(s)
        self._acceptor.join(timeout=5)

    # ------------------------------------------------------------------ forwarding
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            if self.mode == "drop":
                _reset(client)
                continue
            threading.Thread(target=self._serve, args=(client,), name="netproxy-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)
            return
        server.settimeout(None)
        with self._lock:
            self._conns.update((client, server))
        done = threading.Event()
        threads = [
            threading.Thread(target=self._pump, args=(client, server, self.up, done), daemon=True),
            threading.Thread(target=self._pump, args=(server, client, self.down, done), daemon=True),
        ]
        for t in threads:
            t.start()
        done.wait()
        for s in (client, server):
            _reset(s)
        with self._lock:
            self._conns.difference_update((client, server))

    def _pump(
        self, src: socket.socket, dst: socket.socket, bucket: TokenBucket, done: threading.Event
    ) -> None:
        try:
            src.settimeout(0.2)
            while not done.is_set() and not self._closed.is_set():
                if self.mode == "blackhole":
                    time.sleep(0.05)  # hold everything: neither read nor forward
                    continue
                try:
                    data = src.recv(_CHUNK)
                except TimeoutError:
                    continue
                if not data:
                    break
                while self.mode == "blackhole" and not self._closed.is_set():
                    time.sleep(0.05)
                if self.mode == "drop":
                    break
                bucket.take(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            done.set()


def _reset(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or a dropping firewall does."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.close()
