"""A local causal LM as a teacher: text, finish reasons and per-token log-probabilities with exact token bytes,
sampled by our own loop so that every sample is reproducible on its own.

`HFTeacher.complete` answers one request (one prompt, n samples) the way an OpenAI-compatible server does;
`bayeskd serve-teacher` (`teachers/server.py`) puts it behind HTTP and `bayeskd generate --backend hf` calls it
directly. Reproducibility contract: sample i of a call is drawn with its own CPU `torch.Generator` seeded with
`row_seed(seed, i)` = (seed * 1_000_003 + i) mod 2**63 (one uniform per generated token, inverse-CDF sampling);
the n samples of a call are n identical rows of one batch (no padding; the prompt runs once and its KV cache is
repeated), and rows of different prompts are never batched together. So a sample depends only on (prompt,
settings, seed, i) and on the model's arithmetic, never on what else runs. (Batches of different sizes may round
differently on some hardware, so sample i of n=2 and of n=4 agree exactly where the matmuls are batch-invariant,
as on our CPU tests.)

`HFTeacher.complete_batch` and `Decoding` (serve-teacher and generate with `--max-batch` > 1) decode many
requests together: left-padded prompts, one preallocated KV cache, finished rows dropped, and (`Decoding.step`)
new requests joining the running batch between steps. Each row keeps its generator and its request's settings
and stop rules, so it draws the same uniforms as alone; its logits differ from `complete`'s in their low bits
(padding and batch size change the order of a matmul's sums), so its tokens match `complete`'s (except where a
uniform falls that close to a boundary of the sampling CDF) and its log-probabilities match to ~1e-6, not bit
for bit (docs/design.md, "Batching").
"""
from __future__ import annotations

import hashlib
import inspect
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from bayeskd.token_bytes import token_bytes_table, token_display

SEED_STRIDE = 1_000_003


def row_seed(seed: int, i: int) -> int:
    """The generator seed of sample i of a call with `seed`: (seed * 1_000_003 + i) mod 2**63 (torch takes a
    signed 64-bit seed; any int, also a negative OpenAI seed, maps into it)."""
    return (int(seed) * SEED_STRIDE + int(i)) % (1 << 63)


# ---------------------------------------------------------------------------------------------------- results

@dataclass
class TokenLogprob:
    """One generated token: its string, exact bytes, log-probability and the top alternatives (token, bytes,
    log-probability), largest first. Log-probabilities are of the model's own distribution (temperature 1)."""
    token: str
    bytes: bytes
    logprob: float | None  # None: the first token of a scored text (nothing before it to predict it)
    top: list[tuple[str, bytes, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The teacher-record format of a token (the keys of OpenAI's chat `logprobs.content[]`)."""
        return {"token": self.token, "bytes": list(self.bytes), "logprob": self.logprob,
                "top_logprobs": [{"token": t, "bytes": list(b), "logprob": lp} for t, b, lp in self.top]}


@dataclass
class Generation:
    """One sample. `text` is the decode of `token_ids` (special tokens skipped, never stripped), cut before a stop
    string; `token_ids` (and `tokens`, when log-probabilities were asked for) hold the generated tokens whose
    bytes lie inside `text`: no EOS, nothing of a stop string. `completion_tokens` counts every token the model
    generated (EOS and a stop string's tokens included), as API usage does. finish_reason: "stop" (EOS or a stop
    string) or "length" (max_tokens)."""
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tokens: list[TokenLogprob] | None = None


@dataclass
class Scored:
    """A scored text (`HFTeacher.score`): its token ids, per token its `TokenLogprob` (the first one's logprob
    None), its rank in the model's distribution (1: the most likely; None for the first) and its top alternatives
    as (id, log-probability), largest first."""
    ids: list[int]
    tokens: list[TokenLogprob]
    ranks: list[int | None]
    top_ids: list[list[tuple[int, float]]]


@dataclass
class _Job:
    """One checked request of `complete` / `complete_batch`: prompt ids and settings (k < 0: no log-probs)."""
    ids: list[int]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    k: int


# ---------------------------------------------------------------------------------------------------- sampling

def _sample_rows(logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse-CDF sampling with that row's uniform in [0, 1). Every operation is row-wise,
    so a row's choice depends on its logits and its uniform only. Tokens of probability zero are never chosen."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        # Nucleus: keep the smallest prefix whose mass reaches top_p (the first token always stays).
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.double().cumsum(-1)
    target = uniforms.to(device=cdf.device, dtype=torch.float64)[:, None] * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    return (order.gather(-1, idx) if order is not None else idx)[:, 0]


def _repeat_cache(cache: Any, n: int) -> Any:
    """The prompt's KV cache for n identical rows."""
    if n == 1:
        return cache
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(n)
        return cache
    return tuple(tuple(t.repeat_interleave(n, dim=0) for t in layer) for layer in cache)  # legacy tuple cache


def _prompt_seed(seed: int, prompt: str) -> int:
    """Teacher.generate's per-prompt seed: from (seed, prompt text), so prompts sampled with one seed do not
    share their uniforms, and a prompt's answer does not depend on its place in the list."""
    h = hashlib.blake2b(f"{int(seed)}\0{prompt}".encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(h, "big")


class HFTeacher:
    """A transformers causal LM (a checkpoint directory or hub name) answering completion requests.

    Loaded with AutoTokenizer/AutoModelForCausalLM.from_pretrained, in eval mode; `device` defaults to cuda when
    available. Calls are serialized by a lock (one model call at a time), so one object may serve many threads.
    """

    def __init__(self, model: str | os.PathLike, *, device: str | None = None, dtype: Any = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = str(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        kwargs: dict[str, Any] = {}
        if dtype is not None:  # transformers renamed torch_dtype to dtype in 4.56
            import transformers
            from packaging.version import Version

            kwargs["dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"] = dtype
        self.model = AutoModelForCausalLM.from_pretrained(self.path, **kwargs).to(self.device).eval()
        self._lock = threading.Lock()
        self._bytes: list[bytes] | None = None
        self._strs: list[str] | None = None
        eos: set[int] = set()
        for src in (self.model.config, getattr(self.model, "generation_config", None), self.tokenizer):
            ids = getattr(src, "eos_token_id", None)
            eos.update([ids] if isinstance(ids, int) else (ids or []))
        self.eos_ids = eos  # chat models end a turn with a token listed in generation_config, not the tokenizer
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self._forward_params = set(inspect.signature(self.model.forward).parameters)

    def __repr__(self) -> str:
        return f"HFTeacher({self.path!r}, device={str(self.device)!r})"

    # ------------------------------------------------------------------------------------------------ tokens

    def token_bytes(self) -> list[bytes]:
        """`token_bytes_table(self.tokenizer)`, computed once."""
        if self._bytes is None:
            self._bytes = token_bytes_table(self.tokenizer)
            toks = self.tokenizer.convert_ids_to_tokens(list(range(len(self._bytes))))
            self._strs = [token_display(b, t or "") for b, t in zip(self._bytes, toks)]
        return self._bytes

    def token_str(self, token_id: int) -> str:
        """The `token` string of an id (its text, `bytes:\\x..` for partial characters, the name of a special)."""
        self.token_bytes()
        assert self._strs is not None
        return self._strs[token_id]

    def encode_prompt(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        """Token ids of a request's prompt. Chat messages go through the chat template (add_generation_prompt) and
        are encoded without the tokenizer's own special tokens (the template writes them, as `bayeskd.data`
        does); a plain prompt is encoded with them (BOS)."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"the tokenizer of {self.path} has no chat template; use the completions endpoint")
            text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ValueError("the prompt is empty (no tokens) and the tokenizer adds no BOS token")
        return list(ids)

    # ------------------------------------------------------------------------------------------------ generation

    def complete(self, prompt: str | None = None, messages: list[dict] | None = None, *, n: int = 1,
                 max_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 stop: list[str] | None = None, top_logprobs: int = 0, logprobs: bool = False) -> list[Generation]:
        """n samples of one prompt (text `prompt` or chat `messages`).

        temperature 0 is greedy (the first maximal token); top_p < 1 samples from the nucleus. A sample ends at
        EOS or a stop string (finish_reason "stop"; neither is in the text) or after max_tokens ("length").
        With `logprobs` or `top_logprobs` > 0 each Generation carries `tokens`: per token its log-probability and
        the top_logprobs largest alternatives, from log_softmax of the raw logits, i.e. the model's own
        distribution at temperature 1 whatever the sampling settings (as vLLM's default raw_logprobs).
        Sample i depends only on (prompt, settings, seed, i): see the module docstring.
        """
        job = self._job(prompt, messages, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                        seed=seed, stop=stop, top_logprobs=top_logprobs, logprobs=logprobs)
        table = self.token_bytes()
        with self._lock, torch.inference_mode():
            rows = self._run(job.ids, job.n, job.max_tokens, job.temperature, job.top_p, job.seed, job.stop, job.k)
        return self._generations(job, rows, table)

    def complete_batch(self, requests: list[dict[str, Any]]) -> list[list[Generation] | Exception]:
        """Many `complete` calls decoded together (`bayeskd serve-teacher --max-batch`): each request is a dict of
        `complete`'s arguments (`max_tokens` None: the rest of the model's context); per request its Generations,
        or the ValueError that `complete` would raise for it (the other requests still run).

        Every request's n samples are rows of one batch: prompts left-padded, one forward per step over a shared
        KV cache, finished rows dropped from it. Each row keeps its own generator, settings and stop rules, so a
        sample is drawn from the same uniforms as by `complete`; the logits it is drawn from may differ from
        `complete`'s in their low bits (a padded, batched matmul sums in another order; see docs/design.md)."""
        decoding = self.decoding()
        done = dict(decoding.step(list(enumerate(requests))))
        while decoding.rows:
            done.update(decoding.step())
        return [done[i] for i in range(len(requests))]

    def decoding(self, rows: int = 0) -> "Decoding":
        """An empty running batch (continuous batching: `Decoding.step` admits requests between steps); `rows`:
        how many rows its cache makes room for at once (it grows beyond as needed)."""
        return Decoding(self, rows)

    def _request(self, r: dict[str, Any]) -> _Job:
        """A `complete_batch` request dict as a checked job (`max_tokens` None: the rest of the context)."""
        r = dict(r)
        if r.get("max_tokens") is None:
            used = len(self.encode_prompt(r.get("prompt"), r.get("messages")))
            r["max_tokens"] = max(1, (self.max_positions or 2048) - used)
        return self._job(**r)

    def _job(self, prompt: str | None = None, messages: list[dict] | None = None, *, n: int = 1,
             max_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             stop: list[str] | str | None = None, top_logprobs: int = 0, logprobs: bool = False) -> _Job:
        """A checked, encoded request (ValueError for one this model cannot answer)."""
        if n < 1 or max_tokens < 1:
            raise ValueError(f"n and max_tokens must be at least 1 (got n={n}, max_tokens={max_tokens})")
        if temperature < 0 or not 0 < top_p <= 1 or top_logprobs < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_logprobs >= 0 (got {temperature}, "
                             f"{top_p}, {top_logprobs})")
        stop = [s for s in ([stop] if isinstance(stop, str) else (stop or [])) if s]
        ids = self.encode_prompt(prompt, messages)
        if self.max_positions and len(ids) + max_tokens > self.max_positions:
            raise ValueError(f"this model's maximum context length is {self.max_positions} tokens; the request "
                             f"needs {len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} to generate)")
        want = logprobs or top_logprobs > 0
        return _Job(ids, int(n), int(max_tokens), float(temperature), float(top_p), int(seed), stop,
                    int(top_logprobs) if want else -1)

    def _generations(self, job: _Job, rows: list[tuple[list[int], list, str, int | None]],
                     table: list[bytes]) -> list[Generation]:
        out = []
        for gen, steps, reason, cut in rows:
            # Keep the tokens whose bytes end inside the (possibly cut) text: no EOS, nothing of a stop string.
            text = self.tokenizer.decode(gen, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            keep = len(gen)
            if cut is not None:
                text = text[:cut]
                budget, keep = len(text.encode("utf-8")), 0
                while keep < len(gen) and len(table[gen[keep]]) <= budget:
                    budget -= len(table[gen[keep]])
                    keep += 1
            tokens = None
            if job.k >= 0:
                strs, k = self._strs, job.k
                assert strs is not None  # token_bytes() filled it
                # A step is (logprob, top ids, top logprobs), the top lists of the whole batch's k (cut to k here).
                tokens = [TokenLogprob(strs[t], table[t], lp,
                                       [(strs[a], table[a], alp) for a, alp in zip(ti[:k], tv[:k])] if k else [])
                          for t, (lp, ti, tv) in zip(gen[:keep], steps[:keep])]
            out.append(Generation(text, gen[:keep], reason, len(job.ids), len(steps), tokens))
        return out

    def score(self, prompt: str, top_logprobs: int = 0) -> Scored:
        """Teacher forcing: the log-probability of every token of `prompt` (encoded as `encode_prompt` does, BOS
        included) given the tokens before it, and its top_logprobs largest alternatives, in one forward pass
        (what `echo` with `logprobs` answers; deterministic). The first token has none (logprob None)."""
        if top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0 (got {top_logprobs})")
        ids = self.encode_prompt(prompt)
        if self.max_positions and len(ids) > self.max_positions:
            raise ValueError(f"this model's maximum context length is {self.max_positions} tokens; the text has "
                             f"{len(ids)}")
        table = self.token_bytes()
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=False).logits[0]
            logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # row j predicts token j + 1
            target = torch.tensor(ids[1:], device=logp.device)
            chosen = logp.gather(-1, target[:, None])[:, 0]
            ranks = ((logp > chosen[:, None]).sum(-1) + 1).tolist()
            k = min(top_logprobs, logp.shape[-1])
            top_v, top_i = (x.tolist() for x in logp.topk(k, dim=-1, sorted=True))
            chosen = chosen.tolist()
        tokens = [TokenLogprob(self.token_str(ids[0]), table[ids[0]], None)]
        tokens += [TokenLogprob(self.token_str(t), table[t], lp, [(self.token_str(a), table[a], v) for a, v in
                                                               zip(ti, tv)])
                   for t, lp, ti, tv in zip(ids[1:], chosen, top_i, top_v)]
        return Scored(ids, tokens, [None] + ranks, [[]] + [list(zip(ti, tv)) for ti, tv in zip(top_i, top_v)])

    def _run(self, ids: list[int], n: int, max_tokens: int, temperature: float, top_p: float, seed: int,
             stop: list[str], k: int) -> list[tuple[list[int], list, str, int | None]]:
        """The sampling loop: per row (generated ids before EOS, per step (logprob, top-k ids, top-k logprobs) or
        None, finish reason, character index of the first stop string or None). k < 0: no log-probabilities."""
        gens = [torch.Generator(device="cpu").manual_seed(row_seed(seed, i)) for i in range(n)]
        # The prompt runs once (batch 1); its cache is repeated, so every row starts from identical numbers.
        out = self._forward(torch.tensor([ids], device=self.device), _new_cache(self.model.config), last_only=True)
        past = _repeat_cache(self._cache_of(out), n)
        logits = out.logits[:, -1, :].float().expand(n, -1)
        rows: list[list[int]] = [[] for _ in range(n)]
        steps: list[list] = [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n
        cuts: list[int | None] = [None] * n
        for step in range(max_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                # One uniform per row per step, drawn whether or not the row is done, from the row's own generator.
                u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])
                nxt = _sample_rows(logits, temperature, top_p, u)
            lp_chosen = top_v = top_i = None
            if k >= 0:
                logp = torch.log_softmax(logits.float(), dim=-1)
                lp_chosen = logp.gather(-1, nxt[:, None])[:, 0].tolist()
                if k > 0:
                    top_v, top_i = (x.tolist() for x in logp.topk(min(k, logp.shape[-1]), dim=-1, sorted=True))
            chosen = nxt.tolist()
            for i in range(n):
                if reasons[i] is not None:
                    continue
                steps[i].append(None if k < 0 else (lp_chosen[i], top_i[i] if k else (), top_v[i] if k else ()))
                reasons[i], cuts[i] = self._row_step(rows[i], steps[i], chosen[i], stop, max_tokens)
            if all(r is not None for r in reasons) or step == max_tokens - 1:
                break
            # Finished rows keep running (their numbers are ignored) so the batch never changes shape mid-call.
            out = self._forward(nxt[:, None], past)
            past, logits = self._cache_of(out), out.logits[:, -1, :].float()
        return [(rows[i], steps[i], reasons[i] or "length", cuts[i]) for i in range(n)]

    def _row_step(self, row: list[int], steps: list, t: int, stop: list[str], max_tokens: int
                  ) -> tuple[str | None, int | None]:
        """A row's token t (its step already in `steps`): (finish reason or None, character index of the first
        stop string or None). EOS ends the row without joining it; a stop string ends it at its first match."""
        if t in self.eos_ids:
            return "stop", None
        row.append(t)
        if stop:
            text = self.tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            hits = [p for p in (text.find(s) for s in stop) if p >= 0]
            if hits:
                return "stop", min(hits)
        return ("length" if len(steps) >= max_tokens else None), None

    def _forward(self, input_ids: torch.Tensor, cache: Any, last_only: bool = False, **extra: Any) -> Any:
        """One forward pass with the KV cache, under whichever argument names this transformers version uses
        (`cache` from 5.x, `past_key_values` before; `logits_to_keep` / `num_logits_to_keep` spare the prefill
        its [L, V] logits)."""
        params = self._forward_params
        kwargs: dict[str, Any] = {"use_cache": True, ("cache" if "cache" in params else "past_key_values"): cache}
        if last_only:
            for name in ("logits_to_keep", "num_logits_to_keep"):
                if name in params:
                    kwargs[name] = 1
                    break
        return self.model(input_ids=input_ids, **kwargs, **extra)

    @staticmethod
    def _cache_of(out: Any) -> Any:
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 1.0,
                 seed: int = 0) -> list[str]:
        """The Teacher protocol: one continuation per prompt, prompt by prompt. Each prompt is sample 0 of
        `complete` with a seed derived from (seed, prompt text), so its answer is the same wherever it sits in
        the list, and two prompts sampled with one seed do not share their random numbers."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        return [self.complete(p, max_tokens=int(max_new_tokens), temperature=float(temperature),
                              seed=_prompt_seed(seed, p))[0].text for p in prompts]


def _new_cache(config: Any) -> Any:
    """An empty DynamicCache where transformers has one (so the prefill returns a cache object we can repeat);
    given the model's config where the class takes it (sliding-window layers)."""
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover - very old transformers: the model makes its own (tuple) cache
        return None
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers before the config argument
        return DynamicCache()


# ---------------------------------------------------------------------------------------------------- batching

@dataclass
class _Request:
    """A request inside a `Decoding`: its job, the key it came with, its rows and how many are still decoding."""
    key: Any
    job: _Job
    rows: list["_Row"]
    left: int


@dataclass
class _Row:
    """One sample of a request decoding in a batch: its generator, generated ids, per-step log-probabilities,
    finish reason and stop-string cut (as `_run` keeps them per row), and its uniforms drawn ahead (`us`, the
    next at `ui`)."""
    req: _Request
    gen: torch.Generator
    ids: list[int] = field(default_factory=list)
    steps: list = field(default_factory=list)
    reason: str | None = None
    cut: int | None = None
    us: list[float] = field(default_factory=list)
    ui: int = 0

    def uniform(self) -> float:
        """The row's next uniform: its generator's next number, as `_run` draws one per step (drawn 64 at a time,
        which gives the same sequence; the ones left when the row ends are never used)."""
        if self.ui == len(self.us):
            ahead = max(1, min(64, self.req.job.max_tokens - len(self.steps)))
            self.us, self.ui = torch.rand(ahead, generator=self.gen, dtype=torch.float64).tolist(), 0
        self.ui += 1
        return self.us[self.ui - 1]


class Decoding:
    """A running batch of `HFTeacher` requests, decoded together step by step (continuous batching).

    `step(new)` admits the requests `new` ((key, request dict) pairs; a request `complete` would refuse comes back
    at once as its ValueError): their prompts run in one left-padded forward and their KV caches join the batch's,
    right-aligned, the shorter side padded on the left and masked. Then every live row samples one token with its
    own generator (`row_seed(seed, i)`), settings and stop rules, exactly as in `HFTeacher._run`; finished rows
    leave the batch (their cache rows dropped, columns no live row still attends to trimmed on the left), and the
    live rows' next forward runs. It returns (key, Generations) for every request whose rows all ended. So
    requests join a batch between steps and leave it when they end, and no row's random numbers depend on what
    else runs: only the low bits of its logits do (see the module docstring).

    The cache preallocates its keys and values (`_slab_cache`, room for `rows` rows): a step writes into the
    buffer instead of concatenating every layer's cache, admitted rows are written after the live ones, and a
    finished row's place is taken by the last live row (the others stay where they are), so no step copies the
    whole cache. Not thread-safe by itself; each step holds the teacher's lock."""

    def __init__(self, teacher: "HFTeacher", rows: int = 0):
        self.teacher = teacher
        self.rows_hint = rows
        self.live: list[_Row] = []
        self.cache: Any = None
        self.mask = self.pos = self.logits = None
        self.fast = False  # decoding steps through `_llama_step` (see there)

    @property
    def rows(self) -> int:
        """How many rows are decoding."""
        return len(self.live)

    def step(self, new: list[tuple[Any, dict[str, Any]]] = ()) -> list[tuple[Any, list[Generation] | Exception]]:
        t = self.teacher
        out: list[tuple[Any, list[Generation] | Exception]] = []
        jobs = []
        for key, r in new:
            try:
                jobs.append((key, t._request(r)))
            except ValueError as e:
                out.append((key, e))
        table = t.token_bytes()
        with t._lock, torch.inference_mode():
            if jobs:
                self._admit(jobs)
            if self.live:
                out += self._advance(table)
        return out

    def _admit(self, jobs: list[tuple[Any, _Job]]) -> None:
        t, dev = self.teacher, self.teacher.device
        length = max(len(j.ids) for _, j in jobs)
        pad = t.tokenizer.pad_token_id if t.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (length - len(j.ids)) + j.ids for _, j in jobs], device=dev)
        mask = torch.tensor([[0] * (length - len(j.ids)) + [1] * len(j.ids) for _, j in jobs], device=dev)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        out = t._forward(input_ids, _new_cache(t.model.config), last_only=True, attention_mask=mask,
                         position_ids=positions)
        rows = []
        owner = []
        for jn, (key, j) in enumerate(jobs):
            req = _Request(key, j, [], j.n)
            req.rows = [_Row(req, torch.Generator(device="cpu").manual_seed(row_seed(j.seed, i))) for i in range(j.n)]
            rows += req.rows
            owner += [jn] * j.n
        take = torch.tensor(owner, device=dev) if len(owner) > len(jobs) else None
        logits = out.logits[:, -1, :].float()
        pos = torch.tensor([len(r.req.job.ids) for r in rows], device=dev)
        if take is not None:
            mask, logits = mask[take], logits[take]
        if self.cache is None:
            self.cache = _slab_cache(t.model.config, self.rows_hint)
            self.fast = _llama_step_fits(t.model, self.cache)
        for mine, theirs in zip(self.cache.layers, t._cache_of(out).layers):
            keys, values = theirs.keys, theirs.values
            if take is not None:
                keys, values = keys.index_select(0, take), values.index_select(0, take)
            _join_layer(mine, keys, values)
        if self.live:
            have, add = self.mask.shape[1], mask.shape[1]
            width = max(have, add)
            mask = torch.cat([torch.nn.functional.pad(self.mask, (width - have, 0)),
                              torch.nn.functional.pad(mask, (width - add, 0))])
            pos, logits = torch.cat([self.pos, pos]), torch.cat([self.logits, logits])
        self.mask, self.pos, self.logits = mask, pos, logits
        self.live += rows

    def _advance(self, table: list[bytes]) -> list[tuple[Any, list[Generation]]]:
        """Sample a token for every live row, let finished rows and requests go, run the next forward."""
        t, logits, live = self.teacher, self.logits, self.live
        nxt = torch.empty(len(live), dtype=torch.long, device=logits.device)
        groups: dict[tuple[float, float], list[int]] = {}
        for b, row in enumerate(live):
            groups.setdefault((row.req.job.temperature, row.req.job.top_p), []).append(b)
        for (temperature, top_p), bs in groups.items():
            idx = torch.tensor(bs, device=logits.device) if len(bs) < len(live) else None
            part = logits[idx] if idx is not None else logits
            if temperature == 0:
                chosen_part = part.argmax(-1)
            else:
                u = torch.tensor([live[b].uniform() for b in bs], dtype=torch.float64)
                chosen_part = _sample_rows(part, temperature, top_p, u)
            if idx is not None:
                nxt[idx] = chosen_part
            else:
                nxt = chosen_part
        k_max = max(row.req.job.k for row in live)
        lp_chosen = top_v = top_i = None
        if k_max >= 0:
            logp = torch.log_softmax(logits.float(), dim=-1)
            lp_chosen = logp.gather(-1, nxt[:, None])[:, 0].tolist()
            if k_max > 0:
                top_v, top_i = (x.tolist() for x in logp.topk(min(k_max, logp.shape[-1]), dim=-1, sorted=True))
        chosen = nxt.tolist()
        keep, done = [], []
        for b, row in enumerate(live):
            job = row.req.job
            k = job.k
            # The row's top lists as they come (the batch's largest k), cut to its k only once, in `_generations`.
            row.steps.append(None if k < 0 else (lp_chosen[b], top_i[b], top_v[b]) if k > 0 else (lp_chosen[b], (), ()))
            row.reason, row.cut = t._row_step(row.ids, row.steps, chosen[b], job.stop, job.max_tokens)
            if row.reason is None:
                keep.append(b)
                continue
            row.req.left -= 1
            if row.req.left == 0:
                req = row.req
                done.append((req.key, t._generations(req.job, [(r.ids, r.steps, r.reason, r.cut) for r in req.rows],
                                                     table)))
        if len(keep) < len(live):
            if not keep:
                self.live = []
                self.cache = self.mask = self.pos = self.logits = None
                return done
            # The first m places keep their rows; a finished row's place takes a kept row from beyond m.
            m, dev = len(keep), self.mask.device
            kept = set(keep)
            holes = [b for b in range(m) if b not in kept]
            tail = keep[m - len(holes):]
            order = list(range(m))
            for h, b in zip(holes, tail):
                order[h] = b
            self.live = [live[b] for b in order]
            sel = torch.tensor(order, device=dev)
            dst, src = (torch.tensor(holes, device=dev), torch.tensor(tail, device=dev)) if holes else (None, None)
            for layer in self.cache.layers:
                _keep_layer_rows(layer, sel, dst, src)
            self.mask, self.pos, nxt = self.mask[sel], self.pos[sel], nxt[sel]
            first = int(self.mask.any(0).int().argmax())  # columns before it: padding of every live row
            if first > 0:
                for layer in self.cache.layers:
                    _trim_layer(layer, first)
                self.mask = self.mask[:, first:]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(keep), 1)], dim=1)
        if self.fast:
            self.logits = _llama_step(t.model, nxt[:, None], self.cache, self.mask, self.pos[:, None])
        else:
            out = t._forward(nxt[:, None], self.cache, attention_mask=self.mask, position_ids=self.pos[:, None])
            self.cache, self.logits = t._cache_of(out), out.logits[:, -1, :].float()
        self.pos = self.pos + 1
        return done


def _llama_step_fits(model: Any, cache: Any) -> bool:
    """Whether `_llama_step` computes this model's decoding step: a transformers Llama (the same modules, SDPA
    attention) whose cache layers are all slabs."""
    inner = getattr(model, "model", None)
    return (getattr(model.config, "model_type", None) == "llama"
            and getattr(model.config, "_attn_implementation", None) == "sdpa"
            and all(hasattr(inner, a) for a in ("embed_tokens", "rotary_emb", "layers", "norm"))
            and hasattr(model, "lm_head") and len(cache.layers) == len(inner.layers)
            and all(type(layer) is _SLAB_LAYER for layer in cache.layers))


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm's forward, op for op."""
    x32 = x.to(torch.float32)
    return norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb of one tensor, op for op."""
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin


def _llama_step(model: Any, input_ids: torch.Tensor, cache: Any, mask: torch.Tensor, position_ids: torch.Tensor
                ) -> torch.Tensor:
    """One decoding step of a transformers Llama ([B, 1] ids, 2-D padding mask, positions [B, 1]; the cache's
    slab layers updated) and its last logits [B, V] in float32: the modules' own weights and the same torch ops
    as LlamaForCausalLM.forward with SDPA (identical logits on our CPU check), without the per-call work of its
    wrappers, hooks and mask builders, which costs as much as the small models' matmuls."""
    inner, b = model.model, input_ids.shape[0]
    h = inner.embed_tokens(input_ids)
    cos, sin = inner.rotary_emb(h, position_ids)
    cos, sin = cos[:, None], sin[:, None]
    keep = mask.bool()[:, None, None, :]
    for layer, slab in zip(inner.layers, cache.layers):
        a = layer.self_attn
        x = _rms_norm(layer.input_layernorm, h)
        q = _rotate(a.q_proj(x).view(b, 1, -1, a.head_dim).transpose(1, 2), cos, sin)
        k = _rotate(a.k_proj(x).view(b, 1, -1, a.head_dim).transpose(1, 2), cos, sin)
        k, v = slab.update(k, a.v_proj(x).view(b, 1, -1, a.head_dim).transpose(1, 2))
        heads = q.shape[1]
        if k.shape[1] != heads:  # grouped queries: one query row per head of its group, as transformers packs them
            q = q.reshape(b, k.shape[1], heads // k.shape[1], a.head_dim)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=a.scaling)
        h = h + a.o_proj(o.reshape(b, heads, 1, a.head_dim).transpose(1, 2).reshape(b, 1, -1))
        x = _rms_norm(layer.post_attention_layernorm, h)
        mlp = layer.mlp
        h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    return model.lm_head(_rms_norm(inner.norm, h))[:, -1, :].float()


_SLAB_LAYER: Any = None


def _slab_cache(config: Any, rows: int = 0) -> Any:
    """The DynamicCache of a `Decoding`: its full-attention layers (DynamicLayer) replaced by `SlabLayer`s, whose
    keys and values are views of a buffer with spare rows (at least `rows`) and columns, written in place: a step
    writes one column, an admission writes its rows after the live ones, a finished row's place is taken by a row
    from the end (a DynamicLayer concatenates its whole cache per step and layer, and copies it whenever a row
    joins or leaves); other layer types stay as they are."""
    global _SLAB_LAYER
    from transformers.cache_utils import DynamicLayer

    if _SLAB_LAYER is None:
        class SlabLayer(DynamicLayer):
            """Keys and values [B, H, L, D] as `buffer[:B, :, start:end]`. `update` writes the new states at `end`
            (the columns double when full); `join` writes new rows after the live ones, right-aligned (a wider
            newcomer moves `start` left); `keep_rows` moves rows from the end into finished rows' places; `trim`
            drops columns on the left. Every cell of the view holds a state or zero padding (never garbage, which
            could be NaN under the mask)."""

            def __init__(self, rows: int = 0, **kwargs: Any):
                super().__init__(**kwargs)
                self.k = self.v = None
                self.rows_hint = rows
                self.n = self.start = self.end = 0

            def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
                self.keys = self.k[:self.n, :, self.start:self.end]
                self.values = self.v[:self.n, :, self.start:self.end]
                return self.keys, self.values

            def _place(self, like: torch.Tensor, rows: int, width: int, room: int) -> None:
                """New buffers for at least `rows` rows and `width` + `room` columns (and spare columns), the live
                rows' window copied right-aligned at column `width`, zeros on its left."""
                old_rows = self.k.shape[0] if self.k is not None else 0
                rcap = max(rows, self.rows_hint, old_rows if rows <= old_rows else 2 * old_rows)
                cap = width + max(room, width, 16)
                shape = (rcap, like.shape[1], cap, like.shape[3])
                k, v = like.new_empty(shape), like.new_empty(shape)
                if self.k is not None and self.n:
                    w = self.end - self.start
                    for new, old in ((k, self.k), (v, self.v)):
                        new[:self.n, :, :width - w].zero_()
                        new[:self.n, :, width - w:width] = old[:self.n, :, self.start:self.end]
                self.k, self.v = k, v
                self.start, self.end = 0, width
                self.device, self.is_initialized = like.device, True

            def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
                       ) -> tuple[torch.Tensor, torch.Tensor]:
                if self.k is None or not self.n:
                    self.join(key_states, value_states)
                    return self.keys, self.values
                n = key_states.shape[-2]
                if self.end + n > self.k.shape[2]:
                    self._place(key_states, self.n, self.end - self.start, n)
                self.k[:self.n, :, self.end:self.end + n] = key_states
                self.v[:self.n, :, self.end:self.end + n] = value_states
                self.end += n
                return self._views()

            def join(self, keys: torch.Tensor, values: torch.Tensor) -> None:
                b, length = keys.shape[0], keys.shape[2]
                if self.k is None or not self.n:
                    self.n = 0
                    self._place(keys, b, length, length)
                width = max(self.end - self.start, length)
                if self.n + b > self.k.shape[0] or self.end < width:
                    self._place(keys, self.n + b, width, 0)
                if self.end - width < self.start:  # a wider newcomer: the live rows' new columns are padding
                    self.k[:self.n, :, self.end - width:self.start].zero_()
                    self.v[:self.n, :, self.end - width:self.start].zero_()
                    self.start = self.end - width
                r0, r1, at = self.n, self.n + b, self.end - length
                for buf, x in ((self.k, keys), (self.v, values)):
                    buf[r0:r1, :, self.start:at].zero_()
                    buf[r0:r1, :, at:self.end] = x
                self.n = r1
                self._views()

            def keep_rows(self, n: int, dst: torch.Tensor | None, src: torch.Tensor | None) -> None:
                """Keep the first `n` rows, rows `src` (beyond n) first copied into rows `dst` (below n)."""
                if dst is not None:
                    cols = slice(self.start, self.end)
                    self.k[dst, :, cols] = self.k[src, :, cols]
                    self.v[dst, :, cols] = self.v[src, :, cols]
                self.n = n
                self._views()

            def trim(self, n: int) -> None:
                self.start += n
                self._views()

            def batch_select_indices(self, indices: torch.Tensor) -> None:
                if self.k is not None:
                    cols = slice(self.start, self.end)
                    self.k[:len(indices), :, cols] = self.k[indices, :, cols]  # the right side is a copy
                    self.v[:len(indices), :, cols] = self.v[indices, :, cols]
                    self.n = len(indices)
                    self._views()

            def reset(self) -> None:
                self.k = self.v = None
                self.n = self.start = self.end = 0
                super().reset()

        _SLAB_LAYER = SlabLayer
    cache = _new_cache(config)
    cache.layers = [_SLAB_LAYER(rows) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _join_layer(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Add rows (their keys and values) to a cache layer: both sides right-aligned, the shorter padded on the left."""
    if hasattr(layer, "join"):
        layer.join(keys, values)
        return
    if not getattr(layer, "is_initialized", False) or layer.keys is None or layer.keys.numel() == 0:
        layer.update(keys, values)
        return
    width = max(layer.keys.shape[2], keys.shape[2])
    left = torch.nn.functional.pad
    layer.keys = torch.cat([left(x, (0, 0, width - x.shape[2], 0)) for x in (layer.keys, keys)])
    layer.values = torch.cat([left(x, (0, 0, width - x.shape[2], 0)) for x in (layer.values, values)])


def _keep_layer_rows(layer: Any, order: torch.Tensor, dst: torch.Tensor | None, src: torch.Tensor | None) -> None:
    """Keep a cache layer's rows `order` (a slab moves only the rows `src` into `dst`, see `SlabLayer.keep_rows`)."""
    if hasattr(layer, "keep_rows"):
        layer.keep_rows(len(order), dst, src)
    elif getattr(layer, "keys", None) is not None and layer.keys.numel():
        layer.batch_select_indices(order)


def _trim_layer(layer: Any, n: int) -> None:
    """Drop a cache layer's first n columns (padding no row attends to)."""
    if hasattr(layer, "trim"):
        layer.trim(n)
    elif getattr(layer, "keys", None) is not None and layer.keys.numel():
        layer.keys, layer.values = layer.keys[:, :, n:], layer.values[:, :, n:]
