"""sdzoo: stochastic-depth ResNets (Huang et al., 2016) for timm, with a real skip and ONNX export."""
__version__ = "0.1.0"
__all__ = ["survival_probs", "expected_depth", "SurvivalSettings", "SURVIVAL_RULES", "GATE_MODES", "SCALINGS",
           "GateSampler", "ResidualGate", "SDResNet", "convert_drop_path", "set_drop_rate_factor", "drop_warmup_factor",
           "same_gates", "gate_state", "load_gate_state", "prune_blocks"]

from sdzoo.survival import SURVIVAL_RULES, SurvivalSettings, drop_warmup_factor, expected_depth, survival_probs  # noqa: F401
from sdzoo.gate import (GATE_MODES, SCALINGS, GateSampler, ResidualGate, gate_state, load_gate_state,  # noqa: F401
                   same_gates, set_drop_rate_factor)
from sdzoo.models import SDResNet  # noqa: F401  (registers the zoo with timm)
from sdzoo.files.hub_http import install_load_deadline
from sdzoo.convert import convert_drop_path, install_create_model_hook  # noqa: F401
from sdzoo.prune import prune_blocks  # noqa: F401

install_create_model_hook()  # SDZOO_CONVERT_DROP_PATH=sample|batch: timm.create_model converts (see README)
install_load_deadline()  # with $SDZOO_HUB_TIMEOUT set, every Hub request of the process is bounded
