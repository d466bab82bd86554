"""sdzoo: stochastic-depth ResNets (Huang et al., 2016) for timm, with a real skip and ONNX export."""
__version__ = "0.1.0"
__all__ = ["survival_probs", "expected_depth", "SURVIVAL_RULES", "GATE_MODES", "SCALINGS", "GateSampler",
           "ResidualGate", "SDResNet"]

from .survival import SURVIVAL_RULES, expected_depth, survival_probs  # noqa: F401
from .gate import GATE_MODES, SCALINGS, GateSampler, ResidualGate  # noqa: F401
from .models import SDResNet  # noqa: F401  (registers the zoo with timm)
