"""load_model never holds the weights twice: peak resident memory while loading a ~60 MB
checkpoint stays within the loaded model plus one shard, where a loader that first reads every
tensor (the control) needs twice the model.

Measured in a fresh process: peak RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS
before the load. glibc would otherwise keep freed blocks and grow its mmap threshold, so the child
runs with a fixed MALLOC_MMAP_THRESHOLD_ and RSS follows the live tensors.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4.loading.testing import write_random_checkpoint
from dsv4.network.config import ModelConfig

MiB = 2**20
ROOT = Path(__file__).resolve().parents[2]
CHILD = r"""
import gc, json, sys, torch
torch.set_num_threads(1)
from pathlib import Path
from safetensors.torch import load_file
from dsv4 import load_model
from dsv4.loading.checkpoint import _read_headers, _read_index, build_model
from dsv4.network.config import ModelConfig

path = Path(sys.argv[1])

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

def measure(load):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                   # VmHWM := VmRSS
    base = rss("VmRSS")
    model = load()
    return {"peak": rss("VmHWM") - base,
            "model_bytes": sum(t.nbytes for t in model.state_dict().values())}

def two_copies():        # control: every tensor read into memory first, then the model built
    headers, _ = _read_headers(path, _read_index(path))
    everything = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        everything.update({k: v.clone() for k, v in load_file(shard).items()})
    return build_model(ModelConfig.from_hf_config(path), headers, [everything.items()])

load_model(path)                       # warm-up: one-off imports and caches
print(json.dumps({"quantised": measure(lambda: load_model(path)),
                  "dequantize": measure(lambda: load_model(path, dequantize=True)),
                  "control": measure(two_copies)}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # ~60 MB in 11 shards of at most ~8 MB
    cfg = ModelConfig.tiny().replace(dim=1024, moe_inter_dim=256, vocab_size=4096, n_layers=8,
                                     compress_ratios=(0, 4, 128, 4, 128, 4, 128, 4, 0))
    return write_random_checkpoint(tmp_path_factory.mktemp("mid"), cfg, seed=11)


def peaks(checkpoint: Path) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_loading_holds_one_copy(checkpoint):
    largest_shard = max(f.stat().st_size for f in checkpoint.glob("model-*.safetensors"))
    total = sum(f.stat().st_size for f in checkpoint.glob("model-*.safetensors"))
    assert total > 50 * MiB and largest_shard < total / 6
    slack = 8 * MiB
    got = peaks(checkpoint)
    print({mode: {k: round(v / MiB, 1) for k, v in m.items()} for mode, m in got.items()})
    for mode in ("quantised", "dequantize"):
        m = got[mode]
        assert m["peak"] <= m["model_bytes"] + largest_shard + slack, mode
        assert m["peak"] >= 0.8 * m["model_bytes"], mode      # the measurement sees the model
    assert got["dequantize"]["model_bytes"] > 1.5 * got["quantised"]["model_bytes"]
    control = got["control"]                  # the same bound catches a loader holding two copies
    assert control["peak"] > control["model_bytes"] + largest_shard + slack
