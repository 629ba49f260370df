"""Registry connections that end by a deadline, however slowly the other side answers.

httpx bounds each read (``timeout``), not a request: a registry that sends its answer a byte
a second is never cut off, in its headers as in its body. The registry client's transport
therefore wraps httpcore's network streams: every connect, TLS handshake, read and write may
take only what is left until the client's deadline (``Registry.within``), and fails as a
timeout ("out of time") once nothing is left.
"""

import math
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import httpcore
import httpx

OUT_OF_TIME = "out of time"
Deadline = Callable[[], float]  # the time.monotonic() by which it must all be over
T = TypeVar("T")


def transport(verify: ssl.SSLContext, deadline: Deadline) -> httpx.HTTPTransport:
    """An httpx transport whose connections keep to ``deadline()``."""
    made = httpx.HTTPTransport(verify=verify, trust_env=False)
    pool = getattr(made, "_pool", None)
    inner = getattr(pool, "_network_backend", None)
    if not isinstance(inner, httpcore.NetworkBackend):  # (httpx changed how it is built)
        raise RuntimeError("this httpx has no httpcore network backend to bound a request's "
                           "time with: install the httpx pyproject.toml names")
    pool._network_backend = _Backend(inner, deadline)  # type: ignore[union-attr]
    return made


def _left(deadline: Deadline, timeout: float | None, error: type[Exception]) -> float | None:
    """``timeout``, cut to what is left until the deadline (``error`` if nothing is)."""
    left = deadline() - time.monotonic()
    if left <= 0:
        raise error(OUT_OF_TIME)
    if math.isinf(left):
        return timeout
    return left if timeout is None else min(timeout, left)


def _bounded(deadline: Deadline, timeout: float | None, error: type[Exception],
             call: Callable[[float | None], T]) -> T:
    """``call(timeout cut to the deadline)``; its timeout, once the deadline has passed, says
    so ("out of time", not "timed out": the operation's time is up, not one read's)."""
    try:
        return call(_left(deadline, timeout, error))
    except error:
        if deadline() - time.monotonic() <= 0:
            raise error(OUT_OF_TIME) from None
        raise


class _Backend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend, deadline: Deadline) -> None:
        self._inner, self._deadline = inner, deadline

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _Stream(_bounded(self._deadline, timeout, httpcore.ConnectTimeout, lambda t:
                                self._inner.connect_tcp(host, port, t, local_address,
                                                        socket_options)), self._deadline)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None
                            ) -> httpcore.NetworkStream:
        return _Stream(_bounded(self._deadline, timeout, httpcore.ConnectTimeout, lambda t:
                                self._inner.connect_unix_socket(path, t, socket_options)),
                       self._deadline)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, deadline: Deadline) -> None:
        self._inner, self._deadline = inner, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return _bounded(self._deadline, timeout, httpcore.ReadTimeout,
                        lambda t: self._inner.read(max_bytes, t))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        _bounded(self._deadline, timeout, httpcore.WriteTimeout,
                 lambda t: self._inner.write(buffer, t))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _Stream(_bounded(self._deadline, timeout, httpcore.ConnectTimeout, lambda t:
                                self._inner.start_tls(ssl_context, server_hostname, t)),
                       self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)
