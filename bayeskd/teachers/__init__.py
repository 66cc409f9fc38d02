"""Sampling a teacher: the Teacher protocol, the teachers that live in this process, and turning any teacher's
answers into teacher records. base.py (the protocols), hf.py (a local model as a teacher), local.py (the lab's
black-box and white-box teachers), sampling.py (any Teacher -> teacher records), server.py (serve-teacher),
clients.py and generate.py (the `generate` job)."""
from typing import TYPE_CHECKING

from bayeskd._lazy import lazy_exports
from bayeskd.teachers.base import Teacher, TopLogprobsTeacher
from bayeskd.teachers.hf import Generation, HFTeacher, TokenLogprob
from bayeskd.token_bytes import token_bytes_table
from bayeskd.teachers.local import BlackBoxTeacher, WhiteBoxTeacher
from bayeskd.teachers.sampling import sample_records, sample_teacher_jsonl

# the server loads on first use, so importing bayeskd.teachers does not import FastAPI
_LAZY = {"bayeskd.teachers.server": ("create_app", "serve_teacher", "running_server")}
if TYPE_CHECKING:
    from bayeskd.teachers.server import create_app, running_server, serve_teacher

__all__ = ["Teacher", "TopLogprobsTeacher", "BlackBoxTeacher", "WhiteBoxTeacher", "sample_records",
           "sample_teacher_jsonl", "HFTeacher", "Generation", "TokenLogprob", "token_bytes_table", "create_app",
           "serve_teacher", "running_server"]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
