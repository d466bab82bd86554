"""Publish a training run to the Hugging Face Hub, with a model card, and check what arrived.

    sdzoo push --model local-dir:runs/r110 --repo-id ORG/sd_resnet110_cifar.cifar10
    sdzoo push --model runs/r110 --repo-id ORG/NAME --onnx r110.onnx --private
    sdzoo push --model runs/r110 --repo-id ORG/NAME --local-dir out/NAME   # no upload

The token comes from HF_TOKEN or `hf auth login`: no --token flag, as a command line ends up in shell history.
Exit status: 0 published, 2 a wrong flag or run folder, 1 the upload or its check failed.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from sdzoo.cli.common import EXIT_USAGE, first_paragraph
from sdzoo.files.checks import check_output_path, check_seconds
from sdzoo.files.disk import is_new_or_empty_folder, write_text
from sdzoo.hub.upload import DEFAULT_TIMEOUT, CheckpointMismatchError, HubError, publish

EXIT_ERROR = 1  # the upload or its check failed; EXIT_USAGE: what was given is wrong (flags, the run folder)
HELP = "publish a run folder to the Hugging Face Hub with its model card, and check what arrived"


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=first_paragraph(__doc__))
    parser.add_argument("--model", required=True,
                        help="the run folder: local-dir:PATH or PATH (config.json + model.safetensors)")
    parser.add_argument("--repo-id", required=True,
                        help="the Hub repo, OWNER/NAME (e.g. ORG/sd_resnet110_cifar.cifar10)")
    parser.add_argument("--local-dir",
                        help="write the repo's files to this new folder instead of uploading (no token needed)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--commit-message", help="commit message")
    parser.add_argument("--onnx", help="ONNX file to include as model.onnx (default: RUN/model.onnx if any)")
    parser.add_argument("--curves", help="training curves to include (default: RUN/curves.png if any)")
    parser.add_argument("--card-template", help="model card, a Jinja template (default: the one shipped with sdzoo)")
    parser.add_argument("--card-dir", help="also save the published card as CARD_DIR/NAME.md (the zoo's record: "
                                           "model_cards); default: not saved")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds within which each request to the Hub must end, its whole answer read "
                             "(a positive, finite number; default: %(default)s)")
    parser.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT, else https://huggingface.co)")
    return parser


def card_path(card_dir: Path, repo_id: str) -> Path:
    """Where the card of ``repo_id`` goes, NAME.md, checked before the upload: a repo id never replaces a file
    that is not an earlier card of the same repo (the folder's README.md, the template, another repo's card)."""
    path = card_dir / f"{repo_id.split('/')[-1]}.md"
    check_output_path("--card-dir", path)
    if path.exists() and f"hf-hub:{repo_id}" not in path.read_text(encoding="utf-8", errors="replace"):
        raise ValueError(f"--card-dir: {path} exists and is not a card of {repo_id}; --repo-id {repo_id} "
                         "would replace it: choose another --card-dir or repo name")
    return path


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per HTTP request is noise here
    card = None
    try:  # every argument checked before the run is loaded
        check_seconds("--timeout", args.timeout)  # the flag's name, before publish() checks its argument
        if args.local_dir:
            check_output_path("--local-dir", args.local_dir, kind="folder")
            if not is_new_or_empty_folder(args.local_dir):
                raise ValueError(f"--local-dir {args.local_dir} is not empty; give a new folder")
        if args.model.startswith("hf-hub:"):
            raise ValueError("--model must be a local run folder (local-dir:PATH or PATH), not an hf-hub: repo")
        if args.card_dir and not args.local_dir:
            card = card_path(Path(args.card_dir), args.repo_id)
        template = Path(args.card_template).read_text(encoding="utf-8") if args.card_template else None
        result = publish(args.model.removeprefix("local-dir:"), args.repo_id, local_dir=args.local_dir,
                         private=args.private, commit_message=args.commit_message, onnx=args.onnx, curves=args.curves,
                         card_template=template, endpoint=args.endpoint, timeout=args.timeout)
    except (HubError, ValueError, OSError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        given = isinstance(err, (ValueError, CheckpointMismatchError, FileNotFoundError, NotADirectoryError))
        return EXIT_USAGE if given else EXIT_ERROR
    if args.local_dir:
        print(f"wrote {len(result.files)} files to {result.local_dir}; load them with "
              f"timm.create_model('local-dir:{result.local_dir}', pretrained=True)")
        return 0
    if card is not None:
        try:
            card.parent.mkdir(parents=True, exist_ok=True)
            write_text(card, result.card)  # atomically: never half-written
            print(f"model card saved as {card}")
        except OSError as err:
            print(f"warning: published, but the card could not be saved as {card}: {err}", file=sys.stderr)
    print(f"published {args.repo_id} at commit {result.commit_oid}, every file's hash checked; load it with "
          f"timm.create_model('hf-hub:{args.repo_id}', pretrained=True)")
    return 0
