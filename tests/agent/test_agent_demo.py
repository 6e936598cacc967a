"""The demo's scripted fallback runs the same task end to end through the CLI (the engine path is
covered by test_agent_engine.py and by scripts/demo.sh)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from agent.cli import app
from agent.demo import DEMO_COMPLETIONS, DEMO_TASK


def test_demo_on_the_scripted_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV4_DEMO_BACKEND", "scripted")
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--demo", "-o", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "model: NONE" in result.output  # the fallback says what it is
    summary = json.loads(runner.invoke(app, ["inspect", "last", "--json", "-o", str(tmp_path)]).output)
    assert summary["task"] == DEMO_TASK and summary["status"] == "completed"
    assert len(summary["steps"]) == len(DEMO_COMPLETIONS)
    calls = [c["name"] for step in summary["steps"] for c in step["calls"]]
    assert calls == ["write_file", "time__get_current_time", "bash", "read_file", "list_dir"]
    assert all(c["outcome"] == "ok" for step in summary["steps"] for c in step["calls"])
    (workspace,) = tmp_path.glob("*/workspace")
    assert (workspace / "primes.txt").read_text().split() == [
        "2",
        "3",
        "5",
        "7",
        "11",
        "13",
        "17",
        "19",
        "23",
        "29",
        "31",
        "37",
        "41",
        "43",
        "47",
    ]
