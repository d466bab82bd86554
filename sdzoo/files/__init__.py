"""Files and weights, the bottom layer: atomic writes, the run folder, safetensors weights and their one check,
config.json, the pretrained weights that exist, Hub requests with a deadline, and shared argument checks."""
from importlib.metadata import version

SDZOO_VERSION = version("sdzoo")  # the installed release, as the files sdzoo writes record it
