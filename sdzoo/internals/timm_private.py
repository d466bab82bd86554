"""timm's private names that sdzoo uses, re-exported from here alone; checked against timm 1.0.31, which
exports none of them publicly. Each is what timm itself runs, so a copy could drift from timm:

* ``feature_take_indices``: the index rules of ``forward_intermediates`` and ``prune_intermediate_layers``.
* ``_resolve_pretrained_source``: where ``load_pretrained`` will read a pretrained cfg's weights from, so the
  weights checks read the same source before anything is built.
* ``load_state_dict_from_path``: the weights file timm picks in a ``local-dir:`` folder without
  model.safetensors, read as timm's loader reads it.
* ``save_config_for_hf``: config.json without the ``torch.save`` of every weight that ``save_for_hf`` adds
  (a run rewrites config.json at each new best evaluation).

Two conventions have no name to import and live where they act: ``model._model_args`` (a property of
``SDResNet``, so a folded or pruned model records what rebuilds it), and the ``timm.create_model`` wrapper of
``sdzoo.convert.install_create_model_hook`` behind ``SDZOO_CONVERT_DROP_PATH`` (timm offers no hook).
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
