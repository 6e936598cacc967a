"""Per-step cost of DSML-constrained decoding against the decode step it rides on.

    PYTHONPATH=. python bench/bench_constrain.py [--tools 24] [--steps 64] [--repeat 3]

1. Build the constraint for the agent's built-in tools plus --tools synthetic ones (cold: the
   vocabulary byte index included; warm: the index cached, as for every later session).
2. Replay a realistic completion (reasoning, content, a tool block of three calls with long string
   values) through the logits processor on random float32 logits of the full vocabulary, one token
   at a time: time per step at constrained points (choice points: tool/parameter names, flags,
   tags) and at free-text points, on the first turn (allowed sets computed) and the next (cached).
3. In the same run, time the decode step of the tiny random DSV4 model (full vocabulary, CPU,
   float32) with and without the processor attached (interleaved, best of --repeat).
Prints one line per figure.
"""
from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import time

import torch

from agent.backends.engine import ConstrainedDecoding
from dsv4 import Engine, ModelConfig
from dsv4.loading.testing import write_random_checkpoint
from encoding import DSMLConstraint, Tokenizer
from encoding.dsml import render_tool_calls
from tools import builtin_tools


def synthetic_tools(n: int) -> list[dict]:
    props = {f"arg_{k}": {"type": t} for k, t in enumerate(("string", "integer", "boolean", "array", "string"))}
    return [{"type": "function", "function": {"name": f"service_{i}_operation", "description": "d",
             "parameters": {"type": "object", "properties": props, "required": ["arg_0"]}}} for i in range(n)]


def completion(tok: Tokenizer) -> list[int]:
    words = "the agent reads the file then checks the tests and plans the next edit carefully".split()
    reasoning = " ".join(words[i % len(words)] for i in range(400))
    calls = [
        ("read_file", {"path": "src/module/file.py"}),
        ("service_3_operation", {"arg_0": " ".join(words * 12), "arg_1": 42, "arg_2": True, "arg_3": [1, "x"]}),
        ("bash", {"command": "pytest -q tests/ && git diff --stat"}),
    ]
    return tok.encode(reasoning + "</think>I will look first." + render_tool_calls(calls) + "<｜end▁of▁sentence｜>")


def replay(processor: ConstrainedDecoding, ids: list[int], vocab: int) -> tuple[list[float], list[float]]:
    """Per-step seconds of the processor (constrained steps, free steps) over one completion."""
    processor.start_turn(thinking=True)
    logits = torch.randn(vocab)
    constrained, free = [], []
    for n in range(len(ids)):
        is_choice = processor.constraint.phase in ("choice", "special")
        generated = ids[:n]
        start = time.perf_counter()
        out = processor(generated, logits)
        took = time.perf_counter() - start
        assert out[ids[n]] > float("-inf"), f"the processor rejected token {n} of a valid completion"
        (constrained if is_choice else free).append(took)
    return constrained, free


async def decode_step_s(engine: Engine, prompt: list[int], steps: int, processors) -> float:
    session = engine.new_session()
    await session.aappend(prompt)
    start = time.perf_counter()
    n = 0
    async for _ in session.generate(max_tokens=steps, seed=0, ignore_eos=True, logits_processors=processors):
        n += 1
    took = (time.perf_counter() - start) / n
    session.close()
    return took


def us(values: list[float]) -> str:
    p90 = statistics.quantiles(values, n=10)[-1]
    return (f"median {statistics.median(values) * 1e6:.0f} us, p90 {p90 * 1e6:.0f} us, "
            f"mean {statistics.fmean(values) * 1e6:.0f} us, max {max(values) * 1e6:.0f} us, n={len(values)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tools", type=int, default=24)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    tok = Tokenizer.default()
    tools = [t.openai_schema() for t in builtin_tools()] + synthetic_tools(args.tools)
    start = time.perf_counter()
    constraint = DSMLConstraint(tok, tools)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    DSMLConstraint(tok, tools)
    warm = time.perf_counter() - start
    print(f"build ({len(tools)} tools, vocab {tok.vocab_size}): cold {cold * 1e3:.0f} ms (vocabulary index), warm {warm * 1e3:.2f} ms")

    ids = completion(tok)
    processor = ConstrainedDecoding(constraint)
    c1, f1 = replay(processor, ids, tok.vocab_size)
    c2, f2 = replay(processor, ids, tok.vocab_size)
    print(f"completion: {len(ids)} tokens, {len(c1)} at constrained points, {len(f1)} in free text")
    print(f"processor, constrained step, first turn: {us(c1)}")
    print(f"processor, constrained step, cached:     {us(c2)}")
    print(f"processor, free-text step:               {us(f1 + f2)}")

    cfg = ModelConfig.tiny().model_copy(update={"vocab_size": tok.vocab_size})
    with tempfile.TemporaryDirectory() as folder:
        engine = Engine(write_random_checkpoint(folder, cfg, seed=0), device="cpu", dtype=torch.float32)
        prompt = ids[:64]
        asyncio.run(decode_step_s(engine, prompt, 8, ()))  # warm-up
        plain, with_free = [], []
        for _ in range(args.repeat):  # interleaved, best of: the machine is shared
            plain.append(asyncio.run(decode_step_s(engine, prompt, args.steps, ())))
            processor.start_turn(thinking=True)
            with_free.append(asyncio.run(decode_step_s(engine, prompt, args.steps, (processor,))))
        plain, with_free = min(plain), min(with_free)
    print(f"tiny DSV4 decode step (CPU, float32, vocab {tok.vocab_size}, best of {args.repeat}): {plain * 1e3:.2f} ms "
          f"plain, {with_free * 1e3:.2f} ms with the processor attached (free text)")
    print(f"overhead / decode step: constrained cached {statistics.median(c2) / plain:.1%}, "
          f"constrained first turn {statistics.median(c1) / plain:.1%}, free {statistics.median(f1 + f2) / plain:.1%}")


if __name__ == "__main__":
    main()
