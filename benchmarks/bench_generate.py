"""`bayeskd generate` throughput and client overhead, each beside the bare `openai` SDK in the same run.

1. Against `bayeskd serve-teacher` with a small model (its own process): requests/s and completion tokens/s of
   `generate` at concurrency 1, 8 and 32, beside a plain sequential loop of `openai` calls.
2. Against a server that answers instantly (its own process): requests/s and the client's CPU time per request
   of `generate` (resume bookkeeping, rate limiting, writing, the progress bar) beside a bare `AsyncOpenAI` loop
   with a semaphore at the same concurrency. Target: generate costs <= 1.2x the bare loop's CPU per request.
3. In-process, `generate --backend hf` (no server): completion tokens/s of the whole job (the model, batching,
   records written) at `--max-batch` 1, 32, 128 and 256 with as many requests in flight, one torch thread, on two
   random Llamas over a vocabulary of 1,024: the lab's tiny teacher's shape (2 layers, hidden 128, MLP 256: the
   issue's target, >= 5,000 tokens/s) and a 10x larger one (4 layers, hidden 256, MLP 1,024); `--hf-max-tokens`
   tokens per answer, 5 alternatives each. Also tokens per CPU second of the whole process (both its threads):
   what one core does when the machine is not shared, which wall time shows only then.
serve-teacher answers one request at a time (bit-exact answers per request and seed), so part 1 measures how
little the client adds to a busy server rather than the server's parallelism.

Prints a table and writes benchmarks/results/generate.json (`--parts` runs some parts and keeps the file's rows of
the others). Run it alone (the servers share the machine's cores):

    .venv/bin/python benchmarks/bench_generate.py [--requests 400] [--model-requests 64] [--parts serve,instant,hf]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, write_json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, seconds: float = 120.0) -> None:
    import httpx

    t = time.time()
    while time.time() - t < seconds:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


class Server:
    """A server process on 127.0.0.1, always stopped."""

    def __init__(self, args: list[str], health: str):
        self.port = _free_port()
        args = [str(self.port) if a == "{port}" else a for a in args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.health = f"http://127.0.0.1:{self.port}{health}"

    def __enter__(self) -> "Server":
        try:
            _wait(self.health, self.proc)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------------------------------------------- instant server

def serve_instant(port: int) -> None:
    """An OpenAI-compatible chat endpoint that answers at once with a fixed completion (the client's cost alone)."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()
    body = {"id": "x", "object": "chat.completion", "created": 0, "model": "instant",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "a fixed answer of some words"},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14}}

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/v1/chat/completions")
    def chat() -> dict:
        return body

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---------------------------------------------------------------------------------------------------- clients

def bare_loop(base_url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> float:
    """The bare SDK: AsyncOpenAI, a semaphore, nothing else. Returns seconds."""
    import openai

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompts[i]}],
                                                     max_tokens=max_tokens, seed=i)

        await asyncio.gather(*(one(i) for i in range(len(prompts))))
        await client.close()

    t = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - t


def sequential_loop(base_url: str, model: str, prompts: list[str], max_tokens: int) -> tuple[float, int]:
    """A plain loop of synchronous `openai` calls. Returns (seconds, completion tokens)."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
    tokens, t = 0, time.perf_counter()
    for i, p in enumerate(prompts):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                           max_tokens=max_tokens, seed=i)
        tokens += r.usage.completion_tokens
    return time.perf_counter() - t, tokens


def run_generate(base_url: str, model: str, prompts_path: Path, out: Path, concurrency: int,
                 max_tokens: int) -> dict:
    from bayeskd.teachers.generate import generate, side_files

    for f in (out, *side_files(out)):
        f.unlink(missing_ok=True)
    t = time.perf_counter()
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # the bar is drawn, and paid for
        s = generate(str(prompts_path), str(out), model=model, base_url=base_url, concurrency=concurrency,
                     max_tokens=max_tokens, progress=True)
    return {"seconds": time.perf_counter() - t, "completion_tokens": s["completion_tokens"],
            "records": s["records_total"]}


def tiny_llama(path: Path, tokenizer, seed: int, layers: int = 2, hidden: int = 32, intermediate: int = 64,
               positions: int = 256) -> str:
    """A tiny Llama over `tokenizer`'s vocabulary (width 32 unless told), saved with its tokenizer like a user's
    checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=positions,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def run_hf(model: str, prompts_path: Path, out: Path, max_batch: int, max_tokens: int, **kw) -> dict:
    """`generate --backend hf` in this process: every prompt once, `max_batch` requests in flight (the model
    loaded by each call, as the command does: ~0.3 s of a run of several seconds)."""
    from bayeskd.teachers.generate import generate, side_files

    for f in (out, *side_files(out)):
        f.unlink(missing_ok=True)
    t, c = time.perf_counter(), time.process_time()
    s = generate(str(prompts_path), str(out), model=model, backend="hf", endpoint="completions", device="cpu",
                 max_batch=max_batch, concurrency=max_batch, max_tokens=max_tokens, top_logprobs=5, seed=0,
                 keep_empty=True, progress=False, **kw)
    return {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c,
            "completion_tokens": s["completion_tokens"],
            "records": s["records_total"]}


def _cpu(fn, *args, **kwargs):
    """(fn's result, this process's CPU seconds during it)."""
    c = time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - c


# ---------------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=400, help="requests against the instant server")
    ap.add_argument("--model-requests", type=int, default=64, help="requests against serve-teacher")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="serve,instant,hf", help="which parts to run: serve, instant, hf")
    ap.add_argument("--hf-batches", default="1,32,128,256", help="part 3: the --max-batch values")
    ap.add_argument("--hf-requests", type=int, default=256, help="part 3: prompts per --max-batch value")
    ap.add_argument("--hf-max-tokens", type=int, default=64)
    ap.add_argument("--serve-instant", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_instant is not None:
        serve_instant(args.serve_instant)
        return

    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from bayeskd.corpus import embedded_corpus, embedded_teacher_records, train_bpe_tokenizer

    parts = set(args.parts.split(","))
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
                    "max_tokens": args.max_tokens, "load_average_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tok = AutoTokenizer.from_pretrained(train_bpe_tokenizer(embedded_corpus(), 512, d / "tok"))
        model = tiny_llama(d / "teacher", tok, seed=0, layers=2)
        texts = [r["prompt"] for r in embedded_teacher_records(max(args.requests, args.model_requests,
                                                                   args.hf_requests), seed=0)]
        rows = []

        # 3. generate --backend hf in-process, on the serve benchmark's teacher
        if "hf" in parts:
            tok_hf = AutoTokenizer.from_pretrained(train_bpe_tokenizer(embedded_corpus(), 1024, d / "tok_hf"))
            models = {"lab tiny teacher (2 x 128)": tiny_llama(d / "teacher_tiny", tok_hf, seed=0, layers=2,
                                                               hidden=128, intermediate=256, positions=512),
                      "4 x 256": tiny_llama(d / "teacher_hf", tok_hf, seed=0, layers=4, hidden=256,
                                            intermediate=1024, positions=512)}
            prompts = d / "hf_prompts.jsonl"
            prompts.write_text("".join(json.dumps({"prompt": t[:200]}) + "\n" for t in texts[:args.hf_requests]))
            for name, model_hf in models.items():
                run_hf(model_hf, prompts, d / "hf_warm.jsonl", 2, 2, max_prompts=2)  # imports, caches: not timed
                for mb in (int(x) for x in args.hf_batches.split(",")):
                    g = run_hf(model_hf, prompts, d / f"hf{mb}.jsonl", mb, args.hf_max_tokens)
                    rows.append({"part": "hf backend", "model": name, "client": f"generate --max-batch {mb}",
                                 "concurrency": mb, "requests_per_s": g["records"] / g["seconds"],
                                 "tokens_per_s": g["completion_tokens"] / g["seconds"],
                                 "tokens_per_cpu_s": g["completion_tokens"] / g["cpu_seconds"]})
                    print(f"hf backend, {name}, --max-batch {mb}: {rows[-1]['tokens_per_s']:.0f} tokens/s, "
                          f"{rows[-1]['tokens_per_cpu_s']:.0f} per CPU second of the process "
                          f"(load average {os.getloadavg()[0]:.1f})", flush=True)

        # 1. a small model behind serve-teacher
        if "serve" in parts:
            prompts = d / "model_prompts.jsonl"
            prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts[:args.model_requests]))
            cmd = [sys.executable, "-m", "bayeskd.cli", "serve-teacher", "--model", model, "--name", "teacher",
                   "--port", "{port}"]
            with Server(cmd, "/health") as srv:
                seq_s, seq_tok = sequential_loop(srv.base_url, "teacher", texts[:args.model_requests], args.max_tokens)
                rows.append({"part": "serve-teacher", "client": "sequential openai loop", "concurrency": 1,
                             "requests_per_s": args.model_requests / seq_s, "tokens_per_s": seq_tok / seq_s})
                for c in (1, 8, 32):
                    g = run_generate(srv.base_url, "teacher", prompts, d / f"m{c}.jsonl", c, args.max_tokens)
                    rows.append({"part": "serve-teacher", "client": "bayeskd generate", "concurrency": c,
                                 "requests_per_s": args.model_requests / g["seconds"],
                                 "tokens_per_s": g["completion_tokens"] / g["seconds"],
                                 "vs_sequential": seq_s / g["seconds"]})

        # 2. the client's own cost, against a server that answers at once
        if "instant" in parts:
            prompts = d / "prompts.jsonl"
            prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts[:args.requests]))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-instant", "{port}"]
            with Server(cmd, "/health") as srv:
                for c in (8, 32):
                    bare, gen = [], []
                    for r in range(args.repeats):  # interleaved, so drifts of the machine hit both alike
                        secs, cpu = _cpu(bare_loop, srv.base_url, "instant", texts[:args.requests], c, args.max_tokens)
                        bare.append((secs, cpu))
                        g, cpu = _cpu(run_generate, srv.base_url, "instant", prompts, d / f"i{c}.jsonl", c,
                                      args.max_tokens)
                        gen.append((g["seconds"], cpu))
                    med = lambda xs, k: sorted(x[k] for x in xs)[len(xs) // 2]  # noqa: E731
                    n = args.requests
                    rows.append({"part": "instant server", "client": "bare AsyncOpenAI + semaphore", "concurrency": c,
                                 "requests_per_s": n / med(bare, 0), "cpu_ms_per_request": 1e3 * med(bare, 1) / n})
                    rows.append({"part": "instant server", "client": "bayeskd generate", "concurrency": c,
                                 "requests_per_s": n / med(gen, 0), "cpu_ms_per_request": 1e3 * med(gen, 1) / n,
                                 "cpu_vs_bare": med(gen, 1) / med(bare, 1)})
    old = RESULTS / "generate.json"
    if old.exists() and parts != {"serve", "instant", "hf"}:  # keep the rows of the parts not run
        names = {"serve-teacher": "serve", "instant server": "instant", "hf backend": "hf"}
        kept = [r for r in json.loads(old.read_text()).get("rows", []) if names.get(r["part"]) not in parts]
        rows = kept + rows
    result["load_average_after"] = round(os.getloadavg()[0], 2)
    result["rows"] = rows
    print(f"{'part':<42} {'client':<30} {'conc':>4} {'req/s':>8} {'tok/s':>8} {'cpu ms/req':>10} {'ratio':>6}")
    for r in rows:
        ratio = r.get("vs_sequential", r.get("cpu_vs_bare"))
        part = f"{r['part']}, {r['model']}" if "model" in r else r["part"]
        print(f"{part:<42} {r['client']:<30} {r['concurrency']:>4} {r['requests_per_s']:>8.1f} "
              f"{r.get('tokens_per_s', float('nan')):>8.1f} {r.get('cpu_ms_per_request', float('nan')):>10.2f} "
              f"{'' if ratio is None else f'{ratio:.2f}':>6}")
    write_json(RESULTS / "generate.json", result, indent=1)


if __name__ == "__main__":
    main()
