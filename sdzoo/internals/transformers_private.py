"""transformers' private details that sdzoo uses, read from here alone; checked against transformers 5.25.0.

transformers' ``TimmWrapper`` builds its timm model with ``timm.create_model(architecture, pretrained=False,
num_classes=..., **config.model_args)``, then reads the checkpoint files itself and sets each tensor with
``setattr``: no ``load_state_dict``, hence no load hook of the model, ever runs, and nothing public tells the
model which files it is given. The only place those files are known while sdzoo code runs is
``from_pretrained``'s own frame, which has resolved them before it builds the model:

* ``PreTrainedModel.from_pretrained`` (``transformers.modeling_utils``): the frame looked for on the stack,
  by its module and function name.
* its local ``config``: tells a TimmWrapper load (``model_type == "timm_wrapper"``) from any other.
* its local ``checkpoint_files``: the weights files the TimmWrapper is about to be given, which the weights
  checks read before the model is built.

It finds nothing (so nothing is checked twice) when transformers is not loading a TimmWrapper. The
architecture config.json names is not compared: a TimmWrapper builds one timm model, and a name with a tag or
an ``hf-hub:`` prefix must not take the model past the check.

``INTERNALS`` names a function's local variable as ``"function:variable"``; ``tests/test_internals.py`` checks
every entry against the transformers that is installed.
"""
from __future__ import annotations

import inspect
import sys
from typing import List, Optional

__all__ = ["INTERNALS", "transformers_checkpoint_files"]

# (module, name, what sdzoo uses it for): one entry per private detail this module reads.
INTERNALS = [
    ("transformers.modeling_utils", "PreTrainedModel.from_pretrained",
     "transformers_checkpoint_files: the frame on the stack that is loading a model, found by module and name"),
    ("transformers.modeling_utils", "PreTrainedModel.from_pretrained:config",
     "transformers_checkpoint_files: whether the model being loaded is a TimmWrapper"),
    ("transformers.modeling_utils", "PreTrainedModel.from_pretrained:checkpoint_files",
     "transformers_checkpoint_files: the weights files checked before a TimmWrapper's timm model is built"),
]

_FROM_PRETRAINED = ("transformers.modeling_utils", "from_pretrained")
_MAX_FRAMES = 64


def transformers_checkpoint_files() -> Optional[List[str]]:
    """The checkpoint files of the ``from_pretrained`` call that is building a TimmWrapper right now, or None
    when no such call is on this thread's stack (or it loads no file)."""
    if "transformers" not in sys.modules:
        return None
    frame = inspect.currentframe().f_back
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        if (frame.f_globals.get("__name__"), frame.f_code.co_name) == _FROM_PRETRAINED:
            config = frame.f_locals.get("config")
            files = frame.f_locals.get("checkpoint_files")
            if getattr(config, "model_type", None) != "timm_wrapper" or not files:
                return None
            return [str(f) for f in files]
        frame = frame.f_back
    return None
