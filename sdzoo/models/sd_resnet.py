"""ResNets with stochastic depth (Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016), in the two
layouts of the authors' code:

* CIFAR (6n+2 layers): 3x3 stem (conv with bias, BN, ReLU), three stages of n basic blocks at 16/32/64
  channels, the first block of stages 2 and 3 with stride 2 and a parameter-free "option A" shortcut
  (strided subsampling, zero-padded channels; a 1x1 projection is an option), global average pool, linear.
* ImageNet: the bottleneck ResNet of fb.resnet.torch (7x7 stem, max pool, four stages, projection shortcuts).

A block computes ``ReLU(shortcut(x) + b_l * f_l(x))`` in training, b_l ~ Bernoulli(p_l), and
``ReLU(shortcut(x) + p_l * f_l(x))`` at test time; a dropped f_l is not computed (``sdzoo.gate``).
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import create_classifier, get_device_dtype, register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import downsample_conv

from sdzoo.files.checks import check_choice, check_fraction
from sdzoo.internals.timm_private import feature_take_indices
# Per-channel statistics of the training sets, for the data configs timm resolves from the cfgs below.
from sdzoo.datasets import DATASETS
from sdzoo.gate import Branch, GateSampler, ResidualGate
from sdzoo.files.weights import (MAX_BLOCKS, WeightsProvenance, check_before_build, check_model_size,
                                 install_state_dict_checks)
from sdzoo.files.pretrained import tag_model_defaults, timm_weight_cfgs, with_published_weights
from sdzoo.survival import SurvivalSettings

__all__ = ["SDResNet", "BasicBlock", "Bottleneck", "cifar_stage_depths", "build_args"]

SHORTCUTS = ("zero_pad", "projection")
GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax", "")
CIFAR_WIDTHS = (16, 32, 64)
IMAGENET_WIDTHS = (64, 128, 256, 512)
# Each layout's block, stage widths and default shortcut, by its stem.
LAYOUTS = {"cifar": ("basic", CIFAR_WIDTHS, "zero_pad"), "imagenet": ("bottleneck", IMAGENET_WIDTHS, "projection")}


def cifar_stage_depths(depth: int) -> Tuple[int, int, int]:
    """Blocks per stage of a 6n+2-layer CIFAR ResNet (110 -> 18 blocks in each of 3 stages)."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 56, 110, 152, 1202, ...); got {depth!r}")
    n = (depth - 2) // 6
    return n, n, n


def conv3x3(in_chs: int, out_chs: int, stride: int = 1, **dd) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)


class ZeroPadShortcut(nn.Module):
    """Option A shortcut: keep every other pixel, zero-fill the new channels. No parameters."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra_chs = out_chs - in_chs

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_chs))


def make_downsample(kind: str, in_chs: int, out_chs: int, stride: int, **dd) -> Optional[nn.Module]:
    """The shortcut of a block that changes shape (None: the identity). Named as in timm's ResNet."""
    if in_chs == out_chs and stride == 1:
        return None
    if kind == "zero_pad":
        return ZeroPadShortcut(in_chs, out_chs, stride)
    # timm's own projection shortcut (conv1x1 + BN, keys downsample.0/.1), so state dicts interchange with timm's
    return downsample_conv(in_chs, out_chs, kernel_size=1, stride=stride, **dd)


class _GatedBlock(nn.Module):
    """What both blocks share: ``branch`` runs ``residual``, f_l, through the gate; ``branch_layer_names`` are the
    layers it uses (a skipped branch gives their parameters zero gradients)."""

    def branch_layers(self) -> List[nn.Module]:
        """f_l's layers, in order."""
        return self.branch.modules()

    def gated_sum(self, x: Tensor) -> Tensor:
        """shortcut + b_l * residual(x), before the block's last ReLU."""
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.gate(self.branch, shortcut, x)


# Blocks are leaves of timm's FX graphs (features_only="fx", its FX tests): a gate decides in Python.
@register_notrace_module
class BasicBlock(_GatedBlock):
    """conv3x3 - BN - ReLU - conv3x3 - BN, gated, added to the shortcut, then ReLU."""

    expansion = 1
    branch_layer_names = ("conv1", "bn1", "act1", "conv2", "bn2")

    def __init__(self, in_chs: int, chs: int, stride: int, shortcut: str, gate: ResidualGate, **dd):
        super().__init__()
        out_chs = chs * self.expansion
        self.conv1 = conv3x3(in_chs, chs, stride, **dd)
        self.bn1 = nn.BatchNorm2d(chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(chs, out_chs, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.act2 = nn.ReLU()  # not in place: a skipped block's output is its input
        self.downsample = make_downsample(shortcut, in_chs, out_chs, stride, **dd)
        self.gate = gate
        self.branch = Branch(self, type(self).residual, self.branch_layer_names)

    def residual(self, x: Tensor) -> Tensor:
        """f_l, the residual branch."""
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.act2(self.gated_sum(x))


@register_notrace_module
class Bottleneck(_GatedBlock):
    """conv1x1 - BN - ReLU - conv3x3(stride) - BN - ReLU - conv1x1 - BN, gated, added, then ReLU."""

    expansion = 4
    branch_layer_names = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3")

    def __init__(self, in_chs: int, chs: int, stride: int, shortcut: str, gate: ResidualGate, **dd):
        super().__init__()
        out_chs = chs * self.expansion
        self.conv1 = nn.Conv2d(in_chs, chs, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(chs, chs, stride, **dd)
        self.bn2 = nn.BatchNorm2d(chs, **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(chs, out_chs, 1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(out_chs, **dd)
        self.act3 = nn.ReLU()  # not in place: a skipped block's output is its input
        self.downsample = make_downsample(shortcut, in_chs, out_chs, stride, **dd)
        self.gate = gate
        self.branch = Branch(self, type(self).residual, self.branch_layer_names)

    def residual(self, x: Tensor) -> Tensor:
        """f_l, the residual branch."""
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.act2(x)
        x = self.conv3(x)
        x = self.bn3(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.act3(self.gated_sum(x))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
SURVIVAL_ARG_NAMES = frozenset(f.name for f in fields(SurvivalSettings))


class SDResNet(nn.Module):
    """A ResNet whose residual blocks are skipped at random during training (stochastic depth).

    Args:
        layers: residual blocks per stage.
        block: "basic" or "bottleneck".
        stem: "cifar" (3x3 conv with bias) or "imagenet" (7x7/2 conv, 3x3/2 max pool).
        widths: channels of each stage's branch (before bottleneck expansion).
        shortcut: "zero_pad" (option A, parameter-free) or "projection" (1x1 conv + BN) for blocks that
            change shape.
        survival_prob: p_L, the survival probability of the last block. 1.0 is constant depth.
        survival_rule: "linear" (p_l decays from 1 to p_L over the blocks) or "uniform" (p_l = p_L).
        gate_mode: "batch" (one draw per block per mini-batch, the paper's), "sample" (per-sample drop
            computed on the kept samples only) or "off" (constant depth; survival settings are ignored).
        scaling: "expectation" (branch times p_l at eval, the paper's) or "inverted" (branch divided by p_l
            in training, as timm's DropPath).
        gate_seed: seed of the model's gate generator; the same seed gives the same gates everywhere.
        drop_path_rate: timm's name for 1 - p_L; accepted when survival_prob is not given.
        folded_from: the survival settings a folded model (``sdzoo.fold``) was trained with; it has no gates.
        pruned_from: the record of a model pruned to fewer blocks (``sdzoo.prune``): the source's architecture,
            ``layers`` and the names of the blocks kept. A pruned model is folded.
        device, dtype: as in timm's models (``device="meta"`` builds without allocating memory).
    """

    def __init__(self, layers: Sequence[int], block: str = "basic", stem: str = "cifar",
                 widths: Sequence[int] = CIFAR_WIDTHS, shortcut: str = "zero_pad", num_classes: int = 1000,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0,
                 survival_prob: Optional[float] = None, survival_rule: str = SurvivalSettings.survival_rule,
                 gate_mode: str = SurvivalSettings.gate_mode, scaling: str = SurvivalSettings.scaling,
                 gate_seed: int = SurvivalSettings.gate_seed, drop_path_rate: Optional[float] = None,
                 folded_from: Optional[Dict[str, Any]] = None, pruned_from: Optional[Dict[str, Any]] = None,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        check_choice("block", block, tuple(BLOCKS))
        check_choice("stem", stem, tuple(LAYOUTS))
        check_choice("shortcut", shortcut, SHORTCUTS)
        settings = SurvivalSettings.from_args(dict(
            survival_prob=survival_prob, survival_rule=survival_rule, gate_mode=gate_mode, scaling=scaling,
            gate_seed=gate_seed, drop_path_rate=drop_path_rate, folded_from=folded_from))
        check_choice("global_pool", global_pool, GLOBAL_POOLS)
        check_fraction("drop_rate", drop_rate, include_one=False)
        # Checked and bounded before anything is allocated: config.json of a Hub repo or a folder may ask anything.
        check_model_size(layers, widths, block, stem, shortcut, num_classes, in_chans, global_pool)
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.survival_settings = settings
        self.pruned_from = _check_pruned_from(pruned_from, layers, settings)
        # timm's factory lays its kwargs over these, and the ``_model_args`` property the survival settings.
        self._factory_args = dict(shortcut=shortcut)

        block_probs = settings.block_survival_probs(sum(layers))
        self.gate_sampler = GateSampler(block_probs, settings.gate_mode, settings.gate_seed)
        self.gate_sampler.attach(self, device=device)

        stem_chs = widths[0]
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, padding=1, bias=True, **dd)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False, **dd)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(stem_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        reduction = 1 if stem == "cifar" else 2
        self.feature_info = [dict(num_chs=stem_chs, reduction=reduction, module="act1")]
        reduction *= 1 if stem == "cifar" else 2  # the max pool

        # Blocks are numbered l = 1..L across stages for the survival schedule.
        block_cls, in_chs, block_idx = BLOCKS[block], stem_chs, 0
        self.stage_names = []
        for stage_idx, (num, chs) in enumerate(zip(layers, widths)):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for i in range(num):
                gate = ResidualGate(block_probs[block_idx], settings.scaling, index=block_idx,
                                    sampler=self.gate_sampler)
                blocks.append(block_cls(in_chs, chs, stride if i == 0 else 1, shortcut, gate, **dd))
                in_chs = chs * block_cls.expansion
                block_idx += 1
            name = f"layer{stage_idx + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=name))

        self.num_features = in_chs
        self.reset_classifier(num_classes, global_pool)
        self.stem = stem
        self.init_weights()
        # Where the weights came from, and whether that source said they are folded (``fold_survival`` reads it).
        self.weights_provenance = WeightsProvenance("initialised by this model", settings.as_recorded())
        install_state_dict_checks(self)
        self.register_load_state_dict_post_hook(_restore_gate_stream)

    def init_weights(self) -> None:
        """The initialisation of each layout's code. CIFAR, the authors' Torch7: convs normal of std
        sqrt(2 / fan_in), BatchNorm gamma ~ U(0, 1) (Torch's ``reset()``), the linear layer Torch's default,
        which is PyTorch's too. ImageNet, fb.resnet.torch: convs std sqrt(2 / fan_out), gamma 1, linear bias 0.
        """
        cifar = self.stem == "cifar"
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in" if cifar else "fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                if cifar:
                    nn.init.uniform_(m.weight, 0.0, 1.0)
                else:
                    nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and not cifar:
                nn.init.zeros_(m.bias)

    def residual_blocks(self) -> List[nn.Module]:
        """All residual blocks in schedule order l = 1..L."""
        return [blk for name in self.stage_names for blk in getattr(self, name)]

    def block_survival_probs(self) -> List[float]:
        return [blk.gate.survival_prob for blk in self.residual_blocks()]

    def expected_depth(self) -> float:
        """Expected number of residual blocks computed per training step."""
        return sum(self.block_survival_probs())

    def stochastic_depth_args(self) -> Dict[str, Any]:
        """The survival settings of this model, as model arguments (JSON-serialisable): what
        ``timm.create_model(name, **model.stochastic_depth_args(), num_classes=...)`` takes back."""
        return self.survival_settings.as_model_args()

    # Read-only views of ``survival_settings``: folding replaces the settings, and these follow.
    survival_prob = property(lambda self: self.survival_settings.survival_prob)
    survival_rule = property(lambda self: self.survival_settings.survival_rule)
    gate_mode = property(lambda self: self.survival_settings.gate_mode)
    scaling = property(lambda self: self.survival_settings.scaling)

    @property
    def folded_from(self) -> Optional[Dict[str, Any]]:
        """The survival settings a folded model was trained with; None while p_l is not in the weights."""
        folded = self.survival_settings.folded_from
        return None if folded is None else folded.trained_dict()

    # timm's record of the arguments that rebuild this model (config.json's model_args, get_model_args): what its
    # factory stored, with today's survival settings over it (a copy would go stale), so a folded model rebuilds
    # folded.
    @property
    def _model_args(self) -> Dict[str, Any]:
        args = dict(self._factory_args, **self.survival_settings.as_model_args())
        if self.pruned_from is not None:
            args["pruned_from"] = self.pruned_from  # with the layers its factory was given (sdzoo.prune gives them)
        return args

    @_model_args.setter
    def _model_args(self, args: Dict[str, Any]) -> None:
        self._factory_args = {k: v for k, v in args.items() if k not in SURVIVAL_ARG_NAMES}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^conv1|bn1|^maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each kept branch in the backward pass, inside its gate's skip: torch.compile cannot compile
        a torch.cond inside a checkpoint."""
        self.grad_checkpointing = enable
        for blk in self.residual_blocks():
            blk.gate.checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head for ``num_classes`` (0: none); the current pooling is kept when global_pool is None."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool,
                                                      **get_device_dtype(self))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def _forward_trunk(self, x: Tensor, take_indices: Sequence[int] = (), num_stages: Optional[int] = None
                       ) -> Tuple[Tensor, List[Tensor]]:
        """Stem and stages, with the outputs at ``take_indices`` (0: the stem, i: stage i) collected."""
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        for feat_idx, name in enumerate(self.stage_names[:num_stages], start=1):
            x = getattr(self, name)(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        return x, intermediates

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Forward features that returns intermediates (stem output, then each stage's output)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW'; got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stage_names) + 1, indices)
        x, intermediates = self._forward_trunk(x, take_indices, max_index if stop_early else None)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Remove the stages (and head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stage_names) + 1, indices)
        for name in self.stage_names[max_index:]:
            setattr(self, name, nn.Identity())
        self.stage_names = self.stage_names[:max_index]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        return self._forward_trunk(x)[0]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _check_pruned_from(record: Optional[Dict[str, Any]], layers: Sequence[int],
                       settings: SurvivalSettings) -> Optional[Dict[str, Any]]:
    """``pruned_from`` as config.json or ``sdzoo.prune`` gives it: the source's architecture, its ``layers``,
    and one source block name (``layerS.I``) for each block of ``layers``."""
    if record is None:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("architecture"), str) or \
            not isinstance(record.get("layers"), (list, tuple)) or not isinstance(record.get("kept"), (list, tuple)):
        raise ValueError(f"pruned_from must be a mapping with 'architecture', 'layers' and 'kept' (the pruned "
                         f"model's record); got {record!r:.200}")
    source_layers, kept = record["layers"], record["kept"]
    if len(source_layers) != len(layers) or any(isinstance(n, bool) or not isinstance(n, int) or not
                                                 low <= n <= MAX_BLOCKS for low, n in zip(layers, source_layers)):
        raise ValueError(f"pruned_from['layers'] must be the source's blocks per stage, at least layers={list(layers)} "
                         f"in each; got {source_layers!r:.200}")
    names = [f"layer{stage + 1}.{i}" for stage, n in enumerate(source_layers) for i in range(n)]
    if len(kept) != sum(layers) or len(set(map(str, kept))) != len(kept) or any(name not in names for name in kept):
        raise ValueError(f"pruned_from['kept'] must name {sum(layers)} distinct blocks (layerS.I) of the source's "
                         f"layers={list(source_layers)}; got {kept!r:.200}")
    if settings.folded_from is None:
        raise ValueError("pruned_from needs folded_from: a pruned model is folded (its p_l are in its weights)")
    return dict(record, layers=list(record["layers"]), kept=list(record["kept"]))


def _restore_gate_stream(module: "SDResNet", incompatible_keys) -> None:
    """load_state_dict post-hook: the gates of training forward t are a function of (gate_seed, t), and t is the
    stem BatchNorm's num_batches_tracked, which every state dict holds (timm's ResNets' too): a model restored
    from any state dict draws the gates it would have drawn, and no extra key breaks a strict load."""
    counter = module.bn1.num_batches_tracked
    if counter is not None and counter.device.type != "meta":
        module.gate_sampler.step = int(counter)


# -- builders -----------------------------------------------------------------------------------------
def _as_tuples(cfg: Any) -> Any:
    """Lists to tuples, as in timm's own cfgs: timm's tools concatenate config.json's lists with tuples."""
    if isinstance(cfg, dict):
        return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    return cfg


def build_args(kwargs: Mapping[str, Any], cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The arguments SDResNet will be built with: the factory's kwargs (config.json's model_args and the
    caller's), else what timm takes from the pretrained cfg (config.json's top level: num_classes, the input
    size's channels), else the constructor's defaults."""
    input_size = cfg.get("input_size") or (3,)
    args = dict(
        layers=tuple(kwargs["layers"]) if isinstance(kwargs.get("layers"), (list, tuple)) else kwargs.get("layers"),
        widths=tuple(kwargs["widths"]) if isinstance(kwargs.get("widths"), (list, tuple)) else kwargs.get("widths"),
        block=kwargs.get("block", "basic"), stem=kwargs.get("stem", "cifar"),
        shortcut=kwargs.get("shortcut", "zero_pad"),
        num_classes=kwargs.get("num_classes", cfg.get("num_classes", 1000)),
        in_chans=kwargs.get("in_chans", input_size[0]), global_pool=kwargs.get("global_pool", "avg"),
        folded_from=None)
    args.update(SurvivalSettings.from_args(kwargs).as_model_args())  # folded_from too, when the model is folded
    return args


def _create_sd_resnet(variant: str, layout: str, stage_depths: Sequence[int], pretrained: bool, /,
                      **kwargs) -> SDResNet:
    block, widths, shortcut = LAYOUTS[layout]
    kwargs.setdefault("shortcut", shortcut)
    # The caller's kwargs win: layers= (a pruned model's config.json, sdzoo.prune) replaces the variant's.
    kwargs = dict(dict(layers=tuple(stage_depths), block=block, stem=layout, widths=widths), **kwargs)
    for key in ("pretrained_cfg", "pretrained_cfg_overlay"):
        if key in kwargs:
            kwargs[key] = _as_tuples(kwargs[key])
    for key, value in tag_model_defaults(variant, kwargs.get("pretrained_cfg")).items():
        kwargs.setdefault(key, value)  # timm's weights: scaling="inverted", so eval is the pretrained network
    # The weights' header and metadata against the arguments, before anything is built; timm's load is then
    # strict (every tensor of the file, and only those), and the model's load pre-hook refuses NaN and inf.
    provenance = check_before_build(variant, kwargs, pretrained, build_args)
    # Features come from forward_intermediates: the blocks need the step's gates, which a plain
    # module-by-module feature wrapper would not pass.
    feature_cfg = dict(feature_cls="getter", out_indices=tuple(range(len(kwargs["layers"]) + 1)))
    model = build_model_with_cfg(SDResNet, variant, pretrained, pretrained_strict=True, feature_cfg=feature_cfg,
                                 **kwargs)
    if provenance is not None:
        model.weights_provenance = provenance
    return model


def _cfg(**kwargs) -> Dict[str, Any]:
    """The zoo's own cfgs claim no weights (``with_published_weights`` fills in those sdzoo publishes)."""
    return {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": DATASETS["cifar10"].mean, "std": DATASETS["cifar10"].std,
        "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0", **kwargs,
    }


def _cifar_cfgs(name: str, first: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """A tag per data set of the registry with a ``cifar_tag``, in the registry's order, ``first`` (the default
    tag) first. The stages halve the input twice: the final feature map is a quarter of the image's side."""
    tags = sorted((spec for spec in DATASETS.values() if spec.cifar_tag), key=lambda spec: spec.name != first)
    return {f"{name}.{spec.name}": _cfg(num_classes=spec.num_classes, mean=spec.mean, std=spec.std,
                                        input_size=(spec.in_chans, spec.image_size, spec.image_size),
                                        pool_size=(spec.image_size // 4,) * 2) for spec in tags}


def _in1k_cfg() -> Dict[str, Any]:
    imagenet = DATASETS["imagenet"]
    return _cfg(num_classes=imagenet.num_classes, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                mean=imagenet.mean, std=imagenet.std)


default_cfgs = generate_default_cfgs(with_published_weights({
    **_cifar_cfgs("sd_resnet20_cifar"),
    **_cifar_cfgs("sd_resnet56_cifar"),
    **_cifar_cfgs("sd_resnet110_cifar"),
    **_cifar_cfgs("sd_resnet152_cifar", first="svhn"),  # the paper's SVHN model
    **_cifar_cfgs("sd_resnet1202_cifar"),
    # timm's ImageNet weights, one tag each (sdzoo.files.pretrained); then the weightless in1k tag, marked '*'
    # and last, so it stays the default (timm would make the first tag with weights the default otherwise).
    **timm_weight_cfgs("sd_resnet50"),
    "sd_resnet50.in1k*": _in1k_cfg(),
    **timm_weight_cfgs("sd_resnet101"),
    "sd_resnet101.in1k*": _in1k_cfg(),
    **timm_weight_cfgs("sd_resnet152"),
    "sd_resnet152.in1k*": _in1k_cfg(),
}))


@register_model
def sd_resnet20_cifar(pretrained: bool = False, **kwargs) -> SDResNet:
    """ResNet-20 for CIFAR (n = 3) with stochastic depth."""
    return _create_sd_resnet("sd_resnet20_cifar", "cifar", cifar_stage_depths(20), pretrained, **kwargs)


@register_model
def sd_resnet56_cifar(pretrained: bool = False, **kwargs) -> SDResNet:
    """ResNet-56 for CIFAR (n = 9) with stochastic depth."""
    return _create_sd_resnet("sd_resnet56_cifar", "cifar", cifar_stage_depths(56), pretrained, **kwargs)


@register_model
def sd_resnet110_cifar(pretrained: bool = False, **kwargs) -> SDResNet:
    """ResNet-110 for CIFAR (n = 18, L = 54 blocks): the paper's main CIFAR model."""
    return _create_sd_resnet("sd_resnet110_cifar", "cifar", cifar_stage_depths(110), pretrained, **kwargs)


@register_model
def sd_resnet152_cifar(pretrained: bool = False, **kwargs) -> SDResNet:
    """ResNet-152 of CIFAR layout (n = 25): the paper's SVHN model."""
    return _create_sd_resnet("sd_resnet152_cifar", "cifar", cifar_stage_depths(152), pretrained, **kwargs)


@register_model
def sd_resnet1202_cifar(pretrained: bool = False, **kwargs) -> SDResNet:
    """ResNet-1202 for CIFAR (n = 200)."""
    return _create_sd_resnet("sd_resnet1202_cifar", "cifar", cifar_stage_depths(1202), pretrained, **kwargs)


@register_model
def sd_resnet50(pretrained: bool = False, **kwargs) -> SDResNet:
    """ResNet-50 (bottleneck, projection shortcuts) with stochastic depth."""
    return _create_sd_resnet("sd_resnet50", "imagenet", (3, 4, 6, 3), pretrained, **kwargs)


@register_model
def sd_resnet101(pretrained: bool = False, **kwargs) -> SDResNet:
    """ResNet-101 (bottleneck, projection shortcuts) with stochastic depth."""
    return _create_sd_resnet("sd_resnet101", "imagenet", (3, 4, 23, 3), pretrained, **kwargs)


@register_model
def sd_resnet152(pretrained: bool = False, **kwargs) -> SDResNet:
    """ResNet-152 (bottleneck, projection shortcuts): the paper's ImageNet model."""
    return _create_sd_resnet("sd_resnet152", "imagenet", (3, 8, 36, 3), pretrained, **kwargs)
