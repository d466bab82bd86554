"""Loading what sdzoo publishes, and checking it; this side only reads. A run folder and a Hub repo are untrusted
input: every failure names the file and what is wrong with it, and no message contains the token.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import onnx
import timm
from huggingface_hub import RepoFile
from huggingface_hub.utils.sha import git_hash, sha_fileobj
from safetensors import SafetensorError
from torch import nn

from sdzoo.files.disk import PathLike
from sdzoo.files.hub_http import DEFAULT_TIMEOUT, bounded_waits, describe_error, hub_api, scrub_token
from sdzoo.files.run_folder import CONFIG_NAME, SUMMARY_NAME, WEIGHTS_NAME, read_run_config
from sdzoo.files.hf_config import head_args, model_kwargs_of_config
from sdzoo.files.weights import PICKLE_SUFFIXES, WeightsError, load_failure_reason
from sdzoo.export.onnx_export import ExportError, verify_onnx
from sdzoo.models import SDResNet


class HubError(RuntimeError):
    """Loading, checking or publishing a run failed. The message says what and where, never the token."""


class CheckpointMismatchError(HubError):
    """The files of a run folder do not fit one another (config.json, the weights, summary.json, an ONNX file)."""


class VerificationError(HubError):
    """A Hub commit does not hold what was uploaded, or the Hub could not say what it holds."""


@dataclass
class LoadedRun:
    """A run folder, loaded: the model with its weights (eval mode) and the run's summary.json."""
    path: Path
    model: nn.Module
    summary: Optional[Dict[str, Any]]


def file_sha256(path: PathLike) -> str:
    """The hex sha256 of a file, as the Hub reports it for an LFS file."""
    with open(path, "rb") as f:
        return sha_fileobj(f).hex()


def load_run(model_dir: PathLike) -> LoadedRun:
    """Build the model that the run's config.json describes and load its weights, checking that they fit."""
    path = Path(model_dir)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist (a run folder: config.json + model.safetensors)")
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; a run folder holds timm's config.json and "
                                f"{WEIGHTS_NAME}")
    if not weights_path.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" ({', '.join(pickles)} found: pickle checkpoints are neither loaded nor published)" if pickles else ""
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME}{hint}")
    try:
        config = read_run_config(config_path)
    except ValueError as e:
        raise CheckpointMismatchError(str(e)) from None
    architecture = config["architecture"]  # a str: read_run_config checks it
    if not timm.is_model(architecture):
        raise CheckpointMismatchError(f"{config_path}: unknown architecture {architecture!r}")
    try:  # timm's own loader, the weights checked first by the model factory (sdzoo.files.weights)
        model = timm.create_model(f"local-dir:{path}", pretrained=True)
    except WeightsError as e:  # the file does not fit config.json, contradicts it, or holds NaN/inf
        raise CheckpointMismatchError(str(e)) from None
    except (MemoryError, RuntimeError) as e:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(model_kwargs_of_config(config).items()))
        reason = load_failure_reason(e, f"{architecture}({args}) as config.json describes it")
        raise CheckpointMismatchError(f"{weights_path}: {reason}") from None
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
    return LoadedRun(path=path, model=model.eval(), summary=summary)


def check_onnx_matches(run: LoadedRun, onnx_path: PathLike) -> None:
    """The ONNX file must compute what the run's weights compute (the export's own onnxruntime check, at the
    file's input size): a file exported from another epoch or run is never published."""
    try:
        dims = onnx.load(os.fspath(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        input_size = [int(d.dim_value) for d in dims[1:]]
        verify_onnx(onnx_path, run.model, input_size=input_size, batch_sizes=(1, 3), atol=1e-4, rtol=1e-4)
    except (ExportError, ValueError, IndexError) as e:
        raise CheckpointMismatchError(
            f"onnx: {onnx_path} does not compute what {run.path / WEIGHTS_NAME} computes ({e}); it was exported "
            f"from other weights. Export it again: sdzoo export --model local-dir:{run.path} "
            f"--output {onnx_path}") from None


def verify_upload(folder: PathLike, repo_id: str, revision: str, token: Optional[str] = None,
                  endpoint: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT) -> Dict[str, str]:
    """Check every file of ``folder`` against the repo at ``revision`` without a download (``get_paths_info``:
    the sha256 of an LFS file, the git blob id of another). Returns name -> sha256 of the local files."""
    paths = sorted(p for p in Path(folder).iterdir() if p.is_file())
    api = hub_api(endpoint, token)
    with bounded_waits(timeout):
        try:
            remote = {f.path: f for f in api.get_paths_info(repo_id, [p.name for p in paths], revision=revision)}
        except Exception as e:  # noqa: BLE001
            raise VerificationError(scrub_token(f"commit {revision} of {repo_id} was created, but asking the Hub "
                                                f"what it holds failed: {describe_error(e)}", token)) from None
    hashes, mismatched = {}, []
    for path in paths:
        hashes[path.name] = file_sha256(path)
        entry = remote.get(path.name)
        if not isinstance(entry, RepoFile):
            mismatched.append(f"{path.name} (missing)")
        elif entry.lfs is not None and entry.lfs.sha256 != hashes[path.name]:
            mismatched.append(f"{path.name} (sha256 {entry.lfs.sha256})")
        elif entry.lfs is None and entry.blob_id != git_hash(path.read_bytes()):  # a small file, stored in git
            mismatched.append(f"{path.name} (git blob {entry.blob_id})")
    if mismatched:
        raise VerificationError(f"commit {revision} of {repo_id} was created, but the Hub holds other content "
                                f"than was uploaded: {', '.join(mismatched)}")
    return hashes
