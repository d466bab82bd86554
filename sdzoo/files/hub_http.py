"""Requests to the Hub: huggingface_hub's shared HTTP client with one deadline per request, however slowly
the Hub answers, and what a failed request says.

httpx2's timeouts apply to each socket operation, so a server that sends one byte a second never trips them,
and huggingface_hub passes ``timeout=None`` (no timeout at all) on some calls (``model_info``, hence
``repo_exists`` and the private check). httpx2 has no total timeout (its maintainers point to a network
backend), so this one is hand-written: every read and connect of a request gets only the seconds left until
its deadline, ``timeout`` seconds after the request started or after it last sent a part of its body (an
upload's bytes are the client's to send; the Hub's answer, once asked for, is bounded end to end).

A request past its deadline raises ``HubTimeout``, which huggingface_hub's backoff does not retry, and a
Hub that asks (Retry-After, RateLimit) to wait longer than ``timeout`` before a retry gets the same error at
once instead of the sleep. ``bounded_waits`` installs that client for a block of Hub calls, made with
``hub_api``.

``describe_error`` puts a failed request in one line (the HTTP status, the request, the server's message),
and ``scrub_token`` keeps the token out of every message built from one.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Optional

import httpcore2
import httpx2
from huggingface_hub import HfApi, set_client_factory
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import parse_ratelimit_headers

from sdzoo.files import SDZOO_VERSION
from sdzoo.files.checks import check_seconds, error_line
from sdzoo.internals.hub_private import client_factory_in_use, hf_request_event_hook

__all__ = ["DEFAULT_TIMEOUT", "LOAD_TIMEOUT", "LOAD_TIMEOUT_ENV", "load_timeout", "install_load_deadline", "HubTimeout",
           "deadline_client", "bounded_waits", "hub_api", "http_error", "describe_error", "is_timeout", "scrub_token"]

DEFAULT_TIMEOUT = 60.0  # seconds within which each request to the Hub ends, its answer read
# Loading: each request ends within LOAD_TIMEOUT seconds (a weights download is one request, so it is longer),
# or within $SDZOO_HUB_TIMEOUT, which, when set, bounds every Hub request of the process (``install_load_deadline``).
LOAD_TIMEOUT = 300.0
LOAD_TIMEOUT_ENV = "SDZOO_HUB_TIMEOUT"

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
        raise _timeout_error(what)
    return left


def _timeout_error(what: str) -> HubTimeout:
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
            raise _timeout_error("reading its answer") from None

    def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
        try:
            self._stream.write(buffer, _bound(timeout, "sending the request"))
        except httpcore2.WriteTimeout:
            raise _timeout_error("sending the request") from None
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
            raise _timeout_error("connecting") from None
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


def _deadline_client_factory(timeout: float):
    """A client factory for ``set_client_factory``: deadline clients that keep the default client's request
    hook (offline mode, request ids)."""
    return lambda: deadline_client(timeout, event_hooks={"request": [hf_request_event_hook]})


@contextlib.contextmanager
def bounded_waits(timeout: float):
    """Every request of huggingface_hub's shared HTTP client ends within ``timeout`` seconds, end to end:
    calls that pass ``timeout=None`` and servers that trickle their answer included; a request past its
    deadline is not retried, and a wait the Hub asks for beyond ``timeout`` is not slept."""
    check_seconds("timeout", timeout)
    previous = client_factory_in_use()
    set_client_factory(_deadline_client_factory(timeout))
    try:
        yield
    finally:
        set_client_factory(previous)


def load_timeout() -> float:
    """Seconds within which each Hub request of a load ends: $SDZOO_HUB_TIMEOUT, else ``LOAD_TIMEOUT``."""
    import os

    text = os.environ.get(LOAD_TIMEOUT_ENV, "").strip()
    if not text:
        return LOAD_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = text
    return check_seconds(f"${LOAD_TIMEOUT_ENV}", value)


def install_load_deadline() -> None:
    """With $SDZOO_HUB_TIMEOUT set, every request of huggingface_hub's shared client in this process ends within
    it: the config.json and weights that timm (``hf-hub:``) and transformers download before any sdzoo code
    runs included. Unset, nothing changes (sdzoo's own downloads are bounded where they are made)."""
    import os

    if os.environ.get(LOAD_TIMEOUT_ENV, "").strip():
        set_client_factory(_deadline_client_factory(load_timeout()))


def hub_api(endpoint: Optional[str], token: Optional[str]) -> HfApi:
    """The client of the Hub's API, naming sdzoo and its version in its requests."""
    return HfApi(endpoint=endpoint, token=token, library_name="sdzoo", library_version=SDZOO_VERSION)


def http_error(error: BaseException) -> Optional[HfHubHTTPError]:
    """The HTTP error behind ``error``, or None: the client raises a storage upload's HTTP error as the cause
    of its own RuntimeError."""
    while error is not None and not isinstance(error, HfHubHTTPError):
        error = error.__cause__
    return error


def describe_error(error: BaseException) -> str:
    """What went wrong, in one line: the HTTP status, the request and the server's message, or the error."""
    http = http_error(error)
    if http is None:
        return error_line(error, 400)
    request = http.response.request  # the error's own .request is httpx's, which is not always set
    return (f"HTTP {http.response.status_code} from {request.method} {request.url.path}"
            + (f" ({http.server_message})" if http.server_message else ""))


def is_timeout(error: BaseException) -> bool:
    """Whether ``error``, or an error it came from, is a request that ran out of time."""
    while error is not None:
        if isinstance(error, (HubTimeout, httpx2.TimeoutException)):
            return True
        error = error.__cause__ or error.__context__
    return False


def scrub_token(text: str, token: Optional[str]) -> str:
    """``text`` with every occurrence of ``token`` replaced: messages quote the Hub's answers and requests."""
    return text.replace(token, "<token>") if token else text
