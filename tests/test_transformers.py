"""Run folders and Hub repos in transformers: ``AutoModelForImageClassification``, ``TimmWrapper`` and the
image-classification pipeline load what sdzoo writes, with timm's logits and the survival settings.

Nothing is downloaded: local folders load offline, and the Hub repo is served by ``FakeHub``
(tests/hub_server.py) on 127.0.0.1 to a fresh interpreter that points huggingface_hub at it.
"""
import ast
import json
import os
import re
import subprocess
import sys
import tempfile

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import timm
from timm.models import save_for_hf

from hub_server import FakeHub
from helpers import TOKEN, randomize_batchnorm
from sdzoo.files.run_folder import save_model_config
from sdzoo.files.weights import save_weights
from sdzoo.training.data import load_digits_split
from sdzoo.hub.upload import publish

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForImageClassification, TimmWrapperForImageClassification, pipeline  # noqa: E402

OWNER = "sdzoo-test"
# Not the defaults, so that settings lost on the way would show.
SURVIVAL = dict(survival_prob=0.7, survival_rule="uniform", gate_seed=3, scaling="expectation")
LABELS = [f"class {i}" for i in range(10)]

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


@pytest.fixture(autouse=True)
def offline(monkeypatch, hub_client):
    """Local folders only: the client may not reach any server, and no real login is read (``hub_client``)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def write_run_folder(path, name="sd_resnet20_cifar.cifar10", seed=0, **kwargs):
    """A run folder as the trainer writes it (``save_model_config`` + ``save_weights``), of a model whose
    BatchNorm statistics are not trivial, so that a lost buffer would show in the logits."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(timm.create_model(name, **{**SURVIVAL, **kwargs})).eval()
    path.mkdir(parents=True, exist_ok=True)
    data_config = timm.data.resolve_model_data_config(model) if model.in_chans == 3 else None  # timm's: RGB only
    save_model_config(path / "config.json", model, data_config,
                      tag=name.split(".")[1] if "." in name else None, label_names=LABELS)
    save_weights(path / "model.safetensors", model)
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "r20"
    write_run_folder(path)
    return path


def logits(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    return getattr(out, "logits", out)


def test_config_keeps_num_classes_out_of_model_args(run):
    config = json.loads((run / "config.json").read_text())
    assert config["num_classes"] == 10 and config["label_names"] == LABELS
    assert not {"num_classes", "in_chans", "global_pool"} & set(config["model_args"])
    assert {k: config["model_args"][k] for k in SURVIVAL} == SURVIVAL
    assert "label_names" not in config["pretrained_cfg"]


@pytest.mark.parametrize("loader", [AutoModelForImageClassification, TimmWrapperForImageClassification])
def test_run_folder_loads_in_transformers_with_timm_logits(run, loader):
    reference = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    model = loader.from_pretrained(str(run)).eval()
    assert type(model) is TimmWrapperForImageClassification
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(model, x), logits(reference, x))  # bit for bit
    inner = model.timm_model
    assert inner.stochastic_depth_args() == reference.stochastic_depth_args()
    assert {k: inner.stochastic_depth_args()[k] for k in SURVIVAL} == SURVIVAL
    assert inner.block_survival_probs() == reference.block_survival_probs()
    assert model.config.id2label == dict(enumerate(LABELS))


def test_non_default_in_chans_and_pool_stay_in_model_args(tmp_path):
    """Values other than the architecture's defaults stay in model_args, so both loaders rebuild them."""
    reference_model = write_run_folder(tmp_path / "run", in_chans=1, global_pool="max")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model_args"]["in_chans"] == 1 and config["model_args"]["global_pool"] == "max"
    assert "num_classes" not in config["model_args"]
    model = AutoModelForImageClassification.from_pretrained(str(tmp_path / "run"))
    x = torch.randn(2, 1, 32, 32)
    timm_model = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True)
    assert torch.equal(logits(model, x), logits(timm_model, x))
    assert torch.equal(logits(model, x), logits(reference_model, x))


def test_folder_of_timms_writer_fails_in_transformers_and_publishing_fixes_it(tmp_path):
    """timm's own writer puts num_classes into model_args (transformers then passes it twice); sdzoo's Hub folder
    of that run loads in transformers, and sdzoo's readers still load the old folder."""
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model("sd_resnet20_cifar", **SURVIVAL)).eval()
    save_for_hf(model, tmp_path / "old", safe_serialization=True)
    assert json.loads((tmp_path / "old" / "config.json").read_text())["model_args"]["num_classes"] == 10
    with pytest.raises(TypeError, match="multiple values for keyword argument 'num_classes'"):
        AutoModelForImageClassification.from_pretrained(str(tmp_path / "old"))

    publish(tmp_path / "old", f"{OWNER}/r20", local_dir=tmp_path / "hub")
    x = torch.randn(3, 3, 32, 32)
    loaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "hub"))
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert torch.equal(logits(timm.create_model(f"local-dir:{tmp_path / 'old'}", pretrained=True), x),
                       logits(model, x))


# -- a Hub repo ------------------------------------------------------------------------------------------
HUB_CHILD = """
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification
repo_id, io_path, survival = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = AutoModelForImageClassification.from_pretrained(repo_id).eval()
io = load_file(io_path)
with torch.no_grad():
    out = model(io["x"]).logits
assert torch.equal(out, io["out"]), (out - io["out"]).abs().max()
args = model.timm_model.stochastic_depth_args()
assert {k: args[k] for k in survival} == survival, args
# the model card's transformers usage, as a reader would paste it
from PIL import Image
image = Image.new("RGB", (32, 32), (200, 30, 90))
exec(sys.argv[4])
print("loaded", type(model).__name__, model.config.id2label[3])
"""


@pytest.mark.slow
def test_hub_repo_loads_in_transformers_with_timm_logits(run, tmp_path, monkeypatch):
    repo_id = f"{OWNER}/sd_resnet20_cifar.cifar10"
    with FakeHub(tokens={TOKEN: "tester"}, orgs={"tester": [OWNER]}) as server:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        publish(run, repo_id, token=TOKEN, endpoint=server.url)
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        reference = timm.create_model(f"local-dir:{run}", pretrained=True)
        save_file({"x": x, "out": logits(reference, x)}, tmp_path / "io.safetensors")
        env = {k: v for k, v in os.environ.items()
               if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "SDZOO_DISABLE_AUTOLOAD", "HF_HUB_OFFLINE")}
        env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
        card = server.files(repo_id)["README.md"].decode()
        usage = re.search(r"```python\n(from transformers import pipeline\n.*?)```", card, re.S)
        assert usage and f'model="{repo_id}"' in usage.group(1), card
        result = subprocess.run(
            [sys.executable, "-c", HUB_CHILD, repo_id, str(tmp_path / "io.safetensors"), json.dumps(SURVIVAL),
             usage.group(1)],
            env=env, capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir())
        assert result.returncode == 0, result.stdout + result.stderr[-4000:]
        lines = result.stdout.strip().splitlines()
        assert lines[-1] == "loaded TimmWrapperForImageClassification class 3"
        top5 = ast.literal_eval(lines[-2])  # what the card's print shows
        assert len(top5) == 5 and all(answer["label"] in LABELS for answer in top5)
        downloads = [p for m, p in server.requests if m == "GET" and "/resolve/" in p]
        assert any(p.startswith(f"/{repo_id}/resolve/") and p.endswith("/model.safetensors")
                   for p in downloads), downloads


# -- the pipeline on digits ----------------------------------------------------------------------------
def digit_pictures():
    """The test digits as a user has pictures: 8-bit RGB images, and their labels."""
    images, labels = load_digits_split("test", 32)
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels], labels.tolist()


@pytest.mark.slow
def test_pipeline_classifies_digits_as_timm_does(trained_run):
    pictures, labels = digit_pictures()
    model = timm.create_model(f"local-dir:{trained_run}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    with torch.no_grad():
        timm_predictions = model(torch.stack([transform(p) for p in pictures])).argmax(-1).tolist()

    classifier = pipeline("image-classification", model=str(trained_run), device="cpu")
    answers = classifier(pictures, top_k=1, batch_size=32)
    predictions = [int(answer[0]["label"]) for answer in answers]  # the digits' class names are "0".."9"
    assert predictions == timm_predictions
    accuracy = np.mean(np.array(predictions) == np.array(labels))
    assert accuracy == np.mean(np.array(timm_predictions) == np.array(labels))
    assert accuracy > 0.5, f"accuracy {accuracy:.2f}: the model did not learn the digits (chance: 0.1)"


def test_class_names_that_do_not_fit_the_head_are_refused_or_dropped(tmp_path, run):
    model = timm.create_model(f"local-dir:{run}", pretrained=True)
    with pytest.raises(ValueError, match="label_names must name each of the model's 10 classes; got 3"):
        save_model_config(tmp_path / "config.json", model, None, label_names=["a", "b", "c"])
    assert not (tmp_path / "config.json").exists()
    model.reset_classifier(4)  # a new head: the folder's ten names are not its classes
    save_model_config(tmp_path / "config.json", model, None)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_classes"] == 4 and "label_names" not in config
    save_weights(tmp_path / "model.safetensors", model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(logits(AutoModelForImageClassification.from_pretrained(str(tmp_path)), x), logits(model, x))


# -- readers of config.json: the new layout and the old one -------------------------------------------
def test_readers_take_head_args_from_model_args_else_top_level_else_defaults(tmp_path, run):
    from sdzoo.files.run_folder import read_run_config
    from sdzoo.files.hf_config import head_args
    from sdzoo.hub.upload import CheckpointMismatchError, load_run

    new = json.loads((run / "config.json").read_text())
    assert head_args(new) == dict(num_classes=10, in_chans=3, global_pool="avg")
    old = dict(new, model_args=dict(new["model_args"], num_classes=10, in_chans=1, global_pool="max"))
    assert head_args(old) == dict(num_classes=10, in_chans=1, global_pool="max")
    bare = {"architecture": "sd_resnet20_cifar", "model_args": {"survival_prob": 0.5}}
    assert head_args(bare) == dict(in_chans=3, global_pool="avg")  # no classes recorded anywhere

    # a folder whose model_args and top level disagree on the classes is refused, naming the file
    folder = tmp_path / "disagree"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    (folder / "config.json").write_text(json.dumps(dict(new, model_args=dict(new["model_args"], num_classes=7))))
    with pytest.raises(ValueError, match=r"config.json: model_args\['num_classes'\] = 7 disagrees"):
        read_run_config(folder / "config.json")
    with pytest.raises(CheckpointMismatchError, match="disagrees"):
        load_run(folder)
    assert load_run(run).model.num_classes == 10


# -- what timm refuses, transformers refuses --------------------------------------------------------------
TRAINED_WITH = dict(survival_prob=0.5, survival_rule="linear", scaling="expectation", gate_mode="batch")


def tamper_config(**model_args):
    def tamper(folder):
        config = json.loads((folder / "config.json").read_text())
        config["model_args"].update(model_args)
        (folder / "config.json").write_text(json.dumps(config))
    return tamper


def tagged_architecture(folder):
    """A tag in the architecture's name, which transformers passes to timm as it is."""
    tamper_config(survival_prob=0.9)(folder)
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = "sd_resnet20_cifar.cifar10"
    (folder / "config.json").write_text(json.dumps(config))


def nan_weight(folder):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(folder / "model.safetensors")
    tensors["layer2.1.bn2.weight"][3] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata=metadata)


# Each folder: its config.json or weights changed after the trainer wrote them, and what the refusal names.
TAMPERED = {
    "folded_from on unfolded weights": (tamper_config(folded_from=TRAINED_WITH), "the file's weights are not folded"),
    "survival_prob 0.9 against 0.5": (tamper_config(survival_prob=0.9), r"survival_prob=0.9 \(the file's: 0.5\)"),
    "scaling": (tamper_config(scaling="inverted"), r"scaling='inverted' \(the file's: 'expectation'\)"),
    "survival_rule": (tamper_config(survival_rule="uniform"), r"survival_rule='uniform' \(the file's: 'linear'\)"),
    "gate_mode": (tamper_config(gate_mode="sample"), r"gate_mode='sample' \(the file's: 'batch'\)"),
    "NaN weights": (nan_weight, r"NaN or infinite values in 1 tensor\(s\) \(layer2.1.bn2.weight\)"),
    "a tag in the architecture": (tagged_architecture, r"survival_prob=0.9 \(the file's: 0.5\)"),
}


def tampered_folders(root):
    folders = {}
    for case, (tamper, expected) in TAMPERED.items():
        folder = root / case.replace(" ", "_")
        write_run_folder(folder, **TRAINED_WITH)
        tamper(folder)
        folders[case] = (folder, expected)
    return folders


def test_transformers_refuses_every_folder_that_timm_refuses(tmp_path):
    """The folders that timm, the export and publishing refuse: transformers builds the model with
    pretrained=False and sets the tensors itself, and the model factory checks that file first, so each of
    AutoModelForImageClassification, TimmWrapperForImageClassification and the pipeline refuses them, naming
    the contradiction, with nothing loaded."""
    from sdzoo.files.weights import WeightsError

    for folder, expected in tampered_folders(tmp_path).values():
        with pytest.raises(WeightsError, match=expected):
            timm.create_model(f"local-dir:{folder}", pretrained=True)
        for loader in (AutoModelForImageClassification.from_pretrained,
                       TimmWrapperForImageClassification.from_pretrained):
            with pytest.raises(WeightsError, match=expected):
                loader(str(folder))
        with pytest.raises(Exception, match=expected):  # the pipeline wraps the error in its own ValueError
            pipeline("image-classification", model=str(folder))
    # and an untampered folder of the same settings loads, with timm's logits
    write_run_folder(tmp_path / "good", **TRAINED_WITH)
    model = AutoModelForImageClassification.from_pretrained(str(tmp_path / "good"))
    assert model.timm_model.weights_provenance.recorded["survival_prob"] == 0.5
    x = torch.randn(2, 3, 32, 32)
    reference = timm.create_model(f"local-dir:{tmp_path / 'good'}", pretrained=True)
    assert torch.equal(logits(model, x), logits(reference, x))


TAMPERED_CHILD = """
import json, sys
from transformers import AutoModelForImageClassification, TimmWrapperForImageClassification, pipeline
loaders = dict(auto=AutoModelForImageClassification.from_pretrained,
               wrapper=TimmWrapperForImageClassification.from_pretrained,
               pipeline=lambda repo: pipeline("image-classification", model=repo))
results = {}
for repo in json.loads(sys.argv[1]):
    for name, load in loaders.items():
        try:
            load(repo)
            results[f"{repo} {name}"] = "loaded"
        except Exception as e:
            results[f"{repo} {name}"] = str(e)
print(json.dumps(results))
"""


@pytest.mark.slow
def test_transformers_refuses_tampered_repos_served_by_the_hub(tmp_path, monkeypatch):
    """The same folders as Hub repos (uploaded as they are: publishing would refuse them), loaded by a fresh
    interpreter through the three doors of transformers: every load is refused, naming the contradiction."""
    folders = tampered_folders(tmp_path)
    repos = {}
    with FakeHub(tokens={TOKEN: "tester"}, orgs={"tester": [OWNER]}) as server:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        api = huggingface_hub.HfApi(endpoint=server.url, token=TOKEN)
        for folder, expected in folders.values():
            repo_id = f"{OWNER}/{folder.name.replace('.', '-')}"
            api.create_repo(repo_id)
            api.upload_folder(repo_id=repo_id, folder_path=folder)
            repos[repo_id] = expected
        env = {k: v for k, v in os.environ.items()
               if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "SDZOO_DISABLE_AUTOLOAD", "HF_HUB_OFFLINE")}
        env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, "-c", TAMPERED_CHILD, json.dumps(list(repos))], env=env,
                                capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stderr[-4000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(answers) == 3 * len(repos)
    for key, answer in answers.items():
        assert re.search(repos[key.split()[0]], answer), (key, answer[-600:])


@pytest.mark.parametrize("num_classes", [1e9, 10**9])
def test_load_run_vets_the_config_that_transformers_would_spend_gigabytes_on(tmp_path, num_classes):
    """transformers reads config.json's num_classes, and builds that many labels, before any sdzoo code runs;
    the check the README gives for an untrusted folder refuses it, naming the value, without building anything."""
    from sdzoo.hub.upload import CheckpointMismatchError, load_run

    write_run_folder(tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["num_classes"] = num_classes
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    expected = rf"num_classes must be an integer in \[0, 100000\]; got {num_classes!r}"
    with pytest.raises(CheckpointMismatchError, match=expected):
        load_run(tmp_path / "run")
