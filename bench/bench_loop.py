"""The agent loop's own cost, without a model, and what append-only encoding saves per turn.

1. Loop overhead: the real `Agent` loop on the scripted backend (no model), a no-op tool each turn.
   Everything the loop does is in the time: detokenizing and stream-parsing every token, the
   append-only encode of the tool result, tool dispatch, and 4 fsynced trajectory events a turn.
2. Append-only vs full re-encode at each turn of one long Think-Max tool session: the time to produce
   the ids to prefill (`AppendOnlyEncoder.append` vs re-rendering and re-tokenizing the whole
   conversation, what HTTP-client agents do every step), and the tokens a session must prefill (new
   only, vs the whole history for an engine that does not keep the KV cache).

    python bench/bench_loop.py [--turns 40]      # writes bench/bench_loop.out too
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from agent import Agent, ScriptedBackend, completion
from encoding import AppendOnlyEncoder, Tokenizer, render_messages
from tools import tool

REASONING = (
    "The previous command listed the files; the failing test is in test_parser.py. "
    "I should read the function under test before changing anything, then run the test again. "
) * 4  # ~150 tokens of Think-Max reasoning per turn
RESULT = "\n".join(
    f"src/module_{i:03d}.py: def handler_{i}(request): return respond(request, status={200 + i % 5})" for i in range(20)
)


@tool(parallel_safe=True)
def noop(step: int) -> str:
    """Return a fixed tool result."""
    return RESULT


async def loop_overhead(turns: int, out_dir: Path) -> dict:
    script = [completion(REASONING, calls=[("noop", {"step": i})]) for i in range(turns)] + [
        completion("Done.", content="done")
    ]
    agent = Agent(backend=ScriptedBackend(script), tools=[noop], output_dir=out_dir, max_steps=turns + 1)
    await Agent(backend=ScriptedBackend([completion("w", content="w")]), tools=[noop], output_dir=out_dir).run(
        "warm up"
    )
    started = time.perf_counter()
    result = await agent.run("call noop repeatedly")
    wall = time.perf_counter() - started
    assert result.status.value == "completed", result.message
    return {
        "turns": result.steps,
        "wall_s": wall,
        "ms_per_turn": 1000 * wall / result.steps,
        "decoded_tokens": result.usage.decoded,
        "us_per_decoded_token": 1e6 * wall / result.usage.decoded,
        "trajectory_bytes": result.trajectory_path.stat().st_size,
    }


def fsync_cost(n: int = 200) -> float:
    """ms of one append + flush + fsync of a 1 kB line, on this disk (the floor of a trajectory event)."""
    import os

    with tempfile.NamedTemporaryFile("a") as f:
        started = time.perf_counter()
        for _ in range(n):
            f.write("x" * 1000 + "\n")
            f.flush()
            os.fsync(f.fileno())
        return 1000 * (time.perf_counter() - started) / n


def encode_comparison(turns: int) -> list[dict]:
    tok = Tokenizer.default()
    enc = AppendOnlyEncoder(tok)
    system = {
        "role": "system",
        "content": "You are an agent.",
        "tools": [noop.openai_schema()],
    }
    messages = [system, {"role": "user", "content": "fix the failing test"}]
    session = enc.prompt(messages)
    rows = []
    for turn in range(1, turns + 1):
        completion_ids = tok.encode(completion(REASONING, calls=[("noop", {"step": turn})])) + [tok.eos_id]
        message = enc.record_completion(completion_ids)
        session += completion_ids
        tool_msg = [{"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": RESULT}]
        t0 = time.perf_counter()
        new_ids = enc.append(tool_msg)
        t_append = time.perf_counter() - t0
        session += new_ids
        t0 = time.perf_counter()
        full = tok.encode_prompt(render_messages(enc.messages, "thinking", drop_thinking=False, reasoning_effort="max"))
        t_full = time.perf_counter() - t0
        assert full == session, f"turn {turn}: append-only ids differ from the full re-encode"
        rows.append(
            {
                "turn": turn,
                "history_tokens": len(session),
                "new_tokens": len(new_ids),
                "append_ms": 1000 * t_append,
                "full_reencode_ms": 1000 * t_full,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=40)
    args = parser.parse_args()
    out = io.StringIO()

    def say(line: str = "") -> None:
        print(line)
        out.write(line + "\n")

    say(
        f"bench_loop.py --turns {args.turns} · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · "
        f"{platform.processor() or platform.machine()} · Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        loop = anyio.run(loop_overhead, args.turns, Path(tmp))
    fsync_ms = fsync_cost()
    say(f"\n1. loop overhead (scripted backend, no model): {loop['turns']} turns in {loop['wall_s']:.2f} s")
    say(
        f"   {loop['ms_per_turn']:.1f} ms per turn · {loop['us_per_decoded_token']:.0f} µs per decoded token "
        f"({loop['decoded_tokens']} tokens) · trajectory {loop['trajectory_bytes'] / 1024:.0f} KiB"
    )
    say(f"   floor on this disk: one fsynced 1 kB event = {fsync_ms:.2f} ms (4 per turn = {4 * fsync_ms:.1f} ms)")

    rows = encode_comparison(args.turns)
    say("\n2. append-only vs full re-encode per turn (ids identical at every turn, checked)")
    say(
        f"   {'turn':>4} {'history tok':>11} {'new tok':>7} {'append ms':>9} {'full ms':>8} {'speed-up':>8} {'prefill saved':>13}"
    )
    for r in rows:
        if r["turn"] in (1, 5, 10, 20, 30, 40) or r["turn"] == len(rows):
            say(
                f"   {r['turn']:>4} {r['history_tokens']:>11,} {r['new_tokens']:>7} {r['append_ms']:>9.2f} "
                f"{r['full_reencode_ms']:>8.2f} {r['full_reencode_ms'] / r['append_ms']:>7.0f}x "
                f"{r['history_tokens'] / r['new_tokens']:>12.0f}x"
            )
    total_new = sum(r["new_tokens"] for r in rows)
    total_full = sum(r["history_tokens"] for r in rows)
    say(
        f"   over {len(rows)} turns: append {sum(r['append_ms'] for r in rows):.0f} ms vs re-encode "
        f"{sum(r['full_reencode_ms'] for r in rows):.0f} ms; tokens to prefill {total_new:,} (append-only, resident KV) "
        f"vs {total_full:,} (whole history every turn) = {total_full / total_new:.0f}x fewer"
    )
    say(f"   median append {statistics.median(r['append_ms'] for r in rows):.2f} ms")
    Path(__file__).with_suffix(".out").write_text(out.getvalue())
    Path(__file__).with_suffix(".json").write_text(
        json.dumps({"loop": loop, "fsync_ms": fsync_ms, "encode": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
