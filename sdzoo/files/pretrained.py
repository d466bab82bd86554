"""Which pretrained weights exist: unlike timm, whose ``pretrained=True`` without weights only warns, the zoo's
cfgs claim weights only where they are published (``PUBLISHED_WEIGHTS``), or where they are timm's weights of the
same network (``sd_resnet50/101/152``: ``timm_weight_cfgs``, whose ``scaling="inverted"`` keeps timm's eval net).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import timm
from timm.models import resolve_pretrained_cfg

# "architecture.tag" -> Hub repo id, for weights that sdzoo trained, published and verified. None yet.
PUBLISHED_WEIGHTS: Dict[str, str] = {}
# The zoo's architectures that are timm's ResNets with the same layers and state-dict keys.
TIMM_TWINS: Dict[str, str] = {"sd_resnet50": "resnet50", "sd_resnet101": "resnet101", "sd_resnet152": "resnet152"}
# "sd_resnet50.a1_in1k" -> "resnet50.a1_in1k": each tag of ours that loads timm's weights. Filled by timm_weight_cfgs.
TIMM_WEIGHTS: Dict[str, str] = {}
# Model arguments of the tags that load timm's weights, unless given: the eval network is timm's.
TIMM_WEIGHTS_DEFAULTS = {"scaling": "inverted"}
# What a cfg says about where its weights are and how they load: ours are set here, not copied.
_LOCATION_FIELDS = ("url", "file", "state_dict", "hf_hub_filename", "source", "architecture", "tag")


class NoPretrainedWeightsError(RuntimeError):
    """``pretrained=True`` on a tag whose weights are not published."""


def with_published_weights(cfgs: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Point the cfgs of published tags at their Hub repos (``hf_hub_id``); leave every other cfg as it is.
    Keys may end in ``*`` (timm's mark of an architecture's default tag)."""
    unknown = sorted(set(PUBLISHED_WEIGHTS) - {k.rstrip("*") for k in cfgs})
    if unknown:
        raise KeyError(f"PUBLISHED_WEIGHTS names tags the zoo does not have: {', '.join(unknown)}")
    out = {}
    for name, cfg in cfgs.items():
        repo = PUBLISHED_WEIGHTS.get(name.rstrip("*"))
        out[name] = dict(cfg, hf_hub_id=repo) if repo else cfg
    return out


def timm_weight_cfgs(architecture: str) -> Dict[str, Dict[str, Any]]:
    """A cfg ``architecture.tag`` for each of timm's Hub weights of its twin, recorded in ``TIMM_WEIGHTS``:
    timm's cfg, but always ``model.safetensors`` (timm never unpickles a ``.bin``), saying whose weights they are."""
    twin = TIMM_TWINS[architecture]
    cfgs: Dict[str, Dict[str, Any]] = {}
    for name, cfg in timm.models.get_arch_pretrained_cfgs(twin).items():
        _, tag = timm.models.split_model_name_tag(name)
        if not tag or not cfg.hf_hub_id:
            continue
        fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _LOCATION_FIELDS}
        source_file = cfg.hf_hub_filename or ""
        origin = f"timm's {name} weights (Hub repo {cfg.hf_hub_id})"
        fields.update(
            hf_hub_id=cfg.hf_hub_id,
            hf_hub_filename=source_file if source_file.endswith(".safetensors") else "model.safetensors",
            description=(f"{origin}, loaded unchanged into {architecture}: with scaling='inverted' (the "
                         f"default of this tag) its eval network is exactly timm's {twin}."),
            notes=(*(cfg.notes or ()), f"origin: {origin}"),
        )
        cfgs[f"{architecture}.{tag}"] = fields
        TIMM_WEIGHTS[f"{architecture}.{tag}"] = name
    return cfgs


def tag_model_defaults(variant: str, pretrained_cfg=None) -> Dict[str, Any]:
    """Model arguments that the tag ``pretrained_cfg`` (a tag, a cfg or None: the default tag) implies:
    ``TIMM_WEIGHTS_DEFAULTS`` for the tags of timm's weights, else none."""
    if isinstance(pretrained_cfg, str):
        tag = pretrained_cfg
    elif isinstance(pretrained_cfg, dict):
        tag = pretrained_cfg.get("tag")
    else:
        tag = getattr(pretrained_cfg, "tag", None)
    return dict(TIMM_WEIGHTS_DEFAULTS) if f"{variant}.{tag}" in TIMM_WEIGHTS else {}


def require_published_weights(variant: str, pretrained_cfg=None, pretrained_cfg_overlay=None) -> None:
    """Raise a clear error, with the ways to get weights, when ``pretrained=True`` has nothing to load."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    if cfg.has_weights or cfg.state_dict is not None:
        return
    name = f"{variant}.{cfg.tag}" if cfg.tag else variant
    tags = timm.list_pretrained(f"{variant}.*")
    with_weights = (f" {variant} has weights under other tags: {', '.join(tags)} "
                    f"(timm.create_model('{tags[0]}', pretrained=True)).") if tags else ""
    published = ", ".join(f"{k} ({v})" for k, v in sorted(PUBLISHED_WEIGHTS.items())) or "none yet"
    raise NoPretrainedWeightsError(
        f"No pretrained weights for {name}: the sdzoo registry only points at weights that are published "
        f"(published so far: {published}).{with_weights} To get weights, load a published run with "
        f"timm.create_model('hf-hub:OWNER/REPO', pretrained=True), or train one "
        f"(sdzoo train --output runs/NAME) and load its run folder with "
        f"timm.create_model('local-dir:runs/NAME', pretrained=True). "
        f"Use pretrained=False for random initialisation.")
