"""The benchmark's model variants (sdzoo.export.benchmark_variants), built and run as scripts/benchmark.py runs them."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath

from sdzoo.export.benchmark_variants import (CONVERT_VARIANTS, VARIANTS, MaskGate, build_timm_variant, build_variant,
                                      flops_per_image)
from sdzoo.gate import ResidualGate

MODEL = "sd_resnet20_cifar"
MASKS = ("timm DropPath", "torchvision SD batch", "torchvision SD row")


def _batch(n=4):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_benchmark_variants_train_step_shapes_and_gradients():
    x, y = _batch()
    grads = {}
    for variant in VARIANTS:
        model = build_variant(MODEL, variant, survival_prob=0.5, seed=0).train()
        out = model(x)
        assert out.shape == (4, 10) and torch.isfinite(out).all(), variant
        F.cross_entropy(out, y).backward()
        grads[variant] = {name: p.grad for name, p in model.named_parameters()}
        gates = [blk.gate for blk in model.residual_blocks()]
        if variant in MASKS:
            assert all(isinstance(g, MaskGate) for g in gates), variant
        elif variant == "constant depth":
            assert model.gate_mode == "off"
    assert all(g is not None for g in grads["constant depth"].values())
    # Zero gradients or none: the same seed draws the same blocks; the skipped ones' parameters get zeros in
    # one and no gradient in the other, and every other gradient is the same.
    missing = {name for name, g in grads["sdzoo batch, no grads"].items() if g is None}
    assert missing, "p_L = 0.5 over 9 blocks: this seed skips some"
    for name, g in grads["sdzoo batch"].items():
        assert g is not None
        if name in missing:
            assert not g.any(), name
        else:
            torch.testing.assert_close(g, grads["sdzoo batch, no grads"][name])


def test_benchmark_mask_variants_at_eval_are_constant_depth():
    """A mask scales by 1/p in training, so at test time it is the identity: the same weights (the same seed)
    give constant depth's outputs."""
    x, _ = _batch()
    with torch.no_grad():
        constant = build_variant(MODEL, "constant depth", 0.5, seed=3).eval()(x)
        for variant in MASKS:
            model = build_variant(MODEL, variant, 0.5, seed=3).eval()
            torch.testing.assert_close(model(x), constant, rtol=0, atol=0, msg=variant)


def test_benchmark_variants_executed_flops():
    x, y = _batch()
    flops = {v: flops_per_image(build_variant(MODEL, v, 0.5, seed=0).train(), x, y, steps=3)
             for v in ("constant depth", "sdzoo batch", *MASKS)}
    for variant in MASKS:  # masks compute every block
        assert flops[variant] == pytest.approx(flops["constant depth"]), variant
    assert flops["sdzoo batch"] < 0.95 * flops["constant depth"]  # the real skip


def test_benchmark_convert_variants_build():
    x = torch.randn(2, 3, 32, 32)
    for variant in CONVERT_VARIANTS:
        model = build_timm_variant("resnet10t", variant, rate=0.2, img_size=32, seed=0, uniform=True)
        assert model.training and model(x).shape == (2, 10), variant
        has_gates = any(isinstance(m, ResidualGate) for m in model.modules())
        assert has_gates == variant.startswith("sdzoo"), variant
        if not has_gates:  # --uniform-rate: every branch at the rate
            rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
            assert rates and all(r == 0.2 for r in rates)


def test_benchmark_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant must be one of"):
        build_variant(MODEL, "torchvision SD column", 0.5, seed=0)
    with pytest.raises(ValueError, match="variant must be one of"):
        build_timm_variant("resnet10t", "sdzoo row", 0.2, 32, 0, uniform=False)
