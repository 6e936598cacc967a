"""Per-request overhead of `dsv4-agent serve` against the engine it wraps, on the same agent-like workload.

    PYTHONPATH=. python bench/bench_serve.py [--prompt 1024] [--turns 16] [--append 32] [--decode 8]

A tiny random DSV4 checkpoint (full vocabulary, CPU, float32, 1 thread). Each "conversation" starts
with a --prompt-token prompt, then for --turns turns appends --append new tokens and decodes --decode
greedy tokens. Directly: one resident Session (append + generate). Over HTTP: uvicorn in this process,
each turn a POST /v1/completions re-sending the whole token list (the remote backend's pattern), once
non-streamed and once streamed (SSE); the server finds the session by prefix and appends only the new
tokens. The first turn (the full prefill) is left out of the per-turn figures. Interleaved, best of
--repeat per path. Prints one line per figure.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import socket
import statistics
import tempfile
import threading
import time

import httpx2
import torch
import uvicorn

from agent.server import create_app
from dsv4 import Engine, ModelConfig
from dsv4.loading.testing import write_random_checkpoint
from encoding import Tokenizer


def workload(args, vocab: int, seed: int) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(seed)
    return ([rng.randrange(vocab) for _ in range(args.prompt)],
            [[rng.randrange(vocab) for _ in range(args.append)] for _ in range(args.turns)])


def direct(engine, prompt, appends, decode) -> list[float]:
    async def run():
        session, times = engine.new_session(), []
        for ids in [prompt] + appends:
            start = time.perf_counter()
            await session.aappend(ids)
            async for _ in session.generate(max_tokens=decode, temperature=0, ignore_eos=True):
                pass
            times.append(time.perf_counter() - start)
        session.close()
        return times[1:]

    return asyncio.run(run())


def over_http(client, prompt, appends, decode, stream) -> list[float]:
    tokens, times = [], []
    for ids in [prompt] + appends:
        tokens += ids
        body = {"prompt": tokens, "max_tokens": decode, "temperature": 0, "return_token_ids": True,
                "stream": stream}
        start = time.perf_counter()
        if stream:
            with client.stream("POST", "/v1/completions", json=body) as r:
                got = [t for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line
                       for t in json.loads(line[5:])["choices"][0]["token_ids"]]
        else:
            got = client.post("/v1/completions", json=body).json()["choices"][0]["token_ids"]
        times.append(time.perf_counter() - start)
        tokens += got
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--turns", type=int, default=16)
    parser.add_argument("--append", type=int, default=32)
    parser.add_argument("--decode", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = Tokenizer.default()
    cfg = ModelConfig.tiny().model_copy(update={"vocab_size": tokenizer.vocab_size})
    path = write_random_checkpoint(tempfile.mkdtemp(), cfg, seed=0)
    engine = Engine(path, device="cpu", dtype=torch.float32)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(engine, tokenizer, model_name="tiny", max_sessions=2)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    best: dict[str, list[float]] = {}
    with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        for rep in range(args.repeat):
            prompt, appends = workload(args, tokenizer.vocab_size, seed=rep)  # a new conversation each round
            runs = {"engine": (direct, engine), "http": (over_http, client, False),
                    "http+sse": (over_http, client, True)}
            for name, (fn, target, *stream) in runs.items():
                times = fn(target, prompt, appends, args.decode, *stream)
                if name not in best or statistics.median(times) < statistics.median(best[name]):
                    best[name] = times
    server.should_exit = True
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    print(f"workload: prompt {args.prompt}, {args.turns} turns of +{args.append} tokens and {args.decode} "
          f"greedy tokens (history {args.prompt} -> {args.prompt + args.turns * (args.append + args.decode)})")
    base = statistics.median(best["engine"])
    for name, times in best.items():
        med = statistics.median(times)
        print(f"{name:9s} per turn: median {med * 1e3:7.1f} ms, max {max(times) * 1e3:7.1f} ms; "
              f"overhead vs engine {1e3 * (med - base):+6.1f} ms ({med / base:.3f}x)")


if __name__ == "__main__":
    main()
