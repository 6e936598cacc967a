"""Encoding benchmarks: a 1M-token agent conversation, and streaming DSML parse throughput.

    PYTHONPATH=. python bench/bench_encoding.py [--tokens 1000000] [--repeat 3]

1. Build an agent session (system + tools, then turns of reasoning + tool calls + tool results)
   through AppendOnlyEncoder until it holds --tokens tokens.
2. Append one more turn: append-only (`AppendOnlyEncoder.append`, timed once, plus the median of
   the 50 turns before) vs the full re-encode (`render_messages` of the whole conversation +
   `Tokenizer.encode_prompt`, best of --repeat), and check they agree.
3. Stream-parse a large completion (a 1 MB write_file argument plus reasoning and content) in
   token-sized (4-char) and 64 KB chunks, strict and tolerant, against the whole-text parser.
Prints one line per figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

from encoding import (AppendOnlyEncoder, StreamParser, Tokenizer, encode_messages, parse_message_from_completion_text,
                      render_messages)

EOS = "<｜end▁of▁sentence｜>"
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}}}
    for name in ("bash", "read_file", "write_file")]


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def prose(rng: random.Random, n_words: int) -> str:
    vocab = "the a file test error fix run check value return function class import 中文 résumé x=1 {} [] ( ) : , . \n".split(" ")
    return " ".join(rng.choice(vocab) for _ in range(n_words))


def turn(rng: random.Random, tok: Tokenizer, enc: AppendOnlyEncoder, n: int) -> list[dict]:
    """One agent turn: the model's completion (reasoning + 2 calls) and the tool results."""
    args = [{"path": f"src/m{n}_{i}.py", "content": prose(rng, 120)} for i in range(2)]
    calls = [{"type": "function", "function": {"name": "write_file", "arguments": json.dumps(a)}} for a in args]
    planned = {"role": "assistant", "reasoning_content": prose(rng, 300), "content": prose(rng, 20), "tool_calls": calls}
    text = encode_messages([planned], "thinking", context=[{"role": "user", "content": "q"}], drop_thinking=False)
    message = enc.record_completion(tok.encode(text))
    return [{"role": "tool", "tool_call_id": c["id"], "content": prose(rng, 250)} for c in message["tool_calls"]]


def bench_conversation(tok: Tokenizer, target: int, repeat: int) -> None:
    rng = random.Random(0)
    enc = AppendOnlyEncoder(tok)
    enc.prompt([{"role": "system", "content": "You are a coding agent.", "tools": TOOLS},
                {"role": "user", "content": "Refactor the project. " + prose(rng, 50)}])
    appends: list[float] = []  # seconds of each append, the conversation growing
    start, n = time.perf_counter(), 0
    while enc.num_tokens < target:
        new = turn(rng, tok, enc, n)
        t0 = time.perf_counter()
        enc.append(new)
        appends.append(time.perf_counter() - t0)
        n += 1
    build = time.perf_counter() - start
    print(f"conversation: {enc.num_tokens:,} tokens, {len(enc.messages):,} messages, {n} turns "
          f"built append-only in {build:.2f} s ({build / n * 1e3:.2f} ms per turn incl. completion parse)")

    # One more turn onto the full conversation: append-only vs the full re-encode it must equal.
    new = turn(rng, tok, enc, n)
    t_full_render, pieces = best_of(repeat, lambda: render_messages(enc.messages + new, "thinking", reasoning_effort="max"))
    t_full_tok, full_ids = best_of(repeat, lambda: tok.encode_prompt(pieces))
    t0 = time.perf_counter()
    appended = enc.append(new)
    t_append = time.perf_counter() - t0
    assert full_ids[-len(appended):] == appended, "append-only ids differ from the full re-encode's tail"
    last = sorted(appends[-50:])
    t_full = t_full_render + t_full_tok
    print(f"full re-encode of {len(full_ids):,} tokens: render {t_full_render * 1e3:.1f} ms + tokenize "
          f"{t_full_tok * 1e3:.1f} ms = {t_full * 1e3:.1f} ms ({len(full_ids) / t_full / 1e6:.2f} M tok/s)")
    median = last[len(last) // 2]
    print(f"append-only turn ({len(appended)} tokens) at {enc.num_tokens - len(appended):,} tokens: {t_append * 1e3:.3f} ms, "
          f"median of the 50 turns before {median * 1e3:.3f} ms; speed-up over the full re-encode: "
          f"{t_full / t_append:,.0f}x (this turn), {t_full / median:,.0f}x (median); ids equal to the re-encode's tail: True")


def bench_stream(repeat: int) -> None:
    rng = random.Random(1)
    big = prose(rng, 180_000)  # ~1 MB of file content in one parameter
    text = (prose(rng, 2000) + "</think>" + prose(rng, 500) + "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"write_file\">\n"
            f'<｜DSML｜parameter name="path" string="true">a.py</｜DSML｜parameter>\n'
            f'<｜DSML｜parameter name="content" string="true">{big}</｜DSML｜parameter>\n'
            "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS)
    mb = len(text.encode()) / 1e6
    t_whole, expected = best_of(repeat, lambda: parse_message_from_completion_text(text, "thinking"))
    print(f"completion: {len(text):,} chars ({mb:.2f} MB); whole-text parser (official semantics): {t_whole * 1e3:.1f} ms "
          f"({mb / t_whole:.1f} MB/s)")
    for strict in (True, False):
        for size in (4, 65536):
            chunks = [text[i:i + size] for i in range(0, len(text), size)]

            def run():
                parser = StreamParser("thinking", strict=strict)
                for chunk in chunks:
                    parser.feed(chunk)
                return parser.close()[-1]

            t, end = best_of(repeat, run)
            assert end.message == expected
            print(f"StreamParser strict={strict!s:5} chunks of {size:>5} chars: {t * 1e3:8.1f} ms = {mb / t:6.2f} MB/s, "
                  f"{len(chunks) / t / 1e3:8.1f} k chunks/s ({t / t_whole:.1f}x the whole-text parse)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'default')}")
    tok = Tokenizer.default()
    bench_conversation(tok, args.tokens, args.repeat)
    bench_stream(args.repeat)


if __name__ == "__main__":
    main()
