"""Small helpers shared by the test files."""
import torch


def randomize_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affines, so that a lost buffer or a wrong fold shows in the outputs."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.2)
    return model
