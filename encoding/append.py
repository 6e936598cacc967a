"""`AppendOnlyEncoder`: the token ids of an agent session, produced without re-rendering history.

    enc = AppendOnlyEncoder(Tokenizer.default())              # thinking mode, Think Max
    ids = enc.prompt([system_with_tools, user])               # whole first prompt
    msg = enc.record_completion(generated_ids)                # what the model wrote, EOS included
    ids = enc.append([tool_result, ...])                      # only the new ids

The contract: after any sequence of these calls, `prompt ids + generated ids + appended ids`
ends exactly like the full re-encode `Tokenizer.encode_prompt(render_messages(enc.messages, mode,
reasoning_effort=...))` does: every `append` returns the tail of that full re-encode, token for token.
Message data (task, tool results, notices) never yields a control id; where it holds no added-token
string the ids are those of `Tokenizer.encode(encode_messages(...))`.

Why it holds:
  * Thinking is never dropped: with tools present the official encoder keeps every turn's
    reasoning (drop_thinking is off), so history renders the same however long the conversation
    grows. Without tools the official default would drop old reasoning and rewrite history;
    this encoder then renders like `drop_thinking=False` (the only append-only choice).
  * A message renders from itself, the role of the next message and the turn before it; appended
    turns follow an assistant completion, so they are rendered with that completion as context.
  * Token boundaries: each appended piece starts right after the completion's EOS, a markup added
    token at which `encode_prompt` cuts the text, so its ids equal the full re-encode's tail. A completion
    cut before its EOS (max tokens, truncated call) gets the EOS id prepended to the next append,
    which is what the full re-encode has there.
  * The generated ids themselves are kept as the model wrote them (possibly not the tokenizer's
    canonical split); only the text after them is encoded.
"""
from __future__ import annotations

from typing import Any

from .encode import check_modes, render_messages
from .errors import MessageError
from .messages import ToolCallLedger, as_message_dicts
from .stream import End, StreamParser, ToolCallComplete
from .tokenizer import Tokenizer


class AppendOnlyEncoder:
    def __init__(self, tokenizer: Tokenizer, thinking_mode: str = "thinking", reasoning_effort: str | None = "max"):
        check_modes(thinking_mode, reasoning_effort)
        self.tokenizer = tokenizer
        self.thinking_mode = thinking_mode
        self.reasoning_effort = reasoning_effort
        self._messages: list[dict] = []
        self._tool_names: set[str] = set()
        self._turns = 0  # completions recorded
        self._missing_eos = False  # the last completion ended without EOS
        self._awaiting = "prompt"  # which call comes next: prompt | completion | append
        self.num_tokens = 0
        self.last_end: End | None = None  # End event of the last recorded completion
        self.last_call_errors: dict[str, str] = {}  # call id -> why that call of the last completion must not run

    @property
    def messages(self) -> list[dict]:
        """The conversation so far; completions as parsed (a call whose arguments are not JSON keeps
        its raw text, which renders as the single parameter `arguments`, as upstream renders it)."""
        return list(self._messages)

    def _expect(self, call: str) -> None:
        if self._awaiting != call:
            raise RuntimeError(f"AppendOnlyEncoder.{call}() called while waiting for {self._awaiting}()")

    def prompt(self, messages: list[Any]) -> list[int]:
        """Ids of the whole first prompt (BOS, Think Max prefix, ..., the assistant transition)."""
        self._expect("prompt")
        msgs = as_message_dicts(messages)
        _check_asks_for_answer(msgs, "messages")
        pieces = render_messages(msgs, self.thinking_mode, drop_thinking=False, reasoning_effort=self.reasoning_effort)
        self._messages = msgs
        for msg in msgs:
            self._tool_names.update(tool["function"]["name"] for tool in msg.get("tools") or [])
        self._awaiting = "completion"
        return self._count(self.tokenizer.encode_prompt(pieces))

    def record_completion(self, token_ids: list[int]) -> dict:
        """Parse what the model generated (tolerantly) and add it to the conversation.

        Returns the assistant message; its tool calls get ids `call_<turn>_<i>` (turn = 0-based
        count of completions, i = 0-based call index). `last_end` keeps the parser's `End`
        (truncation, incomplete call, warnings) and `last_call_errors` the calls that must not run
        (unknown tool, invalid JSON value, malformed invoke), by id, with the reason.
        """
        self._expect("completion")
        token_ids = list(token_ids)
        parser = StreamParser(self.thinking_mode, strict=False, tool_names=self._tool_names)
        events = parser.feed(self.tokenizer.decode(token_ids)) + parser.close()
        end = events[-1]
        message = dict(end.message)
        message["tool_calls"] = [
            {"id": f"call_{self._turns}_{i}", **call} for i, call in enumerate(message["tool_calls"])
        ]
        self.last_call_errors = {
            f"call_{self._turns}_{e.index}": e.error for e in events if isinstance(e, ToolCallComplete) and e.error
        }
        self._messages.append(_history_form(message))
        self._turns += 1
        self._missing_eos = not token_ids or token_ids[-1] != self.tokenizer.eos_id
        self.last_end = end
        self._awaiting = "append"
        self._count(token_ids)
        return message

    def append(self, new_messages: list[Any]) -> list[int]:
        """Ids of `new_messages` (tool results, a user turn, ...) and the next assistant transition."""
        self._expect("append")
        completion = self._messages[-1]
        # The completion is the only context that shapes the new turns (tool-result order, ids).
        ledger = ToolCallLedger()
        as_message_dicts([completion], "completion", ledger)
        msgs = as_message_dicts(new_messages, "new_messages", ledger)  # tool results answer its calls
        _check_asks_for_answer(msgs, "new_messages")
        pieces = render_messages(msgs, self.thinking_mode, context=[completion], drop_thinking=False,
                                 reasoning_effort=self.reasoning_effort)
        ids = ([self.tokenizer.eos_id] if self._missing_eos else []) + self.tokenizer.encode_prompt(pieces)
        self._messages.extend(msgs)
        self._awaiting = "completion"
        return self._count(ids)

    def _count(self, ids: list[int]) -> list[int]:
        self.num_tokens += len(ids)
        return ids


def _check_asks_for_answer(msgs: list[dict], name: str) -> None:
    """The prompt must end where the model answers: a user, developer or tool turn."""
    if not msgs:
        raise MessageError(name, "is empty")
    if msgs[-1].get("role") not in ("user", "developer", "tool"):
        raise MessageError(f"{name}[{len(msgs) - 1}].role", f"the last message must be user, developer or tool "
                           f"(the model answers it), got {msgs[-1].get('role')!r}")


# Stands in for a tool name the model garbled; never a real tool (tool names have no angle brackets).
UNREADABLE_TOOL_NAME = "<unreadable>"


def _history_form(message: dict) -> dict:
    """The message as kept for later rendering: a call whose name the tolerant parser could not read
    (a garbled invoke header) is kept under UNREADABLE_TOOL_NAME, so its error result can still
    answer it. History is never rendered again; this only keeps the conversation valid for
    `render_messages`."""
    calls = [
        {**call, "function": {**call["function"], "name": UNREADABLE_TOOL_NAME}} if not call["function"].get("name") else call
        for call in message["tool_calls"]
    ]
    return {**message, "tool_calls": calls}
