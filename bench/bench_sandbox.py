"""Sandbox latency: cold start, warm (pool) start, per-command latency against a bare docker-py exec_run.

    python bench/bench_sandbox.py [--runs 15] [--commands 200] [--json bench/bench_sandbox.json]

Every figure comes from one run on one machine: the peer (docker-py `exec_run`, what most agent runtimes do
per command) is measured in the same container as our persistent shell. Needs the default image
(`dsv4-agent sandbox build`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import anyio
import docker

from sandboxes import DEFAULT_IMAGE, DockerSandbox, LocalSandbox
from sandboxes.pool import SandboxPool


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p95_ms": ms[min(len(ms) - 1, int(0.95 * len(ms)))],
            "mean_ms": statistics.fmean(ms)}


async def timed(fn, *args) -> tuple[float, object]:
    started = time.perf_counter()
    value = await fn(*args)
    return time.perf_counter() - started, value


async def bench(runs: int, commands: int) -> dict:
    results: dict[str, dict] = {}

    cold, close = [], []
    for _ in range(runs):
        sandbox = DockerSandbox(DEFAULT_IMAGE)
        seconds, _ = await timed(sandbox.start)
        first, result = await timed(sandbox.run, "echo ready")
        assert result.stdout == "ready\n"
        cold.append(seconds + first)
        seconds, _ = await timed(sandbox.close)
        close.append(seconds)
    results["cold start (create+start+shell+first command)"] = summary(cold)
    results["close (remove)"] = summary(close)

    warm = []
    async with SandboxPool(size=1, image=DEFAULT_IMAGE) as pool:
        for _ in range(runs):
            await pool.fill()
            seconds, sandbox = await timed(pool.acquire)
            first, result = await timed(sandbox.run, "echo ready")
            assert result.stdout == "ready\n"
            warm.append(seconds + first)
            await sandbox.close()
    results["warm start (pool: unpause+first command)"] = summary(warm)

    async with DockerSandbox(DEFAULT_IMAGE) as sandbox:
        shell = []
        for _ in range(commands):
            seconds, result = await timed(sandbox.run, "true")
            assert result.exit_code == 0
            shell.append(seconds)
        container = docker.from_env().containers.get(sandbox.container_id)
        bare = []
        for _ in range(max(20, commands // 4)):
            started = time.perf_counter()
            exit_code, _ = await anyio.to_thread.run_sync(lambda: container.exec_run(["true"], user="1000:1000"))
            bare.append(time.perf_counter() - started)
            assert exit_code == 0
        payload = os.urandom(2**20)
        writes, reads = [], []
        for _ in range(runs):
            seconds, _ = await timed(sandbox.write_file, "bench.bin", payload)
            writes.append(seconds)
            seconds, data = await timed(sandbox.read_file, "bench.bin")
            assert data == payload
            reads.append(seconds)
    results["command `true`, DockerSandbox.run (persistent shell)"] = summary(shell)
    results["command `true`, bare docker-py exec_run (peer)"] = summary(bare)
    results["write_file 1 MiB"] = summary(writes)
    results["read_file 1 MiB"] = summary(reads)

    with tempfile.TemporaryDirectory() as folder:
        async with LocalSandbox(folder) as local:
            host = []
            for _ in range(commands):
                seconds, _ = await timed(local.run, "true")
                host.append(seconds)
    results["command `true`, LocalSandbox.run (host, no container)"] = summary(host)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--commands", type=int, default=200)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    results = anyio.run(bench, args.runs, args.commands)
    engine = docker.from_env().version()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
            "cpus": os.cpu_count(), "kernel": platform.release(), "docker": engine["Version"],
            "docker_py": docker.__version__, "image": DEFAULT_IMAGE}
    print(json.dumps(meta))
    print("| operation | n | p50 ms | p95 ms |\n|---|---|---|---|")
    for name, s in results.items():
        print(f"| {name} | {s['n']} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} |")
    shell = results["command `true`, DockerSandbox.run (persistent shell)"]["p50_ms"]
    bare = results["command `true`, bare docker-py exec_run (peer)"]["p50_ms"]
    cold = results["cold start (create+start+shell+first command)"]["p50_ms"]
    warm = results["warm start (pool: unpause+first command)"]["p50_ms"]
    print(f"\nper command: bare exec_run / persistent shell = {bare / shell:.1f}x;  "
          f"start: cold / warm = {cold / warm:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
