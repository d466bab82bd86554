#!/usr/bin/env python3
"""What each refusal of a hostile input costs: seconds until the error, and the process's peak memory.

    OMP_NUM_THREADS=1 python scripts/refusal_costs.py [--hub-timeout 5]

Each case runs in a fresh interpreter (so that its peak memory is its own) and prints one row: the case, the
door, the seconds from the call to its error, the peak resident memory of the process (and how much of it the
call added over the imports), and the head of the error. The cases:

* a safetensors header of 60 MB of valid JSON listing 1.2 million tensors, in a run folder, loaded by timm
  (``local-dir:``), by ``sdzoo.hub.load_run`` and by transformers' ``AutoModelForImageClassification``;
* a run folder whose config.json says ``num_classes: 1e9`` (and ``10**9``), vetted with ``sdzoo.hub.load_run``
  (transformers itself builds a table of that many labels before any sdzoo code runs: docs/loading.md,
  "Where the bounds stop");
* a pretrained tag and an ``hf-hub:`` repo served one byte a second by the loopback Hub of the test suite
  (tests/hub_server.py), loaded with ``$SDZOO_HUB_TIMEOUT`` set to ``--hub-timeout``.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import timm
from huggingface_hub import constants

from sdzoo.files.run_folder import save_model_config
from sdzoo.files.weights import save_weights

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
setup, call = sys.argv[1], sys.argv[2]
exec(setup)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
try:
    exec(call)
    outcome = "LOADED (not refused)"
except BaseException as e:
    outcome = f"{type(e).__name__}: {e}".replace(chr(10), " ")
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(seconds=seconds, peak_mib=peak / 1024, added_mib=(peak - base) / 1024, outcome=outcome)))
"""


def hostile_header_folder(folder: Path, tensors: int = 1_200_000) -> None:
    """A run folder whose model.safetensors header is ~60 MB of valid JSON naming ``tensors`` empty tensors."""
    folder.mkdir(parents=True)
    model = timm.create_model("sd_resnet20_cifar", num_classes=10)
    save_model_config(folder / "config.json", model, timm.data.resolve_model_data_config(model),
                      label_names=[str(i) for i in range(10)])
    entry = '"layer1.0.conv1.weight{}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    header = ("{" + ",".join(entry.format(i) for i in range(tensors)) + "}").encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)


def config_folder(folder: Path, num_classes) -> None:
    folder.mkdir(parents=True)
    model = timm.create_model("sd_resnet20_cifar", num_classes=10)
    save_model_config(folder / "config.json", model, timm.data.resolve_model_data_config(model))
    save_weights(folder / "model.safetensors", model)
    config = json.loads((folder / "config.json").read_text())
    config["num_classes"] = num_classes
    (folder / "config.json").write_text(json.dumps(config))


def measure(setup: str, call: str, env=None) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, setup, call], capture_output=True, text=True,
                            env=env, cwd=tempfile.gettempdir(), timeout=900)
    if result.returncode != 0 or not result.stdout.strip():
        return dict(seconds=float("nan"), peak_mib=float("nan"), added_mib=float("nan"),
                    outcome=f"child failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hub-timeout", type=float, default=5.0, help="$SDZOO_HUB_TIMEOUT of the Hub cases")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="sdzoo-refusals-"))
    try:
        offline = dict(os.environ, HF_HUB_OFFLINE="1")
        header = work / "header"
        hostile_header_folder(header)
        print(f"hostile header: {(header / 'model.safetensors').stat().st_size / 2**20:.1f} MB, 1,200,000 tensors",
              file=sys.stderr)
        imports = "import timm, sdzoo.hub.upload"
        for door, call in (("timm local-dir:", f"timm.create_model('local-dir:{header}', pretrained=True)"),
                           ("sdzoo.hub.load_run", f"sdzoo.hub.load_run('{header}')")):
            rows.append(("60 MB header", door, measure(imports, call, offline)))
        rows.append(("60 MB header", "transformers Auto...", measure(
            "import timm\nfrom transformers import AutoModelForImageClassification",
            f"AutoModelForImageClassification.from_pretrained('{header}')", offline)))
        for label, value in (("num_classes 1e9", 1e9), ("num_classes 10**9", 10**9)):
            folder = work / label.replace(" ", "_").replace("*", "")
            config_folder(folder, value)
            rows.append((label, "sdzoo.hub.load_run", measure(imports, f"sdzoo.hub.load_run('{folder}')", offline)))
        rows += hub_rows(work, args.hub_timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| case | door | seconds | peak MiB (added) | error |\n|---|---|---|---|---|")
    for case, door, r in rows:
        print(f"| {case} | {door} | {r['seconds']:.3f} | {r['peak_mib']:.0f} ({r['added_mib']:+.0f}) | "
              f"{r['outcome'][:150]} |")
    return 0


def hub_rows(work: Path, timeout: float):
    sys.path.insert(0, str(ROOT / "tests"))  # the loopback Hub of the test suite: this tool needs a checkout
    from hub_server import trickling_weights_hub
    constants.HF_HUB_DISABLE_XET = True
    token = "hf_refusals_" + secrets.token_hex(8)
    tag = next(name for name in sorted(timm.list_pretrained("sd_resnet50.*")))
    timm_repo = timm.get_pretrained_cfg(tag).hf_hub_id
    rows = []
    with trickling_weights_hub(token, timm_repo) as server:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")}
        env.update(HF_ENDPOINT=server.url, HF_HOME=str(work / "hf"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", SDZOO_HUB_TIMEOUT=f"{timeout:g}")
        for name in (tag, "hf-hub:owner/r20"):
            rows.append((f"1 byte/s Hub, SDZOO_HUB_TIMEOUT={timeout:g}", name,
                         measure("import timm", f"timm.create_model('{name}', pretrained=True)", env)))
        rows.append((f"1 byte/s Hub, SDZOO_HUB_TIMEOUT={timeout:g}", "transformers Auto... owner/r20",
                     measure("from transformers import AutoModelForImageClassification",
                             "AutoModelForImageClassification.from_pretrained('owner/r20')", env)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
