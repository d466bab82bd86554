"""No wrong model ever loads, publishes or exports with exit 0: weights checked against config.json (classes,
survival settings, folded or not), NaN or infinite values, hostile configs and safetensors headers bounded
before anything is built or read.
"""
import os
import re
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

import sdzoo.cli.export
from sdzoo.export import onnx_export
from sdzoo.files.run_folder import CONFIG_NAME, WEIGHTS_NAME
from sdzoo.files.weights import (
    MAX_BLOCKS, MAX_HEADER_BYTES, MAX_TENSORS, WeightsError, count_parameters, read_header, read_weights_settings,
    save_weights)
from sdzoo.fold import fold_survival
from sdzoo.hub import upload as hub

from hub_server import FakeHub
from helpers import ROOT, edit_config, exit_code, random_resnet20, snapshot, write_run_folder

# huggingface_hub's own LFS upload passes a file object as data=, which its HTTP library flags.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model.eval()(X)


def refused_everywhere(folder: Path, tmp_path: Path, capsys, expected: str):
    """local-dir: loading, load_run, publishing and exporting all refuse the folder, and leave no file."""
    before = snapshot(folder)
    with pytest.raises(WeightsError, match=expected):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    with pytest.raises(hub.CheckpointMismatchError, match=expected):
        hub.load_run(folder)
    with pytest.raises(hub.CheckpointMismatchError, match=expected):
        hub.publish(folder, "tester/wrong", local_dir=tmp_path / "hub")
    code = exit_code(sdzoo.cli.export.main, ["--model", f"local-dir:{folder}", "--output",
                                                       str(tmp_path / "wrong.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and re.search(expected, err) and "Traceback" not in err
    assert not (tmp_path / "hub").exists() and not (tmp_path / "wrong.onnx").exists()
    assert snapshot(folder) == before


def test_a_config_with_other_classes_never_loads_a_random_head(tmp_path, capsys):
    model = random_resnet20(survival_prob=0.7)
    folder = write_run_folder(model, tmp_path / "run")
    torch.testing.assert_close(logits(timm.create_model(f"local-dir:{folder}", pretrained=True)), logits(model),
                               rtol=0, atol=0)
    # model_args (today's config.json), the top level (timm's own place for it) and the pretrained cfg.
    wrong_places = (("model_args", lambda c: (c["model_args"].update(num_classes=100), c.update(num_classes=100))),
                    ("top level", lambda c: (c["model_args"].pop("num_classes", None), c.update(num_classes=100))))
    for where, change in wrong_places:
        wrong = tmp_path / where.replace(" ", "_")
        wrong.mkdir()
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            (wrong / name).write_bytes((folder / name).read_bytes())
        edit_config(wrong, change)
        refused_everywhere(wrong, tmp_path, capsys, r"num_classes=100 \(.*model.safetensors holds num_classes=10\)")
    # model_args keep 10 and the top level says 100: timm would drop the head
    edit_config(folder, lambda c: (c["model_args"].update(num_classes=10), c.update(num_classes=100)))
    refused_everywhere(folder, tmp_path, capsys, r"num_classes=100 for the pretrained cfg and builds num_classes=10|"
                                                 r"model_args\['num_classes'\] = 10 disagrees with num_classes = 100")
    # A caller's own num_classes is no way around it either: never a non-strict head drop.
    edit_config(folder, lambda c: c.update(num_classes=10))
    with pytest.raises(WeightsError, match=r"num_classes=5 \("):
        timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=5)
    with pytest.raises(WeightsError, match="pretrained_strict must be True"):
        timm.create_model(f"local-dir:{folder}", pretrained=True, pretrained_strict=False)


HOSTILE_HF_CHILD = """
import sys, timm, sdzoo
from sdzoo.files.weights import WeightsError
try:
    timm.create_model("hf-hub:" + sys.argv[1], pretrained=True)
except WeightsError as e:
    print("refused:", e)
else:
    print("loaded")
"""


@pytest.mark.slow
@pytest.mark.timeout(900)  # two loads in subprocesses (up to 300 s each)
def test_a_hub_repo_of_other_classes_or_folded_weights_is_refused_over_hf_hub(tmp_path, monkeypatch,
                                                                                        hub_token):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    model = random_resnet20(survival_prob=0.7)
    wrong_classes = write_run_folder(model, tmp_path / "classes")
    edit_config(wrong_classes, lambda c: c["model_args"].update(num_classes=100))
    folded_weights = write_run_folder(model, tmp_path / "folded")
    save_weights(folded_weights / WEIGHTS_NAME, fold_survival(random_resnet20(survival_prob=0.7)))
    with FakeHub(tokens={hub_token: "tester"}) as server:
        api = huggingface_hub.HfApi(endpoint=server.url, token=hub_token)
        for folder in (wrong_classes, folded_weights):  # uploaded as a hostile repo would be, not by sdzoo
            api.create_repo(f"tester/{folder.name}")
            api.upload_folder(repo_id=f"tester/{folder.name}", folder_path=folder)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   OMP_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1")
        for folder, expected in ((wrong_classes, "num_classes=100 ("),
                                 (folded_weights, "an unfolded model, while the file's weights are folded")):
            proc = subprocess.run([sys.executable, "-c", HOSTILE_HF_CHILD, f"tester/{folder.name}"], env=env,
                                  capture_output=True, text=True, timeout=300, cwd=ROOT)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.startswith("refused:") and expected in proc.stdout, proc.stdout


def test_weights_whose_settings_contradict_config_are_refused_naming_both(tmp_path, capsys):
    folder = write_run_folder(random_resnet20(survival_prob=0.7), tmp_path / "run")
    edit_config(folder, lambda c: c["model_args"].update(survival_prob=0.3, scaling="inverted"))
    refused_everywhere(folder, tmp_path, capsys,
                       r"survival_prob=0\.3 \(the file's: 0\.7\); scaling='inverted' \(the file's: 'expectation'\)")
    # The evidence survives: the weights' metadata still says what they were trained with.
    assert read_weights_settings(folder / WEIGHTS_NAME)["model_args"]["survival_prob"] == 0.7


def test_folded_and_unfolded_weights_never_mix(tmp_path, capsys):
    model = random_resnet20(survival_prob=0.5)
    expected = logits(model)
    folded = fold_survival(random_resnet20(survival_prob=0.5))
    folded_file, plain_file = tmp_path / "folded.safetensors", tmp_path / "plain.safetensors"
    save_weights(folded_file, folded)
    save_weights(plain_file, model)
    assert read_weights_settings(folded_file)["model_args"]["folded_from"] == folded.folded_from

    overlay = lambda path: dict(file=str(path))  # noqa: E731  timm's documented way to load a file
    with pytest.raises(WeightsError, match="an unfolded model, while the file's weights are folded"):
        timm.create_model("sd_resnet20_cifar", num_classes=10, pretrained=True,
                          pretrained_cfg_overlay=overlay(folded_file))
    with pytest.raises(WeightsError, match="while the file's weights are not folded"):
        timm.create_model("sd_resnet20_cifar", num_classes=10, folded_from=folded.folded_from, pretrained=True,
                          pretrained_cfg_overlay=overlay(plain_file))
    right = timm.create_model("sd_resnet20_cifar", num_classes=10, folded_from=folded.folded_from, pretrained=True,
                              pretrained_cfg_overlay=overlay(folded_file))
    torch.testing.assert_close(logits(right), expected, rtol=0, atol=1e-5)

    # The export of a folded file never folds it again: what it computes is what the trained model computes.
    script = sdzoo.cli.export
    flags = ["--survival-prob", "0.5", "--survival-rule", "linear", "--scaling", "expectation", "--gate-mode", "batch"]
    code = exit_code(script.main, ["--model", "sd_resnet20_cifar", "--checkpoint", str(folded_file), *flags,
                                   "--output", str(tmp_path / "twice.onnx")])
    assert code == 2 and "--gate-mode batch (the checkpoint's: off)" in capsys.readouterr().err
    bare = tmp_path / "bare.safetensors"  # folded, written elsewhere: nothing in it says so
    save_file(folded.state_dict(), str(bare))
    code = exit_code(script.main, ["--model", "sd_resnet20_cifar", "--checkpoint", str(bare), *flags,
                                   "--output", str(tmp_path / "twice.onnx")])
    assert code == 2 and "--checkpoint-folded" in capsys.readouterr().err
    assert not (tmp_path / "twice.onnx").exists()
    for source, extra in ((folded_file, []), (bare, [*flags, "--checkpoint-folded", "yes"])):
        output = tmp_path / f"{source.stem}.onnx"
        assert script.main(["--model", "sd_resnet20_cifar", "--checkpoint", str(source), *extra, "--output",
                            str(output), "--verify-batch-sizes", "1"]) == 0
        got = onnx_export.predict_onnx(output, X.numpy())
        assert abs(got - expected.numpy()).max() <= 1e-4, source


def test_nan_or_infinite_weights_are_never_published_or_exported(tmp_path, capsys):
    for value in (float("nan"), float("inf")):
        model = random_resnet20()
        model.layer2[1].bn2.weight.data[3] = value
        folder = write_run_folder(model, tmp_path / f"run_{value}")
        refused_everywhere(folder, tmp_path, capsys, r"holds NaN or infinite values in 1 tensor\(s\) "
                                                     r"\(layer2\.1\.bn2\.weight\)")
        code = exit_code(sdzoo.cli.export.main, [
            "--model", "sd_resnet20_cifar", "--checkpoint", str(folder / WEIGHTS_NAME), "--output",
            str(tmp_path / "nan.onnx")])
        assert code == 2 and "NaN or infinite" in capsys.readouterr().err
        assert not (tmp_path / "nan.onnx").exists()


def test_a_hostile_config_is_refused_in_under_a_second(tmp_path):
    folder = write_run_folder(random_resnet20(), tmp_path / "run")
    hostile = {
        "layers [3, 3, 300000]": lambda c: c["model_args"].update(layers=[3, 3, 300000]),
        "num_classes 2e6": lambda c: c["model_args"].update(num_classes=2_000_000),
        "widths": lambda c: c["model_args"].update(widths=[16, 32, 1_000_000]),
        "in_chans": lambda c: c["model_args"].update(in_chans=100_000),
        "block and stem": lambda c: c["model_args"].update(block="bottleneck", stem="imagenet"),  # within bounds
    }
    original = (folder / CONFIG_NAME).read_text()
    for name, change in hostile.items():
        (folder / CONFIG_NAME).write_text(original)
        edit_config(folder, change)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for pretrained in (True, False) if name != "block and stem" else (True,):
            start = time.perf_counter()
            with pytest.raises(ValueError):
                timm.create_model(f"local-dir:{folder}", pretrained=pretrained)
            assert time.perf_counter() - start < 1.0, name
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 50_000, name  # KiB: nothing large built


def test_the_parameter_bound_counts_what_the_constructor_builds():
    for name, kwargs in (("sd_resnet20_cifar", {}), ("sd_resnet56_cifar", dict(shortcut="projection", num_classes=7)),
                         ("sd_resnet50", dict(global_pool="catavgmax", in_chans=1)),
                         ("sd_resnet101", dict(num_classes=0))):
        model = timm.create_model(name, device="meta", **kwargs)
        blocks = model.residual_blocks()
        block = "bottleneck" if hasattr(blocks[0], "conv3") else "basic"
        layers = [len(getattr(model, s)) for s in model.stage_names]
        widths = [getattr(model, s)[0].conv1.out_channels for s in model.stage_names]
        counted = count_parameters(layers, widths, block, model.stem, kwargs.get("shortcut", "zero_pad" if
                                   model.stem == "cifar" else "projection"), model.num_classes, model.in_chans,
                                   kwargs.get("global_pool", "avg"))
        assert counted == sum(p.numel() for p in model.parameters()), name


def test_a_safetensors_header_beyond_any_zoo_model_is_refused_unparsed(tmp_path):
    """The header's length (its first 8 bytes) is read first and bounded by what the largest zoo model needs;
    then the tensor count. A 60 MB header is refused without reading it, as is one within the size bound that
    lists more tensors than any sdzoo model has; every door reads headers through the same function."""
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 60_000_000) + b"{" + b" " * 1000)  # the rest of the 60 MB never comes
    with pytest.raises(WeightsError, match=r"header is 60,000,000 bytes, more than the .* refused without reading"):
        read_header(huge)
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(MAX_TENSORS + 1))
    header = ("{" + entries + "}").encode()
    assert len(header) < MAX_HEADER_BYTES
    many = tmp_path / "many.safetensors"
    many.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(WeightsError, match=f"holds {MAX_TENSORS + 1:,} tensors, more than the {MAX_TENSORS:,}"):
        read_header(many)
    # the largest model the bounds allow fits: MAX_BLOCKS bottleneck blocks of 18 tensors, stem and head
    assert MAX_TENSORS > MAX_BLOCKS * 18 + 10
    # a run folder with the huge file is refused by the loaders that read it
    folder = write_run_folder(random_resnet20(), tmp_path / "run")
    (folder / WEIGHTS_NAME).write_bytes(huge.read_bytes())
    with pytest.raises(WeightsError, match="refused without reading it"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    with pytest.raises(ValueError, match="refused without reading it"):
        read_weights_settings(folder / WEIGHTS_NAME)
