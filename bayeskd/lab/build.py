"""The lab: a teacher with a known distribution, built on one machine from the embedded corpus.

`build_lab` splits `embedded_corpus()` (deterministically) into a teacher part, a related proxy part and
held-out prompts, trains a byte-level BPE tokenizer (or takes a real one, GPT-2's for `tiny-gpt2`:
`bayeskd.lab.real_tokenizers`), trains a small Llama teacher and a proxy with a plain
causal-LM loop, and saves an untrained smaller student initialisation:

    root/<preset>/tokenizer/   the tokenizer (also saved next to every model)
    root/<preset>/teacher/     Llama trained on the teacher part
    root/<preset>/proxy/       Llama trained on the proxy part
    root/<preset>/student/     smaller Llama, initialised only
    root/<preset>/prompts.jsonl  held-out {"prompt", "response"} (the reference text, not teacher samples)
    root/<preset>/lab.json     manifest: the preset config, split sizes, first/last training losses

A sharp preset (`SharpLabPreset`, e.g. `tiny-sharp`) builds (or reuses) its base lab (`tiny`), copies its
tokenizer, proxy, student and prompts, and saves as its teacher the base teacher at a temperature τ < 1
(`bayeskd.lab.teacher`): the same layout, with τ and the measured entropy in lab.json under "sharpen".

The pipeline sees the teacher only through `bayeskd.teachers.local.BlackBoxTeacher` (text in, text out); the
evaluation reads its true distributions through `WhiteBoxTeacher`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from bayeskd.corpus import embedded_corpus, split_prompt_response, train_bpe_tokenizer
from bayeskd.lab.errors import LabError  # noqa: F401  (raised here; imported from here by others)
from bayeskd.integrity import atomic_write_bytes

LAB_VERSION = 2  # 2: held-out prompts share no text with training documents
MANIFEST = "lab.json"



@dataclass(frozen=True)
class ModelSize:
    """The shape of a Llama model; the vocabulary comes from the lab's tokenizer."""

    hidden: int
    intermediate: int
    layers: int
    heads: int

    def llama_config(self, tokenizer, max_positions: int):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=len(tokenizer), hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.heads, max_position_embeddings=max_positions,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)


@dataclass(frozen=True)
class LabPreset:
    """Everything that determines a lab. Two labs with equal presets are identical (same seed, same corpus)."""

    name: str
    vocab_size: int
    teacher: ModelSize
    proxy: ModelSize
    student: ModelSize
    steps: int          # optimizer steps for the teacher and for the proxy
    batch_size: int     # sequences per step
    lr: float
    seq_len: int        # tokens per training sequence
    seed: int = 0
    n_prompts: int = 32  # held-out prompts
    warmup_steps: int = 10
    # "bpe": a byte-level BPE of `vocab_size` trained on the corpus; "gpt2": GPT-2's own (bayeskd.lab.real_tokenizers,
    # `vocab_size` then its size with the lab's special tokens), with Whisper's multilingual one for teacher B.
    tokenizer: str = "bpe"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["tokenizer"] == "bpe":
            del d["tokenizer"]  # the labs built before the field existed keep their manifests' preset
        return d

    def base_preset(self) -> "LabPreset":
        """The lab whose models this one uses: itself (a sharp preset: its base lab's preset)."""
        return self


@dataclass(frozen=True)
class SharpLabPreset(LabPreset):
    """The `base` lab with a sharper teacher: the base teacher at the temperature τ whose mean entropy at the
    teacher-forced positions of the first `entropy_docs` teacher training documents (the first `entropy_len` tokens
    of each) is at most `teacher_entropy_target` nats/token. The other fields must be the base preset's."""

    base: str = "tiny"
    teacher_entropy_target: float = 1.3
    entropy_docs: int = 64
    entropy_len: int = 128

    def __post_init__(self):
        if self.base == self.name:
            raise LabError(f"a sharp lab preset needs a base lab of another name than its own ({self.name!r})")

    def base_preset(self) -> LabPreset:
        return LabPreset(**{**{f.name: getattr(self, f.name) for f in fields(LabPreset)}, "name": self.base})


def sharp_preset(base: LabPreset, target: float = 1.3) -> SharpLabPreset:
    """`base` with its teacher sharpened to a mean entropy of at most `target` nats/token, named `<base>-sharp`."""
    return SharpLabPreset(**{**{f.name: getattr(base, f.name) for f in fields(LabPreset)},
                             "name": f"{base.name}-sharp"}, base=base.name, teacher_entropy_target=target)


PRESETS: dict[str, LabPreset] = {
    # Seconds: for tests and smoke runs. The teacher barely learns, but its loss does drop.
    "micro": LabPreset("micro", vocab_size=512, teacher=ModelSize(32, 64, 1, 4), proxy=ModelSize(32, 64, 1, 4),
                       student=ModelSize(16, 32, 1, 2), steps=50, batch_size=8, lr=3e-3, seq_len=64,
                       n_prompts=16, warmup_steps=5),
    # A few minutes on 2 CPU cores (each of teacher and proxy: 400 steps of 16 x 64 tokens).
    "tiny": LabPreset("tiny", vocab_size=1024, teacher=ModelSize(128, 256, 2, 4), proxy=ModelSize(128, 256, 2, 4),
                      student=ModelSize(64, 128, 1, 4), steps=400, batch_size=16, lr=2e-3, seq_len=64,
                      n_prompts=128, warmup_steps=20),
    # Meant for a GPU (or a long CPU run).
    "small": LabPreset("small", vocab_size=4096, teacher=ModelSize(256, 688, 4, 8), proxy=ModelSize(256, 688, 4, 8),
                       student=ModelSize(128, 344, 2, 4), steps=4000, batch_size=32, lr=6e-4, seq_len=256,
                       n_prompts=256, warmup_steps=200),
    # tiny with GPT-2's real tokenizer (50,256 BPE tokens + the lab's 4 specials); teacher B: Whisper's multilingual.
    "tiny-gpt2": LabPreset("tiny-gpt2", vocab_size=50260, teacher=ModelSize(128, 256, 2, 4),
                           proxy=ModelSize(128, 256, 2, 4), student=ModelSize(64, 128, 1, 4), steps=400, batch_size=16,
                           lr=2e-3, seq_len=64, n_prompts=128, warmup_steps=20, tokenizer="gpt2"),
}
# The same labs with a sharp teacher (real instruction-tuned teachers are far sharper than the lab's ~3.5 nats).
PRESETS.update({f"{name}-sharp": sharp_preset(p) for name, p in list(PRESETS.items())})


def get_preset(preset: str | LabPreset) -> LabPreset:
    if isinstance(preset, LabPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise LabError(f"unknown lab preset {preset!r}; choose one of {sorted(PRESETS)}") from None


def split_corpus(docs: Sequence[str], n_prompts: int, seed: int) -> tuple[list[str], list[str], list[dict]]:
    """(teacher docs, proxy docs, held-out prompt records), deterministic in `seed`.

    The held-out documents are `n_prompts` documents (in a seeded random order) that split into a prompt and a
    response, with distinct prompt texts. Held-out prompts share no text with training ones: every other document
    that opens with a held-out prompt's text (the corpus repeats many first sentences, e.g. "*Names* refer to
    objects.") is left out of both parts, since the teacher is trained on its part and answers the first
    sentences of both. The rest, in corpus order (topics sorted by name, so neighbours are related), alternate
    between the teacher and the proxy: the two parts are disjoint but cover the same topics.
    """
    pairs = [split_prompt_response(d) for d in docs]
    order = np.random.default_rng(seed).permutation(len(docs))
    held: set[int] = set()
    held_prompts: set[str] = set()
    records: list[dict] = []
    for i in order:
        if len(held) >= n_prompts:
            break
        pair = pairs[i]
        if pair is not None and pair[0] not in held_prompts:
            held.add(int(i))
            held_prompts.add(pair[0])
            records.append({"prompt": pair[0], "response": pair[1]})
    if len(held) < n_prompts:
        raise LabError(f"the corpus has only {len(held)} documents with distinct prompts that split into "
                       f"prompt/response, {n_prompts} asked")
    rest = [d for i, d in enumerate(docs)
            if i not in held and (pairs[i] is None or pairs[i][0] not in held_prompts)]
    return rest[0::2], rest[1::2], records


def _token_stream(tokenizer, docs: Iterable[str]):
    """All documents as one 1-D LongTensor: <bos> doc <eos> <bos> doc <eos> ..."""
    import torch

    ids: list[int] = []
    # The backend tokenizer directly: no "longer than model_max_length" warning for long documents; its
    # post-processor prepends <bos>.
    for enc in tokenizer.backend_tokenizer.encode_batch(list(docs)):
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def train_causal_lm(model, stream, preset: LabPreset, seed: int, desc: str, progress: bool = True) -> list[float]:
    """A plain causal-LM loop: random windows of `seq_len` tokens, AdamW, linear warmup then cosine decay.
    Returns the per-step losses."""
    import torch
    from tqdm.auto import tqdm

    if len(stream) <= preset.seq_len + 1:
        raise LabError(f"{desc}: {len(stream)} tokens is too few for seq_len={preset.seq_len}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=0.01, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < preset.warmup_steps:
            return preset.lr * (step + 1) / preset.warmup_steps
        frac = (step - preset.warmup_steps) / max(1, preset.steps - preset.warmup_steps)
        return preset.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    offsets = torch.arange(preset.seq_len + 1)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(preset.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        starts = torch.randint(0, len(stream) - preset.seq_len - 1, (preset.batch_size,), generator=gen)
        batch = stream[starts[:, None] + offsets]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1])
        # labels == inputs: the model shifts them itself. The last target token (batch[:, -1]) is unused.
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def _save_model(model, tokenizer, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))


def _loss_summary(losses: list[float]) -> dict[str, float]:
    k = min(5, len(losses))
    return {"first_loss": losses[0], "last_loss": float(np.mean(losses[-k:])), "steps": len(losses)}


def train_lab_model(size: ModelSize, tokenizer, docs: Sequence[str], preset: LabPreset, seed: int, path: Path,
                    desc: str, progress: bool = True) -> dict[str, Any]:
    """A lab model of `size` (initialised with `seed`) trained on `docs` (with `seed` + 1) and saved with its
    tokenizer at `path`; returns its statistics."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(size.llama_config(tokenizer, max(512, 4 * preset.seq_len)))
    stream = _token_stream(tokenizer, docs)
    losses = train_causal_lm(model, stream, preset, seed=seed + 1, desc=desc, progress=progress)
    _save_model(model, tokenizer, Path(path))
    return {"docs": len(docs), "tokens": int(len(stream)), "params": sum(p.numel() for p in model.parameters()),
            **_loss_summary(losses)}


def make_lab_tokenizer(cfg: LabPreset, texts: Sequence[str], out_dir: str | os.PathLike,
                       root: str | os.PathLike) -> str:
    """Save the lab tokenizer of `cfg` in `out_dir`: a BPE of `vocab_size` trained on `texts`, or a real one
    converted once for every lab under `root` (`bayeskd.lab.real_tokenizers`) with `vocab_size` tokens. Returns
    `out_dir` as a string."""
    if cfg.tokenizer == "bpe":
        return train_bpe_tokenizer(texts, cfg.vocab_size, out_dir)
    from transformers import AutoTokenizer

    from bayeskd.lab.real_tokenizers import REAL_TOKENIZERS, save_real_tokenizer

    if cfg.tokenizer not in REAL_TOKENIZERS:
        raise LabError(f"lab preset {cfg.name!r}: unknown tokenizer {cfg.tokenizer!r}; choose 'bpe' or one of "
                       f"{sorted(REAL_TOKENIZERS)}")
    save_real_tokenizer(REAL_TOKENIZERS[cfg.tokenizer][0], out_dir, root)
    size = len(AutoTokenizer.from_pretrained(str(out_dir)))
    if size != cfg.vocab_size:
        raise LabError(f"lab preset {cfg.name!r}: its {cfg.tokenizer!r} tokenizer has {size} tokens, the preset says "
                       f"vocab_size={cfg.vocab_size}")
    return str(out_dir)


def lab_paths(root: str | os.PathLike, name: str) -> dict[str, str]:
    base = Path(root) / name
    return {"root": str(base), "tokenizer": str(base / "tokenizer"), "teacher": str(base / "teacher"),
            "proxy": str(base / "proxy"), "student": str(base / "student"), "prompts": str(base / "prompts.jsonl"),
            "manifest": str(base / MANIFEST)}


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The lab.json of a built lab (`path` is the lab directory or the manifest itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    return json.loads(path.read_text())


def _built_by_older_version(have: dict[str, Any], want: dict[str, Any], base: Path) -> bool:
    """The same preset built by an older bayeskd (another corpus split): a stale cache, rebuilt with a note."""
    older = have.get("preset") == want["preset"] and (have.get("version") or 0) < LAB_VERSION
    if older:
        print(f"[lab] {base} was built by an older bayeskd (lab version {have.get('version')}, now "
              f"{LAB_VERSION}); rebuilding it")
    return older


def build_lab(root: str | os.PathLike, preset: str | LabPreset = "tiny", force: bool = False,
              progress: bool = True) -> dict[str, str]:
    """Build (or reuse) the lab for `preset` under `root/<preset name>`; returns its paths.

    A lab whose manifest records the same config is reused as is. One built with another config is an error
    unless `force`, which rebuilds it. A directory without a manifest (an interrupted build) is rebuilt.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    cfg = get_preset(preset)
    if isinstance(cfg, SharpLabPreset):
        return _build_sharp_lab(root, cfg, force, progress)
    paths = lab_paths(root, cfg.name)
    base, manifest_path = Path(paths["root"]), Path(paths["manifest"])
    want = {"version": LAB_VERSION, "preset": cfg.to_dict()}
    if manifest_path.exists():
        have = read_manifest(manifest_path)
        if {"version": have.get("version"), "preset": have.get("preset")} == want and not force:
            return paths
        older = _built_by_older_version(have, want, base)
        if not force and not older:
            raise LabError(f"{base} holds a lab built with another config (version {have.get('version')}, "
                           f"preset {have.get('preset')}); pass force=True to rebuild it, or use another root")
    if base.exists():
        if manifest_path.exists():
            manifest_path.unlink()  # an interrupted rebuild must not look complete
        for key in ("tokenizer", "teacher", "proxy", "student"):
            shutil.rmtree(paths[key], ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)

    docs = embedded_corpus()
    teacher_docs, proxy_docs, prompts = split_corpus(docs, cfg.n_prompts, cfg.seed)
    tok = AutoTokenizer.from_pretrained(make_lab_tokenizer(cfg, teacher_docs + proxy_docs, paths["tokenizer"], root))
    max_positions = max(512, 4 * cfg.seq_len)

    stats: dict[str, Any] = {}
    for role, size, part, seed in (("teacher", cfg.teacher, teacher_docs, cfg.seed),
                                   ("proxy", cfg.proxy, proxy_docs, cfg.seed + 1000)):
        stats[role] = train_lab_model(size, tok, part, cfg, seed, Path(paths[role]), f"lab {cfg.name}: {role}",
                                      progress)
    torch.manual_seed(cfg.seed + 2000)
    student = LlamaForCausalLM(cfg.student.llama_config(tok, max_positions))
    _save_model(student, tok, Path(paths["student"]))
    stats["student"] = {"params": sum(p.numel() for p in student.parameters())}

    atomic_write_bytes(Path(paths["prompts"]),
                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in prompts).encode())
    manifest = {**want, "stats": stats, "n_prompts": len(prompts), "corpus_docs": len(docs)}
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())  # written last
    return paths


def _weights_sha256(model_dir: str) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _build_sharp_lab(root: str | os.PathLike, cfg: SharpLabPreset, force: bool, progress: bool) -> dict[str, str]:
    """A sharp lab under `root/<name>`: its base lab's tokenizer, proxy, student and prompts (copied; the base lab
    is built or reused, never retrained here) and the base teacher sharpened (`bayeskd.lab.teacher`). Reused when
    its manifest records the same preset and the same base teacher weights; otherwise an error unless `force`."""
    from bayeskd.lab.teacher import sharpen_teacher

    base_paths = build_lab(root, cfg.base_preset(), progress=progress)
    paths = lab_paths(root, cfg.name)
    base, manifest_path = Path(paths["root"]), Path(paths["manifest"])
    want = {"version": LAB_VERSION, "preset": cfg.to_dict(),
            "base_teacher_sha256": _weights_sha256(base_paths["teacher"])}
    if manifest_path.exists():
        have = read_manifest(manifest_path)
        if {k: have.get(k) for k in want} == want and not force:
            return paths
        older = _built_by_older_version(have, want, base)
        if not force and not older:
            raise LabError(f"{base} holds a sharp lab made with another config or from another {cfg.base!r} teacher; "
                           "pass force=True to remake it, or delete it")
        manifest_path.unlink()
    for key in ("tokenizer", "teacher", "proxy", "student"):
        shutil.rmtree(paths[key], ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    for key in ("tokenizer", "proxy", "student"):
        shutil.copytree(base_paths[key], paths[key])
    shutil.copyfile(base_paths["prompts"], paths["prompts"])
    teacher_docs, _, _ = split_corpus(embedded_corpus(), cfg.n_prompts, cfg.seed)  # training text, not held out
    try:
        sharpen = sharpen_teacher(base_paths["teacher"], paths["teacher"], teacher_docs[:cfg.entropy_docs],
                                  cfg.teacher_entropy_target, max_len=cfg.entropy_len)
    except (ValueError, RuntimeError) as e:
        raise LabError(f"sharpening the {cfg.base!r} teacher for {cfg.name!r}: {e}") from e
    have = read_manifest(base_paths["manifest"])
    manifest = {**want, "sharpen": sharpen, "base_lab": base_paths["root"],
                **{k: have.get(k) for k in ("stats", "n_prompts", "corpus_docs")}}
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())  # written last
    return paths


def load_lab_prompts(path: str | os.PathLike) -> list[dict]:
    """The held-out {"prompt", "response"} records of a lab (`path`: lab directory or prompts.jsonl)."""
    path = Path(path)
    if path.is_dir():
        path = path / "prompts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
