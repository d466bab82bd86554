"""Weights to download: sd_resnet50/101/152 carry a tag for each of timm's Hub weights of resnet50/101/152,
and load them through timm's own Hub path into exactly the pretrained network.

Nothing is downloaded: ``FakeHub`` (tests/hub_server.py) serves generated resnet50 weights, in timm's layout
and as safetensors, under the repo id that the tag names, to a fresh interpreter pointed at it. Also here:
every config.json that sdzoo writes keeps num_classes out of model_args.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import save, save_file

import timm

from hub_server import FakeHub, trickling_weights_hub
from helpers import ROOT, TOKEN, randomize_batchnorm
from sdzoo.files import pretrained
from sdzoo.hub.upload import publish
from sdzoo.files.pretrained import NoPretrainedWeightsError


pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


def timm_hub_tags(architecture):
    """The tags of timm's weights of ``architecture`` that are on the Hub, from timm's registry."""
    return {name.split(".", 1)[1] for name in timm.list_pretrained(f"{architecture}.*")
            if timm.get_pretrained_cfg(name).hf_hub_id}


def tags(architecture):
    return {name.split(".", 1)[1] for name in timm.list_pretrained(f"{architecture}.*")}


# -- the tags ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture,twin", sorted(pretrained.TIMM_TWINS.items()))
def test_tags_are_timms_hub_weights_of_the_same_network(architecture, twin):
    assert tags(architecture) == timm_hub_tags(twin)
    assert len(tags(architecture)) >= 5  # resnet50 alone has 19 in timm 1.0.31
    for tag in tags(architecture):
        ours, theirs = timm.get_pretrained_cfg(f"{architecture}.{tag}"), timm.get_pretrained_cfg(f"{twin}.{tag}")
        assert ours.hf_hub_id == theirs.hf_hub_id and ours.hf_hub_filename == "model.safetensors"
        assert not ours.url and not ours.file  # the Hub and safetensors only: no pickle fallback
        for field in ("input_size", "test_input_size", "crop_pct", "interpolation", "mean", "std", "num_classes",
                      "license", "origin_url", "paper_ids"):
            assert getattr(ours, field) == getattr(theirs, field), (tag, field)
        # where the weights come from, in the cfg
        assert f"timm's {twin}.{tag} weights (Hub repo {theirs.hf_hub_id})" in ours.description
        assert any(theirs.hf_hub_id in note for note in ours.notes)
        assert pretrained.TIMM_WEIGHTS[f"{architecture}.{tag}"] == f"{twin}.{tag}"


def test_the_resnet50_tags_are_timms_resnet50_tags_with_weights():
    listed = timm.list_pretrained("sd_resnet50*")
    assert {"sd_resnet50.a1_in1k", "sd_resnet50.tv2_in1k"} <= set(listed)
    assert [name.split(".", 1)[1] for name in listed] == [
        name.split(".", 1)[1] for name in timm.list_pretrained("resnet50.*") if timm.get_pretrained_cfg(name).hf_hub_id]


@pytest.mark.parametrize("architecture", sorted(pretrained.TIMM_TWINS))
def test_default_tag_stays_the_weightless_in1k(architecture):
    assert timm.get_pretrained_cfg(architecture).tag == "in1k"
    assert timm.create_model(architecture).scaling == "expectation"
    with pytest.raises(NoPretrainedWeightsError, match=rf"{architecture}\.in1k.*{architecture}\.\w+ .*pretrained=True"):
        timm.create_model(architecture, pretrained=True)


def test_timm_weights_tags_default_to_inverted_scaling():
    name = f"sd_resnet50.{sorted(tags('sd_resnet50'))[0]}"
    assert timm.create_model(name).scaling == "inverted"
    assert timm.create_model(name, scaling="expectation").scaling == "expectation"  # a given value wins
    assert timm.create_model("sd_resnet110_cifar.cifar10").scaling == "expectation"


def test_eval_network_is_timms_resnet_for_any_survival_prob():
    """With inverted scaling the eval network has no p_l in it: it is the pretrained network."""
    torch.manual_seed(0)
    theirs = randomize_batchnorm(timm.create_model("resnet50")).eval()
    name = f"sd_resnet50.{sorted(tags('sd_resnet50'))[0]}"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x)
        for survival_prob in (0.5, 0.8):
            ours = timm.create_model(name, survival_prob=survival_prob).eval()
            ours.load_state_dict(theirs.state_dict(), strict=True)
            assert torch.equal(ours(x), expected)
    # and the expectation scaling of the paper would not be: p_l multiplies each branch at eval
    paper = timm.create_model(name, scaling="expectation").eval()
    paper.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        assert not torch.allclose(paper(x), expected)


# -- pretrained=True through timm's Hub path ------------------------------------------------------------
LOAD_CHILD = """
import sys
import torch, timm
from safetensors.torch import load_file
name, io_path, weights_path = sys.argv[1:4]
io, weights = load_file(io_path), load_file(weights_path)
model = timm.create_model(name, pretrained=True).eval()
# the reference is timm's resnet50 on the same weights, run here: the same process and thread count, so the
# comparison is bit-exact (a parent with another thread count rounds differently)
reference = timm.create_model("resnet50").eval()
reference.load_state_dict(weights)
with torch.no_grad():
    out, expected = model(io["x"]), reference(io["x"])
assert torch.equal(out, expected), (out - expected).abs().max()
assert model.scaling == "inverted", model.scaling
# fine-tuning: a new head for 10 classes, every other tensor the pretrained one. A load accounts for every
# tensor of the file (sdzoo.files.weights), so the head is replaced after it, not dropped by timm's loader.
try:
    timm.create_model(name, pretrained=True, num_classes=10)
    raise SystemExit("a load that drops the file's head was not refused")
except ValueError as e:
    assert "num_classes=10" in str(e), e
tuned = timm.create_model(name, pretrained=True)
tuned.reset_classifier(10)
state = tuned.state_dict()
assert state["fc.weight"].shape == (10, 2048)
assert all(torch.equal(state[k], v) for k, v in weights.items() if not k.startswith("fc.")), "trunk differs"
tuned.train()
tuned(torch.randn(2, 3, 64, 64))
print(type(model).__name__, model.pretrained_cfg["hf_hub_id"], model.pretrained_cfg["tag"])
"""


@pytest.mark.slow
def test_pretrained_true_downloads_timms_weights_from_the_hub(tmp_path, monkeypatch):
    tag = next(t for t in sorted(tags("sd_resnet50")) if timm.get_pretrained_cfg(f"resnet50.{t}").num_classes == 1000)
    repo_id = timm.get_pretrained_cfg(f"sd_resnet50.{tag}").hf_hub_id
    owner = repo_id.split("/")[0]
    torch.manual_seed(0)
    theirs = randomize_batchnorm(timm.create_model("resnet50")).eval()
    weights = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    save_file(weights, tmp_path / "weights.safetensors")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    save_file({"x": x}, tmp_path / "io.safetensors")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub(tokens={TOKEN: "uploader"}, orgs={"uploader": [owner]}) as server:
        api = HfApi(endpoint=server.url, token=TOKEN)
        api.create_repo(repo_id)
        api.upload_file(path_or_fileobj=save(weights), path_in_repo="model.safetensors", repo_id=repo_id)
        env = {k: v for k, v in os.environ.items()
               if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "SDZOO_DISABLE_AUTOLOAD", "HF_HUB_OFFLINE")}
        env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
        seen = len(server.requests)
        result = subprocess.run(
            [sys.executable, "-c", LOAD_CHILD, f"sd_resnet50.{tag}", str(tmp_path / "io.safetensors"),
             str(tmp_path / "weights.safetensors")],
            env=env, capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir())
        assert result.returncode == 0, result.stdout + result.stderr[-4000:]
        assert result.stdout.split() == ["SDResNet", repo_id, tag]
        downloads = [p for m, p in server.requests[seen:] if m == "GET" and "/resolve/" in p]
        assert downloads and all(p.startswith(f"/{repo_id}/resolve/") and p.endswith("/model.safetensors")
                                 for p in downloads), downloads  # safetensors only, never a pickle


# -- every config.json sdzoo writes ---------------------------------------------------------------------
def check_config(path):
    config = json.loads(Path(path).read_text())
    assert "num_classes" not in config.get("model_args", {}), path
    assert not {"in_chans", "global_pool"} & set(config.get("model_args", {})), path  # defaults here
    model = timm.create_model(f"local-dir:{Path(path).parent}", pretrained=True)
    assert model.num_classes == config["num_classes"]  # timm reads the top-level num_classes
    return config


def test_every_config_json_that_sdzoo_writes_keeps_num_classes_top_level(trained_run, tmp_path):
    run = trained_run
    config = check_config(run / "config.json")  # a run folder
    assert config["label_names"] == [str(i) for i in range(10)] and config["model_args"]["survival_prob"] == 0.5
    published = check_config(publish(run, "owner/r20", local_dir=tmp_path / "hub").local_dir / "config.json")
    assert published["label_names"] == config["label_names"]  # a Hub folder
    assert published["model_args"] == config["model_args"]


def test_no_other_writer_of_config_json():
    """Every config.json goes through sdzoo.files.hf_config: no other module of the package or the scripts calls
    timm's writers."""
    # a call or an import of one of timm's writers (comments may name them)
    writers = re.compile(r"^[^#\n]*\b(save_config_for_hf|save_for_hf|push_to_hf_hub)\b\s*(\(|,|$)", re.M)
    private = ROOT / "sdzoo" / "internals" / "timm_private.py"  # re-exports timm's config writer, calls nothing
    sources = [p for p in [*(ROOT / "sdzoo").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]
               if p.name != "hf_config.py" and p != private]
    assert len(sources) > 10 and writers.search((ROOT / "sdzoo" / "files" / "hf_config.py").read_text())
    offenders = [str(p.relative_to(ROOT)) for p in sources if writers.search(p.read_text())]
    assert offenders == []
    lines = [m.group(0).strip() for m in writers.finditer(private.read_text())]
    assert lines == ["from timm.models._hub import load_state_dict_from_path, save_config_for_hf"], lines


TRICKLE_CHILD = """
import sys, time
import timm
for name in sys.argv[1:]:
    started = time.monotonic()
    try:
        timm.create_model(name, pretrained=True)
        print(name, "loaded")
    except Exception as e:
        chain, error = [], e
        while error is not None:
            chain.append(f"{type(error).__name__}: {error}".replace(chr(10), " "))
            error = error.__cause__ or error.__context__
        print(name, f"{time.monotonic() - started:.1f}", " <- ".join(chain))
"""


@pytest.mark.slow
def test_a_hub_that_sends_a_byte_a_second_ends_the_load_within_its_bound(tmp_path, monkeypatch):
    """A pretrained tag (sdzoo's own download of timm's weights) and an hf-hub: repo (timm downloads its
    config.json before any sdzoo code runs) from a Hub that answers one byte a second: with $SDZOO_HUB_TIMEOUT
    each load ends in an error that says the request ran out of time, in seconds, not a hang of minutes."""
    tag = next(t for t in sorted(tags("sd_resnet50")) if timm.get_pretrained_cfg(f"resnet50.{t}").num_classes == 1000)
    timm_repo = timm.get_pretrained_cfg(f"sd_resnet50.{tag}").hf_hub_id
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    with trickling_weights_hub(TOKEN, timm_repo) as server:
        env = {k: v for k, v in os.environ.items()
               if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "SDZOO_DISABLE_AUTOLOAD", "HF_HUB_OFFLINE")}
        env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1", SDZOO_HUB_TIMEOUT="3")
        result = subprocess.run([sys.executable, "-c", TRICKLE_CHILD, f"sd_resnet50.{tag}", "hf-hub:owner/r20"],
                                env=env, capture_output=True, text=True, timeout=240, cwd=tempfile.gettempdir())
        assert server.hung, "no request reached the trickling answer"
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()[-2:]
    assert len(lines) == 2, result.stdout
    for line in lines:
        name, seconds, error = line.split(" ", 2)
        # each request of a load (at most three: the file's metadata, a retry, the download) ends at its 3 s
        assert float(seconds) < 30, line
        assert "did not end within 3 s" in error, line
    assert "downloading model.safetensors did not end within 3 s ($SDZOO_HUB_TIMEOUT" in lines[0]
