"""Publishing a training run to the Hugging Face Hub in timm's own format, so that ``hf-hub:`` loads it with timm
alone.

Everything that can be checked is checked before the upload (the weights fit config.json; an ONNX file computes
what the weights compute), and after it every file's hash is compared with what the Hub reports, without a
download. Error messages say what state the repo is left in and never contain the token (``_scrub``). Which
weights are published, and the cfgs that point at them, live in ``sdzoo.pretrained``.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import timm
import httpx2
from huggingface_hub import HfApi, RepoFile, get_token, set_client_factory
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from huggingface_hub.utils.sha import git_hash
from safetensors import SafetensorError
from torch import nn

from . import __version__
from ._checks import check_seconds
from ._hub_http import HubTimeout, deadline_client
from ._files import PathLike
from .checkpoint import (
    CONFIG_NAME, CURVES_NAME, METRICS_NAME, SUMMARY_NAME, WEIGHTS_NAME, describe_load_error, read_run_config,
    save_weights)
from .hf_config import head_args, model_kwargs_of_config, write_config
from .integrity import WeightsError, describe_failure
from .metrics_plot import read_metrics
from .model_card import published_summary, render_model_card

__all__ = [
    "HubError", "MissingTokenError", "CheckpointMismatchError", "UploadError", "VerificationError", "Run",
    "PublishResult", "check_repo_id", "resolve_token", "load_run", "stage_hub_folder", "write_hub_folder",
    "upload_hub_folder", "verify_upload", "publish",
]

_logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
ONNX_NAME = "model.onnx"
# What each file of a published repo is, for the model card's list of files.
FILE_NOTES = {
    WEIGHTS_NAME: "the weights (safetensors)",
    CONFIG_NAME: "architecture, survival settings and preprocessing, in timm's format",
    CARD_NAME: "this card",
    ONNX_NAME: "the model in ONNX",  # the card says what its metadata says of p_l
    CURVES_NAME: "training curves",
    SUMMARY_NAME: "the run's summary: best epoch, errors, training recipe",
    METRICS_NAME: "per-epoch metrics of the run",
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
DEFAULT_TIMEOUT = 60.0  # seconds within which each request to the Hub ends, its answer read (sdzoo._hub_http)


class HubError(RuntimeError):
    """Publishing failed. The message says what and where, never the token."""


class MissingTokenError(HubError):
    pass


class CheckpointMismatchError(HubError):
    pass


class UploadError(HubError):
    pass


class VerificationError(HubError):
    pass


@dataclass
class Run:
    """A run folder, loaded: the model with its weights (eval mode) and the run's summary.json."""
    path: Path
    model: nn.Module
    summary: Optional[Dict[str, Any]]


@dataclass
class PublishResult:
    repo_id: str
    files: Dict[str, str] = field(default_factory=dict)  # name -> sha256
    commit_oid: Optional[str] = None
    commit_url: Optional[str] = None
    local_dir: Optional[Path] = None
    card: str = ""  # the README.md that was published or written


# -- arguments ------------------------------------------------------------------------------------------
def check_repo_id(repo_id: str) -> str:
    """A Hub model repo id, ``owner/name``: letters, digits, '-', '_', '.', at most 96 characters."""
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


def resolve_token(token: Optional[str] = None) -> str:
    """The token to write with: the argument, else HF_TOKEN, else the stored login."""
    token = token or get_token()
    if not token:
        raise MissingTokenError(
            "no Hugging Face token: set the HF_TOKEN environment variable or log in with `hf auth login` "
            "(a token with write access to the repo's owner); --local-dir writes the folder without one")
    return token


def _scrub(text: str, token: Optional[str]) -> str:
    return text.replace(token, "<token>") if token else text


def _sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- the run folder -------------------------------------------------------------------------------------
def load_run(model_dir: PathLike) -> Run:
    """Build the model that the run's config.json describes and load its weights, checking that they fit."""
    from .models import SDResNet

    path = Path(model_dir)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist (a run folder: config.json + model.safetensors)")
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; a run folder holds timm's config.json and "
                                f"{WEIGHTS_NAME}")
    if not weights_path.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = f" ({', '.join(pickles)} found: pickle checkpoints are neither loaded nor published)" if pickles else ""
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME}{hint}")
    try:
        config = read_run_config(config_path)
    except ValueError as e:
        raise CheckpointMismatchError(str(e)) from None
    architecture = config.get("architecture")
    if not timm.is_model(architecture or ""):
        raise CheckpointMismatchError(f"{config_path}: unknown architecture {architecture!r}")
    try:
        # timm's own loader: config.json's model_args, then a strict load of the weights (sdzoo 0.1 keys too,
        # through the model's pretrained_filter_fn), checked first by the model factory (sdzoo.integrity).
        model = timm.create_model(f"local-dir:{path}", pretrained=True)
    except WeightsError as e:  # the file does not fit config.json, contradicts it, or holds NaN/inf
        raise CheckpointMismatchError(str(e)) from None
    except (MemoryError, RuntimeError) as e:
        message = describe_failure(e, f"{architecture} from {config_path}")
        if message is None:  # torch's strict load: missing, unexpected or mis-shaped tensors
            args = ", ".join(f"{k}={v!r}" for k, v in sorted(model_kwargs_of_config(config).items()))
            message = (f"{weights_path} does not fit {architecture}({args}) as config.json describes it: "
                       f"{describe_load_error(e)}")
        raise CheckpointMismatchError(message) from None
    except (TypeError, ValueError) as e:
        raise CheckpointMismatchError(f"{config_path}: cannot build {architecture} from its model_args: {e}") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointMismatchError(f"cannot read {weights_path} as safetensors: {e}") from None
    if not isinstance(model, SDResNet):
        raise CheckpointMismatchError(f"{config_path}: {architecture} is not an sdzoo architecture")
    expected = head_args(config)
    built = dict(num_classes=model.num_classes, in_chans=model.in_chans, global_pool=model.global_pool.pool_type)
    differ = [f"{k}={built[k]!r} (config.json: {v!r})" for k, v in expected.items() if built.get(k, v) != v]
    if differ:
        raise CheckpointMismatchError(f"{config_path}: the model built from it has {', '.join(differ)}")
    summary_path = path / SUMMARY_NAME
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    except ValueError as e:
        raise CheckpointMismatchError(f"{summary_path} is not valid JSON: {e}") from None
    return Run(path=path, model=model.eval(), summary=summary)


# -- the Hub folder -------------------------------------------------------------------------------------
def run_folder_file(folder: PathLike, name: str) -> Optional[Path]:
    """``folder/name`` if it is there, refusing anything but a regular file inside the folder: a symbolic link
    (to a private file, say) or a special file is never read, let alone published."""
    path = Path(folder) / name
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        raise ValueError(f"{path} is a symbolic link (to {os.readlink(path)}): only regular files inside the run "
                         "folder are published; put the file itself there (or name it with --onnx / --curves)")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file: only regular files inside the run folder are published")
    return path


def _copy_without_links(src: Path, dst: Path) -> None:
    """Copy a run folder's file, refusing it if it became a link since it was checked (O_NOFOLLOW)."""
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise ValueError(f"{src} cannot be published as a regular file of the run folder: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f_in, open(dst, "wb") as f_out:
        if not stat.S_ISREG(os.fstat(f_in.fileno()).st_mode):
            raise ValueError(f"{src} is not a regular file: only regular files inside the run folder are published")
        shutil.copyfileobj(f_in, f_out)


def onnx_folded(onnx_path: PathLike) -> Optional[bool]:
    """What the ONNX file's own metadata says: p_l folded into the weights, not folded, or not said (None)."""
    from .onnx_export import read_metadata

    value = read_metadata(os.fspath(onnx_path)).get("folded")
    return {"true": True, "false": False}.get(value)


def _extras(run: Run, onnx: Optional[PathLike], curves: Optional[PathLike]) -> Dict[str, Tuple[Path, bool]]:
    """Optional files of the repo (name in the repo -> source, whether it is a file of the run folder): ONNX,
    training curves, per-epoch metrics. Files named by the caller are taken as given."""
    for name, given in (("onnx", onnx), ("curves", curves)):
        if given and not Path(given).is_file():
            raise FileNotFoundError(f"{name}: no file at {given}")
    if onnx and Path(onnx).suffix != ".onnx":
        raise ValueError(f"onnx must be a .onnx file; got {onnx}")
    extras = {}
    for name, given in ((ONNX_NAME, onnx), (CURVES_NAME, curves), (METRICS_NAME, None)):
        if given:
            extras[name] = (Path(given), False)
        elif (found := run_folder_file(run.path, name)) is not None:
            extras[name] = (found, True)
    if METRICS_NAME in extras:  # every line a record: a corrupt one is named, never published
        try:
            read_metrics(extras[METRICS_NAME][0])
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{e}; the run's log is corrupt: fix or remove that line before publishing") from None
    return extras


def check_onnx_matches(run: Run, onnx_path: PathLike) -> None:
    """The ONNX file must compute what the published weights compute: the export's own onnxruntime check
    (at the file's input size), so that a file exported from another epoch or run is never published."""
    import onnx

    from .onnx_export import ExportError, verify_onnx

    try:
        dims = onnx.load(os.fspath(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        input_size = [int(d.dim_value) for d in dims[1:]]
        verify_onnx(onnx_path, run.model, input_size=input_size, batch_sizes=(1, 3), atol=1e-4, rtol=1e-4)
    except (ExportError, ValueError, IndexError) as e:
        raise CheckpointMismatchError(
            f"onnx: {onnx_path} does not compute what {run.path / WEIGHTS_NAME} computes ({e}); it was exported "
            f"from other weights. Export it again: python scripts/export_onnx.py --model local-dir:{run.path} "
            f"--output {onnx_path}") from None


def stage_hub_folder(run: Run, folder: PathLike, repo_id: str, onnx: Optional[PathLike] = None,
                     curves: Optional[PathLike] = None, card_template: Optional[str] = None) -> List[str]:
    """Write the repo's files into ``folder`` (an empty directory); returns their names."""
    folder = Path(folder)
    # Only what the card reads is published of summary.json, each value of the type it must be.
    summary = None if run.summary is None else published_summary(run.summary, where=str(run.path / SUMMARY_NAME))
    extras = _extras(run, onnx, curves)
    folded = None
    if ONNX_NAME in extras:
        _logger.info(f"Checking {extras[ONNX_NAME][0]} against the weights with onnxruntime")
        check_onnx_matches(run, extras[ONNX_NAME][0])
        folded = onnx_folded(extras[ONNX_NAME][0])
    # timm's own Hub format: safetensors weights (with their survival settings in the metadata) and a
    # config.json that carries the model arguments, written to load in transformers too.
    save_weights(folder / WEIGHTS_NAME, run.model)
    config = write_config(folder / CONFIG_NAME, run.model)
    for name, (src, in_run_folder) in extras.items():
        if in_run_folder:
            _copy_without_links(src, folder / name)
        else:
            shutil.copyfile(src, folder / name)
    if summary is not None:
        with open(folder / SUMMARY_NAME, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    files = sorted([WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, *extras] + ([SUMMARY_NAME] if summary is not None else []))
    card = render_model_card(
        repo_id, config, summary, block_probs=run.model.block_survival_probs(),
        num_params=sum(p.numel() for p in run.model.parameters()), files=files, file_notes=FILE_NOTES,
        template=card_template, onnx_folded=folded)
    (folder / CARD_NAME).write_text(card, encoding="utf-8")
    return files


def write_hub_folder(run: Run, out_dir: PathLike, repo_id: str, **kwargs) -> List[str]:
    """``stage_hub_folder`` into a new folder, atomically: staged beside it, then renamed into place."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"local_dir {out_dir} exists and is not an empty folder; choose a new one")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        files = stage_hub_folder(run, staging, repo_id, **kwargs)
        try:
            if out_dir.exists():
                out_dir.rmdir()
            os.rename(staging, out_dir)  # onto nothing or an empty folder; never onto another's files
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise FileExistsError(
                f"local_dir {out_dir} was filled by another process while this one prepared its files; nothing of "
                "this one was written there (its files are left as the other process wrote them): choose a new "
                "folder") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return files


# -- upload and check -----------------------------------------------------------------------------------
def _http_error(error: BaseException) -> Optional[HfHubHTTPError]:
    # The client raises a storage upload's HTTP error as the cause of its own RuntimeError.
    while error is not None and not isinstance(error, HfHubHTTPError):
        error = error.__cause__
    return error


def _reason(error: BaseException) -> str:
    """What went wrong, in one line: the HTTP status, the request and the server's message, or the error."""
    http = _http_error(error)
    if http is None:
        return f"{type(error).__name__}: {error}"
    request = http.response.request  # the error's own .request is httpx's, which is not always set
    return (f"HTTP {http.response.status_code} from {request.method} {request.url.path}"
            + (f" ({http.server_message})" if http.server_message else ""))


def _timed_out(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, (HubTimeout, httpx2.TimeoutException)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _upload_error(repo_id: str, step: str, error: BaseException, token: str, state: str) -> UploadError:
    http = _http_error(error)
    status = http.response.status_code if http is not None else None
    if status == 401:
        advice = "the Hub refused the token: check HF_TOKEN or `hf auth login`"
    elif status == 403:
        advice = f"the token cannot write to {repo_id.split('/')[0]!r}"
    elif _timed_out(error) and "asked to wait" in str(error):
        advice = "rerun once the Hub is less busy (or with a --timeout that covers the wait)"
    elif _timed_out(error):
        advice = "the Hub did not answer in time (--timeout); rerun to retry"
    else:
        advice = "rerun to retry"
    return UploadError(_scrub(f"uploading to {repo_id} failed while {step}: {_reason(error)}; {advice}. "
                              f"{state}", token))


@contextlib.contextmanager
def bounded_waits(timeout: float):
    """Every request of huggingface_hub's shared HTTP client ends within ``timeout`` seconds, end to end
    (``sdzoo._hub_http``): calls that pass ``timeout=None`` and servers that trickle their answer included; a
    request past its deadline is not retried, and a wait the Hub asks for beyond ``timeout`` is not slept."""
    from huggingface_hub.utils import _http  # the default client's request hook: offline mode, request ids

    check_seconds("timeout", timeout)
    # huggingface_hub has no public getter for the factory in use; the default one if the attribute went away.
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)
    set_client_factory(lambda: deadline_client(timeout, event_hooks={"request": [_http.hf_request_event_hook]}))
    try:
        yield
    finally:
        set_client_factory(previous)


def upload_hub_folder(
        folder: PathLike,
        repo_id: str,
        token: str,
        private: bool = False,
        commit_message: Optional[str] = None,
        endpoint: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
):
    """Create the repo if needed and upload ``folder`` to its main branch with ``HfApi.upload_folder``: one
    commit for a folder this size (timm's ``push_to_hf_hub`` does the same).

    Each request ends within ``timeout`` seconds. When the upload fails, a repo this call created is deleted
    again, and the error says what the Hub holds: after a failed commit call the Hub is asked whether main
    moved (and whether it holds these files); what cannot be known is said to be unknown."""
    folder = Path(folder)
    api = HfApi(endpoint=endpoint, token=token, library_name="sdzoo", library_version=__version__)
    step, created, before = "checking whether the repo exists", False, None
    with bounded_waits(timeout):
        try:
            existed = api.repo_exists(repo_id)
            step = "creating the repo"
            if not existed:
                _logger.info(f"Creating {'private ' if private else ''}repo {repo_id}")
                api.create_repo(repo_id, private=private, exist_ok=True)
                created = True
            step = "reading the repo's main branch"
            info = api.model_info(repo_id)
            if existed and private and not info.private:
                raise UploadError(f"{repo_id} exists and is public; --private does not change an existing repo's "
                                  "visibility (change it on the Hub, or publish to a new repo)")
            before = info.sha
            paths = sorted(p for p in folder.iterdir() if p.is_file())
            size = sum(p.stat().st_size for p in paths) / 2**20
            _logger.info(f"Uploading {len(paths)} files ({size:.1f} MiB) to {repo_id} in one commit "
                         f"(each request ends within {timeout:g} s)")
            step = "uploading and committing the files"
            return api.upload_folder(repo_id=repo_id, folder_path=folder, parent_commit=before,
                                     commit_message=commit_message or "Upload model with sdzoo")
        except Exception as e:  # noqa: BLE001  HTTP, connection and storage errors alike
            if created:
                state = _delete_created_repo(api, repo_id)
            elif step == "uploading and committing the files":
                state = _state_after_failed_commit(api, folder, repo_id, before, token, timeout)
            elif step == "creating the repo" and _http_error(e) is None:
                state = (f"Nothing was committed, but the Hub's answer to creating {repo_id} was lost: the repo may "
                         f"or may not exist now (empty); look at {api.endpoint}/{repo_id}.")
            else:
                state = "Nothing was committed: no commit request was sent."
            if isinstance(e, UploadError):
                raise UploadError(f"{e} {state}") from None
            raise _upload_error(repo_id, step, e, token, state) from e


def _state_after_failed_commit(api: HfApi, folder: Path, repo_id: str, before: str, token: str,
                               timeout: float) -> str:
    """What the Hub holds after a failed upload, asked of the Hub (each request bounded): main as before,
    main moved to a commit holding these files, main moved to other files, or unknown."""
    look = f"look at {api.endpoint}/{repo_id}/commits/main before you retry"
    try:
        now = api.model_info(repo_id).sha
    except Exception as e:  # noqa: BLE001
        return (f"The commit may or may not have been made: asking the Hub where main is failed too "
                f"({_scrub(_reason(e), token)}); {look}.")
    if now == before:
        return f"Nothing was committed: main is still at {before}, as before this upload (asked the Hub)."
    try:
        verify_upload(folder, repo_id, now, token=token, endpoint=api.endpoint, timeout=timeout)
    except VerificationError:
        return (f"main moved from {before} to {now}, which does not hold the files of this upload: another "
                f"commit landed, and this one may or may not have been made; {look}.")
    return (f"The commit was made, but its answer was lost: main moved from {before} to {now}, which holds "
            "every file of this upload (hashes checked).")


def _delete_created_repo(api: HfApi, repo_id: str) -> str:
    """A first upload that failed leaves no repo behind: what state the repo is left in."""
    try:
        api.delete_repo(repo_id, missing_ok=True)
    except Exception as e:  # noqa: BLE001
        return (f"The repo {repo_id}, which this upload had created, could not be deleted again ({_reason(e)}): "
                "it is left empty (only .gitattributes) or, if the commit was made, with this upload; look at "
                "it on the Hub, delete it or rerun to fill it.")
    return f"The repo {repo_id}, which this upload had created, was deleted again: the Hub holds nothing of it."


def verify_upload(
        folder: PathLike,
        repo_id: str,
        revision: str,
        token: Optional[str] = None,
        endpoint: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
) -> Dict[str, str]:
    """Check every file of ``folder`` against what the repo holds at ``revision``, without downloading: the
    Hub's sha256 of each LFS file, the git blob id of each other file (``HfApi.get_paths_info``).
    Returns name -> sha256 of the local files."""
    paths = sorted(p for p in Path(folder).iterdir() if p.is_file())
    api = HfApi(endpoint=endpoint, token=token, library_name="sdzoo", library_version=__version__)
    with bounded_waits(timeout):
        try:
            remote = {f.path: f for f in api.get_paths_info(repo_id, [p.name for p in paths], revision=revision)}
        except Exception as e:  # noqa: BLE001
            raise VerificationError(_scrub(f"commit {revision} of {repo_id} was created, but asking the Hub what "
                                           f"it holds failed: {_reason(e)}", token)) from None
    hashes, mismatched = {}, []
    for path in paths:
        hashes[path.name] = _sha256(path)
        entry = remote.get(path.name)
        if not isinstance(entry, RepoFile):
            mismatched.append(f"{path.name} (missing)")
        elif entry.lfs is not None:
            if entry.lfs.sha256 != hashes[path.name]:
                mismatched.append(f"{path.name} (sha256 {entry.lfs.sha256})")
        elif entry.blob_id != git_hash(path.read_bytes()):  # a small file, stored in git itself
            mismatched.append(f"{path.name} (git blob {entry.blob_id})")
    if mismatched:
        raise VerificationError(f"commit {revision} of {repo_id} was created, but the Hub holds other content "
                                f"than was uploaded: {', '.join(mismatched)}")
    return hashes


def publish(
        model_dir: PathLike,
        repo_id: str,
        *,
        local_dir: Optional[PathLike] = None,
        token: Optional[str] = None,
        private: bool = False,
        commit_message: Optional[str] = None,
        onnx: Optional[PathLike] = None,
        curves: Optional[PathLike] = None,
        card_template: Optional[str] = None,
        endpoint: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
) -> PublishResult:
    """Publish a run folder to ``repo_id`` and check it by hash, or write the repo folder to ``local_dir``.

    Everything that can be checked locally is checked before any upload: the repo id, the token, that the
    weights fit the architecture, the summary, the extra files.
    """
    check_repo_id(repo_id)
    check_seconds("timeout", timeout)  # before any work, not at the first request
    if local_dir is None:
        token = resolve_token(token)
    for name in (CONFIG_NAME, WEIGHTS_NAME, SUMMARY_NAME):  # nothing behind a link is read, let alone published
        run_folder_file(model_dir, name)
    _logger.info(f"Loading the run in {model_dir}")
    run = load_run(model_dir)
    stage_kwargs = dict(onnx=onnx, curves=curves, card_template=card_template)
    if local_dir is not None:
        files = write_hub_folder(run, local_dir, repo_id, **stage_kwargs)
        local_dir = Path(local_dir)
        _logger.info(f"Wrote {', '.join(files)} to {local_dir}")
        return PublishResult(repo_id, {f: _sha256(local_dir / f) for f in files}, local_dir=local_dir,
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
