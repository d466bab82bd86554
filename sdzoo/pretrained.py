"""Which pretrained weights exist: the zoo's default cfgs claim weights only where they are published.

``PUBLISHED_WEIGHTS`` maps ``architecture.tag`` to the Hub repo that holds verified weights. The models file
passes its cfgs through ``with_published_weights`` and calls ``require_published_weights`` on
``pretrained=True``, so a tag without weights fails with a message that says how to get some.
Kept free of heavy imports: the models module imports it. It exists because timm's own pretrained=True on
a cfg without weights only warns and builds random weights.
"""
from __future__ import annotations

from typing import Any, Dict

__all__ = ["PUBLISHED_WEIGHTS", "NoPretrainedWeightsError", "with_published_weights", "require_published_weights"]

# "architecture.tag" -> Hub repo id, for weights that are published and verified. None yet: the zoo's cfgs
# claim no weights until a repo is listed here.
PUBLISHED_WEIGHTS: Dict[str, str] = {}


class NoPretrainedWeightsError(RuntimeError):
    """``pretrained=True`` on a tag whose weights are not published."""


def with_published_weights(cfgs: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Point the cfgs of published tags at their Hub repos (``hf_hub_id``); leave every other cfg as it is."""
    unknown = sorted(set(PUBLISHED_WEIGHTS) - set(cfgs))
    if unknown:
        raise KeyError(f"PUBLISHED_WEIGHTS names tags the zoo does not have: {', '.join(unknown)}")
    return {name: dict(cfg, hf_hub_id=PUBLISHED_WEIGHTS[name]) if name in PUBLISHED_WEIGHTS else cfg
            for name, cfg in cfgs.items()}


def require_published_weights(variant: str, pretrained_cfg=None, pretrained_cfg_overlay=None) -> None:
    """Raise a clear error, with the ways to get weights, when ``pretrained=True`` has nothing to load."""
    from timm.models._builder import resolve_pretrained_cfg

    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    if cfg.has_weights or cfg.state_dict is not None:
        return
    name = f"{variant}.{cfg.tag}" if cfg.tag else variant
    published = ", ".join(f"{k} ({v})" for k, v in sorted(PUBLISHED_WEIGHTS.items())) or "none yet"
    raise NoPretrainedWeightsError(
        f"No pretrained weights for {name}: the sdzoo registry only points at weights that are published "
        f"(published so far: {published}). To get weights, load a published run with "
        f"timm.create_model('hf-hub:OWNER/REPO', pretrained=True), or train one "
        f"(python scripts/train.py --output runs/NAME) and load its run folder with "
        f"timm.create_model('local-dir:runs/NAME', pretrained=True). "
        f"Use pretrained=False for random initialisation.")
