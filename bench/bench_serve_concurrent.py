"""Concurrent agent-like conversations against `dsv4-agent serve`: aggregate decode rate and per-turn
latency with N conversations at once (the engine's scheduler batches them) against the serial path
(the same conversations served one request at a time, as the server did behind its one lock).

    PYTHONPATH=. python bench/bench_serve_concurrent.py [--n 1,4,16,64] [--prompt 256] [--turns 3]
                                                         [--append 32] [--decode 16] [--out FILE]

A tiny random DSV4 checkpoint (full vocabulary, CPU, float32, --threads torch threads; no
end-of-sequence token, so every turn decodes exactly --decode tokens). A conversation sends a
--prompt-token prompt and decodes a turn, then --turns times appends an --append-token tool result and
decodes a turn, each turn one POST /v1/completions re-sending the whole token list (as RemoteBackend
does; the server prefills only the new tokens). Per N and path: wall time, completion tokens / wall
time, and the latency of the turns after the first (a prompt's full prefill) as median and 90th
percentile, from the moment the conversation is ready for its next turn (on the serial path that
includes waiting for the other conversations' requests); the mean number of sequences decoded per
scheduler step.
Each (N, path) runs on a fresh server (an empty session pool) over one engine, after one unrecorded
warm-up run.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import platform
import random
import socket
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import torch
import uvicorn

from agent.server import create_app
from dsv4 import Engine, ModelConfig
from dsv4.loading.testing import write_random_checkpoint
from encoding import Tokenizer


@dataclass
class Conversation:
    prompt: list[int]
    appends: list[list[int]]
    turn_s: list[float] = field(default_factory=list)
    decoded: int = 0
    reused: int = 0


def conversations(n: int, args, vocab: int, seed: int) -> list[Conversation]:
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, vocab) for _ in range(k)]
    return [Conversation(ids(args.prompt), [ids(args.append) for _ in range(args.turns)]) for _ in range(n)]


async def talk(client: httpx2.AsyncClient, conv: Conversation, decode: int, one_at_a_time: asyncio.Lock | None) -> None:
    tokens = list(conv.prompt)
    for appended in [[], *conv.appends]:
        tokens += appended
        body = {"prompt": tokens, "max_tokens": decode, "temperature": 0, "return_token_ids": True}
        start = time.perf_counter()  # the turn's latency includes waiting for the serial path's turn
        async with one_at_a_time or contextlib.nullcontext():
            r = await client.post("/v1/completions", json=body)
        conv.turn_s.append(time.perf_counter() - start)
        r.raise_for_status()
        answer = r.json()
        got = answer["choices"][0]["token_ids"]
        conv.decoded += len(got)
        conv.reused += answer["usage"]["prompt_tokens_reused"]
        tokens += got


@contextlib.contextmanager
def serving(app):
    """The app under uvicorn in a thread on a free port: its base URL; stopped (and its session pool
    closed) on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def run(engine: Engine, tokenizer: Tokenizer, convs: list[Conversation], args, serial: bool) -> dict:
    app = create_app(engine, tokenizer, model_name="tiny", max_sessions=len(convs), request_timeout_s=None)
    first_step = engine.scheduler.step_index

    async def main(url: str) -> float:
        lock = asyncio.Lock() if serial else None
        limits = httpx2.Limits(max_connections=len(convs) + 1, max_keepalive_connections=len(convs) + 1)
        async with httpx2.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
            start = time.perf_counter()
            await asyncio.gather(*(talk(client, c, args.decode, lock) for c in convs))
            return time.perf_counter() - start

    with serving(app) as url:
        wall = asyncio.run(main(url))
    engine.scheduler.call(lambda: None)  # the last step's record is written
    steps = [r for r in engine.scheduler.records if r.index > first_step and r.decode]
    later = [t for c in convs for t in c.turn_s[1:]]
    decoded = sum(c.decoded for c in convs)
    return {"n": len(convs), "path": "serial" if serial else "concurrent", "wall_s": wall,
            "completion_tokens": decoded, "tokens_per_s": decoded / wall,
            "turn_median_s": statistics.median(later), "turn_p90_s": sorted(later)[int(0.9 * (len(later) - 1))],
            "prompt_tokens_reused": sum(c.reused for c in convs),
            "mean_rows_per_decode_step": statistics.mean(len(r.decode) for r in steps) if steps else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="1,4,16,64", help="concurrent conversations, comma-separated")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--turns", type=int, default=3, help="turns after the first")
    parser.add_argument("--append", type=int, default=32)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.default()
    cfg = ModelConfig.tiny().model_copy(update={"vocab_size": tokenizer.vocab_size})
    engine = Engine(write_random_checkpoint(tempfile.mkdtemp(), cfg, seed=0), device="cpu", dtype=torch.float32,
                    eos_token_ids=())
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)",
               "torch": torch.__version__, "args": vars(args) | {"out": str(args.out)}, "runs": []}
    print(f"{results['machine']}, torch {torch.__version__}; prompt {args.prompt}, {args.turns} turns of "
          f"+{args.append} tokens, {args.decode} greedy tokens a turn")
    run(engine, tokenizer, conversations(2, args, tokenizer.vocab_size, seed=-1), args, serial=False)  # warm-up
    for n in [int(x) for x in args.n.split(",") if x]:
        for serial in (True, False):
            row = run(engine, tokenizer, conversations(n, args, tokenizer.vocab_size, seed=n + serial), args, serial)
            results["runs"].append(row)
            print(f"N={n:3d} {row['path']:10s} wall {row['wall_s']:7.1f} s  {row['tokens_per_s']:7.1f} tok/s  "
                  f"turn median {row['turn_median_s'] * 1e3:8.1f} ms  p90 {row['turn_p90_s'] * 1e3:8.1f} ms  "
                  f"rows/step {row['mean_rows_per_decode_step']:5.1f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
