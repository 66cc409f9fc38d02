"""Teachers that live in this process: the lab's teacher seen as a black box (text in, text out, like an
API) and, for evaluation only, the same model's true distributions.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from bayeskd.teacher_forcing import model_logits


def _load(path: str | os.PathLike):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    model.eval()
    return model, tok


class BlackBoxTeacher:
    """The lab teacher as the pipeline sees a real API teacher: text in, text out, nothing else.

    The model lives only inside a closure; no attribute of the object holds a module or a tensor.
    """

    def __init__(self, path: str | os.PathLike):
        model, tok = _load(path)
        tok.padding_side = "left"

        def _generate(prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
            if not prompts:
                return []
            enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=True)
            kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id,
                                      "eos_token_id": tok.eos_token_id}
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
            else:
                kwargs.update(do_sample=False)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed)
                out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1]:]
            return [str(s) for s in tok.batch_decode(new, skip_special_tokens=True)]

        self.__generate = _generate
        self.path = str(path)

    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 1.0,
                 seed: int = 0) -> list[str]:
        """Continuations of `prompts` (text only), sampled at `temperature` (0: greedy) with `seed`."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        return self.__generate(list(prompts), int(max_new_tokens), float(temperature), int(seed))

    def __repr__(self) -> str:
        return f"BlackBoxTeacher({self.path!r})"


class WhiteBoxTeacher:
    """The lab teacher's true distributions, for evaluation only (never hand this to the pipeline)."""

    def __init__(self, path: str | os.PathLike):
        self.model, self.tokenizer = _load(path)
        self.path = str(path)

    def logprobs(self, input_ids, attention_mask=None):
        """[B, T, V] float32 log-softmax rows: row t is the distribution of token t+1 given tokens ≤ t."""
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        with torch.no_grad():
            logits = model_logits(self.model, input_ids, attention_mask)
        return torch.log_softmax(logits.float(), dim=-1)
