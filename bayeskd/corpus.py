"""The embedded corpus: text every Python install carries, so demos, tests and the lab need no downloads.

The source is `pydoc_data.topics` (the language reference topics behind `help("if")`), optionally plus the
docstrings of a fixed list of standard-library modules. The text depends only on the Python version, so the
corpus is deterministic for a given interpreter.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import textwrap
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

from bayeskd.integrity import atomic_write_bytes

SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}

# A minimal role-tagged template. It starts with the BOS token itself, so chat prompts are tokenized without
# the tokenizer's own special tokens (see bayeskd.data.tokenize_records).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Modules whose docstrings may be added; fixed and sorted so the corpus order never depends on import state.
DOCSTRING_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "functools", "heapq", "itertools", "json",
    "logging", "os", "pathlib", "random", "re", "shutil", "statistics", "string", "textwrap", "typing",
)

_UNDERLINE = re.compile(r"^\s*([*=\-~^\"#+])\1{2,}\s*$")  # reST heading underlines: *****, =====, -----
_MIN_CHARS = 40  # shorter paragraphs are mostly headings and captions


def _blocks(text: str) -> list[str]:
    """Split reST-like text into blank-line separated blocks, dropping headings (a line over an underline)."""
    lines = text.splitlines()
    keep: list[str] = []
    for i, line in enumerate(lines):
        if _UNDERLINE.match(line):
            continue
        if i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1]):
            keep.append("")  # the heading itself: a block boundary
            continue
        keep.append(line.rstrip())
    return [b for b in re.split(r"\n\s*\n", "\n".join(keep)) if b.strip()]


def _paragraphs(text: str) -> list[str]:
    """Clean paragraphs: prose is re-flowed onto one line; indented (code/grammar) blocks and tables keep
    their lines (dedented) and are attached to the paragraph before them, which usually introduces them."""
    out: list[str] = []
    for block in _blocks(text):
        lines = block.split("\n")
        # Indented blocks (code, grammar) and grid tables lose their meaning when re-flowed: keep them verbatim.
        if lines[0].startswith(("+-", "+=", "|")) or all(ln.startswith((" ", "\t")) for ln in lines if ln.strip()):
            code = textwrap.dedent(block).strip("\n")
            if out:
                out[-1] = out[-1] + "\n\n" + code
            else:
                out.append(code)
        else:
            out.append(" ".join(" ".join(lines).split()))
    return [p for p in out if len(p) >= _MIN_CHARS]


def _docstrings(module_name: str) -> list[str]:
    """The module's docstring and its public members' docstrings, in name order."""
    try:
        mod = importlib.import_module(module_name)
    except ImportError:  # a stripped-down install may lack a module; the corpus just gets smaller
        return []
    docs = [inspect.getdoc(mod) or ""]
    with warnings.catch_warnings():  # touching deprecated members (typing.io, ...) warns
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in sorted(vars(mod)):
            obj = getattr(mod, name)
            if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue
            docs.append(inspect.getdoc(obj) or "")
    return [d for d in docs if d]


def embedded_corpus(include_docstrings: bool = False) -> list[str]:
    """Paragraph-sized documents from Python's own documentation, in a deterministic order (topics by name).

    Each document is one prose paragraph, with any code block that follows it appended after a blank line.
    """
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    if include_docstrings:
        texts += [d for m in DOCSTRING_MODULES for d in _docstrings(m)]
    return [p for t in texts for p in _paragraphs(t)]


_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+(?=\S)")


def split_prompt_response(doc: str, min_prompt_chars: int = 15) -> tuple[str, str] | None:
    """Split a document into (first sentence or line, rest); None when there is no non-empty rest."""
    cut = None
    for m in _SENTENCE_END.finditer(doc):
        if m.start() >= min_prompt_chars:
            cut = m
            break
    newline = doc.find("\n")
    if newline >= 0 and (cut is None or newline < cut.start()):
        prompt, response = doc[:newline], doc[newline + 1:]
    elif cut is not None:
        prompt, response = doc[:cut.start()], doc[cut.end():]
    else:
        return None
    prompt, response = prompt.strip(), response.strip("\n").rstrip()
    if not prompt or not response.strip():
        return None
    return prompt, response


def embedded_teacher_records(n: int | None = None, seed: int = 0, include_docstrings: bool = False) -> list[dict]:
    """{"prompt", "response"} records made from the embedded corpus: `n` of them (all if None), in an order
    shuffled with `seed`."""
    pairs = [p for p in map(split_prompt_response, embedded_corpus(include_docstrings)) if p is not None]
    order = np.random.default_rng(seed).permutation(len(pairs))
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        order = order[:n]
    return [{"prompt": pairs[i][0], "response": pairs[i][1]} for i in order]


def embedded_teacher_jsonl(path: str | os.PathLike, n: int | None = None, seed: int = 0,
                           include_docstrings: bool = False) -> int:
    """Write the embedded teacher records as JSONL (atomically) so the pipeline runs with no downloads.

    Returns the number of records written (fewer than `n` when the corpus is smaller).
    """
    records = embedded_teacher_records(n, seed, include_docstrings)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    atomic_write_bytes(path, payload)
    return len(records)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
                        model_max_length: int = 2048) -> str:
    """Train a byte-level BPE tokenizer on `texts` and save it as a Hugging Face tokenizer in `out_dir`.

    It has the special tokens <bos>, <eos>, <pad>, <unk>, prepends <bos> to single sequences like Llama-style
    tokenizers do, and carries a simple chat template. Load it with `AutoTokenizer.from_pretrained(out_dir)`.
    Returns `out_dir` as a string.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is below the byte alphabet plus special tokens "
                         f"({len(alphabet) + len(specials)})")
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Every byte is in the initial alphabet, so no text ever maps to <unk>.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **SPECIAL_TOKENS)
    hf.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return str(out_dir)
