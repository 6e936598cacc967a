"""The run's trajectory: a versioned JSONL event log, one line per event, flushed and fsynced as it happens.

A run lives in `<output_dir>/<run_id>/`; its log is `trajectory.jsonl`. Because every event reaches the
disk before the loop moves on, a run killed at any instant (even SIGKILL) leaves a log that `resume`
can continue from: at worst the last line is cut short, and the reader drops it.

Format versions (bump `TRAJECTORY_FORMAT` and add a line here when the event schema changes):
  dsv4-agent.trajectory/1  run_started, engine_call, tool_call, tool_result, sandbox_event, notice,
                           run_resumed, exit
  dsv4-agent.trajectory/2  + user_message (a `reply`), exit.kv_session; a /1 log that gets a reply
                           keeps its run_started (and format) and gains /2 events
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Annotated, Any, Callable, Iterator, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter

TRAJECTORY_FORMAT = "dsv4-agent.trajectory/2"
SUPPORTED_FORMATS = ("dsv4-agent.trajectory/1", TRAJECTORY_FORMAT)
TRAJECTORY_FILE = "trajectory.jsonl"


class Usage(BaseModel):
    """Token and call counters of a run; every engine call counts, failed parses included."""

    engine_calls: int = 0
    prefill_new: int = Field(0, description="tokens prefilled into the KV cache (computed)")
    prefill_reused: int = Field(
        0, description="tokens already resident in the KV cache when a turn started (not recomputed)"
    )
    reasoning: int = Field(0, description="decoded tokens up to and including </think>")
    content: int = Field(0, description="decoded answer tokens")
    tool_call: int = Field(0, description="decoded tokens from the first DSML tag on")

    @property
    def decoded(self) -> int:
        return self.reasoning + self.content + self.tool_call

    @property
    def processed(self) -> int:
        """Tokens the engine computed: what the token budget counts."""
        return self.prefill_new + self.decoded

    def add(self, other: Usage) -> None:
        for name in Usage.model_fields:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class ParsedCall(BaseModel):
    """One tool call as the stream parser saw it; `error` set when it was malformed."""

    call_id: str = Field(description="call_<step>_<index>: DSML has no call ids, the loop assigns them")
    step: int
    name: str
    arguments: dict[str, Any] | None = None
    error: str | None = None


class _Event(BaseModel):
    t: float = Field(default_factory=time.time, description="unix time the event was written")


class RunStarted(_Event):
    event: Literal["run_started"] = "run_started"
    format: str = TRAJECTORY_FORMAT
    run_id: str
    task: str
    spec: dict[str, Any] = Field(
        description="what `resume`/`replay` need to rebuild the agent (see agent.spec.RunSpec)"
    )
    backend: str = Field(description="honest label of what produced the tokens")
    tools: list[dict[str, Any]] = Field(description="the tool schemas rendered into the prompt, in prompt order")
    system_prompt: str
    prompt_tokens: int


class EngineCall(_Event):
    event: Literal["engine_call"] = "engine_call"
    step: int
    usage: Usage = Field(description="this call only")
    stop_reason: Literal["eos", "max_tokens"]
    prefill_s: float
    decode_s: float
    text: str = Field(description="the decoded completion, special tokens included")
    token_ids: list[int] = Field(description="the generated ids, EOS included: the exact tokens now in the session")
    calls: list[ParsedCall]
    reasoning: str
    content: str
    incomplete_call: str | None = Field(None, description="a call the output cut off; it did not run")
    parse_warnings: list[str] = Field(default_factory=list, description="what the tolerant parser recovered from")
    backend_info: dict[str, Any] = Field(
        default_factory=dict, description="Backend.turn_info(): KV bytes, forced-token statistics"
    )


class ToolCall(_Event):
    event: Literal["tool_call"] = "tool_call"
    step: int
    call_id: str
    name: str
    arguments: dict[str, Any]
    parallel_safe: bool


class ToolResultEvent(_Event):
    event: Literal["tool_result"] = "tool_result"
    step: int
    call_id: str
    name: str
    content: str
    is_error: bool
    error_kind: str | None = Field(
        None,
        description="malformed, unknown_tool, denied, bad_arguments, timeout, mcp, command_failed, exception, tool_error",
    )
    wall_s: float = 0.0


class SandboxEvent(_Event):
    event: Literal["sandbox_event"] = "sandbox_event"
    kind: str = Field(description="started, stopped, error")
    detail: str


class Notice(_Event):
    event: Literal["notice"] = "notice"
    step: int
    kind: str = Field(description="format_error, empty_turn, tools_changed, truncated")
    text: str = Field(description="what the model was told")


class RunResumed(_Event):
    event: Literal["run_resumed"] = "run_resumed"
    from_step: int
    reprefill_tokens: int = Field(
        description="history tokens prefilled once to rebuild the KV cache (0: a saved KV session was loaded)"
    )


class UserMessage(_Event):
    event: Literal["user_message"] = "user_message"
    step: int = Field(description="the step it follows: appended after that step's tool results and notices")
    text: str


class ExitEvent(_Event):
    event: Literal["exit"] = "exit"
    status: str
    exit_code: int
    message: str
    final_answer: str | None
    steps: int
    usage: Usage
    wall_s: float
    kv_session: str | None = Field(None, description="the folder the KV session was saved to, if it was")


Event = Annotated[
    Union[RunStarted, EngineCall, ToolCall, ToolResultEvent, SandboxEvent, Notice, RunResumed, UserMessage, ExitEvent],
    Field(discriminator="event"),
]
_EVENT = TypeAdapter(Event)


def new_run_id() -> str:
    # Sorts by creation time, so the latest run is the largest name.
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


class TrajectoryWriter:
    """Appends events to a run's log; each write is flushed and fsynced before it returns.

    The file is created by the first write, run_started: a run killed before it leaves no log at all,
    never an empty one that `last` could name.
    """

    def __init__(self, path: Path, tee: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.tee = tee  # also handed each line once it is on disk (`dsv4-agent run --json` prints them)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_partial_tail()
        self._started = path.exists() and path.stat().st_size > 0
        self._held: list[BaseModel] = []  # events that came before run_started (a sandbox starting)
        self._file: IO[str] | None = None

    def _cut_partial_tail(self) -> None:
        # A SIGKILL mid-write can leave a last line without its newline; drop it before appending.
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def write(self, event: BaseModel) -> None:
        """Append one event durably. A log always starts with run_started: earlier events wait for it."""
        if not self._started:
            if not isinstance(event, RunStarted):
                self._held.append(event)
                return
            self._started = True
            events = [event, *self._held]
            self._held.clear()
        else:
            events = [event]
        lines = "".join(e.model_dump_json() + "\n" for e in events)
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(lines)
        self._file.flush()
        os.fsync(self._file.fileno())
        if self.tee is not None:
            self.tee(lines)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class TrajectoryError(ValueError):
    """A trajectory file that cannot be read; the message names the file and the line."""


def read_events(path: Path) -> list[Any]:
    """All complete events of a log, in order. A cut-off last line (crash mid-write) is dropped."""
    if not path.exists():
        raise TrajectoryError(f"no trajectory at {path}")
    # Text after the last newline is an unfinished write: ignored.
    *complete, _unfinished = path.read_text(encoding="utf-8").split("\n")
    events = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            events.append(_EVENT.validate_json(line))
        except ValueError as e:
            raise TrajectoryError(f"{path}:{number}: not a trajectory event: {e}") from e
    if not events or not isinstance(events[0], RunStarted):
        raise TrajectoryError(f"{path}: the first event must be run_started")
    if events[0].format not in SUPPORTED_FORMATS:
        raise TrajectoryError(
            f"{path}: trajectory format {events[0].format!r} is not supported (supported: {', '.join(SUPPORTED_FORMATS)})"
        )
    return events


class RunBusy(TrajectoryError):
    """The run folder is locked: another process (or agent) is running, resuming or replying to that run."""


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run folder while its run executes; a second taker is refused at once.

    An flock on the folder itself: the kernel drops it when the holder exits, even by SIGKILL, so a
    killed run is never left locked; the descriptor is not inherited by the processes a run starts.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(
                f"run {run_dir.name} is in use: another process (or agent) is running, resuming or replying "
                "to it; wait for it to end (or stop it) first"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _is_run(path: Path) -> bool:
    """Whether a log's first line is a complete run_started event: what `last` may name."""
    try:
        with path.open("rb") as f:
            first = f.readline()
    except OSError:
        return False
    try:
        return first.endswith(b"\n") and isinstance(_EVENT.validate_json(first), RunStarted)
    except ValueError:
        return False


def resolve_run(run: str, output_dir: Path) -> Path:
    """A run directory from what a user typed: `last`, a run id in `output_dir`, a directory, or a trajectory file.

    `last` is the newest folder whose log starts with run_started; a run killed before its first event
    (or in the middle of writing it) is passed over.
    """
    if run == "last":
        logs = sorted(output_dir.glob(f"*/{TRAJECTORY_FILE}"), reverse=True) if output_dir.is_dir() else []
        newest = next((log.parent for log in logs if _is_run(log)), None)
        if newest is None:
            raise TrajectoryError(f"no runs in {output_dir}")
        return newest
    for candidate in (Path(run), output_dir / run):
        if candidate.is_file() and candidate.name == TRAJECTORY_FILE:
            return candidate.parent
        if (candidate / TRAJECTORY_FILE).is_file():
            return candidate
    raise TrajectoryError(f"no run {run!r}: not a run directory, a {TRAJECTORY_FILE} file, or a run id in {output_dir}")
