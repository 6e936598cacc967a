"""`render_messages`: a conversation to the DSV4 prompt, byte-exact with the official encoder, as
pieces that keep the format's markup apart from message data (`Tokenizer.encode_prompt` turns them
into ids, never matching a control token inside data); `encode_messages` is their text.

Pipeline (same order and semantics as the official `encoding_dsv4.py`):
  1. check the messages (`MessageError` on malformed ones);
  2. merge tool messages into user turns as `<tool_result>` blocks, and order the results of one
     turn by the call order of the assistant turn before it;
  3. in thinking mode with `drop_thinking` (off as soon as any message has tools): drop the
     reasoning of assistant turns and the developer messages before the last user turn;
  4. render each message and the transition after it, concatenated with no separators.

The official encoder works on text; splitting it into pieces changes no character of it.
"""
from __future__ import annotations

from typing import Any

from .dsml import tool_calls_pieces, tools_block_pieces, to_json
from .errors import MessageError
from .messages import ToolCallLedger, as_message_dicts, decode_arguments
from .tokens import (
    ASSISTANT,
    BOS,
    EOS,
    EXTRACTED_URL,
    LATEST_REMINDER,
    REASONING_EFFORT_MAX,
    RESPONSE_FORMAT_PREFIX,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    USER,
    Piece,
    prompt_text,
)

markup, data = Piece.of_markup, Piece.of_data

THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")


def check_modes(thinking_mode: str, reasoning_effort: str | None) -> None:
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")


def encode_messages(
    messages: list[Any],
    thinking_mode: str,
    context: list[Any] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
    reasoning_effort: str | None = None,
) -> str:
    """Render `messages` (dicts or `encoding.messages` models) as DSV4 prompt text (the official API).

    `context`: messages already rendered earlier (e.g. already in a KV cache); they shape the
    rendering of `messages` (transitions, tool-result order, dropped thinking) but are not
    rendered again, and no BOS is added.
    """
    return prompt_text(render_messages(messages, thinking_mode, context, drop_thinking, add_default_bos_token,
                                       reasoning_effort))


def render_messages(
    messages: list[Any],
    thinking_mode: str,
    context: list[Any] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
    reasoning_effort: str | None = None,
) -> list[Piece]:
    """`encode_messages` as pieces: the prompt to encode with `Tokenizer.encode_prompt`."""
    check_modes(thinking_mode, reasoning_effort)
    ledger = ToolCallLedger()
    context_msgs = merge_tool_results(as_message_dicts(context or [], "context", ledger))
    new_msgs = merge_tool_results(as_message_dicts(messages, "messages", ledger))
    full = order_tool_results(context_msgs + new_msgs)

    thinking = thinking_mode == "thinking"
    drop = drop_thinking and not any(m.get("tools") for m in full)
    if thinking and drop:
        # Dropping can remove context messages too (developer turns); the context keeps as many
        # messages as dropping would leave of it alone, as upstream counts them.
        n_context = len(drop_old_thinking(context_msgs))
        full = drop_old_thinking(full)
    else:
        n_context = len(context_msgs)

    last_user = last_user_index(full)
    pieces = [markup(BOS)] if add_default_bos_token and not context_msgs else []
    for index in range(n_context, len(full)):
        pieces += render_message(index, full, thinking, drop, reasoning_effort, last_user)
    return pieces


def last_user_index(messages: list[dict]) -> int:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") in ("user", "developer"):
            return index
    return -1


def merge_tool_results(messages: list[dict]) -> list[dict]:
    """Turn tool messages into `tool_result` blocks of user turns (DSV4 has no tool role).

    Consecutive tool results and the user message after them share one user turn; so do
    consecutive user messages (unless the earlier one carries a task). Input dicts are not modified:
    user turns are new dicts, other messages are passed through.
    """
    merged: list[dict] = []
    for msg in messages:
        role = msg.get("role")
        joinable = merged and merged[-1].get("role") == "user" and "content_blocks" in merged[-1]
        if role == "tool":
            block = {"type": "tool_result", "tool_use_id": msg.get("tool_call_id", ""), "content": msg.get("content", "")}
            if joinable:
                merged[-1]["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            text = msg.get("content") or ""
            block = {"type": "text", "text": text}
            if joinable and merged[-1].get("task") is None:
                merged[-1]["content_blocks"].append(block)
            else:
                turn = {"role": "user", "content": text, "content_blocks": [block]}
                turn.update({k: msg[k] for k in ("task", "wo_eos", "mask") if k in msg})
                merged.append(turn)
        else:
            merged.append(msg)  # never modified downstream, so not copied
    return merged


def order_tool_results(messages: list[dict]) -> list[dict]:
    """Reorder the tool results inside each user turn by the ids of the latest assistant's calls.

    Results with an unknown id sort as if they answered the first call (stable), as upstream.
    """
    call_order: dict[str, int] = {}
    for msg in messages:
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            call_order = {}
            for position, call in enumerate(msg["tool_calls"]):
                call_id = call.get("id") or call.get("function", {}).get("id", "")
                if call_id:
                    call_order[call_id] = position
        elif msg.get("role") == "user" and msg.get("content_blocks"):
            blocks = msg["content_blocks"]
            results = [b for b in blocks if b.get("type") == "tool_result"]
            if len(results) > 1 and call_order:
                in_order = iter(sorted(results, key=lambda b: call_order.get(b.get("tool_use_id", ""), 0)))
                msg["content_blocks"] = [next(in_order) if b.get("type") == "tool_result" else b for b in blocks]
    return messages


def drop_old_thinking(messages: list[dict]) -> list[dict]:
    """Before the last user turn: assistant turns lose their reasoning, developer turns vanish."""
    last_user = last_user_index(messages)
    kept = []
    for index, msg in enumerate(messages):
        role = msg.get("role")
        if role in ("user", "system", "tool", "latest_reminder") or index >= last_user:
            kept.append(msg)
        elif role == "assistant":
            kept.append({k: v for k, v in msg.items() if k != "reasoning_content"})
    return kept


def _system_extras(msg: dict) -> list[Piece]:
    """Tools block and response format, appended to a system or developer message."""
    pieces: list[Piece] = []
    if msg.get("tools"):
        pieces += [markup("\n\n"), *tools_block_pieces([tool["function"] for tool in msg["tools"]])]
    if msg.get("response_format"):
        pieces += [markup("\n\n" + RESPONSE_FORMAT_PREFIX), data(to_json(msg["response_format"]))]
    return pieces


def _tool_result_pieces(content: Any) -> list[Piece]:
    if isinstance(content, list):
        content = "\n\n".join(
            part.get("text", "") if part.get("type") == "text" else f"[Unsupported {part.get('type')}]" for part in content
        )
    return [markup("<tool_result>"), data(content), markup("</tool_result>")]


def _user_pieces(msg: dict) -> list[Piece]:
    blocks = msg.get("content_blocks")
    if not blocks:
        return [data(msg.get("content") or "")]
    pieces: list[Piece] = []
    for block in blocks:
        if pieces:
            pieces.append(markup("\n\n"))
        kind = block.get("type")
        if kind == "text":
            pieces += _text_pieces(block.get("text", ""), read_url=msg.get("task") == "read_url" and block is blocks[-1])
        elif kind == "tool_result":
            pieces += _tool_result_pieces(block.get("content", ""))
        else:
            pieces.append(data(f"[Unsupported {kind}]"))
    return pieces


def _text_pieces(text: str, read_url: bool) -> list[Piece]:
    """A user text block; in the text of a read_url task, its last EXTRACTED_URL is the task's marker."""
    head, marker, url = text.rpartition(EXTRACTED_URL) if read_url else ("", "", text)
    return [data(head), markup(marker), data(url)] if marker else [data(text)]


def _assistant_pieces(index: int, messages: list[dict], thinking: bool, drop: bool, last_user: int) -> list[Piece]:
    msg = messages[index]
    pieces: list[Piece] = []
    # A turn answering a quick-instruction task never carries thinking.
    after_task = index > 0 and messages[index - 1].get("task") is not None
    if thinking and not after_task and (not drop or index > last_user):
        pieces += [data(msg.get("reasoning_content") or ""), markup(THINK_END)]
    pieces.append(data(msg.get("content") or ""))
    calls = msg.get("tool_calls") or []
    if calls:
        pieces += tool_calls_pieces([
            (call["function"]["name"], decode_arguments(call["function"].get("arguments"), f"tool_calls[{i}].function.arguments"))
            for i, call in enumerate(calls)
        ])
    if not msg.get("wo_eos"):
        pieces.append(markup(EOS))
    return pieces


def _transition(index: int, messages: list[dict], thinking: bool, drop: bool, last_user: int) -> str:
    """What follows a message when the model is to answer it (last message, or next is assistant)."""
    nxt = messages[index + 1].get("role") if index + 1 < len(messages) else None
    if nxt is not None and nxt not in ("assistant", "latest_reminder"):
        return ""
    msg = messages[index]
    task = msg.get("task")
    if task is not None:
        if task != "action":
            return TASK_TOKENS[task]
        return ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS[task]
    if msg.get("role") in ("user", "developer"):
        opens_thinking = thinking and (not drop or index >= last_user)
        return ASSISTANT + (THINK_START if opens_thinking else THINK_END)
    return ""


def render_message(index: int, messages: list[dict], thinking: bool, drop: bool, reasoning_effort: str | None,
                   last_user: int) -> list[Piece]:
    """One message (merged form) and its transition."""
    msg = messages[index]
    role = msg.get("role")
    pieces = [markup(REASONING_EFFORT_MAX)] if index == 0 and thinking and reasoning_effort == "max" else []
    if role == "system":
        pieces += [data(msg.get("content") or ""), *_system_extras(msg)]
    elif role == "developer":
        pieces += [markup(USER), data(msg["content"]), *_system_extras(msg)]
    elif role == "user":
        pieces += [markup(USER), *_user_pieces(msg)]
    elif role == "latest_reminder":
        pieces += [markup(LATEST_REMINDER), data(msg["content"])]
    elif role == "assistant":
        pieces += _assistant_pieces(index, messages, thinking, drop, last_user)
    else:  # unreachable after as_message_dicts; kept as a guard for direct callers
        raise MessageError(f"messages[{index}].role", f"cannot render role {role!r}")
    return pieces + [markup(_transition(index, messages, thinking, drop, last_user))]
