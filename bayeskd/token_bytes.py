"""Tokens as bytes: the exact UTF-8 bytes of every token id of a tokenizer, and a token's name as OpenAI-style APIs
write it (`bytes:\\xNN...` when the bytes are not whole characters) and back. Shared by the teachers (server,
client) and the evidence rows of the posterior.
"""
from __future__ import annotations

import json
import re
from typing import Any

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>$")  # SentencePiece's byte-fallback tokens
_ID_OF_BYTES: dict[str, dict[bytes, int]] = {}  # tokenizer fingerprint -> its bytes -> id map


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE writes every byte as one of these characters)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _decoder_types(tokenizer) -> set[str]:
    """The `type`s of a fast tokenizer's decoder (a Sequence counts with its parts); empty for slow ones."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "type" in node:
                found.add(str(node["type"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(backend.to_str()).get("decoder"))
    return found


def token_bytes_table(tokenizer) -> list[bytes]:
    """The exact UTF-8 bytes of every token id (`len(tokenizer)` entries); special tokens are b"".

    Byte-level BPE (GPT-2 style, a ByteLevel decoder): the token string read back through GPT-2's byte map.
    SentencePiece style (byte fallback / Metaspace): `<0xNN>` is that byte and `▁` a space; note that such
    tokenizers drop the first space of a decoded text, which these bytes keep. Anything else:
    `convert_tokens_to_string([token])` in UTF-8. Added tokens that are not special are their content.
    """
    types = _decoder_types(tokenizer)
    if "ByteLevel" in types or (not types and hasattr(tokenizer, "byte_decoder")):
        kind = "bytelevel"
    elif types & {"ByteFallback", "Metaspace"} or (not types and hasattr(tokenizer, "sp_model")):
        kind = "sentencepiece"
    else:
        kind = "generic"
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    added = {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    out: list[bytes] = []
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if tok is None or i in special or (i in added and added[i].special):
            out.append(b"")
        elif i in added:
            out.append(added[i].content.encode("utf-8"))
        elif kind == "bytelevel":
            # A character outside the byte map cannot come out of byte-level BPE; keep it as its UTF-8.
            out.append(b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode("utf-8") for c in tok))
        elif kind == "sentencepiece":
            if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                out.append(bytes([int(tok[3:5], 16)]))
            else:
                out.append(tok.replace("▁", " ").encode("utf-8"))
        else:
            out.append(tokenizer.convert_tokens_to_string([tok]).encode("utf-8"))
    return out


def bytes_to_id(tokenizer, table: list[bytes] | None = None) -> dict[bytes, int]:
    """bytes -> the token id with exactly those bytes (special tokens have none). One byte string with several
    ids (a piece and its `<0xNN>` byte-fallback twin): the id the tokenizer itself gives the text, else the
    smallest that is not a byte piece."""
    table = token_bytes_table(tokenizer) if table is None else table
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in enumerate(table):
        by_bytes.setdefault(b, []).append(i)
    by_bytes.pop(b"", None)
    out = {b: ids[0] for b, ids in by_bytes.items()}
    for b, ids in by_bytes.items():
        if len(ids) > 1:
            enc = tokenizer(b.decode("utf-8", "replace"), add_special_tokens=False)["input_ids"]
            plain = [i for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids)) if not _BYTE_PIECE.match(t)]
            out[b] = enc[0] if len(enc) == 1 and enc[0] in ids else min(plain or ids)
    return out


def cached_bytes_to_id(tokenizer, fingerprint: str | None = None, table: list[bytes] | None = None
                       ) -> dict[bytes, int]:
    """`bytes_to_id` built once per tokenizer (by fingerprint) in this process; do not modify the result. Callers
    that already hold the tokenizer's fingerprint or bytes table pass them."""
    from bayeskd.core.sparse import tokenizer_fingerprint

    fp = fingerprint or tokenizer_fingerprint(tokenizer)
    if fp not in _ID_OF_BYTES:
        _ID_OF_BYTES[fp] = bytes_to_id(tokenizer, table)
    return _ID_OF_BYTES[fp]


def token_display(token_bytes: bytes, fallback: str) -> str:
    """A token's `token` string as OpenAI writes it: its text, or `bytes:\\xNN...` when its bytes are not whole
    UTF-8 characters; `fallback` (the tokenizer's own string) for special tokens, which have no bytes."""
    if not token_bytes:
        return fallback
    try:
        return token_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in token_bytes)


def token_name_bytes(token: str) -> bytes:
    """The bytes of a token named by its text; OpenAI names a token that is not whole UTF-8 `bytes:\\xNN...`."""
    if token.startswith("bytes:"):
        try:
            return token[len("bytes:"):].encode("latin-1").decode("unicode_escape").encode("latin-1")
        except (UnicodeDecodeError, UnicodeEncodeError):
            pass
    return token.encode("utf-8")
