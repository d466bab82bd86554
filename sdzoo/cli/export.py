"""Export a trained stochastic-depth model to ONNX: fold p_l into the weights, export, verify, describe.

The file is kept only after onnx's full checker and an onnxruntime-vs-PyTorch check at several batch sizes pass;
otherwise the command exits 1 and writes nothing. Examples: docs/export.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import torch

import timm
from timm.models import load_state_dict

from sdzoo.cli.common import HUB_PREFIXES, fail, first_paragraph, parse_keeping_parser
from sdzoo.export.calibration import CALIBRATION_DATASETS, calibration_images, calibration_split_size
from sdzoo.export.depth import PRUNING_NAME, describe, run_settings, run_splits
from sdzoo.export.latency import compare_latency, format_latency
from sdzoo.export.onnx_export import (
    DEFAULT_OPSET, MAX_INPUT_SIDE, ExportError, check_opset, export_onnx, onnx_metadata, quantize_int8)
from sdzoo.files.checks import check_output_path, check_seconds, error_line
from sdzoo.files.disk import is_new_or_empty_folder, save_json, staged_folder
from sdzoo.files.hf_config import model_kwargs_of_config, write_config
from sdzoo.files.run_folder import CONFIG_NAME, WEIGHTS_NAME, read_run_config
from sdzoo.files.weights import (
    MissingWeightsError, WeightsError, WeightsProvenance, check_finite, load_failure_reason, out_of_memory_message,
    read_weights_settings, save_weights)
from sdzoo.fold import can_fold, fold_survival, is_folded
from sdzoo.gate import GATE_MODES, SCALINGS
from sdzoo.prune import ORDERS, prune_blocks
from sdzoo.survival import SURVIVAL_RULES, TRAINED_FIELDS
from sdzoo.training.data import DataError

HELP = "fold p_l into the weights, export ONNX and check it against PyTorch"
LOCAL_DIR = "local-dir:"


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=first_paragraph(__doc__),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a registered name (e.g. sd_resnet110_cifar), local-dir:PATH or hf-hub:ORG/NAME")
    parser.add_argument("--checkpoint", default=None,
                        help="weights for a registered name: .safetensors, or a torch file (loaded weights-only)")
    parser.add_argument("--output", required=True, help="the ONNX file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--no-fold", action="store_true",
                        help="export the model as it is (a multiply by p_l per block stays in the graph)")
    group = parser.add_argument_group("model arguments of a registered name (what the checkpoint was trained with)")
    group.add_argument("--num-classes", type=int, default=None)
    group.add_argument("--survival-prob", type=float, default=None,
                       help="p_L; 1.0 for constant depth or for a checkpoint that is already folded")
    group.add_argument("--survival-rule", default=None, choices=SURVIVAL_RULES)
    group.add_argument("--scaling", default=None, choices=SCALINGS)
    group.add_argument("--gate-mode", default=None, choices=GATE_MODES,
                       help="'off' for a checkpoint trained at constant depth (there is no p_l to fold)")
    group.add_argument("--checkpoint-folded", default=None, choices=("yes", "no"),
                       help="whether p_l is already in the weights of a --checkpoint that does not record it")
    parser.add_argument("--img-size", type=int, default=None,
                        help=f"input height and width, at most {MAX_INPUT_SIDE} (default: the model's)")
    parser.add_argument("--label-names", default=None,
                        help="class names written to the metadata: comma-separated, or @FILE with one per line")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest accepted onnxruntime-vs-PyTorch difference")
    parser.add_argument("--rtol", type=float, default=0.0,
                        help="adds rtol x the largest |logit| to --atol (untrained deep models have huge logits)")
    parser.add_argument("--verify-batch-sizes", default="1,3,16", help="batch sizes of the parity check")
    parser.add_argument("--quantize", default=None, choices=("int8",),
                        help="also write a static int8 (QDQ) model next to the output")
    parser.add_argument("--quant-output", default=None, help="the int8 file (default: OUTPUT with .int8.onnx)")
    parser.add_argument("--calib-data", default=None, choices=CALIBRATION_DATASETS,
                        help="calibration images (default: the model's own data set, as its cfg tag names it, when "
                             f"it is one of these; else {CALIBRATION_DATASETS[0]})")
    parser.add_argument("--calib-images", type=int, default=256,
                        help="training images used to calibrate; the test split measures top-1 agreement")
    parser.add_argument("--benchmark", action="store_true",
                        help="CPU latency at batch 1 and 32: onnxruntime (int8 too, with --quantize) against PyTorch")
    parser.add_argument("--bench-seconds", type=float, default=0.5,
                        help="seconds of timed runs per latency (torch.utils.benchmark; the median is reported)")
    group = parser.add_argument_group("depth on demand (sdzoo.prune): export a shallower network of the same model")
    group.add_argument("--keep-blocks", type=int, default=None, metavar="K",
                       help="keep K residual blocks (at least the first block of each stage)")
    group.add_argument("--prune-order", default="survival", metavar="ORDER",
                       help="which blocks go: survival (lowest p_l first), evenly (spaced evenly in each stage), "
                            "greedy (least validation loss, on the run's validation split), or the blocks to "
                            "keep as comma-separated names (layer1.0,layer2.0,...)")
    group.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                       help="re-estimate BatchNorm statistics on N training images after pruning")
    group.add_argument("--dataset", default=None,
                       help="data set of greedy and --recalibrate-bn for a model without a run's summary.json")
    group.add_argument("--data-dir", default=None, help="folder of that data set (default: the run's)")
    group.add_argument("--pruned-dir", default=None,
                       help="also write the pruned model as a new folder (config.json, model.safetensors and "
                            "pruning.json: its measurements), which sdzoo push publishes")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    return parse_keeping_parser(build_parser(prog), argv)


# -- checks of the flags, before anything is loaded or written ------------------------------------------------
def check_flags(args: argparse.Namespace) -> List[int]:
    """Every flag that can be checked alone; returns the parity check's batch sizes."""
    if args.img_size is not None and not 1 <= args.img_size <= MAX_INPUT_SIDE:
        fail(args, f"--img-size must be an integer from 1 to {MAX_INPUT_SIDE}; got {args.img_size}")
    check_output_paths(args)
    try:
        batch_sizes = [int(s) for s in args.verify_batch_sizes.split(",")]
    except ValueError:
        batch_sizes = []
    if not batch_sizes or min(batch_sizes) < 1:
        fail(args, f"--verify-batch-sizes must be comma-separated positive integers; got {args.verify_batch_sizes!r}")
    if args.quantize and args.calib_data:
        check_calib_images(args)
    try:
        check_seconds("--bench-seconds", args.bench_seconds)
    except ValueError as err:
        fail(args, str(err))
    try:
        check_opset(args.opset)
    except ValueError as err:
        fail(args, f"--{err}")  # "opset must be ...": the flag is the argument's name
    if not (args.atol >= 0 and args.rtol >= 0):
        fail(args, f"--atol and --rtol must be >= 0; got {args.atol} and {args.rtol}")
    check_prune_flags(args)
    return batch_sizes


def check_output_paths(args: argparse.Namespace) -> None:
    """The files this export writes: never one of its inputs, never a folder, in a folder that can be written."""
    outputs = [("--output", args.output)] + ([("--quant-output", quant_output_of(args))] if args.quantize else [])
    inputs = [("--checkpoint", args.checkpoint)] if args.checkpoint else []
    if args.label_names and args.label_names.startswith("@"):
        inputs.append(("--label-names", args.label_names[1:]))
    if args.model.startswith(LOCAL_DIR):
        inputs += [(f"--model {args.model}", os.path.join(args.model[len(LOCAL_DIR):], name))
                   for name in (CONFIG_NAME, WEIGHTS_NAME, "pytorch_model.bin")]
    for flag, path in outputs:
        if os.path.isdir(path):
            fail(args, f"{flag} {path} is a directory; give the file to write "
                       f"(e.g. {os.path.join(path, 'model.onnx')})")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            fail(args, f"{flag}: directory {parent!r} {'is a file' if os.path.exists(parent) else 'does not exist'}")
        try:  # a file with no name, gone however the process ends: can the folder be written?
            tempfile.TemporaryFile(dir=parent).close()
        except OSError as err:
            fail(args, f"{flag}: cannot write to directory {parent!r} ({err.strerror or err}); give an output in "
                       "a folder you can write to")
        for input_flag, source in inputs:
            if _same_file(path, source):
                fail(args, f"{flag} {path} is the file {input_flag} reads; writing it would destroy the "
                           "input: choose another output file")
    if len(outputs) == 2 and _same_file(outputs[0][1], outputs[1][1]):
        fail(args, f"--quant-output {outputs[1][1]} is --output: the int8 file would replace the checked fp32 one")


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_calib_images(args: argparse.Namespace) -> None:
    available = calibration_split_size(args.calib_data, "train")
    if not 0 < args.calib_images <= available:
        fail(args, f"--calib-images must be from 1 to {available} (the {args.calib_data} training split); "
                   f"got {args.calib_images}")


def check_prune_flags(args: argparse.Namespace) -> None:
    if not pruning(args):
        for flag, given in (("--prune-order", args.prune_order != "survival"),
                            ("--recalibrate-bn", args.recalibrate_bn), ("--pruned-dir", args.pruned_dir)):
            if given:
                fail(args, f"{flag} applies to a pruned export: give --keep-blocks K (or the blocks to keep as "
                           "--prune-order NAME,NAME,...)")
    elif args.no_fold:
        fail(args, "--no-fold: a pruned model is folded (sdzoo.prune folds it); leave --no-fold out")
    elif args.pruned_dir and not is_new_or_empty_folder(args.pruned_dir):
        fail(args, f"--pruned-dir {args.pruned_dir} exists and is not an empty folder; choose a new one")
    elif args.pruned_dir:  # written last, after the export and its measurements: refused now if it cannot be
        try:
            check_output_path("--pruned-dir", args.pruned_dir, kind="folder")
        except ValueError as err:
            fail(args, str(err))


def pruning(args: argparse.Namespace) -> bool:
    return args.keep_blocks is not None or args.prune_order not in ORDERS


def label_names_of(args: argparse.Namespace) -> Optional[List[str]]:
    if args.label_names is None:
        return None
    if args.label_names.startswith("@"):
        try:
            with open(args.label_names[1:]) as f:
                return [line.strip() for line in f if line.strip()]
        except OSError as err:
            fail(args, f"--label-names: cannot read {args.label_names[1:]!r}: {err.strerror}")
    return [name.strip() for name in args.label_names.split(",")]


def quant_output_of(args: argparse.Namespace) -> str:
    return args.quant_output or args.output.removesuffix(".onnx") + ".int8.onnx"


# -- model --------------------------------------------------------------------------------------------------
def create_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.model.startswith(HUB_PREFIXES):
        return _create_pretrained(args)
    if not timm.is_model(args.model):
        zoo = ", ".join(timm.list_models("sd_*"))
        fail(args, f"--model: unknown model {args.model!r}; give a registered name ({zoo}), "
                   "local-dir:PATH or hf-hub:ORG/NAME")
    # The flags of the settings the fold depends on are named after them: --survival-prob is survival_prob.
    kwargs = {k: getattr(args, k) for k in ("num_classes", *TRAINED_FIELDS) if getattr(args, k) is not None}
    if args.checkpoint is not None:
        if not os.path.isfile(args.checkpoint):
            fail(args, f"--checkpoint: no such file {args.checkpoint!r}")
        kwargs = settings_of_checkpoint(args, kwargs)
        if args.checkpoint.endswith(".safetensors"):
            return create_from_safetensors(args, kwargs)
    try:
        model = timm.create_model(args.model, **kwargs)
    except (ValueError, TypeError) as err:
        fail(args, f"--model {args.model}: {err}")
    except (MemoryError, RuntimeError) as err:
        fail(args, f"--model {args.model}: {out_of_memory_message(err, args.model) or error_line(err)}")
    if args.checkpoint is None:
        print(f"note: no --checkpoint given, exporting {args.model} with its initial weights")
    else:
        load_checkpoint(args, model, args.checkpoint)
    return model


def settings_of_checkpoint(args: argparse.Namespace, given: Dict[str, Any]) -> Dict[str, Any]:
    """The model arguments of a bare checkpoint: those its safetensors metadata records, where the flags given
    agree; without that metadata, every setting the fold depends on from the flags. A wrong p_L or scaling
    would be folded into the weights and still pass the parity check: ask, never guess."""
    recorded = None
    if args.checkpoint.endswith(".safetensors"):
        try:
            recorded = read_weights_settings(args.checkpoint)
        except Exception as err:  # noqa: BLE001  (a damaged header, whatever the safetensors reader raises)
            fail(args, f"--checkpoint {args.checkpoint}: cannot read its metadata: {error_line(err)}")
    if recorded is None:
        missing = [f"--{k.replace('_', '-')}" for k in TRAINED_FIELDS if k not in given]
        if args.checkpoint_folded is None:
            missing.append("--checkpoint-folded")
        if missing:
            fail(args, f"--checkpoint {args.checkpoint} does not record the settings it was trained with: give "
                       f"{', '.join(missing)} (all of --survival-prob, --survival-rule, --scaling and --gate-mode, "
                       "as trained, --gate-mode off for constant depth; and --checkpoint-folded yes or no: whether "
                       "p_l is already in its weights, which the weights themselves cannot show)")
        if args.checkpoint_folded == "yes":  # built as the plain ResNet it is: never folded a second time
            return dict(given, folded_from={k: given[k] for k in TRAINED_FIELDS})
        return given
    folded = bool(recorded["model_args"].get("folded_from"))
    if args.checkpoint_folded is not None and (args.checkpoint_folded == "yes") != folded:
        fail(args, f"--checkpoint-folded {args.checkpoint_folded}: {args.checkpoint} records that its weights are "
                   f"{'folded' if folded else 'not folded'}; leave the flag out")
    architecture = recorded.get("architecture")
    if architecture and architecture != args.model:
        fail(args, f"--checkpoint {args.checkpoint} holds {architecture} weights, not --model {args.model}")
    # num_classes from model_args, else the top level
    settings = {k: v for k, v in model_kwargs_of_config(recorded).items() if v is not None}
    differ = [f"--{k.replace('_', '-')} {v} (the checkpoint's: {settings[k]})" for k, v in given.items()
              if k in settings and settings[k] != v]
    if differ:
        fail(args, f"--checkpoint {args.checkpoint} records other settings than given: {', '.join(differ)}; "
                   "leave those flags out to use the recorded ones")
    return dict(settings, **given)


def create_from_safetensors(args: argparse.Namespace, kwargs: Dict[str, Any]) -> torch.nn.Module:
    """timm's pretrained load of the file: for sdzoo's models its header is checked against the model before
    anything is built (``sdzoo.files.weights.check_before_build``), and the load is strict."""
    path = args.checkpoint
    overlay = dict(file=os.path.abspath(path))
    if "num_classes" in kwargs:  # the classifier of the file: timm would drop one that differs from its cfg's
        overlay["num_classes"] = kwargs["num_classes"]
    try:
        model = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (WeightsError, MissingWeightsError) as err:  # the file against the model, or NaN in it
        fail(args, f"--checkpoint: {err}")
    except (ValueError, TypeError) as err:
        fail(args, f"--model {args.model}: {err}")
    except (MemoryError, RuntimeError) as err:  # a model that is no sdzoo model: torch's strict load
        fail(args, f"--checkpoint {path}: {load_failure_reason(err, f'--model {args.model}')}")
    except Exception as err:  # noqa: BLE001  (safetensors' own errors of a damaged file)
        fail(args, f"--checkpoint {path}: cannot read it as .safetensors: {error_line(err)}")
    check_loaded(args, model, path)
    return model


def _create_pretrained(args: argparse.Namespace) -> torch.nn.Module:
    for flag in ("checkpoint", "num_classes", *TRAINED_FIELDS):
        if getattr(args, flag) is not None:
            fail(args, f"--{flag.replace('_', '-')} applies to a registered model name only; "
                       f"{args.model} brings its weights and settings with it")
    if args.model.startswith(LOCAL_DIR):
        folder = args.model[len(LOCAL_DIR):]
        if not os.path.isdir(folder):
            fail(args, f"--model: no such directory {folder!r}")
        if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            try:
                read_run_config(os.path.join(folder, CONFIG_NAME))
            except ValueError as err:
                fail(args, f"--model {args.model}: {err}")
    try:
        return timm.create_model(args.model, pretrained=True)
    except (WeightsError, MissingWeightsError) as err:  # checked before anything was built (sdzoo.files.weights)
        fail(args, f"--model {args.model}: {err}")
    except (MemoryError, RuntimeError) as err:  # load_state_dict: the weights do not fit the architecture
        fail(args, f"--model {args.model}: {load_failure_reason(err, 'the architecture of its config.json')}")
    except Exception as err:  # noqa: BLE001  (missing files, unknown architecture, no network, ...)
        fail(args, f"--model {args.model}: cannot load it: {error_line(err)}")


def load_checkpoint(args: argparse.Namespace, model: torch.nn.Module, path: str) -> None:
    """A torch file (or safetensors) read by timm (EMA weights first, DDP and compile prefixes removed), then
    loaded strictly: two steps, so that an unreadable file and a mismatch get their own message."""
    try:
        state = load_state_dict(path, use_ema=True, weights_only=True)
    except Exception as err:  # noqa: BLE001  (safetensors, zip and unpickling errors alike)
        fail(args, f"--checkpoint {path}: cannot read it as .safetensors or a weights-only torch file: "
                   f"{error_line(err)}")
    try:
        model.load_state_dict(state, strict=True)  # the model's pre-hook refuses NaN, inf and a folded dict
    except WeightsError as err:
        fail(args, f"--checkpoint {path}: {err}")
    except RuntimeError as err:
        fail(args, f"--checkpoint {path} does not match --model {args.model} "
                   f"(num_classes={model.num_classes}): {error_line(err, 400, lines=4)}")
    check_loaded(args, model, path)


def check_loaded(args: argparse.Namespace, model: torch.nn.Module, path: str) -> None:
    """After a --checkpoint is loaded: no NaN or infinite weight, and the --checkpoint-folded record."""
    try:
        check_finite(model, path)  # models that are no SDResNet have no such pre-hook
    except WeightsError as err:
        fail(args, f"--checkpoint: {err}")
    if args.checkpoint_folded is not None and hasattr(model, "survival_settings"):
        # the flag is the record the file lacks: fold_survival then knows whether these weights are folded
        model.weights_provenance = WeightsProvenance(f"{path} (--checkpoint-folded {args.checkpoint_folded})",
                                                     model.survival_settings.as_recorded())


def input_size_of(args: argparse.Namespace, model: torch.nn.Module) -> List[int]:
    channels, height, width = model.pretrained_cfg.get("input_size", (3, 224, 224))
    if args.img_size is not None:
        height = width = args.img_size
    if max(height, width) > MAX_INPUT_SIDE:
        fail(args, f"--model {args.model}: its input size {height}x{width} is larger than the {MAX_INPUT_SIDE}x"
                   f"{MAX_INPUT_SIDE} exported at most; give --img-size (at most {MAX_INPUT_SIDE})")
    return [channels, height, width]


# -- depth on demand ----------------------------------------------------------------------------------------
# The flag of each argument of sdzoo.prune.prune_blocks, as its errors name it first.
PRUNE_FLAGS = {"keep": "--keep-blocks", "order": "--prune-order", "recalibrate_bn": "--recalibrate-bn",
               "data": "--dataset", "model": "--model"}


def prune_data(args: argparse.Namespace, model: torch.nn.Module, needs_val: bool) -> Dict[str, Any]:
    """The splits of the model's data set, the run's or --dataset's: greedy ranks on the validation split,
    --recalibrate-bn uses the training split, --pruned-dir measures on the test split."""
    settings = None
    if args.model.startswith(HUB_PREFIXES):
        try:
            settings = run_settings(args.model)
        except Exception as err:  # noqa: BLE001  (a missing or unreadable summary.json of a Hub repo)
            fail(args, f"--model {args.model}: cannot read its summary.json: {error_line(err)}")
    if args.dataset:
        settings = dict(settings or {}, dataset=args.dataset)
    if settings is None:
        fail(args, f"--prune-order greedy, --recalibrate-bn and --pruned-dir need the model's data set: {args.model} "
                   "brings none (a run folder or Hub repo brings its summary.json); give --dataset (and --data-dir)")
    try:
        cfg = model.pretrained_cfg
        splits = run_splits(settings, cfg["mean"], cfg["std"], data_dir=args.data_dir)
    except (DataError, ValueError) as err:
        fail(args, f"--dataset/--data-dir: {err}")
    if needs_val and "val" not in splits:
        fail(args, f"--prune-order greedy ranks blocks on a validation split, and {settings['dataset']} as the run "
                   "loaded it has none (--val-size 0); choose another --prune-order")
    return splits


def prune(args: argparse.Namespace, model: torch.nn.Module):
    """The pruned model (sdzoo.prune), and the data set's splits where a flag needed them."""
    order = args.prune_order if args.prune_order in ORDERS else [n.strip() for n in args.prune_order.split(",")]
    splits = None
    if order == "greedy" or args.recalibrate_bn or args.pruned_dir:
        splits = prune_data(args, model, needs_val=order == "greedy")
    try:
        pruned = prune_blocks(model, args.keep_blocks, order, splits, args.recalibrate_bn,
                              progress=lambda line: print(line, flush=True))
    except ValueError as err:
        message = str(err)
        fail(args, f"{PRUNE_FLAGS.get(message.split(' ')[0].rstrip(':').split('[')[0], '--keep-blocks')}: {message}")
    record = pruned.pruned_from
    print(f"pruned to {len(record['kept'])} of {sum(record['layers'])} residual blocks ({args.prune_order}"
          f"{', %d evaluations' % record['evaluations'] if 'evaluations' in record else ''}"
          f"{', BatchNorm recalibrated on %d images' % args.recalibrate_bn if args.recalibrate_bn else ''}): "
          f"kept {', '.join(record['kept'])}")
    return pruned.eval(), splits


def write_pruned_dir(args: argparse.Namespace, model: torch.nn.Module, splits, input_size: List[int]) -> None:
    """The pruned model as a model folder with pruning.json, its measurements: what sdzoo push publishes."""
    row = describe(model, args.output, splits["test"], input_size, args.bench_seconds)
    folder = args.pruned_dir
    with staged_folder(folder) as staging:
        save_weights(os.path.join(staging, WEIGHTS_NAME), model)
        write_config(os.path.join(staging, CONFIG_NAME), model)
        save_json(os.path.join(staging, PRUNING_NAME), dict(row, test_images=len(splits["test"][1])))
    print(f"wrote {folder}: the pruned model (test accuracy {row['acc_torch']:.2f}% in PyTorch, "
          f"{row['acc_ort']:.2f}% in onnxruntime on {len(splits['test'][1])} test images); publish it with "
          f"sdzoo push --model {folder} --onnx {args.output}")


# -- steps --------------------------------------------------------------------------------------------------
def maybe_fold(args: argparse.Namespace, model: torch.nn.Module) -> None:
    if args.no_fold:
        print("not folded (--no-fold): exported as it is; with expectation scaling each block keeps its "
              "multiply by p_l")
    elif not hasattr(model, "residual_blocks"):
        print(f"not folded: {type(model).__name__} is not a stochastic-depth model")
    elif is_folded(model):
        print(f"already folded (trained with {model.folded_from}): exporting as is")
    elif getattr(model, "scaling", None) != "expectation":
        print(f"nothing to fold: scaling is {model.scaling!r}, so the eval network has no p_l in it "
              "and is already a plain ResNet")
    elif not can_fold(model):
        print("nothing to fold: every p_l is 1 (constant depth)")
    else:
        probs = model.block_survival_probs()
        fold_survival(model)
        print(f"folded p_l into {len(probs)} residual branches (p_l from {max(probs):.4f} to {min(probs):.4f})")


def calibration_split(args: argparse.Namespace, model: torch.nn.Module, input_size: List[int]):
    """Calibration images from the training split, held-out images from the test split."""
    check_calib_images(args)
    mean, std = model.pretrained_cfg.get("mean", (0.5,)), model.pretrained_cfg.get("std", (0.5,))
    try:
        train, _ = calibration_images(args.calib_data, input_size, mean, std, split="train")
    except DataError as err:
        fail(args, f"--calib-data {args.calib_data}: {err}")
    return train[:args.calib_images], calibration_images(args.calib_data, input_size, mean, std, split="test")[0]


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Exit status: 0 written and checked, 1 the export or its check failed (no file written), 2 a wrong argument."""
    args = parse_args(argv, prog)
    batch_sizes = check_flags(args)
    label_names = label_names_of(args)
    model = create_model(args).eval()
    if args.calib_data is None:  # the images the model was trained on, where they may calibrate
        tag = model.pretrained_cfg.get("tag")
        args.calib_data = tag if tag in CALIBRATION_DATASETS else CALIBRATION_DATASETS[0]
    input_size = input_size_of(args, model)
    splits = None
    if pruning(args):
        model, splits = prune(args, model)
    if args.quantize:  # read before anything is written: missing images stop the export, not the quantization
        calib, held_out = calibration_split(args, model, input_size)
    maybe_fold(args, model)
    try:
        metadata = onnx_metadata(model, input_size=input_size, label_names=label_names)
        report = export_onnx(model, args.output, input_size=input_size, opset=args.opset,
                             verify_batch_sizes=batch_sizes, atol=args.atol, rtol=args.rtol, metadata=metadata)
    except ValueError as err:
        fail(args, str(err))
    except ExportError as err:
        print(f"error: {err}\nno file written", file=sys.stderr)
        return 1
    print(report.summary())
    if getattr(model, "pruned_from", None):
        print("operators: " + ", ".join(f"{op} {n}" for op, n in sorted(report.op_histogram.items())))
    if args.pruned_dir:
        write_pruned_dir(args, model, splits, input_size)

    if args.quantize == "int8":
        try:
            quant = quantize_int8(args.output, quant_output_of(args), calib, held_out)
        except (ValueError, ExportError) as err:
            print(f"error: int8 quantization failed, no int8 file written: {err}", file=sys.stderr)
            return 1
        print(quant.summary())

    if args.benchmark:
        files, labels = {"fp32": args.output}, {"torch_ms": "PyTorch eager", "fp32_ms": "onnxruntime"}
        if args.quantize:
            files["int8"], labels["int8_ms"] = quant_output_of(args), "ort int8"
        rows = compare_latency(model, files, input_size=input_size, min_run_time=args.bench_seconds)
        print(format_latency(rows, labels))
    return 0
