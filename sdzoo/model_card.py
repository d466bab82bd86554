"""Model cards for published runs: front matter the Hub reads, and a body rendered from a template.

The front matter (library_name, license, tags, datasets, metrics and a ``model-index`` of the run's results)
is built with huggingface_hub's ``ModelCardData``, so it is in the exact form the Hub parses. The body comes
from ``model_cards/template.md`` (``string.Template`` placeholders): what stochastic depth is, the model's
survival settings, the training recipe, its results next to the paper's, usage with timm and with
onnxruntime, and the citation. The paper's numbers are those reported by Huang et al. (2016).
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "DATASETS", "PAPER_RESULTS", "RunResults", "read_results", "card_metadata", "render_model_card",
    "default_template_path",
]

TEMPLATE_NAME = "model_card_template.md"

# Data set name in a run's summary -> (display name, Hub data set id or None).
DATASETS: Dict[str, Tuple[str, Optional[str]]] = {
    "cifar10": ("CIFAR-10", "uoft-cs/cifar10"),
    "cifar100": ("CIFAR-100", "uoft-cs/cifar100"),
    "svhn": ("SVHN", "ufldl-stanford/svhn"),
    "imagenet": ("ImageNet-1k", "ILSVRC/imagenet-1k"),
    "digits": ("scikit-learn handwritten digits (8x8 images, upsampled)", None),
    "synthetic": ("random images and labels (a throughput run: nothing was learned)", None),
}

# Test error (%) reported by Huang et al. (2016): (architecture, data set) -> rows of
# (setting, constant depth, stochastic depth). CIFAR results use the standard augmentation ("+").
PAPER_RESULTS: Dict[Tuple[str, str], List[Tuple[str, float, float]]] = {
    ("sd_resnet110_cifar", "cifar10"): [("ResNet-110, CIFAR-10+, 500 epochs", 6.41, 5.25)],
    ("sd_resnet110_cifar", "cifar100"): [("ResNet-110, CIFAR-100+, 500 epochs", 27.76, 24.98)],
    ("sd_resnet152_cifar", "svhn"): [("ResNet-152 (CIFAR layout), SVHN, 50 epochs", 1.80, 1.75)],
    ("sd_resnet1202_cifar", "cifar10"): [("ResNet-1202, CIFAR-10+, 500 epochs", 6.67, 4.91)],
    ("sd_resnet152", "imagenet"): [
        ("ResNet-152, ImageNet val, 90 epochs", 23.06, 23.38),
        ("ResNet-152, ImageNet val, 120 epochs", 21.78, 21.98),
    ],
}

# Training settings shown in the card's recipe table, in this order (keys of summary.json's "settings").
_RECIPE_KEYS = ("recipe", "epochs", "batch_size", "accum_steps", "lr", "momentum", "nesterov", "dampening",
                "weight_decay", "lr_drops", "lr_gamma", "val_size", "split_seed", "image_size", "shift", "hflip",
                "survival_prob", "survival_rule", "gate_mode", "scaling", "seed", "sync_bn")


@dataclass
class RunResults:
    """The results of a training run, from the summary.json that ``sdzoo.train`` writes (errors in %)."""
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
        return DATASETS.get(self.dataset, (self.dataset, None))[0]

    @property
    def dataset_id(self) -> Optional[str]:
        return DATASETS.get(self.dataset, (None, None))[1]


def _percent(summary: Mapping[str, Any], key: str, where: str) -> Optional[float]:
    value = summary.get(key)
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key} must be a number (percent); got {value!r}") from None
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{where}: {key} is a percentage and must be in [0, 100]; got {value!r}")
    return value


def read_results(summary: Mapping[str, Any], where: str = "summary.json") -> RunResults:
    """The results a card reports, from a run's summary: data set, best epoch, test error there (%)."""
    settings = dict(summary.get("settings") or {})
    dataset = settings.get("dataset") or summary.get("dataset")
    test_error = _percent(summary, "test_error", where)
    missing = [name for name, value in (("settings.dataset", dataset), ("best_epoch", summary.get("best_epoch")),
                                        ("test_error", test_error)) if value is None]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}: the model card reports the test error at the "
                         "best epoch")
    epochs, epochs_done = settings.get("epochs"), summary.get("epochs_done")
    return RunResults(
        dataset=str(dataset),
        test_error=test_error,
        best_epoch=int(summary["best_epoch"]),
        epochs=int(epochs) if epochs is not None else None,
        epochs_done=int(epochs_done) if epochs_done is not None else None,
        finished=bool(summary.get("finished", True)),
        val_error=_percent(summary, "best_val_error", where),
        selection=str(summary.get("selection") or "lowest validation error"),
        settings=settings,
    )


def card_metadata(repo_id: str, architecture: str, results: Optional[RunResults], license: str = "apache-2.0"):
    """Front matter as huggingface_hub's ``ModelCardData`` (its ``model-index`` holds the run's results)."""
    from huggingface_hub import EvalResult, ModelCardData

    tags = ["image-classification", "timm", "sdzoo", "stochastic-depth", "resnet"]
    kwargs: Dict[str, Any] = {}
    if results is not None:
        common = dict(task_type="image-classification", task_name="Image Classification",
                      dataset_type=results.dataset_id or results.dataset, dataset_name=results.dataset_name,
                      dataset_split="test")
        kwargs = dict(
            metrics=["accuracy"],
            model_name=repo_id.split("/")[-1],
            eval_results=[
                EvalResult(metric_type="accuracy", metric_name="Top-1 accuracy (%)",
                           metric_value=round(100.0 - results.test_error, 4), **common),
                EvalResult(metric_type="error", metric_name=f"Test error (%) at best epoch {results.best_epoch}",
                           metric_value=round(results.test_error, 4), **common),
            ],
        )
        if results.dataset_id:
            kwargs["datasets"] = [results.dataset_id]
    return ModelCardData(library_name="timm", license=license, pipeline_tag="image-classification", tags=tags,
                         **kwargs)


def default_template_path() -> Path:
    """The card template, shipped inside the package (``model_cards/template.md`` links to it)."""
    return Path(__file__).with_name(TEMPLATE_NAME)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _survival_table(model_args: Mapping[str, Any], block_probs: Sequence[float]) -> str:
    folded = model_args.get("folded_from")
    settings = dict(folded) if folded else dict(model_args)
    rows = [
        ("survival probability of the last block, p_L", settings.get("survival_prob")),
        ("survival rule", settings.get("survival_rule")),
        ("gates (training)", settings.get("gate_mode")),
        ("test-time scaling", settings.get("scaling")),
        ("gate seed", settings.get("gate_seed")),
        ("downsampling shortcut", model_args.get("shortcut")),
        ("residual blocks L", len(block_probs)),
    ]
    if block_probs and not folded:
        rows += [("p_l of the first / last block", f"{block_probs[0]:.4f} / {block_probs[-1]:.4f}"),
                 ("expected blocks per training step", f"{sum(block_probs):.2f} of {len(block_probs)}")]
    text = _table(("setting", "value"), [r for r in rows if r[1] is not None])
    if folded:
        text += ("\n\nThese weights are *folded*: each p_l was multiplied into its block's last BatchNorm, so the"
                 " network is a plain ResNet with no gates. The settings above are those it was trained with.")
    return text


def _recipe_text(results: Optional[RunResults]) -> str:
    settings = results.settings if results is not None else {}
    rows = [(k, settings[k]) for k in _RECIPE_KEYS if k in settings]
    if not rows:
        return "The run folder recorded no training settings."
    return _table(("setting", "value"), rows) + (
        "\n\nlr_drops are fractions of the run where lr is multiplied by lr_gamma. The paper's recipe: SGD with"
        " Nesterov momentum 0.9, lr 0.1, weight decay 1e-4 on every parameter, batch 128; CIFAR 500 epochs with"
        " lr / 10 at epochs 250 and 375, SVHN 50 epochs with lr / 10 at 60% and 70% of training; p_L = 0.5 with"
        " the linear decay rule.")


def _results_text(architecture: str, results: Optional[RunResults]) -> str:
    if results is None:
        return "The run folder had no summary.json, so this card reports no results."
    epochs = f" of {results.epochs}" if results.epochs else ""
    rows = [(f"this model ({architecture})", results.dataset_name, f"{results.test_error:.2f}",
             f"{results.best_epoch}{epochs}")]
    for setting, constant, stochastic in PAPER_RESULTS.get((architecture, results.dataset), []):
        rows.append((f"paper, stochastic depth: {setting}", results.dataset_name, f"{stochastic:.2f}", ""))
        rows.append((f"paper, constant depth: {setting}", results.dataset_name, f"{constant:.2f}", ""))
    text = _table(("model", "data set", "test error (%)", "epoch"), rows)
    text += (f"\n\nThe test error of this model is the one at epoch {results.best_epoch}, chosen by"
             f" {results.selection}.")
    if results.val_error is not None:
        text += f" Validation error at that epoch: {results.val_error:.2f}%."
    if not results.finished:
        text += (f" The run had not finished: {results.epochs_done} of {results.epochs} epochs."
                 if results.epochs_done is not None else " The run had not finished.")
    if (architecture, results.dataset) not in PAPER_RESULTS:
        text += " The paper reports no result for this architecture on this data set."
    return text


def _paper_table() -> str:
    rows = [(setting, f"{constant:.2f}", f"{stochastic:.2f}")
            for entries in PAPER_RESULTS.values() for setting, constant, stochastic in entries]
    text = _table(("setting", "constant depth", "stochastic depth"), rows)
    return text + ("\n\nTraining time with stochastic depth was about 25% lower (CIFAR-10+: 15h7m against"
                   " 20h42m).")


def _onnx_text(repo_id: str, onnx_name: Optional[str], pretrained_cfg: Mapping[str, Any]) -> str:
    channels, height, width = tuple(pretrained_cfg.get("input_size") or (3, 224, 224))
    mean = list(pretrained_cfg.get("mean") or (0.485, 0.456, 0.406))
    std = list(pretrained_cfg.get("std") or (0.229, 0.224, 0.225))
    if onnx_name is None:
        intro = ("With onnxruntime: this repo has no ONNX file; export one with sdzoo's"
                 f" `python scripts/export_onnx.py --model hf-hub:{repo_id} --output model.onnx` (it folds p_l into"
                 " the weights and checks the graph against PyTorch with onnxruntime), then:")
        source, download = '"model.onnx"', ""
    else:
        intro = f"With onnxruntime (`{onnx_name}`: p_l folded into the weights, a plain ResNet graph):"
        source = f'hf_hub_download("{repo_id}", "{onnx_name}")'
        download = "from huggingface_hub import hf_hub_download\n"
    return f"""{intro}

```python
import numpy as np
import onnxruntime as ort
{download}
session = ort.InferenceSession({source}, providers=["CPUExecutionProvider"])
mean = np.array({mean}, dtype=np.float32).reshape(1, {channels}, 1, 1)
std = np.array({std}, dtype=np.float32).reshape(1, {channels}, 1, 1)
# images: float32 in [0, 1], shape (N, {channels}, {height}, {width})
images = np.random.rand(1, {channels}, {height}, {width}).astype(np.float32)
logits = session.run(None, {{session.get_inputs()[0].name: (images - mean) / std}})[0]
```"""


_FILE_NOTES = {
    "model.safetensors": "the weights (safetensors)",
    "config.json": "architecture, survival settings and preprocessing, in timm's format",
    "README.md": "this card",
    "model.onnx": "the model in ONNX, p_l folded into the weights",
    "curves.png": "training curves",
    "summary.json": "the run's summary: best epoch, errors, settings",
    "metrics.jsonl": "per-epoch metrics of the run",
}


def render_model_card(
        repo_id: str,
        config: Mapping[str, Any],
        summary: Optional[Mapping[str, Any]],
        block_probs: Sequence[float],
        num_params: int,
        files: Sequence[str],
        template: Optional[str] = None,
) -> str:
    """The README.md of a Hub repo.

    Args:
        repo_id: the Hub repo, ``owner/name``.
        config: the repo's config.json (timm's format: architecture, model_args, pretrained_cfg).
        summary: the run's summary.json, or None (the card then reports no results).
        block_probs: survival probability of each residual block (``SDResNet.block_survival_probs()``).
        num_params: number of parameters of the model.
        files: names of the files in the repo.
        template: template text; default ``model_cards/template.md``.
    """
    if template is None:
        path = default_template_path()
        if not path.is_file():
            raise FileNotFoundError(f"model card template not found at {path}; pass template= (the text of one)")
        template = path.read_text(encoding="utf-8")
    architecture = config["architecture"]
    model_args = config.get("model_args") or {}
    pretrained_cfg = config.get("pretrained_cfg") or {}
    results = read_results(summary) if summary is not None else None
    metadata = card_metadata(repo_id, architecture, results, pretrained_cfg.get("license") or "apache-2.0")

    trained_on = f" trained on {results.dataset_name}" if results else ""
    scored = f": {results.test_error:.2f}% test error" if results else ""
    summary_line = (f"A stochastic-depth ResNet ({architecture}, {num_params / 1e6:.2f}M parameters){trained_on}"
                    f"{scored}.")
    onnx_name = next((f for f in files if f.endswith(".onnx")), None)
    curves_text = ("![Training curves](curves.png)\n\nTraining curves of this run (`curves.png`)."
                   if "curves.png" in files else "")
    files_list = "\n".join(f"- `{f}`: {_FILE_NOTES.get(f, 'extra file of the run')}" for f in sorted(files))
    return string.Template(template).substitute(
        front_matter=metadata.to_yaml(),
        repo_id=repo_id,
        repo_name=repo_id.split("/")[-1],
        summary_line=summary_line,
        architecture=architecture,
        survival_table=_survival_table(model_args, block_probs),
        recipe_text=_recipe_text(results),
        results_text=_results_text(architecture, results),
        paper_table=_paper_table(),
        curves_text=curves_text,
        onnx_text=_onnx_text(repo_id, onnx_name, pretrained_cfg),
        files_list=files_list,
    )
