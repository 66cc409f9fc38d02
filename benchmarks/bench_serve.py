"""`bayeskd serve-teacher` throughput against concurrency: completion tokens/s at 1, 8, 32 and 128 clients, for
`--max-batch 1` (one request at a time, the server as it was) beside `--max-batch 32` and `--max-batch 128`
(concurrent requests decoded together), all in one run.

The teacher is a tiny-but-not-trivial Llama built from a config (no download): 4 layers, hidden 256, over a
1,024-token byte-level BPE trained on the embedded corpus (the lab's vocabulary size), random weights, so every
answer runs to `--max-tokens`. Each server is its own `bayeskd serve-teacher` process on 127.0.0.1 at a free port
with `--threads` torch threads (OMP_NUM_THREADS), always stopped; the clients are one asyncio process of httpx
calls to /v1/completions, each with its own seed and `logprobs` alternatives, a bounded number of requests per
level (max(16, 2 x concurrency)).

All servers run from the start (an idle one costs nothing) and the measurements are interleaved: `--repeats`
rounds, each of every concurrency against every server in turn, so a load that comes and goes on a shared machine
hits every column alike; each cell reports the median round (and the best, and every round's figure), and the
speedups are of medians of one run. Each round also records the server's CPU seconds (all its threads) and the
tokens per server CPU second, which a shared machine's load moves far less than wall time.

Prints a table and writes benchmarks/results/serve_cpu.json. Run it alone (the server and clients share the
machine's cores):

    .venv/bin/python benchmarks/bench_serve.py [--max-tokens 64] [--threads 1] [--batches 1,32,128] [--repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, command, print_table, write_json

CONCURRENCY = (1, 8, 32, 128)


def _cpu_seconds(pid: int) -> float:
    """CPU seconds a process has used (all its threads; Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_teacher(root: Path) -> str:
    """The benchmark's teacher checkpoint (tokenizer included) under `root`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bayeskd.corpus import embedded_corpus, train_bpe_tokenizer

    tok_dir = train_bpe_tokenizer(embedded_corpus(), vocab_size=1024, out_dir=root / "tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    path = root / "teacher"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


class Server:
    """`bayeskd serve-teacher` in its own process on a free port, stopped on exit."""

    def __init__(self, model: str, max_batch: int, threads: int):
        self.port = _free_port()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bayeskd.cli", "serve-teacher", "--model", model, "--name", "teacher", "--port",
             str(self.port), "--max-batch", str(max_batch), "--device", "cpu"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "Server":
        import httpx

        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve-teacher exited with {self.proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("serve-teacher did not start within 120 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


async def load(url: str, concurrency: int, requests: int, max_tokens: int, logprobs: int) -> dict:
    """`requests` completions, `concurrency` in flight: completion tokens/s, requests/s, mean latency."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600.0, limits=limits) as client:
        async def one(i: int) -> None:
            nonlocal tokens
            async with sem:
                t = time.perf_counter()
                r = await client.post(f"{url}/completions", json={
                    "model": "teacher", "prompt": f"Question {i}: what does module {i % 17} return when",
                    "max_tokens": max_tokens, "seed": i, "temperature": 1.0, "logprobs": logprobs})
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - t)

        await one(-1)  # warm-up (not counted)
        tokens, latencies = 0, []
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        seconds = time.perf_counter() - t0
    return {"requests": requests, "completion_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "requests_per_s": round(requests / seconds, 2),
            "mean_latency_s": round(sum(latencies) / len(latencies), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--logprobs", type=int, default=5, help="alternatives per token in each answer")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--batches", default="1,32,128", help="the --max-batch values served, comma-separated")
    ap.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each cell reports the median")
    ap.add_argument("--out", default=str(RESULTS / "serve_cpu.json"))
    args = ap.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    levels = [int(x) for x in args.concurrency.split(",")]
    load_before = os.getloadavg()
    runs: dict[tuple[int, int], list[dict]] = {(mb, c): [] for mb in batches for c in levels}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        model = build_teacher(Path(tmp))
        servers = {mb: stack.enter_context(Server(model, mb, args.threads)) for mb in batches}
        for rep in range(args.repeats):
            for c in levels:
                for mb in batches:
                    cpu = _cpu_seconds(servers[mb].proc.pid)
                    r = asyncio.run(load(servers[mb].url, c, max(16, 2 * c), args.max_tokens, args.logprobs))
                    r["server_cpu_s"] = round(_cpu_seconds(servers[mb].proc.pid) - cpu, 3)
                    r["tokens_per_server_cpu_s"] = round(r["completion_tokens"] / max(r["server_cpu_s"], 1e-9), 1)
                    runs[mb, c].append(r)
                    print(f"round {rep + 1} max_batch {mb:>4} concurrency {c:>4}: {r['tokens_per_s']:>8.1f} tokens/s "
                          f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    rows = []
    for (mb, c), rs in runs.items():
        rs = sorted(rs, key=lambda r: r["tokens_per_s"])
        med = rs[(len(rs) - 1) // 2]  # the lower median
        rows.append({"max_batch": mb, "concurrency": c, **med, "best_tokens_per_s": rs[-1]["tokens_per_s"],
                     "rounds_tokens_per_s": [r["tokens_per_s"] for r in runs[mb, c]]})
    base = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["max_batch"] == 1}
    for r in rows:
        r["speedup"] = round(r["tokens_per_s"] / base[r["concurrency"]], 2) if r["concurrency"] in base else None
    print_table(rows, ["max_batch", "concurrency", "requests", "tokens_per_s", "best_tokens_per_s", "speedup",
                       "tokens_per_server_cpu_s", "mean_latency_s"])
    import torch

    write_json(args.out, {
        "command": command(), "machine": {"cpu": platform.processor() or platform.machine(),
                                          "cores": os.cpu_count(), "torch": torch.__version__,
                                          "server_threads": args.threads,
                                          "load_average_before_after": [round(load_before[0], 2),
                                                                        round(os.getloadavg()[0], 2)]},
        "model": "Llama 4 layers, hidden 256, intermediate 1024, vocab 1024 (random weights)",
        "max_tokens": args.max_tokens, "logprobs": args.logprobs, "repeats": args.repeats, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
