"""Faults injected into runs from outside (issue 13, "Runs" 8-15): each test asserts the invariant.

Processes are real (`python -m agent`), killed or signalled at a moment the test waits for (a file an MCP
server writes, an event a tool sets), never after a guessed delay; every wait is bounded.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anyio
import pytest
from rich.console import Console
from typer.testing import CliRunner

from agent import Agent, ExitStatus, RichDisplay, ScriptedBackend, completion
from agent.cli import app
from agent.loop import RERUN_NOTE
from agent.spec import BackendSpec, RunSpec, SandboxSpec
from agent.trajectory import TRAJECTORY_FILE, RunResumed, ToolResultEvent, read_events, resolve_run, run_lock
from tools import tool

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def cli_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    return {**os.environ, "PYTHONPATH": path, "COLUMNS": "160"}


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agent", *args], cwd=cwd, env=cli_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, env=cli_env(),
                          cwd=cwd, timeout=120)


def wait_for(path: Path, proc: subprocess.Popen, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def hanging_mcp_flag(marker: Path) -> str:
    """--mcp for a server that starts (and says so in `marker`) but never answers the handshake."""
    code = f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(600)"
    return f"hang={sys.executable} -c {json.dumps(code)}"


def scripted(tmp_path: Path, turns: list[str]) -> Path:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(turns))
    return path


def one_line_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output and "errors.pydantic.dev" not in output
    return lines[0]


# --- 8. resume of a run that cannot be resumed: one line, exit 2 ------------------------------------------


def test_resume_of_a_completed_run_is_one_line_and_exit_2(tmp_path):
    script = scripted(tmp_path, [completion("x", content="done")])
    out = tmp_path / "runs"
    ran = runner.invoke(app, ["run", "t", "--scripted", str(script), "--sandbox", "none", "-o", str(out)])
    assert ran.exit_code == 0, ran.output
    result = runner.invoke(app, ["resume", "last", "-o", str(out)])
    assert result.exit_code == 2
    assert "already completed" in one_line_error(result.output)


def test_sigterm_names_itself_and_a_run_stopped_before_its_prompt_cannot_be_resumed(tmp_path):
    script = scripted(tmp_path, [completion("x", content="done")])
    out, marker = tmp_path / "runs", tmp_path / "mcp-started"
    proc = start_cli("run", "t", "--scripted", str(script), "--sandbox", "none", "--yolo",
                     "--mcp", hanging_mcp_flag(marker), "-o", str(out), cwd=tmp_path)
    try:
        wait_for(marker, proc)  # the run is starting its MCP server: before its first prompt
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)  # not the 60 s the server has to answer, plus more
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output
    assert "SIGTERM" in output and "Ctrl-C" not in output, output
    exit_event = read_events(resolve_run("last", out) / TRAJECTORY_FILE)[-1]
    assert exit_event.status == "interrupted" and "SIGTERM" in exit_event.message, exit_event
    resumed = cli("resume", "last", "-o", str(out), cwd=tmp_path)  # a real process: the error crosses anyio.run
    assert resumed.returncode == 2
    assert "ended before its first prompt" in one_line_error(resumed.stdout + resumed.stderr)


# --- 9. two resumes of one run: the second is refused --------------------------------------------------


@pytest.mark.anyio
async def test_a_second_resume_of_a_running_run_is_refused(tmp_path):
    started, release = anyio.Event(), anyio.Event()

    @tool
    async def step(label: str) -> str:
        """Do a step; the second waits until the test lets it go."""
        if label == "two":
            started.set()
            await release.wait()
        return f"did {label}"

    turns = [
        completion("One.", calls=[("step", {"label": "one"})]),
        completion("Two.", calls=[("step", {"label": "two"})]),
        completion("Done.", content="both"),
    ]
    # the spec the CLI rebuilds the agent from (its process is refused before it would use it)
    spec = RunSpec(backend=BackendSpec(kind="scripted", completions=turns), sandbox=SandboxSpec(kind="none"))

    def agent(max_steps: int) -> Agent:
        return Agent(backend=ScriptedBackend(turns), tools=[step], output_dir=tmp_path, max_steps=max_steps,
                     spec=spec.model_dump(mode="json"))

    assert (await agent(1).run("do one then two")).status is ExitStatus.max_steps
    async with anyio.create_task_group() as group:
        box = {}

        async def first() -> None:
            box["result"] = await agent(5).resume("last")

        group.start_soon(first)
        with anyio.fail_after(60):
            await started.wait()  # the first resume holds the run and is inside step 2
        second = await anyio.run_process([sys.executable, "-m", "agent", "resume", "last", "-o", str(tmp_path)],
                                         check=False, env=cli_env(), cwd=tmp_path)
        same_process = None
        try:
            await agent(5).resume("last")
        except Exception as e:  # noqa: BLE001 - asserted below
            same_process = e
        release.set()
    output = (second.stdout + second.stderr).decode()
    assert second.returncode == 2
    assert "is in use" in one_line_error(output)
    assert "is in use" in str(same_process)
    assert box["result"].status is ExitStatus.completed
    events = read_events(box["result"].trajectory_path)
    assert sum(isinstance(e, RunResumed) for e in events) == 1  # only the first resume wrote anything
    assert [e.step for e in events if getattr(e, "event", "") == "engine_call"] == [1, 2, 3]


def test_the_run_lock_is_released_with_its_holder(tmp_path):
    run_dir = tmp_path / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from agent.trajectory import run_lock\n"
         "with run_lock(__import__('pathlib').Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)",
         str(run_dir)], stdout=subprocess.PIPE, text=True, env=cli_env(), cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match="is in use"):
            with run_lock(run_dir):
                pass
    finally:
        holder.kill()  # SIGKILL: no chance to unlock, the kernel does it
        holder.wait(timeout=30)
    with run_lock(run_dir):
        pass


# --- 10. escape sequences from tools never reach the terminal; the trajectory keeps them ------------------

# clear screen + home, a window title, an OSC 8 link, an 8-bit CSI, a bell and a backspace
ESCAPES = ("\x1b[2J\x1b[H" + "\x1b]0;pwned\x07" + "\x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\"
           + "\x9b2J\x07\x08")


@pytest.mark.anyio
async def test_terminal_escapes_are_shown_harmless_and_kept_raw_in_the_trajectory(tmp_path):
    @tool
    def noisy() -> str:
        """Print what a hostile program prints."""
        return f"before {ESCAPES} after"

    screen = io.StringIO()
    display = RichDisplay(Console(file=screen, width=400, color_system=None, force_terminal=False))
    turns = [completion("Run it.", calls=[("noisy", {})]), completion("Done.", content=f"answer {ESCAPES}")]
    agent = Agent(backend=ScriptedBackend(turns), tools=[noisy], output_dir=tmp_path, observer=display)
    result = await agent.run(f"task {ESCAPES}")
    assert result.status is ExitStatus.completed
    inspected = runner.invoke(app, ["inspect", "last", "-o", str(tmp_path)])
    for shown in (screen.getvalue(), inspected.output):
        assert not any(c in shown for c in "\x1b\x07\x08\x9b"), repr(shown)
        assert "␛[2J" in shown  # visible, not obeyed
    assert "before ␛[2J␛[H␛]0;pwned␇" in screen.getvalue()
    (recorded,) = [e for e in read_events(result.trajectory_path) if isinstance(e, ToolResultEvent)]
    assert recorded.content == f"before {ESCAPES} after"


# --- 12. a run killed before its first event never becomes `last` --------------------------------------


def test_last_passes_over_folders_without_a_complete_run_started(tmp_path):
    good = tmp_path / "20240101-000000-aaaaaa"
    assert runner.invoke(app, ["run", "t", "--scripted", str(scripted(tmp_path, [completion("x", content="y")])),
                               "--sandbox", "none", "-o", str(tmp_path)]).exit_code == 0
    (real,) = [p for p in tmp_path.iterdir() if (p / TRAJECTORY_FILE).exists()]
    real.rename(good)
    for name, text in (("20991231-000000-bbbbbb", ""), ("20991231-000000-cccccc", '{"t": 1, "event": "run_sta')):
        (tmp_path / name).mkdir()
        (tmp_path / name / TRAJECTORY_FILE).write_text(text)  # empty, or cut in the first write
    assert resolve_run("last", tmp_path) == good


def test_a_run_sigkilled_before_its_first_event_leaves_last_on_the_previous_run(tmp_path):
    out, marker = tmp_path / "runs", tmp_path / "mcp-started"
    script = scripted(tmp_path, [completion("x", content="y")])
    assert cli("run", "the earlier task", "--scripted", str(script), "--sandbox", "none", "-o", str(out),
               cwd=tmp_path).returncode == 0
    earlier = resolve_run("last", out)
    proc = start_cli("run", "killed task", "--scripted", str(script), "--sandbox", "none", "--yolo",
                     "--mcp", hanging_mcp_flag(marker), "-o", str(out), cwd=tmp_path)
    try:
        wait_for(marker, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    (killed,) = [p for p in out.iterdir() if p != earlier]  # the killed run had made its folder, newer by name
    assert not (killed / TRAJECTORY_FILE).exists()  # but no log: its first event was never written
    assert resolve_run("last", out) == earlier
    inspected = cli("inspect", "last", "-o", str(out), cwd=tmp_path)
    assert inspected.returncode == 0 and "the earlier task" in inspected.stdout, inspected.stdout + inspected.stderr


# --- 13. a call that was running when the run died is re-run, and the model is told ----------------------


@pytest.mark.anyio
async def test_resume_tells_the_model_which_call_ran_a_second_time(tmp_path):
    runs: list[str] = []
    first_attempt = anyio.Event()

    @tool
    async def deploy(target: str) -> str:
        """Deploy; the first attempt hangs until the run is interrupted."""
        runs.append(target)
        if len(runs) == 1:
            first_attempt.set()
            await anyio.sleep_forever()
        return f"deployed {target}"

    turns = [completion("Deploy both.", calls=[("deploy", {"target": "a"}), ("deploy", {"target": "b"})]),
             completion("Done.", content="deployed")]
    first = Agent(backend=ScriptedBackend(turns), tools=[deploy], output_dir=tmp_path)
    async with anyio.create_task_group() as group:
        group.start_soon(first.run, "deploy a and b")
        with anyio.fail_after(60):
            await first_attempt.wait()  # call a runs, call b waits its turn (not parallel-safe)
        first.cancel()
    resumed = await Agent(backend=ScriptedBackend(turns), tools=[deploy], output_dir=tmp_path).resume("last")
    assert resumed.status is ExitStatus.completed and runs == ["a", "a", "b"]
    results = {e.call_id: e.content for e in read_events(resumed.trajectory_path) if isinstance(e, ToolResultEvent)}
    assert list(results.values()) == [f"{RERUN_NOTE}\ndeployed a", "deployed b"]  # b had never started


# --- 14. sys.exit and lone surrogates stay inside their call -------------------------------------------


@pytest.mark.anyio
async def test_sys_exit_and_surrogates_in_tools_do_not_end_the_run(tmp_path):
    @tool
    def quit_now() -> str:
        """Exit the process."""
        sys.exit(2)

    @tool
    async def mojibake() -> str:
        """Return undecodable bytes as decoded with surrogateescape."""
        return b"\xff\xfe ok".decode("utf-8", "surrogateescape")

    turns = [completion("Try.", calls=[("quit_now", {}), ("mojibake", {})]), completion("Done.", content="ok")]
    result = await Agent(backend=ScriptedBackend(turns), tools=[quit_now, mojibake], output_dir=tmp_path).run("t")
    assert result.status is ExitStatus.completed
    exited, decoded = [e for e in read_events(result.trajectory_path) if isinstance(e, ToolResultEvent)]
    assert exited.is_error and exited.error_kind == "exception" and "sys.exit(2)" in exited.content
    assert not decoded.is_error and decoded.content == "\ufffd\ufffd ok"


# --- 14. an MCP server that never answers: progress while it starts, a bounded wait, a clear message -------


@pytest.mark.anyio
async def test_a_never_answering_mcp_server_shows_progress_and_fails_at_its_bound(tmp_path):
    from tools.mcp import MCPServer

    class Progress(RichDisplay):
        def __init__(self) -> None:
            super().__init__(Console(file=io.StringIO(), width=200, color_system=None))
            self.footers: list[str] = []

        def starting(self, what: str) -> None:
            super().starting(what)
            self.footers.append(self._footer().renderables[0].plain)

    mute = MCPServer.stdio(sys.executable, ["-c", "import time; time.sleep(600)"], name="mute", start_timeout_s=1)
    display = Progress()
    agent = Agent(backend=ScriptedBackend([completion("x", content="y")]), tools=[], mcp_servers=[mute],
                  output_dir=tmp_path, observer=display)
    result = await agent.run("t")
    assert result.status is ExitStatus.error
    assert "MCP server 'mute'" in result.message and "handshake (initialize, tools/list) within 1 s" in result.message
    assert any(f.startswith("starting MCP server 'mute' (1 s to answer) …") for f in display.footers), display.footers


# --- 15. CLI usage errors: one line, exit 2, before any run folder ------------------------------------


def checkpoint_files(tmp_path: Path) -> Path:
    """A folder with the files of a checkpoint's layout, none of them loadable: enough for the CLI's checks."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"")
    return ckpt


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--model", "{ckpt}", "--device", "cpu", "--port", "99999"], "--port must be a TCP port"),
        (["run", "t", "--scripted", "{script}", "--effort", "ultra"],
         "--effort: Input should be 'max', 'high' or 'none'"),
        (["run", "t", "--scripted", "{script}", "--max-steps", "-1"], "--max-steps: Input should be greater than"),
        (["run", "t", "--model", "{empty}"], "is not a DSV4 checkpoint: it has no config.json"),
        (["serve", "--model", "{empty}"], "is not a DSV4 checkpoint: it has no config.json"),
        (["run", "t", "--model", "{ckpt}", "--device", "{absent_gpu}"], "--device cuda"),
        (["run", "t", "--model", "{ckpt}", "--device", "tpu"], "is not a device"),
    ],
)
def test_cli_usage_errors_are_one_line_and_exit_2_before_any_run_folder(tmp_path, args, message):
    import torch

    values = {
        "ckpt": str(checkpoint_files(tmp_path)),
        "script": str(scripted(tmp_path, [completion("x", content="y")])),
        "empty": str(tmp_path / "empty"),
        "absent_gpu": f"cuda:{torch.cuda.device_count()}",  # one past the last GPU, on any machine
    }
    (tmp_path / "empty").mkdir()
    out = tmp_path / "runs"
    result = runner.invoke(app, [a.format(**values) for a in args] + (["-o", str(out)] if args[0] == "run" else []))
    assert result.exit_code == 2, result.output
    assert message in one_line_error(result.output)
    assert not out.exists()


def test_resume_with_a_bad_budget_flag_is_a_usage_error(tmp_path):
    script = scripted(tmp_path, [completion(f"{i}", calls=[("nothing", {})]) for i in range(3)])
    run = runner.invoke(app, ["run", "t", "--scripted", str(script), "--sandbox", "none", "--max-steps", "1",
                              "-o", str(tmp_path)])
    assert run.exit_code == 3, run.output
    result = runner.invoke(app, ["resume", "last", "--max-steps", "-1", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "--max-steps" in one_line_error(result.output)


def test_serve_on_a_busy_port_exits_1_before_loading_the_model(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the checkpoint cannot load: an error about the port proves the port was tried first
        result = runner.invoke(app, ["serve", "--model", str(checkpoint_files(tmp_path)), "--device", "cpu",
                                     "--port", str(port)])
    assert result.exit_code == 1, result.output  # not 3, which means max_steps
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in one_line_error(result.output)


def test_serve_answers_on_the_port_it_took_before_loading(tmp_path):
    from dsv4 import ModelConfig
    from dsv4.loading.testing import write_random_checkpoint
    from encoding import Tokenizer

    cfg = ModelConfig.tiny().model_copy(update={"vocab_size": Tokenizer.default().vocab_size})
    ckpt = write_random_checkpoint(tmp_path / "tiny", cfg, seed=0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = start_cli("serve", "--model", str(ckpt), "--device", "cpu", "--port", str(port), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the server never answered"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as response:
                    models = json.load(response)
                break
            except OSError:
                time.sleep(0.2)
        assert [m["id"] for m in models["data"]] == ["tiny"]
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert f"serving tiny on http://127.0.0.1:{port}" in output
