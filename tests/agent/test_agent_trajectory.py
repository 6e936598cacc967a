"""The trajectory log: durable appends, a cut-off last line survived, versions checked, runs resolved."""

from __future__ import annotations

import json

import pytest

from agent.trajectory import (
    TRAJECTORY_FILE,
    ExitEvent,
    Notice,
    RunStarted,
    SandboxEvent,
    TrajectoryError,
    TrajectoryWriter,
    Usage,
    read_events,
    resolve_run,
)


def started(run_id="r1"):
    return RunStarted(run_id=run_id, task="t", spec={}, backend="b", tools=[], system_prompt="s", prompt_tokens=3)


def test_events_before_run_started_wait_for_it(tmp_path):
    path = tmp_path / "r" / TRAJECTORY_FILE
    writer = TrajectoryWriter(path)
    writer.write(SandboxEvent(kind="started", detail="box"))
    assert not path.exists()  # held: a log always starts with run_started, and no log is ever empty
    writer.write(started())
    writer.close()
    assert [e.event for e in read_events(path)] == ["run_started", "sandbox_event"]


def test_a_line_cut_by_a_crash_is_dropped_and_overwritten(tmp_path):
    path = tmp_path / TRAJECTORY_FILE
    writer = TrajectoryWriter(path)
    writer.write(started())
    writer.write(Notice(step=1, kind="empty_turn", text="say something"))
    writer.close()
    with path.open("a") as f:
        f.write('{"t": 1, "event": "tool_res')  # SIGKILL in the middle of a write
    assert [e.event for e in read_events(path)] == ["run_started", "notice"]
    again = TrajectoryWriter(path)  # resume appends after the last complete line
    again.write(
        ExitEvent(status="completed", exit_code=0, message="", final_answer="a", steps=1, usage=Usage(), wall_s=1.0)
    )
    again.close()
    assert [e.event for e in read_events(path)] == ["run_started", "notice", "exit"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_bad_logs_are_rejected_with_the_reason(tmp_path):
    path = tmp_path / TRAJECTORY_FILE
    with pytest.raises(TrajectoryError, match="no trajectory"):
        read_events(path)
    path.write_text('{"event": "nonsense"}\n')
    with pytest.raises(TrajectoryError, match=":1: not a trajectory event"):
        read_events(path)
    path.write_text(started().model_copy(update={"format": "dsv4-agent.trajectory/99"}).model_dump_json() + "\n")
    with pytest.raises(TrajectoryError, match="not supported"):
        read_events(path)
    path.write_text(Notice(step=1, kind="x", text="y").model_dump_json() + "\n")
    with pytest.raises(TrajectoryError, match="first event must be run_started"):
        read_events(path)


def test_runs_resolve_by_last_id_folder_or_file(tmp_path):
    for run_id in ("20261201-100000-aaaaaa", "20261201-110000-bbbbbb"):
        writer = TrajectoryWriter(tmp_path / run_id / TRAJECTORY_FILE)
        writer.write(started(run_id))
        writer.close()
    (tmp_path / "demo-model").mkdir()  # other folders in the output dir are not runs
    newest = tmp_path / "20261201-110000-bbbbbb"
    assert resolve_run("last", tmp_path) == newest
    assert resolve_run("20261201-100000-aaaaaa", tmp_path) == tmp_path / "20261201-100000-aaaaaa"
    assert resolve_run(str(newest), tmp_path / "elsewhere") == newest
    assert resolve_run(str(newest / TRAJECTORY_FILE), tmp_path) == newest
    with pytest.raises(TrajectoryError, match="no run 'nope'"):
        resolve_run("nope", tmp_path)
    with pytest.raises(TrajectoryError, match="no runs in"):
        resolve_run("last", tmp_path / "empty")
