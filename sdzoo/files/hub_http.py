"""Hub requests that end within a deadline however slowly the Hub answers, and what a failed one says.

httpx2 bounds each socket operation only (one byte a second never trips it) and huggingface_hub passes
``timeout=None`` on some calls, so ``bounded_waits`` gives every connect, read and write only the seconds left
until ``timeout`` after the request started or last sent a part of its body. Past it: ``HubTimeout``, which the
backoff does not retry; an answer asking to wait longer than ``timeout`` before a retry raises it at once.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Callable, Optional

import httpcore2
import httpx2
from huggingface_hub import HfApi, set_client_factory
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import parse_ratelimit_headers

from sdzoo.files import SDZOO_VERSION
from sdzoo.files.checks import check_seconds, error_line
from sdzoo.internals.hub_private import client_factory_in_use, hf_request_event_hook

DEFAULT_TIMEOUT = 60.0  # seconds within which each request to the Hub ends, its answer read
# A load's requests (a weights download is one) end within LOAD_TIMEOUT, or $SDZOO_HUB_TIMEOUT, which also bounds
# every Hub request of the process when set (``install_load_deadline``).
LOAD_TIMEOUT = 300.0
LOAD_TIMEOUT_ENV = "SDZOO_HUB_TIMEOUT"

_RETRIED_STATUSES = (408, 429, 500, 502, 503, 504)  # those huggingface_hub's backoff retries, as long as asked
_deadlines = threading.local()  # the timeout and deadline of the request this thread is sending or reading


class HubTimeout(httpx2.TransportError):
    """A request that did not get its whole answer within the timeout. Not a ``TimeoutException``: the
    client's backoff retries those, which would multiply the wait."""


def _within(what: str, timeout: Optional[float], operation: Callable[[Optional[float]], object]):
    """``operation(seconds)`` with no more seconds than are left until the deadline, and HubTimeout past it."""
    deadline = getattr(_deadlines, "deadline", None)
    try:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise httpcore2.TimeoutException(what)
            timeout = left if timeout is None else min(timeout, left)
        return operation(timeout)
    except httpcore2.TimeoutException:  # an operation is never given more than the time left: the deadline passed
        raise HubTimeout(f"the request did not end within {getattr(_deadlines, 'timeout', 0):g} s ({what})") from None


class _DeadlineStream(httpcore2.NetworkStream):
    def __init__(self, stream: httpcore2.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
        return _within("reading its answer", timeout, lambda left: self._stream.read(max_bytes, left))

    def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
        _within("sending the request", timeout, lambda left: self._stream.write(buffer, left))
        if getattr(_deadlines, "timeout", None) is not None:  # a part of the body went out: the answer gets it all
            _deadlines.deadline = time.monotonic() + _deadlines.timeout

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> httpcore2.NetworkStream:
        return _DeadlineStream(_within("TLS", timeout,
                                       lambda left: self._stream.start_tls(ssl_context, server_hostname, left)))

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore2.SyncBackend):  # (no unix sockets: the pool has no uds)
    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        connect = super().connect_tcp
        return _DeadlineStream(_within("connecting", timeout,
                                       lambda left: connect(host, port, left, local_address, socket_options)))


class _DeadlineTransport(httpx2.HTTPTransport):
    def __init__(self, timeout: float):
        super().__init__()
        # httpx2 takes no network backend, httpcore2's pool does: the same pool as httpx2's, with the deadline one
        self._pool = httpcore2.ConnectionPool(ssl_context=httpx2.create_ssl_context(),
                                              network_backend=_DeadlineBackend())
        self.timeout = timeout

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        # kept for this thread until its next request: the body is read after this returns
        _deadlines.timeout, _deadlines.deadline = self.timeout, time.monotonic() + self.timeout
        response = super().handle_request(request)
        wait = None
        if response.status_code in _RETRIED_STATUSES:  # how long huggingface_hub's backoff would sleep
            info = parse_ratelimit_headers(response.headers) if response.status_code == 429 else None
            retry_after = response.headers.get("Retry-After", "").strip()
            if info is not None and info.remaining == 0:
                wait = float(info.reset_in_seconds)
            elif retry_after.isdigit():
                wait = float(retry_after)
        if wait is not None and wait > self.timeout:
            response.close()
            raise HubTimeout(f"the Hub answered HTTP {response.status_code} to {request.method} "
                             f"{request.url.path} and asked to wait {wait:g} s before a retry, longer than "
                             f"the timeout of {self.timeout:g} s")
        return response


def _deadline_client_factory(timeout: float) -> Callable[[], httpx2.Client]:
    """Clients like huggingface_hub's default one (its request hook: offline mode, request ids) whose every
    request ends within ``timeout`` seconds. Proxies from the environment are not used: the transport is ours."""
    return lambda: httpx2.Client(transport=_DeadlineTransport(timeout), follow_redirects=True, timeout=timeout,
                                 event_hooks={"request": [hf_request_event_hook]})


@contextlib.contextmanager
def bounded_waits(timeout: float):
    """Every request of huggingface_hub's shared HTTP client within the block ends within ``timeout`` seconds."""
    check_seconds("timeout", timeout)
    previous = client_factory_in_use()
    set_client_factory(_deadline_client_factory(timeout))
    try:
        yield
    finally:
        set_client_factory(previous)


def load_timeout() -> float:
    """Seconds within which each Hub request of a load ends: $SDZOO_HUB_TIMEOUT, else ``LOAD_TIMEOUT``."""
    text = os.environ.get(LOAD_TIMEOUT_ENV, "").strip()
    if not text:
        return LOAD_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = text
    return check_seconds(f"${LOAD_TIMEOUT_ENV}", value)


def install_load_deadline() -> None:
    """With $SDZOO_HUB_TIMEOUT set, every Hub request of this process ends within it, the downloads that timm
    (``hf-hub:``) and transformers make before any sdzoo code runs included."""
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
