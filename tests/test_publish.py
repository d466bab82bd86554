"""Publishing an untrusted run folder, and a Hub that misbehaves.

Each test makes the run folder or the Hub do what a careless user or a hostile one would, and checks what
was published (the folder's bytes, the Hub's files), not only the message. The Hub is ``FakeHub``
(tests/hub_server.py) on 127.0.0.1; the command line runs in subprocesses where the exit time is measured.
"""
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
import yaml

from sdzoo.export import onnx_export
from sdzoo.files.run_folder import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, truncate_lines
from sdzoo.fold import fold_survival
from sdzoo.hub import upload as hub
from sdzoo.hub.model_card import SETTINGS_KEYS, SUMMARY_KEYS
from sdzoo.training.metrics_plot import read_metrics
from sdzoo.training.run_record import METRICS_KEYS

from hub_server import FakeHub
import sdzoo.cli.export
import sdzoo.cli.push
from helpers import ROOT, TOKEN, copy_run_folder, make_run, randomize_batchnorm, snapshot

PUSH = ROOT / "scripts" / "push_to_hub.py"


pytestmark = [
    # huggingface_hub's own LFS upload passes a file object as data=, which its HTTP library flags.
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning"),
    pytest.mark.usefixtures("hub_client"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder (kept as it is: each test copies what it changes)."""
    path = tmp_path_factory.mktemp("run") / "r20"
    path.mkdir()
    make_run(path)
    return path


def edit_summary(path: Path, **changes) -> None:
    summary = json.loads((path / "summary.json").read_text())
    settings = changes.pop("settings", {})
    summary.update(changes)
    summary["settings"].update(settings)
    (path / "summary.json").write_text(json.dumps(summary))


def push(*args) -> int:
    return sdzoo.cli.push.main([str(a) for a in args])


def all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.iterdir()))


@pytest.mark.parametrize("name", ["metrics.jsonl", "curves.png", "summary.json", "model.onnx"])
def test_a_link_in_the_run_folder_is_never_followed_nor_published(run, tmp_path, capsys, name):
    folder = copy_run_folder(run, tmp_path / "run")
    secret = tmp_path / "private.txt"
    marker = "PRIVATE-" + secrets.token_hex(8)
    secret.write_text(json.dumps({"epoch": 1, "note": marker}) + "\n")
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(secret)
    out = tmp_path / "out"
    assert push("--model", folder, "--repo-id", "tester/r20", "--local-dir", out) == 2
    err = capsys.readouterr().err
    assert f"{folder / name} is a symbolic link" in err and "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    (folder / name).unlink()  # the same folder with regular files only is published, byte for byte
    if name != "model.onnx":
        (folder / name).write_bytes((run / name).read_bytes())
    assert push("--model", folder, "--repo-id", "tester/r20", "--local-dir", out) == 0
    assert marker.encode() not in all_bytes(out)
    for extra in ("metrics.jsonl", "curves.png"):
        assert (out / extra).read_bytes() == (run / extra).read_bytes()


def test_only_the_summary_keys_the_card_reads_are_published(run, tmp_path):
    folder = copy_run_folder(run, tmp_path / "run")
    private = "secret-" + secrets.token_hex(8)
    edit_summary(folder, hostname=private, command_line=f"--data-dir /home/{private}",
                 settings=dict(workers=8, data_dir=f"/home/{private}", output=f"/runs/{private}",
                               wandb_key=private, device="cuda:0"))
    out = tmp_path / "out"
    hub.publish(folder, "tester/r20", local_dir=out)
    assert private.encode() not in all_bytes(out)
    published = json.loads((out / "summary.json").read_text())
    assert set(published) <= set(SUMMARY_KEYS) and set(published["settings"]) <= set(SETTINGS_KEYS)
    original = json.loads((run / "summary.json").read_text())
    assert published["test_error"] == original["test_error"] and published["settings"]["lr"] == 0.1
    assert "device" not in published["settings"] and "workers" not in published["settings"]


def test_push_refuses_an_onnx_file_of_other_weights(trained_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME, "summary.json"):
        (run / name).write_bytes((trained_run / name).read_bytes())
    torch.manual_seed(5)
    stale = randomize_batchnorm(timm.create_model(f"local-dir:{run}", pretrained=False)).eval()
    onnx_export.export_onnx(fold_survival(stale), run / "model.onnx", verify_batch_sizes=(1,))
    with pytest.raises(hub.CheckpointMismatchError, match="does not compute what"):
        hub.publish(run, "tester/r20", local_dir=tmp_path / "hub")
    assert not (tmp_path / "hub").exists()

    model = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    onnx_export.export_onnx(fold_survival(model), run / "model.onnx", verify_batch_sizes=(1,))
    result = hub.publish(run, "tester/r20", local_dir=tmp_path / "hub")
    assert "model.onnx" in result.files


@pytest.mark.slow
def test_a_repo_id_never_overwrites_a_file_the_project_ships(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    shipped = snapshot(ROOT / "model_cards")
    cards = tmp_path / "cards"
    cards.mkdir()
    for name in shipped:
        (cards / name).write_bytes((ROOT / "model_cards" / name).read_bytes())
    cli = sdzoo.cli.push
    with FakeHub(tokens={TOKEN: "tester"}) as server:
        for repo_id in ("tester/README", "tester/template"):
            code = cli.main(["--model", str(trained_run), "--repo-id", repo_id, "--endpoint", server.url,
                             "--card-dir", str(cards)])
            assert code == 2 and "is not a card of" in capsys.readouterr().err
        assert server.repos == {}  # refused before anything was uploaded
        assert snapshot(cards) == shipped
        # By default the card is not saved at all, so nothing in the checkout changes.
        assert cli.main(["--model", str(trained_run), "--repo-id", "tester/README", "--endpoint", server.url]) == 0
        assert "tester/README" in server.repos
        # An earlier card of the same repo may be replaced.
        assert cli.main(["--model", str(trained_run), "--repo-id", "tester/r20", "--endpoint", server.url,
                         "--card-dir", str(cards)]) == 0
        assert cli.main(["--model", str(trained_run), "--repo-id", "tester/r20", "--endpoint", server.url,
                         "--card-dir", str(cards)]) == 0
    assert snapshot(ROOT / "model_cards") == shipped
    assert {k: v for k, v in snapshot(cards).items() if k != "r20.md"} == shipped


@pytest.mark.slow
def test_a_commit_whose_answer_was_lost_is_reported_as_made(run, tmp_path):
    second = tmp_path / "second"
    second.mkdir()
    make_run(second, seed=7)
    with FakeHub(tokens={TOKEN: "tester"}) as server:
        hub.publish(run, "tester/lost", token=TOKEN, endpoint=server.url, timeout=5)
        first = server.repos["tester/lost"].branches["main"]
        server.lose_answer("POST", r"/commit/")
        with pytest.raises(hub.UploadError) as info:
            hub.publish(second, "tester/lost", token=TOKEN, endpoint=server.url, timeout=2)
        now = server.repos["tester/lost"].branches["main"]
        weights = server.files("tester/lost")["model.safetensors"]
    message = str(info.value)
    assert now != first  # the Hub made the commit ...
    assert "Nothing was committed" not in message  # ... so the message must not say otherwise
    assert f"The commit was made, but its answer was lost: main moved from {first} to {now}" in message
    published, expected = safetensors.torch.load(weights), safetensors.torch.load_file(second / "model.safetensors")
    assert published.keys() == expected.keys() and all(torch.equal(published[k], expected[k]) for k in expected)
    assert TOKEN not in message


def test_when_the_hub_cannot_say_the_commit_is_said_to_be_unknown(tmp_path):
    api = huggingface_hub.HfApi(endpoint="http://127.0.0.1:9", token=TOKEN)  # nothing listens on port 9
    with hub.bounded_waits(2):
        state = hub._state_after_failed_commit(api, tmp_path, "tester/r20", "0" * 40, TOKEN, 2)
    assert state.startswith("The commit may or may not have been made: asking the Hub where main is failed")
    assert "Nothing was committed" not in state and TOKEN not in state


def test_push_timeout_must_be_positive(trained_run, tmp_path, cli):
    result = cli(sdzoo.cli.push.main, ["--model", trained_run, "--repo-id", "tester/t", "--local-dir",
                                                    tmp_path / "h", "--timeout", "-1"])
    assert result.code == 2 and "--timeout must be a positive number of seconds" in result.err
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-3"])
def test_a_timeout_that_bounds_nothing_is_refused(run, tmp_path, capsys, value):
    assert push("--model", run, "--repo-id", "tester/r20", "--timeout", value, "--local-dir", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "--timeout must be a positive number of seconds" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_timeout_beyond_what_a_socket_takes_is_refused_before_any_work(run, tmp_path, capsys):
    """1e308 s passed the check and ended, after the work, in an OverflowError that said to rerun."""
    assert push("--model", run, "--repo-id", "tester/r20", "--timeout", "1e308", "--local-dir", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "--timeout must be a positive number of seconds; got 1e+308 (at most 1,000,000)" in err
    assert not (tmp_path / "o").exists() and "Traceback" not in err


@pytest.mark.parametrize("behaviour", ["hang", "trickle"])
def test_a_request_ends_within_the_timeout_even_one_that_passes_no_timeout(tmp_path, behaviour):
    # repo_exists passes timeout=None to the client; a trickled answer resets any per-read timeout.
    with FakeHub(tokens={TOKEN: "tester"}) as server:
        getattr(server, behaviour)("GET", r"^/api/models/")
        start = time.monotonic()
        with pytest.raises(hub.UploadError, match="did not answer in time") as info:
            hub.upload_hub_folder(tmp_path, "tester/r20", TOKEN, endpoint=server.url, timeout=1)
        took = time.monotonic() - start
    assert took < 1 + 1, took
    assert "Nothing was committed: no commit request was sent." in str(info.value)


@pytest.mark.slow
def test_push_exits_within_its_timeout_when_the_hub_never_answers_the_commit(trained_run, tmp_path):
    timeout = 4
    with FakeHub(tokens={TOKEN: "tester"}) as server:
        server.hang("POST", r"/commit/")
        env = dict(os.environ, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1")
        start = time.monotonic()
        proc = subprocess.run([sys.executable, str(PUSH), "--model", str(trained_run),
                               "--repo-id", "tester/hangs", "--endpoint", server.url, "--timeout", str(timeout)],
                              capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
        end = time.monotonic()
        assert server.hung, "the commit request never reached the server"
        committed_at = server.hung[0][0]
        repos = dict(server.repos)
    assert proc.returncode != 0
    # From the unanswered commit to the exit: the timeout, then deleting the new repo again, then the
    # interpreter's exit (1.5 to 3 s with torch and timm loaded, on two busy cores).
    assert end - committed_at < timeout + 5, (end - committed_at, proc.stderr)
    assert end - start < 60
    assert "did not answer in time" in proc.stderr
    assert "was deleted again" in proc.stderr and "tester/hangs" not in repos  # no empty repo left
    assert TOKEN not in proc.stdout + proc.stderr


HUB_WAITS = [  # (what the Hub does, method, path): each kind of request of a publish
    ("hang", "GET", r"^/api/models/[^/]+/[^/]+$"),  # repo info: the repo-exists check
    ("trickle", "GET", r"^/api/models/[^/]+/[^/]+$"),
    ("hang", "POST", r"/preupload/"),
    ("hang", "POST", r"/commit/"),
    ("trickle", "POST", r"/commit/"),
    ("hang", "POST", r"/paths-info/"),
]


@pytest.mark.slow
@pytest.mark.parametrize("behaviour, method, pattern", HUB_WAITS)
def test_push_exits_within_its_timeout_whatever_request_the_hub_never_finishes(run, tmp_path, behaviour, method,
                                                                                  pattern):
    timeout = 3
    with FakeHub(tokens={TOKEN: "tester"}) as server:
        getattr(server, behaviour)(method, pattern)
        env = dict(os.environ, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, str(PUSH), "--model", str(run), "--repo-id", "tester/waits",
                               "--endpoint", server.url, "--timeout", str(timeout)],
                              capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
        end = time.monotonic()
        assert server.hung, f"no request reached {pattern}: {proc.stderr}"
        waited = end - server.hung[0][0]
        repo = server.repos.get("tester/waits")
        commits = server.commit_count("tester/waits")
    assert proc.returncode == 1, proc.stderr
    # From the request that never ends to the exit: the timeout, then what the state check asks. Each request
    # is bounded, so where the state check asks the hung endpoint again (paths-info), it waits a second timeout.
    requests = 2 if "paths-info" in pattern else 1
    assert waited < requests * timeout + 5, (waited, proc.stderr)  # the rest: the interpreter's exit
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stdout + proc.stderr
    if "paths-info" in pattern:  # the commit went through; only its check got no answer
        assert commits == 2 and "was created, but asking the Hub what it holds failed" in proc.stderr
    else:
        assert "did not answer in time" in proc.stderr
        assert repo is None or commits == 1  # nothing of the upload is left on the Hub
    print(f"{behaviour} {method} {pattern}: exited {waited:.1f} s after the request (--timeout {timeout})")


@pytest.mark.slow
def test_a_retry_after_longer_than_the_timeout_is_not_slept(run, tmp_path):
    with FakeHub(tokens={TOKEN: "tester"}) as server:
        server.fail("POST", r"/preupload/", status=503, times=None, headers={"Retry-After": "122"})
        start = time.monotonic()
        with pytest.raises(hub.UploadError) as info:
            hub.publish(run, "tester/busy", token=TOKEN, endpoint=server.url, timeout=3)
        took = time.monotonic() - start
        asked = [p for m, p in server.requests if "/preupload/" in p]
        repos = dict(server.repos)
    assert took < 3 + 4, took
    assert len(asked) == 1  # refused at the first answer, not retried after the wait
    assert "asked to wait 122 s before a retry, longer than the timeout of 3 s" in str(info.value)
    assert "tester/busy" not in repos


@pytest.mark.parametrize("key, value, named", [
    ("test_error", "5.3", "test_error"),
    ("best_epoch", "9", "best_epoch"),
    ("best_epoch", 9.5, "best_epoch"),
    ("best_val_error", [1], "best_val_error"),
    ("selection", {"a": 1}, "selection"),
    ("settings", ["cifar10"], "settings"),
    ("finished", "false", "finished"),  # a string is not a bool (and "false" is no truth)
    ("finished", 0, "finished"),
])
def test_wrong_types_in_summary_json_exit_2_naming_the_file_and_key(run, tmp_path, capsys, key, value, named):
    folder = copy_run_folder(run, tmp_path / "run")
    summary = json.loads((folder / "summary.json").read_text())
    summary[key] = value
    (folder / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "out"
    assert push("--model", folder, "--repo-id", "tester/r20", "--local-dir", out) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'summary.json'}: {named} must be" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("key, value", [("epochs", "12"), ("dataset", 10), ("lr_drops", [{"at": 0.5}])])
def test_wrong_types_in_the_summary_settings_name_the_setting(run, tmp_path, key, value):
    folder = copy_run_folder(run, tmp_path / "run")
    edit_summary(folder, settings={key: value})
    with pytest.raises(ValueError, match=rf"summary.json: settings\.{key} must be"):
        hub.publish(folder, "tester/r20", local_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unfinished_run_is_said_so_on_the_card(run, tmp_path):
    folder = copy_run_folder(run, tmp_path / "run")
    edit_summary(folder, finished=False, epochs_done=7)
    hub.publish(folder, "tester/r20", local_dir=tmp_path / "out")
    assert "The run had not finished: 7 of 12 epochs." in (tmp_path / "out" / "README.md").read_text()


def test_a_corrupt_metrics_line_is_named_never_published_or_dropped(run, tmp_path, capsys):
    folder = copy_run_folder(run, tmp_path / "run")
    lines = [json.dumps(dict(kind="epoch", epoch=e, step=10 * e, test_error=50.0 - e)) for e in (1, 2, 3)]
    lines[1] = lines[1][:17]  # cut in the middle of a record
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert push("--model", folder, "--repo-id", "tester/r20", "--local-dir", out) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'metrics.jsonl'}, line 2: not valid JSON" in err and not out.exists()
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not valid JSON"):
        read_metrics(folder / "metrics.jsonl")

    # A resumed run cuts its log back to the checkpoint: a corrupt line is reported, and the log kept as it is.
    before = (folder / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match=r"metrics.jsonl, line 2 is corrupt"):
        truncate_lines(folder / "metrics.jsonl", lambda line: json.loads(line)["step"] <= 30)
    assert (folder / "metrics.jsonl").read_bytes() == before
    # Only a last line without its newline (a kill mid-write) is dropped.
    (folder / "metrics.jsonl").write_text(lines[0] + "\n" + lines[2] + "\n" + lines[2][:20])
    truncate_lines(folder / "metrics.jsonl", lambda line: json.loads(line)["step"] <= 30)
    assert (folder / "metrics.jsonl").read_text() == lines[0] + "\n" + lines[2] + "\n"


def test_the_loser_of_a_local_dir_race_says_so_and_leaves_the_winners_files(run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    stage = hub.stage_hub_folder

    def stage_while_another_process_wins(*args, **kwargs):
        files = stage(*args, **kwargs)
        out.mkdir(exist_ok=True)  # the other process renamed its folder into place meanwhile
        (out / "README.md").write_text("the winner's card")
        return files

    monkeypatch.setattr(hub, "stage_hub_folder", stage_while_another_process_wins)
    with pytest.raises(FileExistsError, match=r"was filled by another process while this one prepared its files"):
        hub.publish(run, "tester/r20", local_dir=out)
    assert os.listdir(tmp_path) == ["out"]  # no staging folder left beside it
    assert os.listdir(out) == ["README.md"] and (out / "README.md").read_text() == "the winner's card"


@pytest.mark.slow  # an ONNX export and its onnxruntime checks: about 12 s
def test_the_card_calls_an_onnx_file_what_its_metadata_says(run, tmp_path):
    folder = copy_run_folder(run, tmp_path / "run")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    onnx_export.export_onnx(model, folder / "model.onnx", verify_batch_sizes=(1,))  # not folded
    assert onnx_export.read_metadata(folder / "model.onnx")["folded"] == "false"
    hub.publish(folder, "tester/r20", local_dir=tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "folded into the weights (a plain ResNet graph)" not in card
    assert "- `model.onnx`: the model in ONNX, p_l applied as a scale in each block (not folded" in card
    assert "With onnxruntime (`model.onnx`: the model in ONNX, p_l applied as a scale" in card


def test_pipes_and_html_in_summary_strings_stay_inside_their_table_cells(run, tmp_path):
    folder = copy_run_folder(run, tmp_path / "run")
    edit_summary(folder, selection="best <script>alert(1)</script> | epoch",
                 settings=dict(dataset="my|set<img src=x onerror=alert(1)>", lr_drop_rule="a|b|c",
                               recipe="<b>bold</b>"))
    hub.publish(folder, "tester/r20", local_dir=tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    body = card.split("\n---\n", 1)[1]  # the front matter is YAML data (its strings quoted where need be)
    assert "<script" not in body and "<img" not in body and "<b>" not in body
    for line in body.splitlines():
        if line.startswith("| this model") or line.startswith("| lr_drop_rule") or line.startswith("| recipe"):
            cells = re.split(r"(?<!\\)\|", line)[1:-1]  # the cells a Markdown table sees
            expected = 4 if line.startswith("| this model") else 2
            assert len(cells) == expected, line
    assert "| lr_drop_rule | a\\|b\\|c |" in card and "my\\|set&lt;img" in card
    assert "chosen by best &lt;script&gt;alert(1)&lt;/script&gt; \\| epoch." in card


@pytest.mark.slow
def test_two_publishers_racing_to_a_new_repo_keep_the_winners_commit(tmp_path):
    """Two push_to_hub.py processes, one new repo id: the Hub holds both requests to create it, and both
    commits, until both arrive, so the race is run every time. One creates the repo, the other is told it exists;
    one commit lands, the other's parent is gone (412). Nothing is deleted: the winner's commit is on the Hub,
    and the loser says that another commit landed."""
    runs = []
    for seed in (0, 1):
        runs.append(tmp_path / f"run{seed}")
        runs[-1].mkdir()
        make_run(runs[-1], seed=seed)
    repo_id = "tester/race"
    with FakeHub(tokens={TOKEN: "tester"}) as server:
        server.meet("POST", r"^/api/repos/create$")
        server.meet("POST", r"/commit/main$")
        env = dict(os.environ, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, str(PUSH), "--model", str(r), "--repo-id", repo_id, "--endpoint",
                                   server.url, "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=ROOT) for r in runs]
        results = [(p.wait(timeout=240), *p.communicate()) for p in procs]
        deletes = [path for method, path in server.requests if method == "DELETE" or path.endswith("/repos/delete")]
        held = server.files(repo_id) if repo_id in server.repos else {}
        commits = server.commit_count(repo_id)
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    winner = next(i for i, (code, _, _) in enumerate(results) if code == 0)
    loser_err = results[1 - winner][2]
    assert not deletes, deletes
    assert commits == 2  # the repo's first commit and the winner's
    published = safetensors.torch.load(held["model.safetensors"])
    expected = safetensors.torch.load_file(runs[winner] / "model.safetensors")
    assert published.keys() == expected.keys() and all(torch.equal(published[k], expected[k]) for k in expected)
    assert "another commit landed" in loser_err and "was deleted" not in loser_err, loser_err
    assert TOKEN not in "".join(out + err for _, out, err in results)


@pytest.mark.slow
def test_a_repo_that_a_wrong_404_hid_is_never_deleted(run, tmp_path):
    """The existence check answers 404 for a repo that exists, and the commit then fails: the create request
    gets the Hub's 409, so the upload did not make the repo, and the repo keeps every file it had."""
    second = tmp_path / "second"
    second.mkdir()
    make_run(second, seed=7)
    with FakeHub(tokens={TOKEN: "tester"}) as server:
        hub.publish(run, "tester/kept", token=TOKEN, endpoint=server.url, timeout=5)
        before = server.files("tester/kept")
        server.fail("GET", r"^/api/models/tester/kept$", status=404, times=1, headers={"X-Error-Code": "RepoNotFound"})
        server.fail("POST", r"/commit/main$", status=500, times=None)
        with pytest.raises(hub.UploadError) as info:
            hub.publish(second, "tester/kept", token=TOKEN, endpoint=server.url, timeout=5)
        after = server.files("tester/kept") if "tester/kept" in server.repos else {}
    assert after == before
    assert "Nothing was committed" in str(info.value) and "deleted" not in str(info.value), str(info.value)


def test_published_metrics_hold_only_the_keys_the_trainer_writes(run, tmp_path, trained_run):
    # every key the trainer writes is one METRICS_KEYS knows, so that nothing of a real run is dropped
    assert {k for r in read_metrics(trained_run / "metrics.jsonl") for k in r} <= METRICS_KEYS
    folder = copy_run_folder(run, tmp_path / "run")
    private = "hf_" + secrets.token_hex(8)
    lines = [dict(kind="epoch", epoch=1, step=10, test_error=50.0, hf_token=private, data_dir=f"/home/{private}"),
             dict(kind="eval", epoch=1, step=5, test_error=60.0, epochs_done=0.5, note=private)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    hub.publish(folder, "tester/r20", local_dir=tmp_path / "out")
    assert private.encode() not in all_bytes(tmp_path / "out")
    assert read_metrics(tmp_path / "out" / "metrics.jsonl") == [
        dict(kind="epoch", epoch=1, step=10, test_error=50.0), dict(kind="eval", epoch=1, step=5, test_error=60.0,
                                                                    epochs_done=0.5)]


def test_html_in_the_dataset_name_is_escaped_in_the_card_front_matter(run, tmp_path):
    folder = copy_run_folder(run, tmp_path / "run")
    edit_summary(folder, settings=dict(dataset="my<img src=x onerror=alert(1)>set"))
    hub.publish(folder, "tester/r20", local_dir=tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "<img" not in front and "&lt;img" in front
    result = yaml.safe_load(front)["model-index"][0]["results"][0]["dataset"]
    escaped = "my&lt;img src=x onerror=alert(1)&gt;set"
    assert result == dict(name=escaped, type=escaped, split="test")


def test_publishing_refuses_an_input_size_that_the_export_refuses(run, tmp_path, capsys):
    folder = copy_run_folder(run, tmp_path / "run")
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, 100000, 100000]
    (folder / "config.json").write_text(json.dumps(config))
    assert push("--model", folder, "--repo-id", "tester/r20", "--local-dir", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert f"{folder / 'config.json'}: pretrained_cfg input_size must be" in err and "<= 1024" in err, err
    assert not (tmp_path / "o").exists()


def test_push_to_hub_exits_2_for_a_run_folder_that_export_onnx_refuses(run, tmp_path, capsys):
    folder = copy_run_folder(run, tmp_path / "run")
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["layers"] = [2, 2, 2]  # the weights hold three blocks a stage
    (folder / "config.json").write_text(json.dumps(config))
    export = sdzoo.cli.export.main
    try:
        export_code = export(["--model", f"local-dir:{folder}", "--output", str(tmp_path / "m.onnx")])
    except SystemExit as e:
        export_code = e.code
    capsys.readouterr()
    assert push("--model", folder, "--repo-id", "tester/r20", "--local-dir", tmp_path / "o") == export_code == 2
    assert "layers=[2, 2, 2]" in capsys.readouterr().err
    assert push("--model", tmp_path / "nowhere", "--repo-id", "tester/r20", "--local-dir", tmp_path / "o") == 2


def test_weights_without_sdzoo_metadata_are_published_saying_so(run, tmp_path, caplog):
    """timm's own writer leaves no survival settings in model.safetensors: those of config.json cannot be
    checked, and the published weights record them: the command line and the card say so. A folder whose weights
    record them says nothing of the kind."""
    with caplog.at_level(logging.INFO, logger="sdzoo.hub.upload"):
        hub.publish(run, "tester/r20", local_dir=tmp_path / "bare")  # make_run writes with timm's save_for_hf
    assert "records no survival settings" in caplog.text and "cannot be checked against the weights" in caplog.text
    assert "recorded no survival settings" in (tmp_path / "bare" / "README.md").read_text()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdzoo.hub.upload"):
        hub.publish(tmp_path / "bare", "tester/r20", local_dir=tmp_path / "again")  # sdzoo's weights, recorded
    assert "records no survival settings" not in caplog.text
    assert "recorded no survival settings" not in (tmp_path / "again" / "README.md").read_text()


class _RacedHub:
    """An HfApi stand-in: this upload creates the repo, another publisher commits its model before main is read,
    then this upload's commit fails on the network."""

    endpoint = "http://hub.invalid"

    def __init__(self, files):
        self.files, self.deleted = files, False

    def repo_exists(self, repo_id):
        return False

    def create_repo(self, repo_id, private, exist_ok):
        return None

    def model_info(self, repo_id):
        return huggingface_hub.hf_api.ModelInfo(id=repo_id, sha="a" * 40, private=False,
                                                siblings=[{"rfilename": name} for name in self.files])

    def upload_folder(self, **kwargs):
        raise ConnectionError("connection reset")

    def delete_repo(self, repo_id, missing_ok):
        self.deleted = True


@pytest.mark.parametrize("files, deleted", [([".gitattributes"], True),
                                            ([".gitattributes", "model.safetensors"], False)])
def test_a_failed_first_upload_deletes_its_repo_only_when_nobody_else_committed_to_it(tmp_path, monkeypatch, files,
                                                                                     deleted):
    (tmp_path / "config.json").write_text("{}")
    api = _RacedHub(files)
    monkeypatch.setattr(hub, "hub_api", lambda endpoint, token: api)
    with pytest.raises(hub.UploadError) as info:
        hub.upload_hub_folder(tmp_path, "tester/raced", TOKEN, timeout=5)
    assert api.deleted is deleted
    expected = "was deleted again" if deleted else "commits this upload did not make (another publisher's)"
    assert expected in str(info.value), str(info.value)
