"""`dsv4-agent run --model PATH --tp 2`: the agent, unchanged, drives a 2-rank engine (this
process is rank 0, one spawned CPU rank follows over gloo) through prefill and decoding."""
from __future__ import annotations

import gc
import json

import pytest
import torch.distributed as dist
from typer.testing import CliRunner

from agent.cli import app
from dsv4 import ModelConfig
from dsv4.loading.testing import write_random_checkpoint
from encoding import Tokenizer

pytestmark = pytest.mark.timeout(180, method="thread")


def test_agent_runs_on_a_tensor_parallel_engine(tmp_path):
    cfg = ModelConfig.tiny().replace(head_dim=128, rope_head_dim=64, o_groups=4, o_lora_rank=128,
                                     index_head_dim=128, vocab_size=Tokenizer.default().vocab_size)
    ckpt = write_random_checkpoint(tmp_path / "ckpt", cfg, seed=2)
    args = ["run", "say hi", "--model", ckpt, "--tp", "2", "--device", "cpu", "--sandbox", "none",
            "--max-steps", "1", "--max-tokens", "200", "--json", "-o", tmp_path / "runs"]
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    events = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert events[0]["spec"]["backend"]["tp"] == 2
    end = events[-1]
    assert end["event"] == "exit" and end["status"] == "max_tokens", end     # random weights: budget
    usage = end["usage"]
    assert usage["prefill_new"] > 0 and usage["reasoning"] + usage["content"] + usage["tool_call"] > 0
    gc.collect()                                       # the run's engine is gone: its ranks stopped
    assert not dist.is_initialized()


def test_tp_needs_a_model(tmp_path):
    result = CliRunner().invoke(app, ["run", "x", "--tp", "2", "--scripted", str(tmp_path / "s.json")])
    assert result.exit_code == 2 and "--tp must be >= 1 and needs --model" in result.output
