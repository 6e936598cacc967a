"""A run's steps as the trajectory recorded them, and the messages each step appends to the session.

The live loop and `resume` build the appended messages with the same functions from the same records,
so a resumed session holds exactly the tokens the interrupted one held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.status import ExitStatus
from agent.tooling import ToolOutcome
from agent.trajectory import (
    EngineCall,
    ExitEvent,
    Notice,
    RunResumed,
    RunStarted,
    ToolCall,
    ToolResultEvent,
    TrajectoryError,
    Usage,
    UserMessage,
)

RESUMABLE_NOTICE_KINDS = ("tools_changed",)  # notices that are not derived from the turn itself


def prompt_messages(system: str, tool_schemas: list[dict], task: str) -> list[dict[str, Any]]:
    """The first prompt: the system message carrying the tool schemas, then the task."""
    return [{"role": "system", "content": system, "tools": tool_schemas}, {"role": "user", "content": task}]


def result_event(step: int, outcome: ToolOutcome) -> ToolResultEvent:
    return ToolResultEvent(
        step=step,
        call_id=outcome.call_id,
        name=outcome.name,
        content=outcome.content,
        is_error=outcome.is_error,
        error_kind=outcome.error_kind,
        wall_s=outcome.wall_s,
    )


@dataclass
class StepRecord:
    call: EngineCall
    results: dict[str, ToolResultEvent] = field(default_factory=dict)
    encoder_call_ids: list[str] = field(default_factory=list)  # the ids AppendOnlyEncoder gave the calls

    @classmethod
    def live(cls, call: EngineCall, outcomes: list[ToolOutcome]) -> StepRecord:
        return cls(call, {o.call_id: result_event(call.step, o) for o in outcomes})

    @property
    def step(self) -> int:
        return self.call.step

    @property
    def final_answer(self) -> str | None:
        """The answer, when this turn ended the run: no call, a stop at EOS, some content."""
        if not self.call.calls and self.call.stop_reason == "eos" and self.call.content.strip():
            return self.call.content.strip()
        return None

    def record_into(self, encoder: Any) -> None:
        """Add this turn's generated ids to the encoder's conversation (no EOS is added: after a cut-off
        turn, `AppendOnlyEncoder.append` puts it in front of the next ids itself)."""
        message = encoder.record_completion(self.call.token_ids)
        self.encoder_call_ids = [call["id"] for call in message["tool_calls"]]
        if len(self.encoder_call_ids) != len(self.call.calls):
            raise RuntimeError(
                f"step {self.step}: the encoder parsed {len(self.encoder_call_ids)} tool calls, the stream parser {len(self.call.calls)}"
            )

    def followup_ids(self, encoder: Any, extra_notices: list[str]) -> list[int]:
        """The ids appended after this turn: tool results in call order, then notices (and a reply's
        message, last) as one user turn."""
        messages: list[dict[str, Any]] = [
            {"role": "tool", "tool_call_id": encoder_id, "content": self.results[c.call_id].content}
            for encoder_id, c in zip(self.encoder_call_ids, self.call.calls)
        ]
        notices = [text for _, text in turn_notices(self.call)] + extra_notices
        if notices:
            messages.append({"role": "user", "content": "\n\n".join(notices)})
        return encoder.append(messages)


def turn_notices(call: EngineCall) -> list[tuple[str, str]]:
    """What the model is told about a turn that went wrong without a tool result to carry it."""
    if call.stop_reason == "max_tokens":
        return [(
            "truncated",
            f"Your last turn was cut off after {len(call.token_ids)} tokens, the per-turn limit"
            + (f", inside the call of {call.incomplete_call!r}, which did not run" if call.incomplete_call else "")
            + ". Think more briefly, then write the tool call or the final answer.",
        )]  # fmt: skip
    if call.incomplete_call:
        return [
            (
                "format_error",
                f"Your call of {call.incomplete_call!r} was not closed before the end of your turn, so it did not run. Write it again, complete.",
            )
        ]
    if not call.calls and not call.content.strip():
        return [
            (
                "empty_turn",
                "Your last turn had neither a tool call nor an answer. Call a tool, or write the final answer.",
            )
        ]
    return []


@dataclass
class History:
    started: RunStarted
    steps: list[StepRecord]
    notices: list[Notice]
    exit: ExitEvent | None  # the exit event that closed the log; None when the process died after it
    reprefilled: int = 0  # history tokens prefilled by earlier resumes
    messages: list[UserMessage] = field(default_factory=list)  # what `reply` appended, in order
    started_calls: set[str] = field(default_factory=set)  # ids of the calls that began (a tool_call event)

    @classmethod
    def from_events(cls, events: list[Any]) -> History:
        started = events[0]
        steps: dict[int, StepRecord] = {}
        results: list[ToolResultEvent] = []
        notices: list[Notice] = []
        messages: list[UserMessage] = []
        exit_event = None
        reprefilled = 0
        started_calls: set[str] = set()
        for event in events[1:]:
            if isinstance(event, EngineCall):
                steps[event.step] = StepRecord(event)
            elif isinstance(event, ToolCall):
                started_calls.add(event.call_id)
            elif isinstance(event, ToolResultEvent):
                results.append(event)
            elif isinstance(event, Notice) and event.kind in RESUMABLE_NOTICE_KINDS:
                notices.append(event)
            elif isinstance(event, UserMessage):
                messages.append(event)
            elif isinstance(event, RunResumed):
                reprefilled += event.reprefill_tokens
            exit_event = event if isinstance(event, ExitEvent) else None
        for result in results:
            if result.step in steps:  # results of a step whose engine call was never recorded are dropped
                steps[result.step].results[result.call_id] = result
        return cls(
            started, [steps[s] for s in sorted(steps)], notices, exit_event, reprefilled, messages, started_calls
        )

    def check_resumable(self) -> None:
        run_id, exit_event = self.started.run_id, self.exit
        if exit_event is not None and exit_event.status == ExitStatus.completed.value:
            raise TrajectoryError(f"run {run_id} already completed; nothing to resume")
        self.check_replyable()

    def check_replyable(self) -> None:
        if self.started.prompt_tokens == 0:
            run_id, exit_event = self.started.run_id, self.exit
            reason = f" ({exit_event.message})" if exit_event else ""
            raise TrajectoryError(
                f"run {run_id} ended before its first prompt{reason}: nothing to continue; start it again with `run`"
            )

    def unfinished(self) -> bool:
        """The last call stopped part-way (interrupted, killed, or before a step's calls all ran):
        `reply` resumes such a run before it appends a message."""
        if self.exit is None or self.exit.status == ExitStatus.interrupted.value or not self.steps:
            return True
        last = self.steps[-1]
        return any(call.call_id not in last.results for call in last.call.calls)

    def replay_into(self, encoder: Any) -> list[int]:
        """Feed the recorded run to a fresh `AppendOnlyEncoder`; return every id the session held:
        the prompt, each turn, and the ids appended after every turn but the last."""
        # The recorded system prompt and schemas, so the history's tokens are exactly as before.
        started = self.started
        ids = encoder.prompt(prompt_messages(started.system_prompt, started.tools, started.task))
        if len(ids) != self.started.prompt_tokens:
            raise TrajectoryError(
                f"the re-rendered prompt has {len(ids)} tokens, the trajectory {self.started.prompt_tokens}"
            )
        for record in self.steps:
            record.record_into(encoder)
            ids += record.call.token_ids
            if record is not self.steps[-1]:
                ids += record.followup_ids(
                    encoder, self.extra_notices(record.step) + self.user_messages(record.step)
                )
        return ids

    def extra_notices(self, step: int) -> list[str]:
        return [n.text for n in self.notices if n.step == step]

    def user_messages(self, step: int) -> list[str]:
        return [m.text for m in self.messages if m.step == step]

    def usage(self) -> Usage:
        total = Usage(prefill_new=self.reprefilled)
        for record in self.steps:
            total.add(record.call.usage)
        return total
