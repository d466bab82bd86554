"""huggingface_hub's private names that sdzoo uses, read from here alone; checked against huggingface_hub 2.4.0.

sdzoo replaces the shared HTTP client with the public ``set_client_factory`` (``sdzoo.files.hub_http``); what
that release has no public name for:

* ``hf_request_event_hook`` (``huggingface_hub.utils._http``): the request hook of the default client (offline
  mode, request ids, the download counter); the deadline client carries it, so that it sends what the default
  client sends.
* ``_GLOBAL_CLIENT_FACTORY`` (``huggingface_hub.utils._http``): the client factory in use, which
  ``set_client_factory`` sets and nothing public reads; ``bounded_waits`` puts it back when its block ends.
  It changes at run time, so it is read through ``client_factory_in_use()``, never copied.

``tests/test_internals.py`` checks every name of ``INTERNALS`` against the huggingface_hub that is installed.
"""
from typing import Callable

import httpx2
from huggingface_hub.utils import _http
from huggingface_hub.utils._http import hf_request_event_hook

__all__ = ["INTERNALS", "hf_request_event_hook", "client_factory_in_use"]

# (module, name, what sdzoo uses it for): one entry per private name this module exposes.
INTERNALS = [
    ("huggingface_hub.utils._http", "hf_request_event_hook",
     "the deadline client of sdzoo.files.hub_http: the default client's request hook (offline mode, request ids)"),
    ("huggingface_hub.utils._http", "_GLOBAL_CLIENT_FACTORY",
     "bounded_waits: the client factory in use, put back when the block ends (set_client_factory has no getter)"),
]


def client_factory_in_use() -> Callable[[], httpx2.Client]:
    """The factory of huggingface_hub's shared client: the last one given to ``set_client_factory``, else the
    default one."""
    return _http._GLOBAL_CLIENT_FACTORY
