"""Sampling a teacher: the Teacher protocol, the teachers that live in this process, and turning any teacher's
answers into teacher records."""
from bayeskd.teachers.base import Teacher, TopLogprobsTeacher
from bayeskd.teachers.local import BlackBoxTeacher, WhiteBoxTeacher
from bayeskd.teachers.sampling import sample_records, sample_teacher_jsonl

__all__ = ["Teacher", "TopLogprobsTeacher", "BlackBoxTeacher", "WhiteBoxTeacher", "sample_records",
           "sample_teacher_jsonl"]
