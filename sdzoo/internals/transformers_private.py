"""transformers' private details that sdzoo uses, read from here alone; checked against transformers 5.25.0.

``TimmWrapper`` builds its timm model, then sets each tensor of the checkpoint with ``setattr``: no load hook
runs, and nothing public tells the model which files it is given. Only ``from_pretrained``'s own frame knows:

* ``from_pretrained`` (``PreTrainedModel``, ``transformers.modeling_utils``): the frame looked for on the stack.
* its local ``config``: tells a TimmWrapper load (``model_type == "timm_wrapper"``) from any other.
* its local ``checkpoint_files``: the files the weights checks read before the model is built.

The architecture config.json names is not compared: a name with a tag or an ``hf-hub:`` prefix must not take
the model past the check. ``INTERNALS`` names a local variable as ``"function:variable"``.
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
