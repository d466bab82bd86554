"""Survival schedules: the probability p_l that residual block l runs during a training step.

Huang et al. (2016), eq. 4: the linear decay rule ``p_l = 1 - (l / L) * (1 - p_L)`` for l = 1..L, L counting
every residual block (downsampling blocks included); the uniform rule uses ``p_l = p_L``. ``SurvivalSettings``
is the one definition of a model's stochastic-depth settings, which everything reads and writes; it checks them
once, when made, and what is built from it trusts them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, List, Mapping, Optional

from sdzoo.files.checks import check_choice, check_fraction, check_int, check_survival_prob
from sdzoo.gate import GATE_MODES, SCALINGS

SURVIVAL_RULES = ("linear", "uniform")


def survival_probs(num_blocks: int, survival_prob: float = 0.5, rule: str = "linear") -> List[float]:
    """Per-block survival probabilities p_1..p_L for ``num_blocks`` residual blocks; ``survival_prob`` is p_L
    (1.0 is constant depth)."""
    settings = SurvivalSettings(survival_prob=survival_prob, survival_rule=rule)  # checks p_L and the rule
    return _schedule(num_blocks, settings.survival_prob, settings.survival_rule)


def _schedule(num_blocks: int, survival_prob: float, rule: str) -> List[float]:
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive integer; got {num_blocks!r}")
    if rule == "uniform":
        return [survival_prob] * num_blocks
    # Hand-written, not timm's calculate_drop_path_rates: that is linspace(0, r, L), which leaves block 1 at drop
    # rate 0, where the paper's l / L gives it (1 - p_L) / L.
    return [1.0 - (block / num_blocks) * (1.0 - survival_prob) for block in range(1, num_blocks + 1)]


def expected_depth(num_blocks: int, survival_prob: float = 0.5, rule: str = "linear") -> float:
    """Expected number of residual blocks that run in a training step (ResNet-110, p_L=0.5: 40.25)."""
    return sum(survival_probs(num_blocks, survival_prob, rule))


def drop_warmup_factor(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Share of the target drop rates in effect at ``step`` (0-based) of ``total_steps``: a linear ramp from
    0 to 1 over the first ``warmup_fraction`` of training, then 1 (Composer's ``drop_warmup``)."""
    warmup_steps = check_fraction("warmup_fraction", warmup_fraction) * total_steps
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def _setting(default, label: str, choices=None, trained: bool = True):
    """A field: ``label`` names it on a model card; folded weights record their ``trained`` fields (not the seed,
    which only picked which blocks ran)."""
    return field(default=default, metadata=dict(label=label, choices=choices, trained=trained))


@dataclass(frozen=True)
class SurvivalSettings:
    """The survival settings of a stochastic-depth model, validated once, when made.

    ``folded_from`` is set on a folded (deployed) model: the trained fields of the settings whose p_l are in its
    weights now (not the gate seed: nothing in the weights depends on it). A folded model has no gates.
    """
    survival_prob: float = _setting(0.5, "survival probability of the last block, p_L")
    survival_rule: str = _setting("linear", "survival rule", SURVIVAL_RULES)
    # scaling before gate_mode: the order weights files and ONNX metadata have always written them in.
    scaling: str = _setting("expectation", "test-time scaling", SCALINGS)
    gate_mode: str = _setting("batch", "gates (training)", GATE_MODES)
    gate_seed: int = _setting(0, "gate seed", trained=False)
    folded_from: Optional["SurvivalSettings"] = None

    def __post_init__(self):
        set_field = object.__setattr__  # a frozen dataclass normalises its own fields this way
        set_field(self, "survival_prob", check_survival_prob("survival_prob", self.survival_prob))
        for f in fields(self):
            if f.metadata.get("choices"):
                check_choice(f.name, getattr(self, f.name), f.metadata["choices"])
        check_int("gate_seed", self.gate_seed, 0, 2**63 - 1)
        if self.folded_from is not None:
            set_field(self, "folded_from", _trained_settings("folded_from", self.folded_from))
            set_field(self, "gate_mode", "off")  # p_l lives in the weights now

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "SurvivalSettings":
        """The settings among model arguments (a factory's kwargs, config.json's ``model_args``); other keys
        are ignored and None is the default. timm's ``drop_path_rate`` is read as 1 - p_L."""
        given = {f.name: args[f.name] for f in fields(cls) if args.get(f.name) is not None}
        survival_prob = _resolve_survival_prob(args.get("survival_prob"), args.get("drop_path_rate"))
        if survival_prob is not None:
            given["survival_prob"] = survival_prob
        return cls(**given)

    def block_survival_probs(self, num_blocks: int) -> List[float]:
        """p_l of each of ``num_blocks`` residual blocks as the gates hold them: 1.0 with gates off (folded too)."""
        if self.gate_mode == "off":
            return _schedule(num_blocks, 1.0, "uniform")
        return _schedule(num_blocks, self.survival_prob, self.survival_rule)

    def folded(self) -> "SurvivalSettings":
        """The settings of this model once p_l is folded into its weights."""
        if self.folded_from is not None:
            raise ValueError(f"the settings are already folded (folded_from={self.folded_from.trained_dict()!r})")
        return replace(self, folded_from=self)

    def as_model_args(self) -> Dict[str, Any]:
        """Every setting as model arguments (JSON-serialisable), ``folded_from`` only when set: what
        ``timm.create_model(name, **args)`` takes back."""
        args = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "folded_from"}
        if self.folded_from is not None:
            args["folded_from"] = self.folded_from.trained_dict()
        return args

    def as_recorded(self) -> Dict[str, Any]:
        """What a weights file records: the model arguments without the gate seed."""
        return {k: v for k, v in self.as_model_args().items() if k in TRAINED_FIELDS + ("folded_from",)}

    def trained_dict(self) -> Dict[str, Any]:
        """The settings the weights were trained with: ``folded_from``'s on a folded model."""
        trained = self.folded_from or self
        return {k: getattr(trained, k) for k in TRAINED_FIELDS}

    def card_rows(self) -> List[tuple]:
        """(label, value) of each setting for a model card; a folded model shows what it was trained with."""
        shown = self.folded_from or self
        return [(f.metadata["label"], getattr(shown, f.name)) for f in fields(self)
                if "label" in f.metadata and (f.metadata["trained"] or self.folded_from is None)]


TRAINED_FIELDS = tuple(f.name for f in fields(SurvivalSettings) if f.metadata.get("trained"))


def _trained_settings(name: str, value: Any) -> SurvivalSettings:
    """``folded_from`` as given (settings, or a mapping of the trained fields, as config.json holds it)."""
    if isinstance(value, SurvivalSettings):
        value = value.trained_dict()
    if not isinstance(value, Mapping) or set(value) - set(TRAINED_FIELDS):
        raise ValueError(f"{name} must be the settings a folded model was trained with, a mapping of "
                         f"{', '.join(TRAINED_FIELDS)}; got {value!r:.200}")
    return SurvivalSettings(**{k: v for k, v in value.items() if v is not None})


def _resolve_survival_prob(survival_prob: Optional[float], drop_path_rate: Optional[float]) -> Optional[float]:
    """p_L from survival_prob and timm's drop_path_rate (1 - p_L), which must agree; None when neither is given."""
    if drop_path_rate is None:
        return survival_prob
    try:
        from_rate = 1.0 - float(drop_path_rate)
    except (TypeError, ValueError):
        raise ValueError(f"drop_path_rate must be a number in [0, 1); got {drop_path_rate!r}") from None
    if not 0.0 < from_rate <= 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1) (it is 1 - survival_prob); got {drop_path_rate!r}")
    if survival_prob is not None and not math.isclose(check_survival_prob("survival_prob", survival_prob), from_rate):
        raise ValueError(
            f"survival_prob={survival_prob!r} and drop_path_rate={drop_path_rate!r} disagree: "
            "drop_path_rate is 1 - survival_prob; give one of them")
    return from_rate
