"""Sampling a teacher: the Teacher protocol, the teachers that live in this process, and turning any teacher's
answers into teacher records."""
from bayeskd.teachers.base import Teacher, TopLogprobsTeacher
from bayeskd.teachers.hf import Generation, HFTeacher, TokenLogprob
from bayeskd.token_bytes import token_bytes_table
from bayeskd.teachers.local import BlackBoxTeacher, WhiteBoxTeacher
from bayeskd.teachers.sampling import sample_records, sample_teacher_jsonl

__all__ = ["Teacher", "TopLogprobsTeacher", "BlackBoxTeacher", "WhiteBoxTeacher", "sample_records",
           "sample_teacher_jsonl"]
__all__ += ["HFTeacher", "Generation", "TokenLogprob", "token_bytes_table", "create_app", "serve_teacher",
            "running_server"]

_SERVER_NAMES = ("create_app", "serve_teacher", "running_server")


def __getattr__(name: str):
    # The server's names load on first use, so importing bayeskd.teachers does not import FastAPI.
    if name in _SERVER_NAMES:
        from bayeskd.teachers import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
