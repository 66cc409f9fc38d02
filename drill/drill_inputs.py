"""Bad-input drill (at the job level): each job reading teacher records or prompts is given a file
with one bad record in the middle; it must stop with a one-line error naming the file and line, write no output,
and (with --skip-bad) skip exactly that record. The property tests (tests/test_garbage_in*.py) cover the readers in
depth; this checks the jobs as users run them.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Callable, Sequence

# one bad line each, placed in the middle of a good file: what a torn or hand-edited JSONL looks like
BAD_LINES: dict[str, bytes] = {
    "torn JSON": b'{"prompt": "half a record", "response": ',
    "response null": json.dumps({"prompt": "p", "response": None}).encode(),
    "wrong types": json.dumps({"prompt": 3, "response": ["a", "b"]}).encode(),
    "invalid UTF-8": b'{"prompt": "p", "response": "\xff\xfe bytes"}',
    "no prompt field": json.dumps({"response": "only a response"}).encode(),
}
PROMPT_BAD_LINES = {k: v for k, v in BAD_LINES.items() if k != "response null"} | {
    "prompt null": json.dumps({"prompt": None}).encode()}


def bad_files(good: Path, work: Path, lines: dict[str, bytes]) -> dict[str, tuple[Path, int]]:
    """Copies of `good` with one bad line inserted in the middle: {case: (path, 1-based line number)}."""
    rows = good.read_bytes().splitlines()
    at = len(rows) // 2
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (case, line) in enumerate(lines.items()):
        path = work / f"bad{i}{good.suffix}"
        path.write_bytes(b"\n".join(rows[:at] + [line] + rows[at:]) + b"\n")
        out[case] = (path, at + 1)
    return out


def bad_input_drill(argv: Callable[[Path], Sequence[str]], out: Path, data: Path, run: Callable[[list[str]],
                    subprocess.CompletedProcess], prompts: bool = False) -> list[dict[str, Any]]:
    """Run the job (`argv(out)`, its --data/--prompts file `data` swapped for a bad copy) once per bad line; each
    case: refused in one line naming file:line, nothing published in `out`."""
    results = []
    for case, (path, line) in bad_files(data, out.parent / "bad-inputs", PROMPT_BAD_LINES if prompts
                                        else BAD_LINES).items():
        cmd = [str(path) if a == str(data) else a for a in argv(out)]
        p = run(cmd)
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        published = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()) if out.exists() else []
        named = f"{path}:{line}" in last or (f"{path.name}" in last and f"line {line}" in last)
        results.append({"case": case, "exit": p.returncode, "refused": p.returncode != 0,
                        "one_line": "Traceback" not in p.stderr, "names_file_line": named,
                        "published": published, "message": last[:300]})
        ok = results[-1]["refused"] and results[-1]["one_line"] and named and not published
        print(f"    bad input {case!r}: {'refused' if ok else 'NOT handled'}: {last[:160]}")
        if out.exists():
            import shutil

            shutil.rmtree(out)
    return results
