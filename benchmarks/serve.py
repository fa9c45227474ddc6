"""Serving: N concurrent streaming clients (1, 16, 64, 256) against `pagedllm serve` on the
256-request workload of throughput.py (prompt and output lengths uniform in 100-1024, random
token ids, ignore_eos, Qwen3-0.6B's architecture), then the offline `LLM.generate` figure on
the same requests in the same run, and the ratio (target at 256 clients: >= 90%).

    PYTHONPATH=. python3 benchmarks/serve.py [--concurrency 1 16 64 256] [--num-requests 256]

Each level runs min(num_requests, max(16, 4 x clients)) requests, so one client does not take
an hour; 64 and 256 clients run all 256. The clients are httpx streams (the server itself needs
fastapi, uvicorn, pydantic, prometheus-client, pyzmq). TTFT: request sent to first token;
ITL: time between streamed chunks that carry tokens (as vLLM's benchmark measures it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx
import torch

from benchmarks.common import QWEN3_0_6B, print_table, timed
from benchmarks.throughput import make_requests, write_hf_checkpoint

ENGINE_OPTIONS = ["--dtype", "bfloat16", "--max-model-len", "2048", "--skip-tokenizer-init"]


@dataclass
class RequestResult:
    ttft: float = 0.0
    latency: float = 0.0
    num_tokens: int = 0
    itls: list[float] = field(default_factory=list)


async def stream_one(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> RequestResult:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    result = RequestResult()
    start = last = time.perf_counter()
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            tokens = sum(len(choice.get("token_ids") or ()) for choice in chunk["choices"])
            if not tokens:
                continue
            now = time.perf_counter()
            if result.num_tokens == 0:
                result.ttft = now - start
            else:
                result.itls.append(now - last)
            last = now
            result.num_tokens += tokens
    result.latency = time.perf_counter() - start
    return result


async def run_level(url: str, requests: list[tuple[list[int], int]], num_clients: int) -> tuple[list[RequestResult], float]:
    queue: asyncio.Queue[tuple[list[int], int]] = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=num_clients, max_keepalive_connections=num_clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                prompt, max_tokens = queue.get_nowait()
                results.append(await stream_one(client, url, prompt, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(num_clients)))
        seconds = time.perf_counter() - start
    return results, seconds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def start_server(folder: str, port: int, max_num_seqs: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", folder, "--served-model-name", "bench",
               "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max_num_seqs),
               "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log", *ENGINE_OPTIONS]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    server = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"pagedllm serve exited with {server.returncode} during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise TimeoutError("pagedllm serve did not become healthy in 900 s")


def offline_tokens_per_second(folder: str, requests: list[tuple[list[int], int]], max_num_seqs: int) -> float:
    from pagedllm import LLM, SamplingParams

    llm = LLM(folder, dtype="bfloat16", max_model_len=2048, max_num_seqs=max_num_seqs, skip_tokenizer_init=True)
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in requests]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
    outputs, seconds = timed(lambda: llm.generate(prompts, params, use_tqdm=False))
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    llm.shutdown()
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    requests = make_requests(args.num_requests, QWEN3_0_6B["vocab_size"], args.seed)
    folder = tempfile.mkdtemp(prefix="pagedllm-serve-bench-")
    write_hf_checkpoint(folder)
    gc.collect()
    torch.cuda.empty_cache()
    url = f"http://127.0.0.1:{args.port}"
    server = start_server(folder, args.port, args.max_num_seqs)
    rows: list[tuple[str, str]] = []
    rates: dict[int, float] = {}
    try:
        asyncio.run(run_level(url, requests[:4], 4))  # warm-up
        for num_clients in args.concurrency:
            subset = requests[: min(len(requests), max(16, 4 * num_clients))]
            results, seconds = asyncio.run(run_level(url, subset, num_clients))
            tokens = sum(r.num_tokens for r in results)
            assert tokens == sum(o for _, o in subset), (tokens, sum(o for _, o in subset))
            rates[num_clients] = tokens / seconds
            ttfts = [r.ttft for r in results]
            itls = [x for r in results for x in r.itls]
            rows.append((
                f"{num_clients} clients, {len(subset)} requests",
                f"{len(subset) / seconds:6.2f} req/s  {tokens / seconds:9,.0f} output tok/s  "
                f"TTFT median {statistics.median(ttfts) * 1e3:7.1f} ms p99 {percentile(ttfts, 99) * 1e3:7.1f} ms  "
                f"ITL median {statistics.median(itls) * 1e3:6.2f} ms p99 {percentile(itls, 99) * 1e3:7.2f} ms",
            ))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    offline = offline_tokens_per_second(folder, requests, args.max_num_seqs)
    rows.append((f"offline LLM.generate, {len(requests)} requests", f"{offline:9,.0f} output tok/s"))
    top = max(rates)
    rows.append((f"server at {top} clients / offline", f"{rates[top] / offline:.1%} (target >= 90%)"))
    print_table(f"serving, Qwen3-0.6B arch, {torch.cuda.get_device_name()}", rows)


if __name__ == "__main__":
    main()
