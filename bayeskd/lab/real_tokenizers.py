"""Real tokenizers for the lab: GPT-2's byte-level BPE and Whisper's multilingual one, read offline.

The `openai-whisper` package ships both vocabularies as tiktoken files (`whisper/assets/gpt2.tiktoken`,
`multilingual.tiktoken`: one base64 token and its rank per line), so a lab can use them with no download. Each is
converted once into a Hugging Face fast tokenizer (what every lab model loads with `AutoTokenizer.from_pretrained`):

- vocabulary: token id = tiktoken rank, every byte written in GPT-2's byte-to-unicode alphabet;
- merges: for each token of two or more bytes, the two tokens BPE forms it from, i.e. the parts BPE makes of its
  bytes with only the lower ranks (a token that does not come out as two parts gets no merge: tiktoken only ever
  returns it whole, as does the BPE model with `ignore_merges`);
- pre-tokenizer: the regex Whisper's `get_encoding` gives tiktoken (GPT-2's pattern, for both files);
- the lab's special tokens (`bayeskd.corpus.SPECIAL_TOKENS`) after the ranks, a <bos>-prepending post-processor
  and the lab's chat template, as `bayeskd.corpus.train_bpe_tokenizer` makes them.

Each conversion is checked against tiktoken itself (the same ids on the embedded corpus and on probe texts) and
cached under `<labs root>/_tokenizers/<asset>-<sha256 prefix>-v<CONVERTER_VERSION>/`.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from bayeskd.lab.errors import LabError

CONVERTER_VERSION = 1
CACHE_DIR = "_tokenizers"  # under the labs' root, next to the lab directories
EXTRA_HINT = "pip install -e '.[lab-real]'"
# A lab's tokenizer name -> (its asset, teacher B's asset): teacher B needs another tokenizer (bayeskd.lab.cross).
REAL_TOKENIZERS: dict[str, tuple[str, str]] = {"gpt2": ("gpt2", "multilingual")}
# The pre-tokenizer pattern of both assets (whisper/tokenizer.py `get_encoding`: one `pat_str` for every file).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Beyond the corpus: runs of whitespace and of repeated characters (where merge order matters most), digits,
# contractions and scripts GPT-2's merges barely cover.
PROBE_TEXTS = (
    "Hello, world! It's 2024; they'll've 3.14159 and 1,000,000 items.",
    "def f(x):\n\tif x  >=  10:\n        return x ** 2\n\n\n    return None   \n",
    "naïve café — “quotes” ½ € 日本語のテキスト 한국어 Ελληνικά русский текст 🙂👍🏽",
    "aaaaaaaaaaaaaaaaaaaaaaa ======================== ---------- ........ 000000000000 11111",
    "   leading spaces and trailing   \r\n\r\n\u00a0non-breaking\u2009thin\u3000ideographic",
)


def tokenizer_asset(asset: str) -> Path:
    """The path of `whisper/assets/<asset>.tiktoken`; a `LabError` naming the extra when openai-whisper or
    tiktoken is not installed (whisper is located, not imported: importing it loads torch)."""
    try:
        import tiktoken  # noqa: F401  (the reference the conversion is checked against)
        spec = importlib.util.find_spec("whisper")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LabError(f"a lab with GPT-2's or Whisper's tokenizer (preset tiny-gpt2) needs the tokenizer files of "
                       f"openai-whisper, checked with tiktoken: {EXTRA_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "assets" / f"{asset}.tiktoken"
    if not path.is_file():
        raise LabError(f"{path}: no such tokenizer file in the installed openai-whisper "
                       f"(known: {sorted({a for pair in REAL_TOKENIZERS.values() for a in pair})})")
    return path


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """A .tiktoken file as {token bytes: rank}. Empty tokens are left out: tiktoken never returns one (Whisper's
    multilingual file lists b"" as its last rank)."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)  # not validated: Whisper writes b"" as "="
        except ValueError as e:
            raise LabError(f"{path}, line {n}: not '<base64 token> <rank>' ({e})") from None
    ranks.pop(b"", None)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise LabError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def _parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE on `token`'s bytes with the merges of rank < `max_rank`: the lowest-ranked pair first (tiktoken's rule)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, at = max_rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], max_rank)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges in rank order: for each token of two or more bytes, the two parts BPE with the lower ranks
    makes of it. Tokens that do not come out as exactly two parts get none."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = _parts(ranks, token, rank)
            if len(parts) == 2:
                merges.append((parts[0], parts[1]))
    return merges


def convert_tiktoken(path: str | os.PathLike, model_max_length: int = 2048):
    """A `PreTrainedTokenizerFast` with the ids of the .tiktoken file at `path` and the lab's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from bayeskd.corpus import CHAT_TEMPLATE, SPECIAL_TOKENS
    from bayeskd.token_bytes import _bytes_to_unicode

    ranks = read_tiktoken_ranks(path)
    to_unicode = _bytes_to_unicode()

    def name(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    vocab = {name(t): r for t, r in ranks.items()}
    merges = [(name(a), name(b)) for a, b in recover_merges(ranks)]
    # ignore_merges: a pre-token that is itself a token is that token, as tiktoken looks pieces up whole first.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))  # ids len(ranks)...: tiktoken's ids stay as they are
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **SPECIAL_TOKENS)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tiktoken_reference(asset: str):
    """tiktoken's own encoder for `asset`, as Whisper builds it (its ranks, pattern and special tokens)."""
    tokenizer_asset(asset)  # the extra's error, before importing whisper
    from whisper.tokenizer import get_encoding

    return get_encoding(asset)


def check_against_tiktoken(tokenizer, asset: str, texts: list[str]) -> None:
    """Raise `LabError` at the first text the converted tokenizer encodes to other ids than tiktoken, or does not
    decode back."""
    ref = tiktoken_reference(asset)
    want = ref.encode_ordinary_batch(texts)
    got = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    for text, w, g in zip(texts, want, got):
        if w != g or tokenizer.decode(g) != text:
            at = next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), min(len(w), len(g)))
            raise LabError(f"the {asset!r} tokenizer converted from tiktoken does not match it on {text[:60]!r}: "
                           f"ids {g[at:at + 5]} where tiktoken has {w[at:at + 5]} (token {at})")


def real_tokenizer(asset: str, cache_root: str | os.PathLike) -> str:
    """The directory of `asset` converted into a Hugging Face tokenizer (checked against tiktoken), made once under
    `cache_root` and reused: the cache names the file's hash and the converter's version."""
    from bayeskd.corpus import embedded_corpus

    path = tokenizer_asset(asset)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    out = Path(cache_root) / f"{asset}-{digest}-v{CONVERTER_VERSION}"
    if (out / "tokenizer.json").exists():
        return str(out)
    hf = convert_tiktoken(path)
    check_against_tiktoken(hf, asset, [*PROBE_TEXTS, *embedded_corpus()])
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(str(tmp))
    try:
        tmp.rename(out)  # complete or absent: a concurrent build may have renamed its own copy first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "tokenizer.json").exists():
            raise
    return str(out)


def save_real_tokenizer(asset: str, out_dir: str | os.PathLike, root: str | os.PathLike) -> str:
    """Copy the converted `asset` tokenizer to `out_dir`; returns `out_dir` as a string. `root`: the directory of
    the labs (`build_lab`'s), whose `CACHE_DIR` keeps the conversions (`real_tokenizer`) for all of them."""
    shutil.copytree(real_tokenizer(asset, Path(root) / CACHE_DIR), out_dir, dirs_exist_ok=True)
    return str(out_dir)
