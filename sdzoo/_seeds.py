"""Seeds derived from a seed and a key: independent random streams that need no stored generator state."""
from __future__ import annotations

import numpy as np


def derived_seed(seed: int, *key: int) -> int:
    """A 63-bit seed for stream ``key`` of ``seed`` (numpy's SeedSequence: well mixed, the same everywhere)."""
    return int(np.random.SeedSequence([seed, *key]).generate_state(1, np.uint64)[0] >> 1)
