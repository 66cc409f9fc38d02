"""The Teacher protocol: what the pipeline may ask of a teacher.

A teacher turns prompts into text. That is all a black-box teacher owes; `bayeskd.teachers.sampling` builds
teacher records from it. A teacher that can say more (an API returning top-k log-probabilities with each
token) also offers `top_logprobs`; the posterior treats what it reveals as evidence.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Teacher(Protocol):
    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 1.0,
                 seed: int = 0) -> list[str]:
        """One continuation (text) per prompt, sampled at `temperature` (0: greedy) with `seed`."""


@runtime_checkable
class TopLogprobsTeacher(Teacher, Protocol):
    def top_logprobs(self, prompts: list[str], k: int, max_new_tokens: int = 64, temperature: float = 1.0,
                     seed: int = 0) -> list[dict[str, Any]]:
        """Per prompt: the text and, per generated token, its bytes and the top-`k` (token bytes, log-probability)
        alternatives."""
