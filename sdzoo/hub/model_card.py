"""Model cards for published runs: huggingface_hub's ``ModelCardData`` front matter (with a ``model-index`` of the
run's results) and a body rendered by ``ModelCard.from_template`` from ``model_card_template.md`` beside this
module. A run's strings are untrusted: every one the card shows goes through ``markdown_cell``."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from sdzoo.datasets import DATASETS
from sdzoo.survival import SurvivalSettings
from sdzoo.training.recipes import PAPER_RESULTS
from sdzoo.training.settings import DEFINING_SETTINGS

# The recipe table: every setting that defines a run; the model, the data set and its classes head the card.
_RECIPE_KEYS = ("recipe",) + tuple(k for k in DEFINING_SETTINGS if k not in ("recipe", "model", "dataset",
                                                                             "num_classes"))


@dataclass
class RunResults:
    """The results of a training run, from the summary.json that ``sdzoo.training.train`` writes (errors in %)."""
    dataset: str
    test_error: float
    best_epoch: int
    epochs: Optional[int] = None
    epochs_done: Optional[int] = None
    finished: bool = True
    val_error: Optional[float] = None
    selection: str = "lowest validation error"
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def dataset_name(self) -> str:
        return DATASETS[self.dataset].title if self.dataset in DATASETS else self.dataset

    @property
    def dataset_id(self) -> Optional[str]:
        return DATASETS[self.dataset].hub_id if self.dataset in DATASETS else None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _scalar(value) -> bool:
    return isinstance(value, (str, int, bool, type(None))) or _number(value)


_PERCENT = (lambda v: _number(v) and 0 <= v <= 100, "a number in [0, 100] (percent) or null")
# All that a published summary.json holds, and what the card reads of it: key -> (check, what it must be).
_SUMMARY_CHECKS = {"finished": (lambda v: isinstance(v, bool), "true or false"),
                   "epochs_done": (_count, "an integer >= 0"), "best_epoch": (_count, "an integer >= 0"),
                   "best_val_error": _PERCENT, "test_error": _PERCENT,
                   "selection": (lambda v: isinstance(v, str), "a string")}
SUMMARY_KEYS = (*_SUMMARY_CHECKS, "settings")
SETTINGS_KEYS = ("dataset", "epochs") + _RECIPE_KEYS
_SETTING_CHECKS = dict.fromkeys(SETTINGS_KEYS, (lambda v: _scalar(v) or isinstance(v, list) and all(map(_scalar, v)),
                                                "a string, a number, true/false or a list of those"))
_SETTING_CHECKS.update(dataset=(lambda v: isinstance(v, str), "a string"),
                       epochs=(lambda v: _count(v, 1), "an integer > 0"))


def _checked(values: Mapping[str, Any], checks: Mapping[str, Tuple], where: str, prefix: str = "") -> Dict[str, Any]:
    """The values of ``checks``' keys that are set, each checked: a ValueError names the file and the key."""
    kept = {}
    for key, (ok, allowed) in checks.items():
        if values.get(key) is not None:
            if not ok(values[key]):
                raise ValueError(f"{where}: {prefix}{key} must be {allowed}; got {values[key]!r}")
            kept[key] = values[key]
    return kept


def published_summary(summary: Mapping[str, Any], where: str = "summary.json") -> Dict[str, Any]:
    """The part of a run's summary that is published (``SUMMARY_KEYS``, ``SETTINGS_KEYS``), each value checked.
    The rest (local paths, how the run ran) stays home."""
    if not isinstance(summary, Mapping):
        raise ValueError(f"{where} must hold a JSON object; got {type(summary).__name__}")
    settings = summary.get("settings", {})
    if not isinstance(settings, Mapping):
        raise ValueError(f"{where}: settings must be a JSON object; got {settings!r}")
    return dict(_checked(summary, _SUMMARY_CHECKS, where),
                settings=_checked(settings, _SETTING_CHECKS, where, "settings."))


def read_results(summary: Mapping[str, Any], where: str = "summary.json") -> RunResults:
    """The results a card reports, from a run's summary: data set, best epoch, test error there (%)."""
    summary = published_summary(summary, where)
    settings = summary["settings"]
    missing = [name for name, value in (("settings.dataset", settings.get("dataset")),
                                        ("best_epoch", summary.get("best_epoch")),
                                        ("test_error", summary.get("test_error"))) if value is None]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}: the model card reports the test error at the "
                         "best epoch")
    return RunResults(dataset=settings["dataset"], test_error=float(summary["test_error"]),
                      best_epoch=summary["best_epoch"], epochs=settings.get("epochs"),
                      epochs_done=summary.get("epochs_done"), finished=summary.get("finished", True),
                      val_error=summary.get("best_val_error"),
                      selection=summary.get("selection") or "lowest validation error", settings=settings)


def markdown_cell(value: Any) -> str:
    """A value as card text: HTML escaped (no markup of a run's strings reaches the page), '|' escaped (a table
    cell stays one cell) and on one line."""
    text = html.escape(value if isinstance(value, str) else str(value), quote=False)
    return " ".join(text.replace("|", "\\|").split())


def card_metadata(repo_id: str, results: Optional[RunResults], license: str = "apache-2.0") -> ModelCardData:
    """Front matter as huggingface_hub's ``ModelCardData`` (its ``model-index`` holds the run's results)."""
    kwargs: Dict[str, Any] = {}
    if results is not None:
        # The Hub's page shows the front matter as it shows the body: a run's own strings escaped as there.
        common = dict(task_type="image-classification", task_name="Image Classification",
                      dataset_type=results.dataset_id or markdown_cell(results.dataset),
                      dataset_name=markdown_cell(results.dataset_name), dataset_split="test")
        kwargs = dict(metrics=["accuracy"], model_name=repo_id.split("/")[-1], eval_results=[
            EvalResult(metric_type="accuracy", metric_name="Top-1 accuracy (%)",
                       metric_value=round(100.0 - results.test_error, 4), **common),
            EvalResult(metric_type="error", metric_name=f"Test error (%) at best epoch {results.best_epoch}",
                       metric_value=round(results.test_error, 4), **common)])
        if results.dataset_id:
            kwargs["datasets"] = [results.dataset_id]
    return ModelCardData(library_name="timm", license=license, pipeline_tag="image-classification",
                         tags=["image-classification", "timm", "sdzoo", "stochastic-depth", "resnet"], **kwargs)


def _survival_rows(model_args: Mapping[str, Any], block_probs: Sequence[float]) -> List[Tuple[str, Any]]:
    settings = SurvivalSettings.from_args(model_args)
    rows = [*settings.card_rows(), ("downsampling shortcut", model_args.get("shortcut")),
            ("residual blocks L", len(block_probs))]
    if block_probs and settings.folded_from is None:
        rows += [("p_l of the first / last block", f"{block_probs[0]:.4f} / {block_probs[-1]:.4f}"),
                 ("expected blocks per training step", f"{sum(block_probs):.2f} of {len(block_probs)}")]
    return [(name, markdown_cell(value)) for name, value in rows if value is not None]


# What a pruned model's card reports of its pruning.json (sdzoo.export.depth.describe), each a number: label, format.
_PRUNING_ROWS = (("params", "parameters", "{:,}"), ("mflops", "MFLOPs per image", "{:.2f}"),
                 ("acc_torch", "test accuracy, PyTorch (%)", "{:.2f}"),
                 ("acc_ort", "test accuracy, onnxruntime (%)", "{:.2f}"), ("test_images", "test images", "{:,}"),
                 ("ms_b1", "onnxruntime latency, batch 1 (ms)", "{:.2f}"),
                 ("ms_b32", "onnxruntime latency, batch 32 (ms)", "{:.2f}"), ("threads", "CPU threads timed", "{}"))


def _pruned_rows(record: Any, pruning: Optional[Mapping[str, Any]]) -> List[Tuple[str, str]]:
    """The rows of a pruned model (``model_args["pruned_from"]``, sdzoo.prune) and of its pruning.json (untrusted:
    only numbers are shown); none for a model that was not pruned."""
    if not isinstance(record, Mapping):
        return []
    kept, layers = list(record.get("kept") or []), list(record.get("layers") or [])
    order = str(record.get("order"))
    if "evaluations" in record:
        order += f" ({record['evaluations']} evaluations of the validation loss)"
    rows = [("pruned from", f"{record.get('architecture')}, layers {layers} ({sum(layers)} residual blocks)"),
            ("blocks kept", f"{len(kept)}: {', '.join(map(str, kept))}"), ("order", order),
            ("BatchNorm statistics", f"re-estimated on {record['recalibrate_bn']} training images"
             if record.get("recalibrate_bn") else "as trained (not recalibrated)")]
    rows += [(label, fmt.format(value)) for key, label, fmt in _PRUNING_ROWS
             if _number(value := (pruning or {}).get(key))]
    return [(name, markdown_cell(value)) for name, value in rows]


def onnx_note(folded: Optional[bool]) -> str:
    """What an ONNX file is, from its metadata's ``folded`` (None: the metadata does not say)."""
    if folded is None:
        return "the model in ONNX (its metadata does not say whether p_l is folded into the weights)"
    return ("the model in ONNX, p_l folded into the weights (a plain ResNet graph)" if folded else
            "the model in ONNX, p_l applied as a scale in each block (not folded into the weights)")


def render_model_card(repo_id: str, config: Mapping[str, Any], summary: Optional[Mapping[str, Any]],
                      block_probs: Sequence[float], num_params: int, files: Sequence[str],
                      template: Optional[str] = None, file_notes: Optional[Mapping[str, str]] = None,
                      onnx_folded: Optional[bool] = None, unverified_settings: bool = False,
                      pruning: Optional[Mapping[str, Any]] = None) -> str:
    """The README.md of a Hub repo, from its config.json and the run's summary.json (None: no results).
    ``onnx_folded``: what the ONNX file's metadata says of p_l; ``unverified_settings``: the weights recorded no
    survival settings. A pruned model's card shows its ``pruning`` measurements, never the full model's results."""
    architecture, model_args = config["architecture"], config.get("model_args") or {}
    pretrained_cfg = config.get("pretrained_cfg") or {}
    pruned_rows = _pruned_rows(model_args.get("pruned_from"), pruning)
    results = read_results(summary) if summary is not None and not pruned_rows else None
    dataset_name = markdown_cell(results.dataset_name) if results else ""
    described = f" trained on {dataset_name}: {results.test_error:.2f}% test error" if results else ""
    if pruned_rows:
        record = model_args["pruned_from"]
        described = f", pruned to {len(record.get('kept') or [])} of {sum(record.get('layers') or [])} residual blocks"
    settings = results.settings if results else {}
    onnx = next((f for f in files if f.endswith(".onnx")), None)
    channels, height, width = tuple(pretrained_cfg.get("input_size") or (3, 224, 224))
    card = ModelCard.from_template(
        card_metadata(repo_id, results, pretrained_cfg.get("license") or "apache-2.0"),
        template_path=Path(__file__).with_name("model_card_template.md") if template is None else None,
        template_str=template, repo_id=repo_id, repo_name=repo_id.split("/")[-1],
        summary_line=f"A stochastic-depth ResNet ({architecture}, {num_params / 1e6:.2f}M parameters){described}.",
        architecture=architecture, survival_rows=_survival_rows(model_args, block_probs),
        folded=bool(model_args.get("folded_from")), unverified_settings=unverified_settings, pruned_rows=pruned_rows,
        recipe_rows=[(k, markdown_cell(settings[k])) for k in _RECIPE_KEYS if k in settings],
        results=results, dataset_name=dataset_name, selection=markdown_cell(results.selection) if results else "",
        run_paper_rows=PAPER_RESULTS.get((architecture, results.dataset), []) if results else [],
        paper_rows=[row for rows in PAPER_RESULTS.values() for row in rows], files=sorted(files),
        file_notes=dict(file_notes or {}, **({onnx: onnx_note(onnx_folded)} if onnx else {})),
        onnx_name=onnx, onnx_note=onnx_note(onnx_folded),
        curves_name=next((f for f in files if f.endswith(".png")), None),
        channels=channels, height=height, width=width,
        mean=list(pretrained_cfg.get("mean") or DATASETS["imagenet"].mean),
        std=list(pretrained_cfg.get("std") or DATASETS["imagenet"].std))
    return str(card)
