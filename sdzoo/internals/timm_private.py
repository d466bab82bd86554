"""timm's private names that sdzoo uses, re-exported from here alone; checked against timm 1.0.31.

None of them has a public counterpart in that release (``timm``, ``timm.models`` and ``timm.layers`` export
none of them), and each is what timm itself runs, so a copy of it could drift from timm:

* ``feature_take_indices`` (``timm.models._features``): the index rules of ``forward_intermediates`` and
  ``prune_intermediate_layers`` (negative indices, an int meaning the last n), which SDResNet shares with
  timm's own models.
* ``_resolve_pretrained_source`` (``timm.models._builder``): where timm's ``load_pretrained`` reads a pretrained
  cfg's weights from (a state dict, a file, a ``local-dir:`` folder, the Hub, a URL); the weights checks read
  the same source, before anything is built.
* ``load_state_dict_from_path`` (``timm.models._hub``): the weights file timm picks in a ``local-dir:`` folder
  that has no model.safetensors, read weights-only as timm's loader reads it (the public
  ``load_state_dict_from_hf`` reads from the Hub only).
* ``save_config_for_hf`` (``timm.models._hub``): the config.json half of timm's public ``save_for_hf``, which
  also writes every weight with ``torch.save``; sdzoo writes its own safetensors weights, with the survival
  settings in their metadata, and a run rewrites config.json at each new best evaluation.

Two of timm's conventions have no name to import, and live where they act:

* ``model._model_args``: the arguments ``timm.create_model`` records on a model, which the public
  ``get_model_args`` and ``save_for_hf`` (config.json's ``model_args``) read. ``SDResNet`` defines it as a
  property, so that a folded or pruned model records what rebuilds it (tests/test_models.py checks the round
  trip through ``get_model_args`` and config.json).
* ``timm.create_model`` wrapped by ``sdzoo.convert.install_create_model_hook`` when
  ``SDZOO_CONVERT_DROP_PATH`` is set: the public names ``timm.create_model`` and ``timm.models.create_model``,
  which timm's scripts call, are replaced; timm offers no hook for it (tests/test_dropin.py checks it).

``tests/test_internals.py`` checks every name of ``INTERNALS`` against the timm that is installed.
"""
from timm.models._builder import _resolve_pretrained_source
from timm.models._features import feature_take_indices
from timm.models._hub import load_state_dict_from_path, save_config_for_hf

__all__ = ["INTERNALS", "feature_take_indices", "resolve_pretrained_source", "load_state_dict_from_path",
           "save_config_for_hf"]

resolve_pretrained_source = _resolve_pretrained_source

# (module, name, what sdzoo uses it for): one entry per private name this module exposes.
INTERNALS = [
    ("timm.models._features", "feature_take_indices",
     "SDResNet.forward_intermediates and prune_intermediate_layers: timm's rules for which stages to return"),
    ("timm.models._builder", "_resolve_pretrained_source",
     "the weights checks before a pretrained build: the source timm's load_pretrained will read"),
    ("timm.models._hub", "load_state_dict_from_path",
     "the weights checks of a local-dir: folder without model.safetensors: the file timm's loader picks"),
    ("timm.models._hub", "save_config_for_hf",
     "config.json (sdzoo.files.hf_config) without the weights file that save_for_hf writes beside it"),
]
