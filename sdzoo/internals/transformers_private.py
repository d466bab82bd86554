"""The weights files that transformers is about to load into the timm model being built, if it is.

transformers' ``TimmWrapper`` builds its timm model with ``timm.create_model(architecture, pretrained=False,
num_classes=..., **config.model_args)``, then reads the checkpoint files itself and sets each tensor with
``setattr``: no ``load_state_dict``, hence no load hook of the model, ever runs, and nothing tells the model
which files it is given. The only place those files are known while sdzoo code runs is ``from_pretrained``'s
own frame, which has resolved them (``checkpoint_files``) before it builds the model. Reading another
library's local variables is private by nature: it lives here alone, and it finds nothing (so nothing is
checked twice) when transformers is not loading a TimmWrapper. The architecture config.json names is not
compared: a TimmWrapper builds one timm model, and a name with a tag or an ``hf-hub:`` prefix must not take the
model past the check.
"""
from __future__ import annotations

import sys
from typing import List, Optional

__all__ = ["transformers_checkpoint_files"]

_FROM_PRETRAINED = ("transformers.modeling_utils", "from_pretrained")
_MAX_FRAMES = 64


def transformers_checkpoint_files() -> Optional[List[str]]:
    """The checkpoint files of the ``from_pretrained`` call that is building a TimmWrapper right now, or None
    when no such call is on this thread's stack (or it loads no file)."""
    if "transformers" not in sys.modules:
        return None
    frame = sys._getframe(1)
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
