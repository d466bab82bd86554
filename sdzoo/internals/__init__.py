"""Private APIs of other libraries, one module per library (``*_private.py``), each listing in ``INTERNALS`` what it
uses and why; tests/test_internals.py checks them against the installed releases."""
