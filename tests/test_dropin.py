"""The zoo in other people's code: a plain DDP loop, timm's ResNet weights, timm's factory arguments and
tools, and timm's own model test suite."""
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from timm.models import save_for_hf

from sdzoo.files.weights import WeightsError
from sdzoo.fold import fold_survival

from helpers import randomize_batchnorm, run_distributed_loop

# -- a plain DDP loop (tests/distributed_loops.py) ----------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)  # torchrun's two processes (up to 600 s)
@pytest.mark.parametrize("name,size", [("sd_resnet20_cifar", 32), ("sd_resnet50", 64)])
def test_plain_ddp_loop_trains_and_replicas_stay_equal(tmp_path, name, size):
    # rank 1 runs an extra training forward after the first step: the ranks go on drawing the same gates
    results = run_distributed_loop("ddp", [dict(model=name, size=size)], 6, tmp_path / "result.json")
    result = results[f"{name} zoo"]
    assert result["skipped"] > 0, "no block was skipped: the loop did not test the skip"
    assert result["same_draws"], "the ranks drew other gates after rank 1's extra forward"
    assert result["replica_max_diff"] == 0.0
    assert result["moved"] > 0 and math.isfinite(result["loss"])


# -- timm's ResNet weights -------------------------------------------------------------------------------
def test_state_dict_moves_both_ways_with_timm_resnet50():
    ours = timm.create_model("sd_resnet50")
    theirs = timm.create_model("resnet50")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    randomize_batchnorm(ours)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))


@pytest.mark.parametrize("name", ["sd_resnet50", "sd_resnet101"])
def test_folded_model_runs_as_timm_resnet(name):
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model(name, survival_prob=0.5)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        fold_survival(model)
        plain = timm.create_model(name[len("sd_"):]).eval()
        plain.load_state_dict(model.state_dict(), strict=True)
        # float rounding only: the deep nets with random BN statistics have logits in the hundreds
        torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_cifar_models_use_timm_block_names():
    keys = list(timm.create_model("sd_resnet20_cifar", shortcut="projection").state_dict())
    block_keys = {re.sub(r"^layer\d+\.\d+\.", "", k).split(".")[0] for k in keys if k.startswith("layer")}
    assert block_keys == {"conv1", "bn1", "conv2", "bn2", "downsample"}


def _renamed(state_dict):
    """The same tensors under other block names: the branch in a Sequential, the projection named shortcut."""
    renamed = {}
    for key, value in state_dict.items():
        key = re.sub(r"^(layer\d+\.\d+)\.downsample\.", r"\1.shortcut.", key)
        key = re.sub(r"^(layer\d+\.\d+)\.((conv|bn)\d)", r"\1.branch.\2", key)
        renamed[key] = value
    return renamed


def test_state_dicts_under_other_key_names_are_refused(tmp_path):
    from safetensors.torch import save_file

    model = timm.create_model("sd_resnet20_cifar", shortcut="projection").eval()
    other = _renamed(model.state_dict())
    assert "layer2.0.shortcut.0.weight" in other and "layer1.0.branch.conv1.weight" in other
    with pytest.raises(RuntimeError, match="layer1.0.conv1.weight"):  # torch's strict load names what is missing
        timm.create_model("sd_resnet20_cifar", shortcut="projection").load_state_dict(other)

    save_for_hf(model, tmp_path)  # a run folder, then its weights replaced by renamed ones
    save_file({k: v.contiguous() for k, v in other.items()}, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="layer1.0.conv1.weight"):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)


# -- timm's factory arguments and tools -----------------------------------------------------------------
def test_device_meta_builds_without_memory():
    model = timm.create_model("sd_resnet152", device="meta")
    assert {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()} == {"meta"}
    model.reset_classifier(7)
    assert model.fc.weight.device.type == "meta"


def test_dtype_bfloat16():
    model = timm.create_model("sd_resnet20_cifar", dtype=torch.bfloat16).train()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_pretrained_cfg_of_a_run_folder_holds_tuples(tmp_path):
    model = timm.create_model("sd_resnet20_cifar.cifar100")
    save_for_hf(model, tmp_path)
    assert isinstance(json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]["mean"], list)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    for key in ("input_size", "mean", "std", "pool_size"):
        assert loaded.pretrained_cfg[key] == model.pretrained_cfg[key]
        assert type(loaded.pretrained_cfg[key]) is tuple, key
    data_config = timm.data.resolve_data_config(model=loaded)
    assert isinstance(data_config["input_size"], tuple)


def test_timm_onnx_export_of_a_run_folder(tmp_path):
    """timm's onnx_export (what its onnx_export.py script calls) takes the input size from the model's cfg."""
    import numpy as np
    import onnxruntime as ort
    from timm.utils.onnx import onnx_export

    model = randomize_batchnorm(timm.create_model("sd_resnet20_cifar")).eval()
    save_for_hf(model, tmp_path / "run")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True).eval()
    onnx_export(loaded, str(tmp_path / "model.onnx"), batch_size=2, use_dynamo=True, check=False)
    x = torch.randn(2, 3, 32, 32)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-4, atol=1e-4)


# -- initialisation ------------------------------------------------------------------------------------
def _convs_and_norms(model):
    return ([m for m in model.modules() if isinstance(m, torch.nn.Conv2d)],
            [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])


def test_cifar_init_is_the_authors():
    """nninit.kaiming with ReLU gain: normal, std sqrt(2 / fan_in), bias 0; Torch BN reset: gamma ~ U(0, 1)."""
    torch.manual_seed(0)
    model = timm.create_model("sd_resnet110_cifar")
    convs, norms = _convs_and_norms(model)
    for conv in convs:
        fan_in = conv.weight[0].numel()
        std = conv.weight.std().item()
        n = conv.weight.numel()
        assert std == pytest.approx(math.sqrt(2.0 / fan_in), rel=6 / math.sqrt(n)), conv
        assert abs(conv.weight.mean().item()) < 6 * std / math.sqrt(n)
        if conv.bias is not None:
            assert not conv.bias.any()
    stem_std = convs[0].weight.std().item()
    assert stem_std == pytest.approx(math.sqrt(2 / 27), rel=0.2)  # 0.272, where fan_out would give 0.118
    gammas = torch.cat([bn.weight.detach() for bn in norms])
    assert gammas.min() >= 0 and gammas.max() <= 1
    assert gammas.mean().item() == pytest.approx(0.5, abs=0.02)
    assert gammas.var().item() == pytest.approx(1 / 12, rel=0.1)  # U(0, 1)
    assert not torch.cat([bn.bias.detach() for bn in norms]).any()


def test_imagenet_init_is_fb_resnet_torch():
    torch.manual_seed(0)
    model = timm.create_model("sd_resnet50")
    convs, norms = _convs_and_norms(model)
    for conv in convs:
        fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
        expected = pytest.approx(math.sqrt(2.0 / fan_out), rel=6 / math.sqrt(conv.weight.numel()))
        assert conv.weight.std().item() == expected
    assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any() for bn in norms)
    assert not model.fc.bias.any()


def test_resnet1202_is_finite_in_eval_at_init():
    torch.manual_seed(0)
    model = timm.create_model("sd_resnet1202_cifar").eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


# -- timm's own model tests ----------------------------------------------------------------------------
def _timm_sdist_tests(cache: Path) -> Path:
    """tests/test_models.py of the installed timm, from its source distribution (fetched once by pip)."""
    version = timm.__version__
    root = cache / f"timm-{version}"
    if not (root / "tests" / "test_models.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"timm=={version}",
             "-d", str(cache)], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"could not fetch timm {version}'s source distribution:\n{proc.stderr[-2000:]}")
        with tarfile.open(cache / f"timm-{version}.tar.gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"timm-{version}/tests/")
                       or m.name == f"timm-{version}/pyproject.toml"]
            tar.extractall(cache, members=members, filter="data")
    return root


_TIMM_SUITE_FILTER = "sd_resnet and not torchscript"
TIMM_TEST_TIMEOUT_S = 120  # timm marks its model tests with a 120 s timeout (pytest-timeout, when installed)
# timm's test_model_load_pretrained and test_model_features_pretrained download the weights of every tag that
# has some: sd_resnet50/101/152 carry timm's Hub weights (sdzoo.files.pretrained), and the tests have no network.
# Their loading is tested against the loopback Hub in test_pretrained.py.
_TIMM_SUITE_SKIP_DOWNLOADS = " and not load_pretrained and not features_pretrained"


def _cfg_tests_left_out() -> str:
    """timm's cfg test runs on every tag, and builds the network each time. Two sets of tags repeat a test
    that runs anyway, so each runs on one of its tags:

    - the tags of timm's weights differ from each other only in data settings: the first of them for each
      architecture (and the zoo's own in1k tags);
    - sd_resnet1202_cifar's tags come from the same ``_cifar_cfgs`` as the shallower CIFAR models', which run
      them all, and its network costs about 20 s a tag: its default tag.
    """
    from sdzoo.files.pretrained import TIMM_TWINS

    deepest = "sd_resnet1202_cifar"
    deepest_default = f"{deepest}.{timm.models.get_pretrained_cfg(deepest).tag}"
    tags = {arch: timm.list_pretrained(f"{arch}.*") for arch in TIMM_TWINS}
    left_out = [name for names in tags.values() for name in names[1:]]
    left_out += [name for name in timm.list_models(deepest, include_tags=True) if name != deepest_default]
    kept = [names[0] for names in tags.values()] + [f"{arch}.in1k" for arch in TIMM_TWINS] + [deepest_default]
    assert len(left_out) > 2, "the zoo's tags are not what this selection expects"
    # -k matches substrings: no name left out may be part of a kept one
    assert not [(a, b) for a in left_out for b in kept if a in b], "a tag left out is part of a kept one"
    return f" and not (default_cfgs and ({' or '.join(left_out)}))"


@pytest.mark.slow
@pytest.mark.timeout(2400)  # fetching timm's sdist (up to 600 s), then timm's suite (up to 1500 s)
@pytest.mark.network
def test_timm_model_suite_passes_on_the_zoo(tmp_path):
    # TorchScript tests are left out: the gates draw with a torch.Generator and decide in Python, which
    # torch.jit.script cannot compile; TorchScript is deprecated in favour of torch.export, which works.
    cache = Path(os.environ.get("SDZOO_TIMM_SDIST_CACHE", Path.home() / ".cache" / "sdzoo" / "timm-sdist"))
    root = _timm_sdist_tests(cache)
    selection = _TIMM_SUITE_FILTER + _TIMM_SUITE_SKIP_DOWNLOADS + _cfg_tests_left_out()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(root), "--durations=3",
         "--durations-min=0", str(root / "tests" / "test_models.py"), "-k", selection],
        capture_output=True, text=True, timeout=1500, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"))
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-6000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 59 and not re.search(r"failed|skipped|error", summary), summary
    # every test inside timm's own timeout, sd_resnet1202_cifar's FX and cfg tests included
    slowest = max(float(t) for t in re.findall(r"^([\d.]+)s (?:call|setup|teardown)", proc.stdout, re.M))
    assert slowest < TIMM_TEST_TIMEOUT_S, proc.stdout[-3000:]


# -- timm's scripts, unedited: SDZOO_CONVERT_DROP_PATH -----------------------------------------------------------
CONVERTED_BY_ENV = textwrap.dedent("""
    import json, warnings
    import timm  # no import of sdzoo: the start-up hook registers it, and it reads the environment
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        converted = timm.create_model("resnet26", drop_path_rate=0.2, num_classes=3)
        plain = timm.create_model("resnet26", num_classes=3)
        zoo = timm.create_model("sd_resnet20_cifar")
        masks_only = timm.create_model("rdnet_tiny", drop_path_rate=0.2, device="meta")
    print(json.dumps(dict(
        gates=len(converted.drop_path_sampler.survival_probs), mode=converted.drop_path_sampler.mode,
        seed=converted.drop_path_sampler.seed, plain=hasattr(plain, "drop_path_sampler"),
        zoo=hasattr(zoo, "drop_path_sampler"), masks_only=hasattr(masks_only, "drop_path_sampler"),
        warnings=[str(w.message) for w in caught])))
""")


def run_with_env(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env))


@pytest.mark.parametrize("mode", ["sample", "batch"])
def test_the_environment_converts_every_timm_create_model(mode):
    proc = run_with_env(CONVERTED_BY_ENV, SDZOO_CONVERT_DROP_PATH=mode, SDZOO_CONVERT_SEED="7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["gates"] == 6 and result["mode"] == mode and result["seed"] == 7  # rates below 0.05 stay masks
    assert not result["plain"] and not result["zoo"] and not result["masks_only"]
    assert any("rdnet_tiny keeps timm's drop-path masks" in w for w in result["warnings"]), result["warnings"]
    assert f"SDZOO_CONVERT_DROP_PATH={mode}: resnet26 converted, 6 branches on gates (seed 7)" in proc.stderr


@pytest.mark.parametrize("env,match", [
    (dict(SDZOO_CONVERT_DROP_PATH="row"), "SDZOO_CONVERT_DROP_PATH must be one of 'sample', 'batch'"),
    (dict(SDZOO_CONVERT_DROP_PATH="batch", SDZOO_CONVERT_SEED="x"), "SDZOO_CONVERT_SEED must be an integer"),
])
def test_a_bad_environment_setting_names_itself(env, match):
    proc = run_with_env("import timm; timm.create_model('resnet26', drop_path_rate=0.2, device='meta')", **env)
    assert proc.returncode != 0 and match in proc.stderr, proc.stderr[-2000:]


def test_without_the_setting_nothing_is_converted():
    proc = run_with_env("import timm; m = timm.create_model('resnet26', drop_path_rate=0.2, device='meta'); "
                        "print(hasattr(m, 'drop_path_sampler'))", SDZOO_CONVERT_DROP_PATH="off")
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]


TIMM_TRAIN_PY = os.environ.get("SDZOO_TIMM_TRAIN_PY")


@pytest.mark.slow
@pytest.mark.timeout(900)  # timm's train.py in a subprocess (up to 600 s)
@pytest.mark.skipif(not TIMM_TRAIN_PY, reason="timm's train.py is not in timm's distributions: set SDZOO_TIMM_TRAIN_PY "
                                              "to a copy of pytorch-image-models' train.py to run it")
@pytest.mark.parametrize("mode", ["sample", "batch"])
def test_timms_own_train_py_trains_a_converted_model(tmp_path, mode):
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "validation"):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(8):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "data" / split / label / f"{i}.png")
    proc = subprocess.run(
        [sys.executable, TIMM_TRAIN_PY, str(tmp_path / "data"), "--model", "convnext_atto", "--drop-path", "0.3",
         "--epochs", "2", "-b", "4", "--num-classes", "2", "--input-size", "3", "32", "32", "--workers", "0",
         "--device", "cpu", "--model-ema", "--output", str(tmp_path / "out"), "--warmup-epochs", "0"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1", SDZOO_CONVERT_DROP_PATH=mode))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"SDZOO_CONVERT_DROP_PATH={mode}: convnext_atto converted, 10 branches on gates" in proc.stderr
    summary = (next((tmp_path / "out").glob("*/summary.csv"))).read_text().splitlines()
    assert len(summary) == 3  # a header and both epochs
