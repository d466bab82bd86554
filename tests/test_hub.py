"""Publishing to the Hub, model cards, and loading back by name with timm alone.

The Hub cannot be reached from the tests: they run the real huggingface_hub client against ``FakeHub``
(tests/hub_server.py), a Hub-compatible server on 127.0.0.1. Loading by name runs in fresh interpreters
that never import sdzoo, the way a user of the published model would.
"""
import functools
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile

import huggingface_hub
import huggingface_hub.lfs
import pytest
import safetensors.torch
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import save_file

import timm

from hub_server import FakeHub
from sdzoo.hub import upload as hub
from sdzoo.files import pretrained
from sdzoo.hub.upload import CheckpointMismatchError, MissingTokenError, UploadError, publish
from sdzoo.files.pretrained import NoPretrainedWeightsError, require_published_weights, with_published_weights
from sdzoo.hub.model_card import render_model_card
import sdzoo.cli.push
from helpers import SURVIVAL, TOKEN, make_run

OWNER = "sdzoo-test"

pytestmark = [
    # huggingface_hub's own LFS upload passes a file object as data=, which its HTTP library flags.
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning"),
    pytest.mark.usefixtures("hub_client"),
]


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def server():
    with FakeHub(tokens={TOKEN: "tester"}, orgs={"tester": [OWNER]}) as hub_server:
        yield hub_server


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    model = make_run(path)
    return path, model


@pytest.fixture(scope="module")
def published(server, run):
    repo_id = f"{OWNER}/sd_resnet20_cifar.cifar10"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        result = publish(run[0], repo_id, token=TOKEN, endpoint=server.url)
    return repo_id, result


def child_env(server, hf_home, **extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "SDZOO_DISABLE_AUTOLOAD", "HF_HUB_OFFLINE")}
    env.update(HF_ENDPOINT=server.url, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               **extra)
    return env


def run_child(code, env, *args):
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# -- publish, then load by name in fresh interpreters ---------------------------------------------------------
@pytest.mark.slow
def test_publish_uploads_timm_format_in_one_commit_and_verifies(published, server, run):
    repo_id, result = published
    files = server.files(repo_id)
    assert set(files) == {".gitattributes", "README.md", "config.json", "model.safetensors", "summary.json",
                          "metrics.jsonl", "curves.png"}
    assert server.commit_count(repo_id) == 2  # the repo's first commit, then everything at once
    assert result.files == {name: sha256(data) for name, data in files.items() if name != ".gitattributes"}
    assert result.commit_oid and result.commit_oid in result.commit_url
    config = json.loads(files["config.json"])
    assert config["architecture"] == "sd_resnet20_cifar"
    assert {k: config["model_args"][k] for k in SURVIVAL} == SURVIVAL
    summary = json.loads(files["summary.json"])
    assert "data_dir" not in summary["settings"] and "output" not in summary["settings"]  # no local paths
    assert summary["test_error"] == json.loads((run[0] / "summary.json").read_text())["test_error"]
    assert files["curves.png"] == (run[0] / "curves.png").read_bytes()
    # every file was checked against the Hub's hashes at the new commit, and none was downloaded to do it
    assert ("POST", f"/api/models/{repo_id}/paths-info/{result.commit_oid}") in server.requests
    assert not [p for m, p in server.requests if "/resolve/" in p]


@pytest.mark.slow
def test_verify_upload_names_a_file_the_hub_holds_otherwise(published, server, run, tmp_path):
    repo_id, result = published
    folder = tmp_path / "uploaded"
    folder.mkdir()
    for name, data in server.files(repo_id).items():
        if name != ".gitattributes":
            (folder / name).write_bytes(data)
    assert hub.verify_upload(folder, repo_id, result.commit_oid, endpoint=server.url) == result.files
    # One LFS file and one git file differ from what the commit holds; a third is not in the repo at all.
    (folder / "model.safetensors").write_bytes(b"other weights")
    (folder / "config.json").write_text("{}")
    (folder / "extra.txt").write_text("never uploaded")
    with pytest.raises(hub.VerificationError) as info:
        hub.verify_upload(folder, repo_id, result.commit_oid, endpoint=server.url)
    message = str(info.value)
    assert "config.json (git blob" in message and "model.safetensors (sha256" in message
    assert "extra.txt (missing)" in message and "README.md" not in message


LOAD_CHILD = """
import json, sys
assert not {"torch", "timm", "sdzoo"} & set(sys.modules), "start-up imported torch, timm or sdzoo"
import torch, timm
from safetensors.torch import load_file
repo_id, io_path, survival = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = timm.create_model("hf-hub:" + repo_id, pretrained=True).eval()
io = load_file(io_path)
with torch.no_grad():
    out = model(io["x"])
assert torch.equal(out, io["out"]), (out - io["out"]).abs().max()
args = model.stochastic_depth_args()
assert {k: args[k] for k in survival} == survival, args
assert model.block_survival_probs() == sorted(model.block_survival_probs(), reverse=True)
print("loaded", type(model).__name__, "sdzoo" in sys.modules)
"""


@pytest.mark.slow
def test_hf_hub_load_in_fresh_process_online_then_offline(published, server, run, tmp_path):
    repo_id, _ = published
    path, model = run
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    save_file({"x": x, "out": outputs(model, x)}, tmp_path / "io.safetensors")
    args = (repo_id, str(tmp_path / "io.safetensors"), json.dumps(SURVIVAL))

    env = child_env(server, tmp_path / "hf")
    assert run_child(LOAD_CHILD, env, *args).strip() == "loaded SDResNet True"
    assert ("GET", f"/{repo_id}/resolve/main/model.safetensors") in server.requests

    # Same again from the filled cache, offline: not one request reaches the server.
    seen = len(server.requests)
    assert run_child(LOAD_CHILD, dict(env, HF_HUB_OFFLINE="1"), *args).strip() == "loaded SDResNet True"
    assert len(server.requests) == seen


# -- no import needed: the start-up hook ------------------------------------------------------------------
REGISTRY_CHILD = """
import sys
hooked = "_sdzoo_autoload" in sys.modules
import timm
registered = timm.is_model("sd_resnet110_cifar")
print(hooked, "sdzoo" in sys.modules, registered)
if registered:
    model = timm.create_model("sd_resnet110_cifar")
    print(len(model.residual_blocks()), round(model.expected_depth(), 2))
import sdzoo  # an explicit import registers the zoo in any case
print(timm.is_model("sd_resnet110_cifar"))
"""


@pytest.mark.slow
def test_registered_without_import_and_off_switch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SDZOO_DISABLE_AUTOLOAD"}
    assert run_child(REGISTRY_CHILD, env).split() == ["True", "True", "True", "54", "40.25", "True"]
    off = run_child(REGISTRY_CHILD, dict(env, SDZOO_DISABLE_AUTOLOAD="1")).split()
    assert off == ["True", "False", "False", "True"]


def test_startup_hook_runs_and_imports_nothing_heavy():
    env = {k: v for k, v in os.environ.items() if k != "SDZOO_DISABLE_AUTOLOAD"}
    code = "import sys; print(sorted({'torch', 'timm', 'sdzoo', 'huggingface_hub'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env, capture_output=True, text=True)
    assert result.stdout.strip() == "[]"
    times = [int(line.split("|")[1]) for line in result.stderr.splitlines()
             if line.split("|")[-1].strip() == "_sdzoo_autoload"]
    assert times, "the start-up hook did not run: is sdzoo installed (pip install -e .)?"


# -- model card ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_model_card_front_matter_parses_with_results(published, server, run):
    repo_id, result = published
    summary = json.loads((run[0] / "summary.json").read_text())
    card_text = server.files(repo_id)["README.md"].decode()
    assert card_text == result.card
    card = ModelCard(card_text)
    assert card.data.library_name == "timm" and card.data.license == "apache-2.0"
    assert card.data.datasets == ["uoft-cs/cifar10"] and "accuracy" in card.data.metrics
    assert {"timm", "stochastic-depth"} <= set(card.data.tags)
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values["error"] == pytest.approx(summary["test_error"])
    assert values["accuracy"] == pytest.approx(100 - summary["test_error"])
    assert {r.dataset_type for r in card.data.eval_results} == {"uoft-cs/cifar10"}
    # the body: stochastic depth, settings, recipe, results with the paper's, usage, citation
    for needle in ("## Stochastic depth", "| survival probability of the last block, p_L | 0.7 |",
                   f"| this model (sd_resnet20_cifar) | CIFAR-10 | {summary['test_error']:.2f} | 9 of 12 |",
                   "| ResNet-110, CIFAR-10+, 500 epochs | 6.41 | 5.25 |",
                   "| ResNet-1202, CIFAR-10+, 500 epochs | 6.67 | 4.91 |", f'"hf-hub:{repo_id}"',
                   "onnxruntime", "Deep Networks with Stochastic Depth", "![Training curves](curves.png)"):
        assert needle in card_text, needle
    assert "private-data" not in card_text
    # what the Hub itself would read: the server parsed the same front matter into the model info
    info = huggingface_hub.HfApi(endpoint=server.url).model_info(repo_id)
    assert info.card_data.eval_results[0].metric_value == card.data.eval_results[0].metric_value


def test_model_card_puts_paper_results_beside_the_run():
    config = {"architecture": "sd_resnet110_cifar", "model_args": dict(SURVIVAL, survival_prob=0.5),
              "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}}
    summary = {"best_epoch": 401, "test_error": 5.61, "best_val_error": 5.3, "finished": False, "epochs_done": 450,
               "settings": {"dataset": "cifar100", "epochs": 500, "lr_drop_rule": "main.lua", "eval_every_steps": 0,
                            "num_classes": 10, "workers": 8}}
    text = render_model_card(f"{OWNER}/r110", config, summary, block_probs=[1.0] * 54, num_params=1_700_000,
                             files=["README.md", "config.json", "model.safetensors", "model.onnx", "extra.txt"],
                             file_notes=hub.FILE_NOTES, onnx_folded=True)
    assert "- `model.onnx`: the model in ONNX, p_l folded into the weights" in text
    assert "- `extra.txt`: extra file of the run" in text and "Training curves" not in text  # no curves.png
    assert "| this model (sd_resnet110_cifar) | CIFAR-100 | 5.61 | 401 of 500 |" in text
    assert "| paper, stochastic depth: ResNet-110, CIFAR-100+, 500 epochs | CIFAR-100 | 24.98 |" in text
    assert "| paper, constant depth: ResNet-110, CIFAR-100+, 500 epochs | CIFAR-100 | 27.76 |" in text
    assert "450 of 500 epochs" in text and f'hf_hub_download("{OWNER}/r110", "model.onnx")' in text
    # the recipe table: every setting that defines the run, none of how it ran (nor the synthetic-only classes)
    assert "| epochs | 500 |" in text and "| lr_drop_rule | main.lua |" in text and "| eval_every_steps | 0 |" in text
    assert "| workers |" not in text and "| num_classes |" not in text
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["model-index"][0]["results"][0]["metrics"][1]["value"] == 5.61
    with pytest.raises(ValueError, match="test_error"):
        render_model_card(f"{OWNER}/r110", config, {"best_epoch": 3, "settings": {"dataset": "cifar10"}},
                          block_probs=[1.0], num_params=1, files=[])


# -- --local-dir and the command line -------------------------------------------------------------------
@pytest.mark.slow
def test_local_dir_writes_the_same_folder_without_upload(server, run, tmp_path):
    path, model = run
    seen = len(server.requests)
    out = tmp_path / "out" / "repo"
    result = publish(path, f"{OWNER}/local", local_dir=out)
    assert len(server.requests) == seen
    assert sorted(os.listdir(out)) == sorted(result.files) == sorted(
        ["README.md", "config.json", "model.safetensors", "summary.json", "metrics.jsonl", "curves.png"])
    assert os.listdir(out.parent) == ["repo"]  # no staging folder left beside it
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(outputs(timm.create_model(f"local-dir:{out}", pretrained=True), x), outputs(model, x))
    with pytest.raises(FileExistsError, match="local_dir"):
        publish(path, f"{OWNER}/local", local_dir=out)


@pytest.mark.slow
def test_cli_publishes_private_repo_saves_card_and_never_shows_token(server, run, tmp_path, monkeypatch, capsys,
                                                                     caplog):
    cli = sdzoo.cli.push
    repo_id = f"{OWNER}/cli-private"
    common = ["--model", f"local-dir:{run[0]}", "--repo-id", repo_id, "--endpoint", server.url,
              "--card-dir", str(tmp_path / "cards")]
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_" + TOKEN)
    assert cli.main(common + ["--private"]) == 1
    assert "refused the token" in capsys.readouterr().err
    assert not (tmp_path / "cards").exists()

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli.main(common + ["--private"]) == 0
    assert server.repos[repo_id].private
    assert (tmp_path / "cards" / "cli-private.md").read_text() == server.files(repo_id)["README.md"].decode()
    captured = capsys.readouterr()
    assert "published" in captured.out
    for text in (captured.out, captured.err, caplog.text):
        assert TOKEN not in text


# -- clear errors, nothing half-written -----------------------------------------------------------------
@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "owner/has space", "owner/x--y", "owner/.hidden",
                                     "owner/" + "n" * 97, ""])
@pytest.mark.slow
def test_invalid_repo_id(server, run, tmp_path, repo_id):
    seen = len(server.requests)
    with pytest.raises(ValueError, match=r"repo_id must be 'owner/name'"):
        publish(run[0], repo_id, token=TOKEN, endpoint=server.url, local_dir=tmp_path / "out")
    assert len(server.requests) == seen and not (tmp_path / "out").exists()


@pytest.mark.parametrize("timeout", [0, -1.0, True, "5", None])
def test_a_timeout_that_is_no_number_of_seconds_fails_before_any_work(tmp_path, timeout):
    from sdzoo.export.latency import median_ms

    # the run folder does not exist either: the timeout is checked first
    with pytest.raises(ValueError, match=r"^timeout must be a positive number of seconds; got "):
        publish(tmp_path / "no-run", "owner/name", timeout=timeout, local_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"^min_run_time must be a positive number of seconds; got "):
        median_ms(lambda: None, min_run_time=timeout)


@pytest.mark.slow
def test_missing_token_fails_before_any_work(server, run):
    seen = len(server.requests)
    with pytest.raises(MissingTokenError, match=r"HF_TOKEN.*hf auth login"):
        publish(run[0], f"{OWNER}/no-token", endpoint=server.url)
    assert len(server.requests) == seen


@pytest.mark.slow
def test_checkpoint_that_does_not_fit(server, tmp_path):
    path = tmp_path / "run"
    make_run(path, extras=False)
    wrong = tmp_path / "wrong"
    make_run(wrong, name="sd_resnet20_cifar.cifar100", summary=False, extras=False)  # a 100-class head
    (path / "model.safetensors").write_bytes((wrong / "model.safetensors").read_bytes())
    seen = len(server.requests)
    with pytest.raises(CheckpointMismatchError, match=r"model.safetensors does not fit sd_resnet20_cifar as "
                                                      r"described by .*config.json: num_classes=10 \(.*"
                                                      r"model.safetensors holds num_classes=100\)"):
        publish(path, f"{OWNER}/mismatch", token=TOKEN, endpoint=server.url)
    with pytest.raises(CheckpointMismatchError):
        publish(path, f"{OWNER}/mismatch", local_dir=tmp_path / "out")
    assert len(server.requests) == seen and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "wrong"]


class _Tripwire:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this runs code: it must never happen
        return os.mkdir, (self.marker,)


@pytest.mark.slow
def test_pickle_checkpoints_are_never_loaded(server, tmp_path):
    path = tmp_path / "run"
    make_run(path, extras=False)
    (path / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(str(marker))))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin found: pickle checkpoints are neither loaded"):
        publish(path, f"{OWNER}/pickle", token=TOKEN, endpoint=server.url)
    assert not marker.exists()


@pytest.mark.parametrize("where, pattern", [("the weights' upload", r"^/lfs-storage/"),
                                            ("the commit", r"^/api/models/.*/commit/")])
@pytest.mark.slow
def test_server_error_mid_upload(server, tmp_path, monkeypatch, where, pattern):
    # The client retries 5xx on the storage PUT with backoff; shorten the waits, keep the retries.
    monkeypatch.setattr(huggingface_hub.lfs, "http_backoff",
                        functools.partial(huggingface_hub.lfs.http_backoff, base_wait_time=0.01, max_wait_time=0.02))
    repo_id = f"{OWNER}/mid-upload-{'put' if 'lfs' in pattern else 'commit'}"
    first, second = tmp_path / "first", tmp_path / "second"
    make_run(first, seed=1)
    make_run(second, seed=2)
    publish(first, repo_id, token=TOKEN, endpoint=server.url)
    before, commits = server.files(repo_id), server.commit_count(repo_id)

    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    server.fail("PUT" if "lfs" in pattern else "POST", pattern, status=500, times=None)
    try:
        with pytest.raises(UploadError) as info:
            publish(second, repo_id, token=TOKEN, endpoint=server.url)
    finally:
        server.clear_failures()
    message = str(info.value)
    assert "failed while uploading and committing the files" in message and "HTTP 500" in message
    assert "Nothing was committed" in message and TOKEN not in message
    assert server.files(repo_id) == before and server.commit_count(repo_id) == commits
    assert list(staging.iterdir()) == []  # no staging or verification folder left behind

    publish(second, repo_id, token=TOKEN, endpoint=server.url)  # once the server is well again, it goes through
    published = safetensors.torch.load(server.files(repo_id)["model.safetensors"])
    expected = safetensors.torch.load_file(second / "model.safetensors")
    assert published.keys() == expected.keys() and all(torch.equal(published[k], expected[k]) for k in expected)


# -- pretrained=True on a tag without published weights ---------------------------------------------------------
def test_pretrained_without_published_weights_says_how_to_get_them(monkeypatch):
    with pytest.raises(NoPretrainedWeightsError) as info:
        require_published_weights("sd_resnet110_cifar", pretrained_cfg="cifar100")
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    for needle in ("sd_resnet110_cifar.cifar100", "published so far: none yet", "hf-hub:OWNER/REPO",
                   "local-dir:runs/NAME", "pretrained=False"):
        assert needle in message, needle
    # a cfg that does point at weights passes
    require_published_weights("sd_resnet110_cifar", pretrained_cfg={"hf_hub_id": f"{OWNER}/r110"})

    # published weights, and only those, get an hf_hub_id in the zoo's cfgs
    cfgs = {"sd_resnet110_cifar.cifar10": {"num_classes": 10}, "sd_resnet110_cifar.cifar100": {"num_classes": 100}}
    monkeypatch.setitem(pretrained.PUBLISHED_WEIGHTS, "sd_resnet110_cifar.cifar10", f"{OWNER}/r110")
    assert with_published_weights(cfgs) == {
        "sd_resnet110_cifar.cifar10": {"num_classes": 10, "hf_hub_id": f"{OWNER}/r110"},
        "sd_resnet110_cifar.cifar100": {"num_classes": 100}}
    monkeypatch.setitem(pretrained.PUBLISHED_WEIGHTS, "sd_resnet110_cifar.imagenet", f"{OWNER}/typo")
    with pytest.raises(KeyError, match="sd_resnet110_cifar.imagenet"):
        with_published_weights(cfgs)


def test_create_model_pretrained_without_weights_says_how_to_get_them():
    with pytest.raises(NoPretrainedWeightsError, match=r"sd_resnet110_cifar\.cifar100.*hf-hub:OWNER/REPO"):
        timm.create_model("sd_resnet110_cifar.cifar100", pretrained=True)


def test_zoo_cfgs_claim_no_unpublished_weights():
    for name in timm.list_models("sd_*", pretrained=True):
        if name in pretrained.TIMM_WEIGHTS:  # timm's weights of the same network, from timm's own repo
            assert timm.get_pretrained_cfg(name).hf_hub_id == timm.get_pretrained_cfg(
                pretrained.TIMM_WEIGHTS[name]).hf_hub_id, name
        else:
            assert name in pretrained.PUBLISHED_WEIGHTS, f"{name} claims weights that are not published"
