"""Publishing a run folder to the Hugging Face Hub in timm's own format (``hf-hub:`` loads it with timm alone):
the repo's files staged, one commit, and what a failed upload leaves on the Hub, said in each error."""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from sdzoo.export.depth import PRUNING_NAME
from sdzoo.export.onnx_export import MAX_INPUT_SIDE, read_metadata
from sdzoo.files.checks import check_input_size, check_seconds
from sdzoo.files.disk import PathLike, is_new_or_empty_folder, staged_folder
from sdzoo.files.hf_config import write_config
from sdzoo.files.hub_http import (
    DEFAULT_TIMEOUT, bounded_waits, describe_error, http_error, hub_api, is_timeout, scrub_token)
from sdzoo.files.run_folder import CONFIG_NAME, CURVES_NAME, METRICS_NAME, ONNX_NAME, SUMMARY_NAME, WEIGHTS_NAME
from sdzoo.files.weights import save_weights
from sdzoo.hub.load import (  # noqa: F401  (re-exported)
    CheckpointMismatchError, HubError, LoadedRun, VerificationError, check_onnx_matches, file_sha256, load_run,
    verify_upload)
from sdzoo.hub.model_card import published_summary, render_model_card
from sdzoo.training.metrics_plot import read_metrics
from sdzoo.training.run_record import METRICS_KEYS

_logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
COMMITTING = "uploading and committing the files"
# What each file of a published repo is, for the model card's list of files.
FILE_NOTES = {
    WEIGHTS_NAME: "the weights (safetensors)",
    CONFIG_NAME: "architecture, survival settings and preprocessing, in timm's format",
    CARD_NAME: "this card",
    ONNX_NAME: "the model in ONNX",  # the card says what its metadata says of p_l
    CURVES_NAME: "training curves",
    SUMMARY_NAME: "the run's summary: best epoch, errors, training recipe",
    METRICS_NAME: "per-epoch metrics of the run",
    PRUNING_NAME: "the pruned model's measurements: parameters, FLOPs, test accuracy, latency",
}


class MissingTokenError(HubError):
    """No token to write with."""


class UploadError(HubError):
    """The upload failed; the message says what the Hub holds now."""


@dataclass
class PublishResult:
    repo_id: str
    files: Dict[str, str] = field(default_factory=dict)  # name -> sha256
    commit_oid: Optional[str] = None
    commit_url: Optional[str] = None
    local_dir: Optional[Path] = None
    card: str = ""  # the README.md that was published or written


def check_repo_id(repo_id: str) -> str:
    """A Hub model repo id, ``owner/name``, as huggingface_hub validates it, and not ending in '.git'."""
    allowed = ("repo_id must be 'owner/name' (a user or organisation, then the repo name; letters, digits, "
               "'-', '_' and '.', no '--' or '..', at most 96 characters)")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"{allowed}; got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"{allowed}; got {repo_id!r}") from None
    if repo_id.endswith(".git"):
        raise ValueError(f"{allowed}, not ending in '.git'; got {repo_id!r}")
    return repo_id


# -- the Hub folder -------------------------------------------------------------------------------------
def run_folder_file(folder: PathLike, name: str) -> Optional[Path]:
    """``folder/name`` if it is there and a regular file: a symbolic link (to a private file, say) or a special
    file of the run folder is never read, let alone published."""
    path = Path(folder) / name
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link (to {os.readlink(path)}): only regular files inside the run "
                         "folder are published; put the file itself there (or name it with --onnx / --curves)")
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} is not a regular file: only regular files inside the run folder are published")
    return path if path.exists() else None


def _copy_without_links(src: Path, dst: Path) -> None:
    """Copy a run folder's file, refusing it if it became a link or special file since it was checked."""
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise ValueError(f"{src} cannot be published as a regular file of the run folder: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f_in, open(dst, "wb") as f_out:
        if not stat.S_ISREG(os.fstat(f_in.fileno()).st_mode):
            raise ValueError(f"{src} is not a regular file: only regular files inside the run folder are published")
        shutil.copyfileobj(f_in, f_out)


def _extras(run: LoadedRun, onnx: Optional[PathLike], curves: Optional[PathLike],
            pruned: bool) -> Dict[str, Tuple[Path, bool]]:
    """Optional files of the repo: name -> (source, whether it is a file of the run folder). A file the caller
    names is taken as given; pruning.json is a pruned model's (written by the export's --pruned-dir)."""
    for name, given in (("onnx", onnx), ("curves", curves)):
        if given and not Path(given).is_file():
            raise FileNotFoundError(f"{name}: no file at {given}")
    if onnx and Path(onnx).suffix != ".onnx":
        raise ValueError(f"onnx must be a .onnx file; got {onnx}")
    extras = {}
    given_files = {ONNX_NAME: onnx, CURVES_NAME: curves}
    for name in (ONNX_NAME, CURVES_NAME, METRICS_NAME) + ((PRUNING_NAME,) if pruned else ()):
        if (given := given_files.get(name)):
            extras[name] = (Path(given), False)
        elif (found := run_folder_file(run.path, name)) is not None:
            extras[name] = (found, True)
    if METRICS_NAME in extras:  # a corrupt record is named, never published
        try:
            read_metrics(extras[METRICS_NAME][0])
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{e}; the run's log is corrupt: fix or remove that line before publishing") from None
    return extras


def _read_pruning(path: Path) -> Dict:
    """A pruned model's measurements (pruning.json)."""
    try:
        pruning = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(pruning, dict):
        raise ValueError(f"{path} must hold a JSON object (the pruned model's measurements)")
    return pruning


def stage_hub_folder(run: LoadedRun, folder: PathLike, repo_id: str, onnx: Optional[PathLike] = None,
                     curves: Optional[PathLike] = None, card_template: Optional[str] = None) -> List[str]:
    """Write the repo's files into ``folder`` (an empty directory); returns their names."""
    folder = Path(folder)
    # A pruned model publishes no summary: the run's is the full model's (sdzoo.prune), pruning.json its own.
    pruned = getattr(run.model, "pruned_from", None) is not None
    summary = None if run.summary is None or pruned else \
        published_summary(run.summary, where=str(run.path / SUMMARY_NAME))
    extras = _extras(run, onnx, curves, pruned)
    pruning = _read_pruning(extras[PRUNING_NAME][0]) if PRUNING_NAME in extras else None
    folded = None
    if ONNX_NAME in extras:
        _logger.info(f"Checking {extras[ONNX_NAME][0]} against the weights with onnxruntime")
        check_onnx_matches(run, extras[ONNX_NAME][0])
        folded = {"true": True, "false": False}.get(read_metadata(extras[ONNX_NAME][0]).get("folded"))
    # Weights that record no survival settings cannot be checked against config.json's, and the published ones
    # will record those as their own: said on the command line and on the card.
    provenance = getattr(run.model, "weights_provenance", None)
    unverified = provenance is not None and provenance.recorded is None
    if unverified:
        _logger.warning(f"warning: {run.path / WEIGHTS_NAME} records no survival settings (it was written without "
                        f"sdzoo's metadata): those of {run.path / CONFIG_NAME} cannot be checked against the "
                        "weights, and the published model.safetensors records them as its own; the card says so")
    config = write_config(folder / CONFIG_NAME, run.model)
    size = (config.get("pretrained_cfg") or {}).get("input_size")
    if size is not None:
        try:
            check_input_size("input_size", size, max_side=MAX_INPUT_SIDE)
        except ValueError as e:
            raise ValueError(f"{run.path / CONFIG_NAME}: pretrained_cfg {e}; it would be published as the model's "
                             "input size, which the export refuses") from None
    save_weights(folder / WEIGHTS_NAME, run.model)
    for name, (src, in_run_folder) in extras.items():
        if in_run_folder:
            _copy_without_links(src, folder / name)
        else:
            shutil.copyfile(src, folder / name)
    if METRICS_NAME in extras:  # only the keys the trainer writes: nothing else a log was given (a token, a path)
        records = read_metrics(folder / METRICS_NAME)  # the copy, read through no link
        (folder / METRICS_NAME).write_text("".join(json.dumps({k: v for k, v in r.items() if k in METRICS_KEYS})
                                                   + "\n" for r in records), encoding="utf-8")
    if summary is not None:
        (folder / SUMMARY_NAME).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    files = sorted([WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, *extras] + ([SUMMARY_NAME] if summary is not None else []))
    card = render_model_card(
        repo_id, config, summary, block_probs=run.model.block_survival_probs(),
        num_params=sum(p.numel() for p in run.model.parameters()), files=files, file_notes=FILE_NOTES,
        template=card_template, onnx_folded=folded, unverified_settings=unverified, pruning=pruning)
    (folder / CARD_NAME).write_text(card, encoding="utf-8")
    return files


def write_hub_folder(run: LoadedRun, out_dir: PathLike, repo_id: str, **kwargs) -> List[str]:
    """``stage_hub_folder`` into a new folder, atomically: staged beside it, then renamed into place."""
    if not is_new_or_empty_folder(out_dir):
        raise FileExistsError(f"local_dir {out_dir} exists and is not an empty folder; choose a new one")
    with staged_folder(out_dir) as staging:
        files = stage_hub_folder(run, staging, repo_id, **kwargs)
    return files


# -- upload and rollback --------------------------------------------------------------------------------
def _advice(error: BaseException, repo_id: str) -> str:
    http = http_error(error)
    status = http.response.status_code if http is not None else None
    if status in (401, 403):
        return ("the Hub refused the token: check HF_TOKEN or `hf auth login`" if status == 401 else
                f"the token cannot write to {repo_id.split('/')[0]!r}")
    if is_timeout(error):
        return ("rerun once the Hub is less busy (or with a --timeout that covers the wait)"
                if "asked to wait" in str(error) else "the Hub did not answer in time (--timeout); rerun to retry")
    return "rerun to retry"


def upload_hub_folder(folder: PathLike, repo_id: str, token: str, private: bool = False,
                      commit_message: Optional[str] = None, endpoint: Optional[str] = None,
                      timeout: float = DEFAULT_TIMEOUT):
    """Create the repo if needed and upload ``folder`` to main in one commit (``HfApi.upload_folder``, as timm's
    ``push_to_hf_hub``), each request ending within ``timeout`` seconds.

    When it fails, the error says what the Hub holds, asked of the Hub where it can. A repo is deleted again only
    when this call provably made it (the Hub answered its create request, not with 409) and the Hub says that main
    is still at the commit read after creating it: another publisher's repo, or commit, is never deleted."""
    paths = [p for p in Path(folder).iterdir() if p.is_file()]
    size = sum(p.stat().st_size for p in paths) / 2**20
    api = hub_api(endpoint, token)
    step, created, before = "checking whether the repo exists", False, None
    with bounded_waits(timeout):
        try:
            existed = api.repo_exists(repo_id)
            step = "creating the repo"
            if not existed:
                _logger.info(f"Creating {'private ' if private else ''}repo {repo_id}")
                created = _create_repo(api, repo_id, private)
                existed = not created  # 409: it exists after all (another publisher, or a wrong 404)
            step = "reading the repo's main branch"
            info = api.model_info(repo_id)
            if existed and private and not info.private:
                raise UploadError(f"{repo_id} exists and is public; --private does not change an existing repo's "
                                  "visibility (change it on the Hub, or publish to a new repo)")
            _logger.info(f"Uploading {len(paths)} files ({size:.1f} MiB) to {repo_id} in one commit "
                         f"(each request ends within {timeout:g} s)")
            before, step = info.sha, COMMITTING
            return api.upload_folder(repo_id=repo_id, folder_path=folder, parent_commit=before,
                                     commit_message=commit_message or "Upload model with sdzoo")
        except Exception as e:  # noqa: BLE001  HTTP, connection and storage errors alike
            state = "Nothing was committed: no commit request was sent."
            if step == COMMITTING:
                state = _state_after_failed_commit(api, folder, repo_id, before, token, timeout)
            elif step == "creating the repo" and not created and http_error(e) is None:
                state = (f"Nothing was committed, but the Hub's answer to creating {repo_id} was lost: the repo may "
                         f"or may not exist now (empty); look at {api.endpoint}/{repo_id}.")
            if created and state.startswith("Nothing was committed"):  # deleted only if it holds nobody's commit
                state = _delete_created_repo(api, repo_id, before)
            if isinstance(e, UploadError):
                raise UploadError(f"{e} {state}") from None
            raise UploadError(scrub_token(f"uploading to {repo_id} failed while {step}: {describe_error(e)}; "
                                          f"{_advice(e, repo_id)}. {state}", token)) from e


def _create_repo(api: HfApi, repo_id: str, private: bool) -> bool:
    """Create ``repo_id``: True when this request made it, False when the Hub answers that it exists (409)."""
    try:
        api.create_repo(repo_id, private=private, exist_ok=False)
    except Exception as e:  # noqa: BLE001
        http = http_error(e)
        if http is None or http.response.status_code != 409:
            raise
        _logger.info(f"{repo_id} exists after all (created by another publisher meanwhile?): uploading to it")
        return False
    return True


def _state_after_failed_commit(api: HfApi, folder: Path, repo_id: str, before: str, token: str,
                               timeout: float) -> str:
    """What the Hub holds after a failed commit, asked of it: main as before, moved to a commit holding these
    files, moved to other files, or unknown."""
    look = f"look at {api.endpoint}/{repo_id}/commits/main before you retry"
    try:
        now = api.model_info(repo_id).sha
    except Exception as e:  # noqa: BLE001
        return (f"The commit may or may not have been made: asking the Hub where main is failed too "
                f"({scrub_token(describe_error(e), token)}); {look}.")
    if now == before:
        return f"Nothing was committed: main is still at {before}, as before this upload (asked the Hub)."
    try:
        verify_upload(folder, repo_id, now, token=token, endpoint=api.endpoint, timeout=timeout)
    except VerificationError:
        return (f"main moved from {before} to {now}, which does not hold the files of this upload: another "
                f"commit landed, and this one may or may not have been made; {look}.")
    return (f"The commit was made, but its answer was lost: main moved from {before} to {now}, which holds "
            "every file of this upload (hashes checked).")


def _delete_created_repo(api: HfApi, repo_id: str, created_at: Optional[str]) -> str:
    """A first upload that failed leaves no repo behind, when it can prove, by asking the Hub right before the
    delete, that the repo holds nothing but the commit the Hub made when this upload created it (``created_at``).
    Main still at ``created_at`` is not enough: another publisher may have committed before it was read. Returns
    what state the repo is left in."""
    kept = f"The repo {repo_id}, which this upload created, is kept"
    if created_at is None:
        return (f"{kept}: this upload failed before it could read the repo's first commit, so it cannot prove that "
                "nobody else committed to it since; look at it on the Hub, delete it or rerun to fill it.")
    try:
        info = api.model_info(repo_id)
    except Exception as e:  # noqa: BLE001
        return (f"{kept}: asking the Hub where main is failed ({describe_error(e)}), so this upload cannot prove "
                "that nobody else committed to it; look at it on the Hub, delete it or rerun to fill it.")
    files = sorted(s.rfilename for s in info.siblings or [])
    if info.sha != created_at or set(files) - {".gitattributes"}:
        return (f"{kept}: main is at {info.sha} and holds {', '.join(files) or 'no file'}, commits this upload did "
                "not make (another publisher's): it is left as it is.")
    try:
        api.delete_repo(repo_id, missing_ok=True)
    except Exception as e:  # noqa: BLE001
        return (f"{kept}: deleting it again failed ({describe_error(e)}); it holds only its first commit "
                "(.gitattributes): delete it on the Hub or rerun to fill it.")
    return (f"The repo {repo_id}, which this upload had created, was deleted again (main still held only its first "
            "commit): the Hub holds nothing of it.")


def publish(model_dir: PathLike, repo_id: str, *, local_dir: Optional[PathLike] = None, token: Optional[str] = None,
            private: bool = False, commit_message: Optional[str] = None, onnx: Optional[PathLike] = None,
            curves: Optional[PathLike] = None, card_template: Optional[str] = None, endpoint: Optional[str] = None,
            timeout: float = DEFAULT_TIMEOUT) -> PublishResult:
    """Publish a run folder to ``repo_id`` and check it by hash, or write the repo folder to ``local_dir``.
    Everything that can be checked locally is checked before any upload."""
    check_repo_id(repo_id)
    check_seconds("timeout", timeout)  # before any work, not at the first request
    if local_dir is None:
        token = token or get_token()  # the argument, else HF_TOKEN, else the stored login
        if not token:
            raise MissingTokenError(
                "no Hugging Face token: set the HF_TOKEN environment variable or log in with `hf auth login` "
                "(a token with write access to the repo's owner); --local-dir writes the folder without one")
    for name in (CONFIG_NAME, WEIGHTS_NAME, SUMMARY_NAME):  # nothing behind a link is read, let alone published
        run_folder_file(model_dir, name)
    _logger.info(f"Loading the run in {model_dir}")
    run = load_run(model_dir)
    stage_kwargs = dict(onnx=onnx, curves=curves, card_template=card_template)
    if local_dir is not None:
        local_dir = Path(local_dir)
        files = write_hub_folder(run, local_dir, repo_id, **stage_kwargs)
        _logger.info(f"Wrote {', '.join(files)} to {local_dir}")
        return PublishResult(repo_id, {f: file_sha256(local_dir / f) for f in files}, local_dir=local_dir,
                             card=(local_dir / CARD_NAME).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="sdzoo-hub-") as staging:
        stage_hub_folder(run, staging, repo_id, **stage_kwargs)
        card = (Path(staging) / CARD_NAME).read_text(encoding="utf-8")
        commit = upload_hub_folder(staging, repo_id, token, private=private, commit_message=commit_message,
                                   endpoint=endpoint, timeout=timeout)
        _logger.info(f"Committed {commit.oid}; checking every file's hash on the Hub")
        hashes = verify_upload(staging, repo_id, commit.oid, token=token, endpoint=endpoint, timeout=timeout)
    _logger.info(f"Published and verified {len(hashes)} files: {commit.commit_url}")
    return PublishResult(repo_id, hashes, commit_oid=commit.oid, commit_url=commit.commit_url, card=card)
