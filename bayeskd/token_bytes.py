"""Tokens as bytes: the exact UTF-8 bytes of every token id of a tokenizer, and a token's name as OpenAI-style APIs
write it (`bytes:\\xNN...` when the bytes are not whole characters) and back. Shared by the teachers (server,
client) and the evidence rows of the posterior.
"""
from __future__ import annotations

import json
from typing import Any


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
