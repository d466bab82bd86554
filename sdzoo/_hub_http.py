"""huggingface_hub's shared HTTP client with one deadline per request, however slowly the Hub answers.

httpx2's timeouts apply to each socket operation, so a server that sends one byte a second never trips them,
and huggingface_hub passes ``timeout=None`` (no timeout at all) on some calls (``model_info``, hence
``repo_exists`` and the private check). httpx2 has no total timeout (its maintainers point to a network
backend), so this one is hand-written: every read and connect of a request gets only the seconds left until
its deadline, ``timeout`` seconds after the request started or after it last sent a part of its body (an
upload's bytes are the client's to send; the Hub's answer, once asked for, is bounded end to end).

A request past its deadline raises ``HubTimeout``, which huggingface_hub's backoff does not retry, and a
Hub that asks (Retry-After, RateLimit) to wait longer than ``timeout`` before a retry gets the same error at
once instead of the sleep.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

import httpcore2
import httpx2
from huggingface_hub.utils import parse_ratelimit_headers

__all__ = ["HubTimeout", "deadline_client"]

# The statuses huggingface_hub's http_backoff retries, sleeping as long as the answer's headers ask.
_RETRIED_STATUSES = (408, 429, 500, 502, 503, 504)
_deadlines = threading.local()  # the deadline of the request this thread is sending or reading


class HubTimeout(httpx2.TransportError):
    """A request that did not get its whole answer within the timeout. Not a ``TimeoutException``: the
    client's backoff retries those, which would multiply the wait."""


def _remaining(what: str) -> float:
    deadline = getattr(_deadlines, "deadline", None)
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timed_out(what)
    return left


def _timed_out(what: str) -> HubTimeout:
    return HubTimeout(f"the request did not end within {getattr(_deadlines, 'timeout', 0):g} s ({what})")


def _bound(timeout: Optional[float], what: str) -> Optional[float]:
    left = _remaining(what)
    return left if timeout is None or left is None else min(timeout, left)


def _start(timeout: float) -> None:
    _deadlines.timeout = timeout
    _deadlines.deadline = time.monotonic() + timeout


class _DeadlineStream(httpcore2.NetworkStream):
    def __init__(self, stream: httpcore2.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
        try:
            return self._stream.read(max_bytes, _bound(timeout, "reading its answer"))
        except httpcore2.ReadTimeout:  # a read is never given more than the time left: the deadline passed
            raise _timed_out("reading its answer") from None

    def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
        try:
            self._stream.write(buffer, _bound(timeout, "sending the request"))
        except httpcore2.WriteTimeout:
            raise _timed_out("sending the request") from None
        if getattr(_deadlines, "timeout", None) is not None:
            _start(_deadlines.timeout)  # a part of the body went out: the answer gets the whole timeout

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> httpcore2.NetworkStream:
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, _bound(timeout, "TLS")))

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore2.NetworkBackend):
    def __init__(self):
        self._backend = httpcore2.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        try:
            stream = self._backend.connect_tcp(host, port, _bound(timeout, "connecting"), local_address,
                                               socket_options)
        except httpcore2.ConnectTimeout:
            raise _timed_out("connecting") from None
        return _DeadlineStream(stream)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        return _DeadlineStream(self._backend.connect_unix_socket(path, _bound(timeout, "connecting"),
                                                                 socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _asked_wait(response: httpx2.Response) -> Optional[float]:
    """Seconds the answer asks to wait before a retry (as huggingface_hub's backoff reads them), or None."""
    if response.status_code == 429:
        info = parse_ratelimit_headers(response.headers)
        if info is not None and info.remaining == 0:
            return float(info.reset_in_seconds)
    value = response.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


class _DeadlineTransport(httpx2.HTTPTransport):
    def __init__(self, timeout: float):
        super().__init__()
        # httpx2 takes no network backend; httpcore2's pool does (public there): the pool is replaced by one
        # with the same defaults and the deadline backend.
        self._pool = httpcore2.ConnectionPool(ssl_context=httpx2.create_ssl_context(),
                                              network_backend=_DeadlineBackend())
        self.timeout = timeout

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        _start(self.timeout)  # kept for this thread until its next request: the body is read after this returns
        response = super().handle_request(request)
        if response.status_code in _RETRIED_STATUSES:
            wait = _asked_wait(response)
            if wait is not None and wait > self.timeout:
                response.close()
                raise HubTimeout(f"the Hub answered HTTP {response.status_code} to {request.method} "
                                 f"{request.url.path} and asked to wait {wait:g} s before a retry, longer than "
                                 f"the timeout of {self.timeout:g} s")
        return response


def deadline_client(timeout: float, event_hooks=None) -> httpx2.Client:
    """An ``httpx2.Client`` like huggingface_hub's default one, whose every request ends within ``timeout``
    seconds (see the module's docstring). Proxies from the environment are not used: the client has its own
    transport."""
    return httpx2.Client(transport=_DeadlineTransport(timeout), event_hooks=event_hooks, follow_redirects=True,
                         timeout=timeout)
