"""Files and weights, the bottom layer: atomic writes and the run folder's lock (``disk``), the run folder's
files (``run_folder``), safetensors weights and the one check of a weights file against the model about to be
built (``weights``), config.json (``hf_config``), which pretrained weights exist (``pretrained``), Hub requests
with a deadline (``hub_http``), and the argument checks and error wording every layer shares (``checks``).
Nothing here imports a model."""

from importlib.metadata import version

# The installed release, as files written by sdzoo record it (the package's own __version__ is above this layer).
SDZOO_VERSION = version("sdzoo")
