"""The zoo: importing this module registers every sdzoo architecture with timm."""
from sdzoo.models.sd_resnet import SDResNet, BasicBlock, Bottleneck, cifar_stage_depths

__all__ = ["SDResNet", "BasicBlock", "Bottleneck", "cifar_stage_depths"]
