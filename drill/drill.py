"""Kill/restart drill: every long job, killed and restarted, ends with the outputs of an
undisturbed run.

For each job of the registry (`job_registry`): run it once undisturbed (the reference; its duration T), then again
into the same output path killed with SIGKILL (the whole process group) at seeded random moments within T after
interpreter startup, restarted each time until it exits 0, and compare with the reference (drill_compare.py says
how each kind of file is compared and which JSON fields are ignored, and why). Optionally: SIGTERM mid-run (must
stop within a few seconds, exit non-zero, say how to resume, leave no lock or temporary, publish nothing
half-written; then resumed and compared) and a concurrent second run into the same output (must be refused naming
the holder's pid and host; the first run must still finish with identical outputs).

Every run of a job uses the same output path (`WORK/<job>/out`, moved aside after each phase), so files that
record their own path compare byte for byte too. Jobs run single-threaded (OMP/MKL threads 1) so that CPU results
are reproducible run to run; trained weights are then required to be exactly equal (torch.equal), no tolerance.

    python drill/drill.py --kills 3 --seed 1          # all jobs; table + drill/results/drill.json
    python drill/drill.py --jobs distill,gad --kills 1

Reusable: other drills build on `Job`, `job_registry`, `prepare_inputs`, `run_job` and `compare_outputs`
(drill/drill_compare.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # drill_compare, drill_faults, drill_inputs beside this file, however it is loaded
from drill_compare import IGNORED, LOG_NAME, TEMP_NAME, compare_outputs, published_ok, temporaries  # noqa: E402
from drill_faults import corruption_drill, disk_full_drill  # noqa: E402
from drill_inputs import bad_input_drill  # noqa: E402

ROOT = HERE.parent  # the repository: the jobs run there, with it on PYTHONPATH
PHASES = ("kills", "sigterm", "concurrent", "corruption", "disk_full", "bad_input")
RESUME_HINT = "rerun the same command to resume"  # what an interrupted job must print (cli.RESUME_HINT)
LOCK_MESSAGE = "is being written by"              # bayeskd.locks.OutputLockedError


@dataclass(frozen=True)
class Job:
    """One long bayeskd command. `argv(out)` writes everything under the directory `out` (created by the job)."""

    name: str
    argv: Callable[[Path], list[str]]
    # summary fields that describe what one invocation did rather than what the output holds (a resumed run
    # does less); ignored when comparing, with the reason
    invocation_fields: dict[str, str] = field(default_factory=dict)
    lock_at: str = ".bayeskd.lock"  # where under `out` the job's output lock lives while it runs

    def lock(self, out: Path) -> Path:
        return out / self.lock_at


# Summary fields that count what one invocation did, not what the output holds (a resumed run does less).
GENERATE_FIELDS = {k: "what this invocation asked or wrote; records_total counts the output" for k in (
    "requests", "requests_done", "requests_failed", "retries", "records_written", "prompt_tokens",
    "completion_tokens", "empty", "empty_kept", "errors")}
PRIOR_FIELDS = {"reused_model": "whether this invocation found the counted model already there"}
POSTERIOR_FIELDS = {"shards_written": "shards this invocation wrote (shards_done counts the output)",
                    "shards_skipped": "shards this invocation found already done"}
DISTILL_FIELDS = {"train_loss": "the Trainer's mean loss over the steps this invocation ran (a resumed run ran fewer)",
                  "train_tokens": "tokens this invocation trained on",
                  "train_response_tokens": "response tokens this invocation trained on"}
SCORE_FIELDS = {**{k: "what this invocation asked or wrote; records_total counts the output" for k in (
    "requests", "requests_done", "requests_failed", "retries", "records_written", "prompt_tokens", "response_tokens",
    "errors", "skipped")}, "skipped_file": "written by the invocation that met a skip",
    "probe": "a resumed run with nothing left to score asks no probe"}
# on-policy scored training: the scorer and the sampler count what this invocation asked and sampled (the scores of
# a resumed run's earlier steps come from the cache in the output, which is compared by key)
ONPOLICY_FIELDS = {**DISTILL_FIELDS, **{k: "what this invocation's scorer or sampler did" for k in (
    "requests", "retries", "errors", "skipped", "cached", "scored_tokens", "failed", "empty", "sequences",
    "sampled_tokens", "cache_entries")}}
# The server the scoring jobs talk to: the lab teacher, refusing and dropping answers as a flaky API does.
SERVER_FAULTS = dict(fail_rate=0.3, drop_rate=0.1)
TEACHER_NAME = "drill-teacher"
LAB_FIELDS = {**GENERATE_FIELDS, **PRIOR_FIELDS, **POSTERIOR_FIELDS,
              "base_url": "the lab's teacher server listens on a free port chosen by each run",
              "timings": "the lab report's wall-clock seconds per stage"}


def bayeskd_cmd() -> list[str]:
    """The console script beside this interpreter (what users run), else `python -m bayeskd.cli`."""
    script = Path(sys.executable).with_name("bayeskd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bayeskd.cli"]


def job_registry(lab: Path, teacher_url: str = "http://127.0.0.1:9/v1") -> dict[str, Job]:
    """Every long job, reading the artifacts of the lab run `lab` (ROOT/micro: teacher records, tokenizer, models),
    with settings small enough for seconds of work beyond startup; the scoring jobs ask the server at
    `teacher_url` (`teacher_server`)."""
    b, data = bayeskd_cmd(), str(lab / "run" / "teacher_train.jsonl")
    retries = ["--max-retries", "12", "--backoff", "0.05"]
    jobs = [
        Job("generate", lambda out: b + [
            "generate", "--backend", "hf", "--model", str(lab / "teacher"), "--prompts", str(lab / "prompts.jsonl"),
            "--endpoint", "completions", "--n", "2", "--max-tokens", "16", "--top-logprobs", "5", "--quiet",
            "--out", str(out / "teacher.jsonl")],
            GENERATE_FIELDS, "teacher.jsonl.lock"),
        Job("estimate-prior", lambda out: b + [
            "estimate-prior", "--data", data, "--tokenizer", str(lab / "tokenizer"), "--order", "3",
            "--write-topk", "--top-k", "16", "--out", str(out)],
            PRIOR_FIELDS),
        Job("estimate-prior-suffix", lambda out: b + [
            "estimate-prior", "--kind", "suffix", "--data", data, "--tokenizer", str(lab / "tokenizer"), "--order",
            "3", "--write-topk", "--top-k", "16", "--out", str(out)],
            PRIOR_FIELDS),
        Job("estimate-posterior", lambda out: b + [
            "estimate-posterior", "--data", data, "--prior", str(lab / "run" / "prior"), "--proxy",
            str(lab / "proxy"), "--tokenizer", str(lab / "tokenizer"), "--top-k", "16", "--shard-records", "8",
            "--out", str(out)],
            POSTERIOR_FIELDS),
        Job("distill", lambda out: b + [
            "distill", "--data", data, "--student", str(lab / "student"), "--targets", str(lab / "run" / "posterior"),
            "--max-steps", "30", "--per-device-train-batch-size", "4", "--logging-steps", "5", "--save-steps", "5",
            "--out", str(out)], DISTILL_FIELDS),
        Job("score", lambda out: b + [
            "score", "--records", data, "--model", TEACHER_NAME, "--base-url", teacher_url, "--top-logprobs", "5",
            "--concurrency", "4", *retries, "--quiet", "--out", str(out / "scored.jsonl")],
            SCORE_FIELDS, "scored.jsonl.lock"),
        Job("distill-onpolicy", lambda out: b + [
            "distill", "--data", data, "--student", str(lab / "student"), "--targets", str(lab / "run" / "prior" /
                                                                                          "topk"),
            "--proxy", str(lab / "proxy"), "--prior", str(lab / "run" / "prior"), "--teacher-url", teacher_url,
            "--teacher-model", TEACHER_NAME, "--onpolicy-fraction", "1", "--onpolicy-score-top-k", "5",
            "--onpolicy-max-new-tokens", "8", "--max-steps", "12", "--per-device-train-batch-size", "4",
            "--logging-steps", "3", "--save-steps", "3", "--out", str(out)], ONPOLICY_FIELDS),
        Job("align-proxy", lambda out: b + [
            "align-proxy", "--data", data, "--proxy", str(lab / "proxy"), "--rounds", "1", "--max-new-tokens", "8",
            "--batch-size", "8", "--holdout-records", "4", "--out", str(out)]),
        Job("gad", lambda out: b + [
            "gad", "--data", data, "--student", str(lab / "student"), "--steps", "4", "--warmup-steps", "2",
            "--group-size", "2", "--batch-prompts", "2", "--max-new-tokens", "8", "--save-every", "1",
            "--out", str(out)]),
        LAB_JOB,
    ]
    return {j.name: j for j in jobs}


LAB_JOB = Job("lab-run", lambda out: bayeskd_cmd() + ["lab", "run", "--preset", "micro", "--quiet", "--root", str(out)],
              LAB_FIELDS, "micro/run.lock")


def job_env(threads: int = 1) -> dict[str, str]:
    """The environment of every run: offline, and a fixed thread count so reruns compute the same floats."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


def start_job(job: Job, out: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start `job` into `out` in its own process group (so a kill reaches its workers too); output to `log`.*"""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{log}.out", "w") as o, open(f"{log}.err", "w") as e:
        return subprocess.Popen(job.argv(out), env=env, cwd=ROOT, start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=o, stderr=e)


def _logs(log: Path) -> tuple[str, str]:
    return tuple(Path(f"{log}.{s}").read_text(errors="replace") for s in ("out", "err"))  # type: ignore[return-value]


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def run_job(job: Job, out: Path, env: dict[str, str], log: Path | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `job` into `out` to the end; its exit status and output (a CompletedProcess)."""
    log = log or out.parent / "logs" / f"{job.name}-{time.monotonic_ns()}"
    p = start_job(job, out, env, log)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(p)
    stdout, stderr = _logs(log)
    return subprocess.CompletedProcess(job.argv(out), p.returncode, stdout, stderr)


def _check_ok(cp: subprocess.CompletedProcess, what: str) -> None:
    if cp.returncode:
        raise RuntimeError(f"{what} failed (exit {cp.returncode}):\n{cp.stderr[-3000:]}")


def prepare_inputs(work: Path, env: dict[str, str]) -> tuple[Path, float]:
    """Run `lab run --preset micro` once (undisturbed) into WORK/lab-run/out, moved to WORK/lab-run/ref: the inputs
    of every other job and the lab job's own reference. Reused when already there. Returns it and its seconds."""
    ref, done = work / LAB_JOB.name / "ref", work / LAB_JOB.name / "ref.json"
    if not done.exists():
        out = work / LAB_JOB.name / "out"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ref, ignore_errors=True)
        t0 = time.monotonic()
        _check_ok(run_job(LAB_JOB, out, env, work / LAB_JOB.name / "logs" / "ref"), "lab run (inputs)")
        os.replace(out, ref)
        done.write_text(json.dumps({"seconds": time.monotonic() - t0}))
    return ref / "micro", json.loads(done.read_text())["seconds"]


def measure_startup(env: dict[str, str]) -> float:
    """Seconds until the CLI and its heavy imports are loaded: kills are drawn after this."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import bayeskd.cli, torch, transformers"], env=env, check=True)
    return time.monotonic() - t0


# ------------------------------------------------------------------------------------------------ the drill

@dataclass
class Drill:
    """One drill: where it works, its random generator, the environment of the runs and the startup time."""

    work: Path
    rng: np.random.Generator
    env: dict[str, str]
    startup: float
    log: Callable[[str], None] = print

    def _moment(self, seconds: float, frac: float = 1.0) -> float:
        """A moment after startup, within the first `frac` of the work of a `seconds`-long run."""
        lo = min(self.startup, 0.6 * seconds)
        return float(self.rng.uniform(lo, lo + frac * max(seconds - lo, 0.2)))

    def _finish(self, job: Job, out: Path, logs: Path, what: str, tries: int = 3) -> int:
        """Restart `job` until it exits 0; the number of restarts it took."""
        for i in range(tries):
            cp = run_job(job, out, self.env, logs / f"{what}-finish{i}")
            if cp.returncode == 0:
                return i + 1
            self.log(f"  {job.name}: restart {i} after {what} exited {cp.returncode}: {cp.stderr.strip()[-300:]}")
        raise RuntimeError(f"{job.name}: did not finish after {what} in {tries} restarts")

    def _put_aside(self, out: Path, name: str) -> Path:
        dest = out.parent / name
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(out, dest)
        return dest

    def reference(self, job: Job, seconds: float | None = None) -> tuple[Path, float]:
        """The undisturbed run (WORK/<job>/ref) and its duration; reused when `seconds` is given."""
        jd = self.work / job.name
        if seconds is None:
            shutil.rmtree(jd, ignore_errors=True)
            t0 = time.monotonic()
            _check_ok(run_job(job, jd / "out", self.env, jd / "logs" / "ref"), f"{job.name} (undisturbed)")
            seconds = time.monotonic() - t0
            self._put_aside(jd / "out", "ref")
        left = temporaries(jd / "ref")
        if left:
            raise RuntimeError(f"{job.name}: the undisturbed run left {left}")
        return jd / "ref", seconds

    def kills(self, job: Job, ref: Path, seconds: float, n: int) -> dict[str, Any]:
        """SIGKILL the job's process group at `n` random moments, restarting it each time, then finish it."""
        jd, attempts, finished = self.work / job.name, [], False
        out = jd / "out"
        shutil.rmtree(out, ignore_errors=True)
        for i in range(n):
            at = self._moment(seconds)
            p = start_job(job, out, self.env, jd / "logs" / f"kill{i}")
            try:
                p.wait(timeout=at)
                attempts.append({"at_s": round(at, 2), "killed": False, "exit": p.returncode})
                self.log(f"  {job.name}: kill {i} at {at:.2f}s: already exited {p.returncode}")
                if p.returncode == 0:
                    finished = True
                    break
            except subprocess.TimeoutExpired:
                _kill_group(p)
                attempts.append({"at_s": round(at, 2), "killed": True})
                self.log(f"  {job.name}: kill {i}: SIGKILL at {at:.2f}s")
        restarts = 0 if finished else self._finish(job, out, jd / "logs", "kills")
        cmp = compare_outputs(ref, out, set(job.invocation_fields))
        self._put_aside(out, "killed")
        return {"attempts": attempts, "landed": sum(a["killed"] for a in attempts), "final_restarts": restarts,
                **cmp}

    def sigterm(self, job: Job, ref: Path, seconds: float, stop_limit: float = 10.0) -> dict[str, Any]:
        """SIGTERM mid-run: a clean stop within `stop_limit` s with the resume hint, no lock or temporary left,
        nothing unreadable published; then resumed and compared."""
        jd = self.work / job.name
        out = jd / "out"
        shutil.rmtree(out, ignore_errors=True)
        at = self._moment(seconds, frac=0.6)
        p = start_job(job, out, self.env, jd / "logs" / "sigterm")
        try:
            p.wait(timeout=at)
            self.log(f"  {job.name}: SIGTERM at {at:.2f}s: already exited {p.returncode}; not tested")
            res: dict[str, Any] = {"at_s": round(at, 2), "tested": False}
        except subprocess.TimeoutExpired:
            t0 = time.monotonic()
            os.kill(p.pid, signal.SIGTERM)  # to the job only, as `kill PID` or a scheduler does
            try:
                p.wait(timeout=stop_limit)
            except subprocess.TimeoutExpired:
                _kill_group(p)
            within = time.monotonic() - t0
            _, err = _logs(jd / "logs" / "sigterm")
            res = {"at_s": round(at, 2), "tested": True, "stopped_within_s": round(within, 2),
                   "stopped": within < stop_limit, "exit": p.returncode, "message_ok": RESUME_HINT in err,
                   "lock_released": not job.lock(out).exists(), "temporaries_after_stop": temporaries(out),
                   "unreadable_published": published_ok(out)}
            self.log(f"  {job.name}: SIGTERM at {at:.2f}s: stopped in {within:.2f}s, exit {p.returncode}, "
                     f"hint {'printed' if res['message_ok'] else 'MISSING'}")
        res["final_restarts"] = self._finish(job, out, jd / "logs", "sigterm")
        res.update(compare_outputs(ref, out, set(job.invocation_fields)))
        self._put_aside(out, "sigterm")
        return res

    def concurrent(self, job: Job, ref: Path, seconds: float) -> dict[str, Any]:
        """A second run into the output a live run holds must be refused at once, naming the holder; the first
        run finishes with the reference's outputs."""
        jd = self.work / job.name
        out = jd / "out"
        shutil.rmtree(out, ignore_errors=True)
        first = start_job(job, out, self.env, jd / "logs" / "first")
        deadline = time.monotonic() + 2 * seconds + 30
        while not job.lock(out).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if first.poll() is not None:
            res: dict[str, Any] = {"tested": False, "why": "the first run ended before its lock was seen"}
        else:
            # The holder is paused while the second run starts: a second run loads its libraries for seconds before
            # it reaches the lock, and under load a short first run had finished by then ("not reached"). A stopped
            # process is alive and holds its lock, which is what is tested; it goes on afterwards.
            os.kill(first.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                second = run_job(job, out, self.env, jd / "logs" / "second")
                took = time.monotonic() - t0
                holder_alive = first.poll() is None
            finally:
                os.kill(first.pid, signal.SIGCONT)
            named = f"pid {first.pid} on {socket.gethostname()}" in second.stderr
            res = {"tested": holder_alive, "refused": second.returncode != 0 and LOCK_MESSAGE in second.stderr,
                   "names_holder": named, "one_line_error": "Traceback" not in second.stderr, "refused_after_s": round(took, 2), "second_exit": second.returncode,
                   "message": second.stderr.strip().splitlines()[-1][:300] if second.stderr.strip() else ""}
            if not holder_alive:
                res["why"] = "the first run ended before the second checked the lock"
            self.log(f"  {job.name}: concurrent run "
                     f"{'refused' if res['refused'] else 'NOT refused' if holder_alive else 'not reached'} "
                     f"after {took:.2f}s: {res['message']}")
        first.wait()
        res["first_exit"] = first.returncode
        if first.returncode != 0:
            self._finish(job, out, jd / "logs", "concurrent")
        res.update(compare_outputs(ref, out, set(job.invocation_fields)))
        self._put_aside(out, "concurrent")
        return res

    def corruption(self, job: Job, ref: Path, seconds: float) -> dict[str, Any]:
        """A flipped byte, a truncation and a deletion in one file of each kind of the job's output (drill_faults):
        each must be named on the rerun (or recovered from with identical outputs)."""
        out = self.work / job.name / "out"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(ref, out, symlinks=True)
        try:
            cases = corruption_drill(job.argv(out), out, seed=int(self.rng.integers(2**31)), log=self.log)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        bad = [c for c in cases if c["outcome"] not in ("named", "recovered")]
        return {"cases": len(cases), "named": sum(c["outcome"] == "named" for c in cases),
                "recovered": sum(c["outcome"] == "recovered" for c in cases), "failed": bad, "details": cases,
                "survived": not bad, "identical": True, "temporaries_left": [], "data_lost": 0}

    def disk_full(self, job: Job, ref: Path, seconds: float) -> dict[str, Any]:
        """The job with too little space (drill_faults): one-line message, nothing partial published, then resumed
        with space to the outputs of an undisturbed run."""
        res = disk_full_drill(job.argv, self.work / job.name / "disk-full", seed=int(self.rng.integers(2**31)),
                              log=lambda m: None)
        self.log(f"  {job.name}: disk full ({res['mode']}, {res['limit_bytes']} bytes): "
                 f"{'ok' if res['ok'] else 'FAILED'}: {res['message'][:160]}")
        return {**res, "survived": res["ok"], "identical": not res.get("differs"), "temporaries_left":
                res.get("leftovers") or [], "data_lost": 0}

    def bad_input(self, job: Job, ref: Path, seconds: float) -> dict[str, Any]:
        """One bad record in the middle of the job's input (drill_inputs): a one-line error naming file:line."""
        argv = job.argv(self.work / job.name / "out")
        flag = "--prompts" if "--prompts" in argv else "--data" if "--data" in argv else None
        if flag is None:
            return {"tested": False, "survived": True, "identical": True, "temporaries_left": [], "data_lost": 0}
        data = Path(argv[argv.index(flag) + 1])
        run = lambda cmd: subprocess.run(cmd, env=self.env, cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                         timeout=900, stdin=subprocess.DEVNULL)
        cases = bad_input_drill(job.argv, self.work / job.name / "out", data, run, prompts=flag == "--prompts")
        handled = [c["refused"] and c["one_line"] and c["names_file_line"] and not c["published"] for c in cases]
        return {"tested": True, "cases": len(cases), "handled": sum(handled), "details": cases,
                "survived": all(handled), "identical": True, "temporaries_left": [], "data_lost": 0}



def run_drill(work: Path, jobs: list[str] | None = None, kills: int = 3, sigterm: list[str] | None = None,
              concurrent: list[str] | None = None, seed: int | None = None, threads: int = 1,
              log: Callable[[str], None] = print, corrupt: list[str] | None = None,
              disk_full: list[str] | None = None, bad_input: list[str] | None = None) -> dict[str, Any]:
    """The whole drill; `sigterm`/`concurrent`/`disk_full`/`bad_input` name the jobs that also get those checks
    (None: all), `corrupt` too (None: all but lab-run, whose outputs are the other jobs' kinds of file, at 20 s a
    rerun). Returns the report (what `drill.json` holds)."""
    seed = int(np.random.SeedSequence().entropy % 2**32) if seed is None else seed
    log(f"drill seed {seed} (replay with --seed {seed})")
    work.mkdir(parents=True, exist_ok=True)
    env = job_env(threads)
    inputs, lab_seconds = prepare_inputs(work, env)
    names = jobs or list(job_registry(inputs))
    unknown = sorted(set(names) - set(job_registry(inputs)))
    if unknown:
        raise ValueError(f"unknown job(s) {unknown}; known: {sorted(job_registry(inputs))}")
    with teacher_server(inputs, seed) as url:
        return _run_jobs(work, names, job_registry(inputs, url), inputs, lab_seconds, env, seed, kills, threads,
                         log, sigterm, concurrent, corrupt, disk_full, bad_input)


@contextmanager
def teacher_server(lab: Path, seed: int) -> Iterator[str]:
    """The lab teacher served on loopback for the whole drill (stopped at the end, also on error), with
    SERVER_FAULTS drawn from `seed`: the scoring jobs' undisturbed runs meet them too, and their outputs must not
    depend on them."""
    from bayeskd.teachers.server import running_server

    with running_server(str(lab / "teacher"), name=TEACHER_NAME, fault_seed=seed, **SERVER_FAULTS) as url:
        yield url


def _run_jobs(work: Path, names: list[str], registry: dict[str, Job], inputs: Path, lab_seconds: float,
              env: dict[str, str], seed: int, kills: int, threads: int, log: Callable[[str], None],
              sigterm, concurrent, corrupt, disk_full, bad_input) -> dict[str, Any]:
    drill = Drill(work, np.random.default_rng(seed), env, measure_startup(env), log)
    log(f"startup {drill.startup:.2f}s; kills drawn after it")
    report: dict[str, Any] = {"seed": seed, "kills_per_job": kills, "threads": threads, "startup_s": drill.startup,
                              "ignored_fields": IGNORED, "temporary_names": TEMP_NAME.pattern,
                              "logs_not_compared": LOG_NAME.pattern,
                              "weights_tolerance": 0.0, "jobs": {}}
    for name in names:
        job = registry[name]
        log(f"{name}: {' '.join(job.argv(work / name / 'out'))}")
        ref, seconds = drill.reference(job, lab_seconds if name == LAB_JOB.name else None)
        log(f"  {name}: undisturbed {seconds:.1f}s")
        r: dict[str, Any] = {"seconds": round(seconds, 2), "invocation_fields": job.invocation_fields}
        chosen = lambda jobs, default=True: default if jobs is None else name in jobs  # noqa: E731
        for phase, wanted, args in (("kills", True, (kills,)), ("sigterm", chosen(sigterm), ()),
                                    ("concurrent", chosen(concurrent), ()),
                                    ("corruption", chosen(corrupt, name != LAB_JOB.name), ()),
                                    ("disk_full", chosen(disk_full), ()), ("bad_input", chosen(bad_input), ())):
            if wanted:
                try:
                    r[phase] = getattr(drill, phase)(job, ref, seconds, *args)
                except Exception as e:  # noqa: BLE001 - a job that cannot be finished is the finding; go on
                    log(f"  {name}: {phase} FAILED: {e}")
                    r[phase] = {"survived": False, "error": str(e)[-2000:], "identical": False, "tested": True,
                                "attempts": [], "landed": 0, "files_compared": 0, "temporaries_left": [],
                                "data_lost": 0}
        phases = [r[k] for k in PHASES if k in r]
        r["survived"] = all(ph.get("survived", True) for ph in phases)
        r["outputs_identical"] = all(ph["identical"] for ph in phases)
        r["temporaries_left"] = sorted({t for ph in phases for t in ph["temporaries_left"]})
        r["data_lost"] = sum(ph["data_lost"] for ph in phases)
        report["jobs"][name] = r
    return report


def table(report: dict[str, Any]) -> str:
    """The per-job table (markdown)."""
    rows = ["| job | undisturbed s | kills (landed) | SIGTERM stop s / hint | concurrent refused | corruptions named "
            "or recovered | disk full | bad inputs refused | survived | outputs identical (files) | temporaries "
            "left | data lost |", "|" + "---|" * 12]
    for name, r in report["jobs"].items():
        k, st, cc = r["kills"], r.get("sigterm"), r.get("concurrent")
        co, df, bi = r.get("corruption"), r.get("disk_full"), r.get("bad_input")
        cor = "—" if co is None else f"{co.get('named', 0) + co.get('recovered', 0)}/{co.get('cases', 0)}"
        full = "—" if df is None else f"{'ok' if df.get('ok') else 'FAILED'} ({df.get('mode', '?')})"
        bad = "—" if bi is None or not bi.get("tested") else f"{bi['handled']}/{bi['cases']}"
        sig = ("—" if st is None else "not reached" if not st["tested"]
               else f"{st.get('stopped_within_s', 'failed')} / {'yes' if st.get('message_ok') else 'NO'}")
        con = "—" if cc is None else "not reached" if not cc["tested"] else ("yes" if cc.get("refused") else "NO")
        rows.append(f"| {name} | {r['seconds']} | {len(k['attempts'])} ({k['landed']}) | {sig} | {con} | {cor} | "
                    f"{full} | {bad} | "
                    f"{'yes' if r['survived'] else 'NO'} | {'yes' if r['outputs_identical'] else 'NO'} "
                    f"({k['files_compared']}) | {len(r['temporaries_left'])} | {r['data_lost']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "drill", help="work directory (inputs, runs)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "drill.json", help="JSON report")
    ap.add_argument("--jobs", default=None, help="comma-separated jobs (default: all)")
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs per job (default 3)")
    ap.add_argument("--sigterm", default=None, help="jobs that get the SIGTERM check (default: all; 'none')")
    ap.add_argument("--concurrent", default=None, help="jobs that get the concurrent-run check (default: all)")
    ap.add_argument("--corrupt", default=None, help="jobs that get the corruption drill (default: all but lab-run)")
    ap.add_argument("--disk-full", default=None, help="jobs that get the disk-full drill (default: all)")
    ap.add_argument("--bad-input", default=None, help="jobs that get the bad-input drill (default: all)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the kill moments (default: fresh, printed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job run (default 1)")
    a = ap.parse_args(argv)
    names = lambda s: None if s is None else [] if s == "none" else s.split(",")  # noqa: E731
    report = run_drill(a.work, names(a.jobs), a.kills, names(a.sigterm), names(a.concurrent), a.seed, a.threads,
                       corrupt=names(a.corrupt), disk_full=names(a.disk_full), bad_input=names(a.bad_input))
    print(table(report))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {a.out}")
    ok = all(r["survived"] and r["outputs_identical"] and not r["temporaries_left"] and not r["data_lost"]
             for r in report["jobs"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
