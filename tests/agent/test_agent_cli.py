"""The `dsv4-agent` CLI in-process (typer's runner): exit codes, run, inspect, replay, usage errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from agent import completion
from agent.cli import app
from agent.trajectory import read_events

runner = CliRunner()


def write_script(tmp_path, turns):
    path = tmp_path / "script.json"
    path.write_text(json.dumps(turns))
    return path


def checkpoint_files(tmp_path):
    """A folder with the files of a checkpoint's layout, none of them loadable: enough for the CLI's checks."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"")
    return ckpt


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def finished_run(tmp_path):
    script = write_script(
        tmp_path,
        [
            completion("Make a file.", calls=[("write_file", {"path": "n.txt", "content": "7"})]),
            completion("Read it back and list.", calls=[("read_file", {"path": "n.txt"}), ("list_dir", {"path": "."})]),
            completion("Done.", content="n.txt holds 7"),
        ],
    )
    out = tmp_path / "runs"
    result = run_cli("run", "store 7 in n.txt", "--scripted", script, "--sandbox", "local", "--yolo", "-o", out)
    assert result.exit_code == 0, result.output
    return out, result


def test_run_streams_the_turns_and_exits_zero(finished_run):
    out, result = finished_run
    assert "n.txt holds 7" in result.output
    assert "prefill:" in result.output and "reused from the KV cache" in result.output
    assert "→ write_file" in result.output and "completed (exit code 0)" in result.output
    (log,) = out.glob("*/trajectory.jsonl")
    assert read_events(log)[-1].status == "completed"


def test_inspect_summarises_the_last_run(finished_run):
    out, _ = finished_run
    text = run_cli("inspect", "last", "-o", out)
    assert text.exit_code == 0
    assert "store 7 in n.txt" in text.output and "read_file" in text.output
    data = json.loads(run_cli("inspect", "last", "--json", "-o", out).output)
    assert data["status"] == "completed" and data["exit_code"] == 0
    assert [s["step"] for s in data["steps"]] == [1, 2, 3]
    assert [c["name"] for c in data["steps"][1]["calls"]] == ["read_file", "list_dir"]
    assert data["steps"][1]["usage"]["prefill_reused"] > data["steps"][1]["usage"]["prefill_new"] > 0


def test_replay_reproduces_the_run(finished_run):
    out, _ = finished_run
    result = run_cli("replay", "last", "-o", out)
    assert result.exit_code == 0, result.output
    assert "identical" in result.output
    assert len(list(out.glob("*/trajectory.jsonl"))) == 2  # the replay is a run of its own


def test_status_codes_reach_the_process(tmp_path):
    script = write_script(tmp_path, [completion("Nothing.")] * 4)
    result = run_cli("run", "say nothing", "--scripted", script, "--sandbox", "none", "-o", tmp_path / "runs")
    assert result.exit_code == 6 and "format_error" in result.output
    script = write_script(tmp_path, [completion(f"{i}", calls=[("bash", {"command": f"echo {i}"})]) for i in range(3)])
    result = run_cli(
        "run", "count", "--scripted", script, "--sandbox", "local", "--yolo", "--max-steps", 2, "-o", tmp_path / "runs"
    )
    assert result.exit_code == 3 and "max_steps" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "task", "--sandbox", "none"], "no model"),
        (["run", "task", "--model", "/nonexistent", "--sandbox", "none"], "not a checkpoint directory"),
        (["run", "", "--sandbox", "none"], "give a TASK"),
        (["run", "t", "--demo"], "--demo runs its own task"),
        (["run", "t", "--scripted", "x.json", "--sandbox", "vm"], "cannot read --scripted"),
        (["inspect", "nope"], "no run 'nope'"),
        (["resume", "last"], "no runs in"),
    ],
)
def test_usage_errors_exit_2_with_a_message(tmp_path, args, message):
    result = runner.invoke(app, args + ["-o", str(tmp_path / "empty")] if args[0] in ("inspect", "resume") else args)
    assert result.exit_code == 2
    assert message in result.output


def test_bad_flags_are_usage_errors(tmp_path):
    script = write_script(tmp_path, [completion("x", content="y")])
    for extra, message in (
        (["--sandbox", "vm"], "--sandbox must be"),
        (["--effort", "extreme"], "effort"),
        (["--mcp", "noequals"], "NAME=COMMAND"),
        (["--approve", "--yolo"], "contradict"),
    ):
        result = runner.invoke(app, ["run", "t", "--scripted", str(script), "-o", str(tmp_path / "r"), *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output, (extra, result.output)


def test_engine_sampling_flags_are_checked_and_reach_the_backend(tmp_path):
    from agent.spec import BackendSpec, build_backend

    ckpt = checkpoint_files(tmp_path)
    result = runner.invoke(app, ["run", "t", "--model", str(ckpt), "--top-p", "1.5", "-o", str(tmp_path / "r")])
    assert result.exit_code == 2 and "top_p" in result.output, result.output
    backend = build_backend(BackendSpec(kind="engine", model=str(ckpt), temperature=0.0, top_p=0.9, seed=7, kv_fp8=True))
    assert (backend.temperature, backend.top_p, backend.seed, backend.kv_fp8) == (0.0, 0.9, 7, True)


def test_version():
    result = run_cli("version")
    assert result.exit_code == 0 and result.output.strip()


def test_a_yaml_config_sets_the_limits_and_rejects_unknown_keys(tmp_path):
    script = write_script(tmp_path, [completion(f"{i}", calls=[("bash", {"command": f"echo {i}"})]) for i in range(3)])
    good = tmp_path / "agent.yaml"
    good.write_text("max_steps: 1\nstuck_repeats: 2\n")
    args = ["run", "count", "--scripted", script, "--sandbox", "local", "--yolo", "-o", tmp_path / "runs"]
    result = run_cli(*args, "--config", good)
    assert result.exit_code == 3, result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 1\n")
    result = run_cli(*args, "--config", bad)
    assert result.exit_code == 2 and "max_stepz" in result.output


def test_json_mode_prints_the_trajectory_events(tmp_path):
    script = write_script(
        tmp_path, [completion("Go.", calls=[("bash", {"command": "echo hi"})]), completion("Ok.", content="hi")]
    )
    result = run_cli(
        "run", "say hi", "--scripted", script, "--sandbox", "local", "--yolo", "--json", "-o", tmp_path / "r"
    )
    assert result.exit_code == 0
    events = [json.loads(line) for line in result.output.splitlines()]
    assert [e["event"] for e in events][0] == "run_started" and events[-1]["event"] == "exit"
    assert events[-1]["status"] == "completed" and "tool_result" in [e["event"] for e in events]
    (log,) = (tmp_path / "r").glob("*/trajectory.jsonl")
    assert log.read_text().splitlines() == result.output.splitlines()
