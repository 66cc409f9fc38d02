"""The `bayeskd` command line: parse and validate, then call one library function."""
from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterator

import click

from bayeskd.cli_config import (TRAINING_LIMITS, ConfigCommand, codec_option, config_option, config_options,
                                given, max_records_option, skip_bad_option)
from bayeskd.core.names import EVIDENCE_MODES, MODES





RESUME_HINT = "interrupted: stopped before finishing; rerun the same command to resume"


@contextmanager
def _stop_cleanly() -> Iterator[None]:
    """SIGTERM (`kill`, a scheduler's stop) stops a job like Ctrl-C: KeyboardInterrupt unwinds through every
    `finally` (atomic writes drop their temporaries, the output lock is released), then exit 130 saying how to
    resume. Installed only around a job, so an in-process caller's own SIGTERM handling is left as it was."""
    import os
    import signal
    import threading

    def _interrupt(signum, frame):
        # Raised inside a finalizer (__del__, e.g. an event loop's), the exception would be printed and dropped and
        # the job would go on (the drill saw it): deliver the signal again a moment later instead.
        while frame is not None:
            if frame.f_code.co_name == "__del__":
                again = threading.Timer(0.05, os.kill, (os.getpid(), signum))
                again.daemon = True
                again.start()
                return
            frame = frame.f_back
        raise KeyboardInterrupt(f"signal {signum}")

    main_thread = threading.current_thread() is threading.main_thread()  # signal() works there only
    old = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        yield
    except KeyboardInterrupt:
        click.echo(RESUME_HINT, err=True)
        raise SystemExit(130) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)


class _Job(click.Command):
    """A long job: SIGTERM/Ctrl-C from its start (the library's imports included) stop it cleanly (`_stop_cleanly`)."""

    def invoke(self, ctx: click.Context):
        with _stop_cleanly():
            return super().invoke(ctx)


class ConfigJob(_Job, ConfigCommand):
    """A long job whose options come from its config dataclass."""


def _run_job(job, drop: tuple[str, ...] = (), **kwargs) -> None:
    """Call the library function behind a command; bad input becomes a one-line error, the summary is printed."""
    from bayeskd.data import DataError
    from bayeskd.locks import OutputLockedError

    try:
        summary = job(**kwargs)
    except (DataError, FileNotFoundError, ValueError, OutputLockedError) as e:
        raise click.ClickException(str(e)) from e
    except Exception as e:  # a full disk: one line, whichever library's write failed (others: the traceback)
        _raise_if_disk_full(e, kwargs.get("out"))
        raise
    click.echo(json.dumps({k: v for k, v in summary.items() if k not in drop}, indent=2))


def _raise_if_disk_full(e: BaseException, out: str | None) -> None:
    """ENOSPC/EFBIG (or a library's word for it) as a one-line error saying how to resume; the job's atomic
    writes have already dropped their temporaries and its lock is released by then."""
    from bayeskd.integrity import disk_full_message

    message = disk_full_message(e, out)
    if message is not None:
        raise click.ClickException(message) from e


def _end_distributed() -> None:
    """Under torchrun, tear the process group down before exit: gloo's threads can abort the process
    ("terminate called without an active exception") when it is left to the interpreter's shutdown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _Main(click.Group):
    """The command group: the SIGTERM handling covers a subcommand's parsing too, where a command whose options come
    from its config (`ConfigCommand`) imports its job's module (transformers: seconds)."""

    def invoke(self, ctx: click.Context):
        with _stop_cleanly():
            return super().invoke(ctx)


@click.group(cls=_Main)
@click.version_option(package_name="bayeskd")
def main() -> None:
    """Estimate a black-box teacher's token distributions and distill students from them."""


@main.command("generate", cls=_Job)
@config_option
@click.option("--prompts", required=True, help="Prompts: JSONL, Parquet or a saved HF dataset with 'prompt' or chat "
              "'messages' (and an optional 'id').")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Teacher records (JSONL), appended as they complete; OUT's .summary.json, .failed.jsonl and "
              ".empty.jsonl beside it.")
@click.option("--model", required=True, help="The teacher's model name at the API (or a local path with --backend hf).")
@click.option("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
              "(default: OpenAI's).")
@click.option("--backend", default="openai", show_default=True, type=click.Choice(["openai", "hf"]),
              help="openai: any OpenAI-compatible API; hf: a local transformers model (--model PATH).")
@click.option("--endpoint", default="chat", show_default=True, type=click.Choice(["chat", "completions"]))
@click.option("--n", default=1, show_default=True, type=click.IntRange(1), help="Samples per prompt.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int, help="Each request's seed derives from it.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--system", default=None, help="System message put before each prompt.")
@click.option("--top-logprobs", default=0, show_default=True, type=click.IntRange(0),
              help="Top-k log-probabilities per generated token (0: text only; OpenAI allows at most 20).")
@click.option("--teacher-tokenizer", default=None, metavar="PATH_OR_HF_NAME",
              help="The teacher's tokenizer, for APIs that do not report it: its fingerprint goes into the records, "
              "so a student with this tokenizer keeps the teacher's tokens and uses its log-probabilities exactly "
              "(records without one: unknown tokenizer, re-tokenized, lower bounds). serve-teacher reports its own.")
@click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the API key (the key is never written anywhere).")
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1))
@click.option("--requests-per-minute", default=None, type=click.FloatRange(0, min_open=True))
@click.option("--tokens-per-minute", default=None, type=click.FloatRange(0, min_open=True))
@click.option("--max-retries", default=6, show_default=True, type=click.IntRange(0))
@click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds per request.")
@click.option("--ordered", is_flag=True, help="Rewrite the output in input order at the end (default: completion "
              "order; every record carries its key).")
@click.option("--keep-empty", is_flag=True, help="Keep blank answers (whitespace only, or the teacher ending at once) "
              "in the output: they are samples of the teacher too (default: set apart in OUT.empty.jsonl).")
@click.option("--max-prompts", default=None, type=click.IntRange(1), help="Use only the first N prompts.")
@click.option("--device", default=None, help="torch device for --backend hf.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@skip_bad_option
def generate_cmd(stop, quiet, **kwargs) -> None:
    """Sample a teacher (an OpenAI-compatible API or a local model) into teacher records, resumably, once each."""
    from bayeskd.teachers.generate import GenerateError, generate

    try:
        _run_job(generate, drop=("settings",), stop=list(stop) or None, progress=not quiet, **kwargs)
    except GenerateError as e:
        raise click.ClickException(str(e)) from e


@main.command("serve-teacher")
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False),
              help="A local causal LM (from_pretrained directory with its tokenizer).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--name", default=None, help="Model name clients ask for (default: the model path's basename).")
@click.option("--fail-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Fault drill: answer this share of requests with 429 (Retry-After: 0) and 500 in turn.")
@click.option("--drop-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Fault drill: close the connection halfway through this share of answers.")
@click.option("--delay", default=0.0, show_default=True, type=click.FloatRange(0), help="Seconds before answering.")
@click.option("--fault-seed", default=0, show_default=True, type=int, help="Seed of the injected faults.")
@click.option("--max-n", default=16, show_default=True, type=click.IntRange(1), help="Largest n a request may ask.")
@click.option("--device", default=None, help="torch device (default: cuda when available).")
@click.option("--api-key-env", default=None, help="Require the API key held in this environment variable "
              "(Bearer token; 401 otherwise). Default: no key.")
def serve_teacher_cmd(model, fail_rate, drop_rate, fault_seed, max_n, api_key_env, **kwargs) -> None:
    """Serve a local causal LM as an OpenAI-compatible API (/v1/chat/completions, /v1/completions with logprobs
    and token bytes) until interrupted."""
    import os

    from bayeskd.teachers.server import serve_teacher

    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise click.BadParameter(f"the environment variable {api_key_env} is not set", param_hint="--api-key-env")
    serve_teacher(model, fail_rate=fail_rate, drop_rate=drop_rate, fault_seed=fault_seed, max_n=max_n,
                  api_key=api_key, **kwargs)


@main.command("estimate-prior", cls=_Job)
@config_option
@click.option("--data", default=None, help="Teacher generations: JSONL, Parquet or a saved HF dataset. "
              "Default: the embedded corpus (Python's own documentation).")
@click.option("--tokenizer", default=None, help="Student tokenizer (path or hub id). Default: a BPE tokenizer "
              "trained on the embedded corpus.")
@click.option("--kind", default="ngram", show_default=True, type=click.Choice(["ngram", "suffix"]),
              help="ngram: an order-N n-gram; suffix: unbounded context (prompt included) from a suffix array of "
              "the teacher's text, backing off to that n-gram.")
@click.option("--order", default=4, show_default=True, type=click.IntRange(1, 8))
@click.option("--max-levels", default=4, show_default=True, type=click.IntRange(1),
              help="--kind suffix: context levels (distinct occurrence counts) interpolated above the n-gram.")
@click.option("--max-support", default=1024, show_default=True, type=click.IntRange(1),
              help="--kind suffix: occurrences read per level (more: evenly spaced ones, as infini-gram does).")
@click.option("--beta", default=None, type=click.FloatRange(min=0, min_open=True),
              help="--kind suffix: trust in a level's count against its variety (Witten-Bell: 1). Default: chosen "
              "by the leave-one-out likelihood of the teacher's own tokens.")
@click.option("--smoothing", default="kneser_ney", show_default=True,
              type=click.Choice(["kneser_ney", "witten_bell", "dirichlet", "mle"]))
@click.option("--alpha", default=1.0, show_default=True, type=float, help="Dirichlet concentration.")
@click.option("--top-k", "top_k", default=64, show_default=True, type=click.IntRange(1),
              help="Entries per position in the written prior shards.")
@click.option("--write-topk/--no-write-topk", default=False, show_default=True,
              help="Also write the per-position top-K prior (leave-one-out) as SparseDist shards.")
@click.option("--leave-one-out/--no-leave-one-out", default=True, show_default=True)
@codec_option
@click.option("--num-proc", default=1, show_default=True, type=click.IntRange(1), help="Parallel counting processes.")
@skip_bad_option
@max_records_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
def estimate_prior_cmd(**kwargs) -> None:
    """Count the teacher's text into a smoothed prior (and optionally its top-K shards)."""
    from bayeskd.priors.estimate import estimate_prior

    _run_job(estimate_prior, **kwargs)


@main.command("estimate-posterior", cls=_Job)
@config_option
@click.option("--data", default=None, help="Teacher generations (default: the data named in the prior's summary.json).")
@click.option("--prior", "prior_dir", default=None, type=click.Path(file_okay=False),
              help="An estimate-prior output directory (or a saved NGramPrior directory); 'none' or omitted: "
              "proxy-only targets (the proxy's own top-K rows; then --data is needed).")
@click.option("--proxy", required=True, help="Proxy causal LM (path or hub id) sharing the student tokenizer.")
@click.option("--tokenizer", default=None, help="Student tokenizer (default: the one named in the prior's summary.json).")
@click.option("--top-k", "top_k", default=64, show_default=True, type=click.IntRange(1))
@click.option("--proxy-top-k", "proxy_top_k", default=None, type=click.IntRange(1),
              help="Proxy entries per position before combining (default: --top-k).")
@click.option("--mode", default=None, type=click.Choice(list(MODES)),
              help="How prior and proxy combine (default: chosen by calibration, else log_linear). Giving it or "
              "--a/--b/--c/--w turns the default calibration off.")
@click.option("--a", default=None, type=float, help="Log-linear prior exponent (default 1).")
@click.option("--b", default=None, type=float, help="Log-linear proxy exponent (default 1).")
@click.option("--c", default=None, type=float, help="Dirichlet concentration of the proxy (default 1).")
@click.option("--w", default=None, type=float, help="Mixture weight of the prior (default 0.5).")
@click.option("--evidence", default=0.0, show_default=True, type=float,
              help="Observations added for the teacher's own token.")
@click.option("--no-evidence", is_flag=True, help="Ignore the teacher's top-k log-probabilities in the data (by "
              "default the posterior is conditioned on them wherever the records carry them).")
@click.option("--evidence-top-k", default=None, type=click.IntRange(1),
              help="Use only the k most likely revealed entries per position.")
@click.option("--evidence-mode", default="condition", show_default=True,
              type=click.Choice(list(EVIDENCE_MODES)),
              help="condition: revealed entries exact, prior x proxy spreads the rest (capped); evidence_only: "
              "the baselines' targets (revealed entries and a uniform tail).")
@click.option("--calibrate/--no-calibrate", default=None,
              help="Choose --mode and its weights by the likelihood of the teacher's own tokens (prior leave-one-out, "
              "proxy on records it was not trained on: an aligned proxy's held-out slice). Default: on with a prior "
              "unless --mode/--a/--b/--c/--w are given; --calibrate with them is refused; --no-calibrate uses "
              "them (or log_linear a=b=1).")
@click.option("--calibration-records", default=256, show_default=True, type=click.IntRange(1),
              help="At most this many records are scored by the calibration.")
@click.option("--calibrate-on-training-records", is_flag=True,
              help="Calibrate even on records the proxy was trained on (it then looks better than it is); without "
              "it, a proxy aligned on all these records is refused.")
@click.option("--leave-one-out/--no-leave-one-out", default=True, show_default=True)
@click.option("--teacher-logprob/--no-teacher-logprob", "teacher_logprob", default=None,
              help="Store the proxy's log-probability of each teacher token (shard extra proxy_teacher_logprob). "
              "Default: on for proxy-only targets, off with a prior.")
@click.option("--batch-size", "batch_size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--shard-records", "shard_records", default=256, show_default=True, type=click.IntRange(1),
              help="Whole records per output shard.")
@codec_option
@click.option("--samples", default=None, type=click.IntRange(1),
              help="Sampled targets: per position, the --keep-top largest entries exactly plus this many draws from "
              "the rest of the top-K posterior and its tail (unbiased for the full forward-KL gradient; "
              "docs/MATH.md). Default: top-K targets.")
@click.option("--keep-top", default=0, show_default=True, type=click.IntRange(0),
              help="With --samples: entries kept exactly before sampling the rest.")
@click.option("--sample-seed", default=0, show_default=True, type=int, help="With --samples: the draws' seed.")
@click.option("--sliding-window", is_flag=True,
              help="Read records longer than the proxy's context in windows of it, half a window apart (every "
              "position keeps at least half the context); without it such records are refused by name.")
@skip_bad_option
@max_records_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
def estimate_posterior_cmd(**kwargs) -> None:
    """Combine the n-gram prior with a proxy LM into per-position top-K posterior shards (resumable)."""
    from bayeskd.posterior.estimate import estimate_posterior

    _run_job(estimate_posterior, **kwargs)


def _distill_options() -> list[click.Option]:
    from bayeskd.distillation.trainer import BayesKDConfig

    return config_options(BayesKDConfig, skip=("output_dir",), extra=TRAINING_LIMITS)


@main.command("distill", cls=ConfigJob, make_options=_distill_options)
@config_option
@click.option("--data", required=True, help="Teacher generations (JSONL, Parquet or a saved HF dataset).")
@click.option("--student", required=True, help="Student model (path or hub id) to start from.")
@click.option("--targets", default=None, help="Sparse target shard directory (from estimate-posterior or "
              "estimate-prior --write-topk); 'none' or omitted: SFT on the teacher text.")
@click.option("--teacher", default=None, help="White-box teacher model (readable logits, e.g. the lab's): "
              "ordinary logit KD from its top-K.")
@click.option("--proxy", default=None, help="Online posterior: a proxy model run inside each training step; "
              "--targets must then hold the prior's top-K shards (estimate-prior --write-topk).")
@click.option("--tokenizer", default=None, help="Tokenizer (default: the student's).")
@click.option("--out", "--output-dir", "out", required=True, type=click.Path(file_okay=False),
              help="Output directory: the student, its checkpoints, summary.json.")
@skip_bad_option
@click.pass_context
def distill_cmd(ctx, data, student, targets, teacher, proxy, tokenizer, out, skip_bad, **training_args) -> None:
    """Train a student on the teacher's text and the estimated (or white-box) token distributions. Every
    `BayesKDConfig` field is an option: the loss settings, the LoRA adapter, and every transformers
    `TrainingArguments` field (bf16, gradient checkpointing, DeepSpeed/FSDP configs, report_to, push_to_hub, the
    scheduler and warm-up, ...)."""
    from bayeskd.distillation.trainer import distill

    try:
        _run_job(distill, drop=("log_history",), data=data, student=student, out=out, targets=targets,
                 teacher=teacher, proxy=proxy, tokenizer=tokenizer, skip_bad=skip_bad,
                 **given(ctx, training_args))
    finally:
        _end_distributed()


@main.command("align-proxy", cls=_Job)
@config_option
@click.option("--data", required=True, help="Teacher generations (JSONL, Parquet or a saved HF dataset).")
@click.option("--proxy", required=True, help="Proxy causal LM (path or hub id) to align.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory: sft/, round_<i>/, final/ (the aligned proxy), summary.json.")
@click.option("--tokenizer", default=None, help="Tokenizer (default: the proxy's).")
@click.option("--sft-epochs", default=1.0, show_default=True, type=click.FloatRange(0),
              help="Epochs of SFT on the teacher responses first (0: none).")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(0),
              help="Preference rounds (teacher response preferred over the proxy's own sample).")
@click.option("--beta", default=0.1, show_default=True, type=click.FloatRange(0, min_open=True), help="DPO β.")
@click.option("--nll-weight", default=1.0, show_default=True, type=click.FloatRange(0),
              help="Weight of the per-token NLL of the teacher response added to the DPO loss.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(0),
              help="Sampling temperature of the proxy's responses (0: greedy).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--sft-learning-rate", default=2e-5, show_default=True, type=float)
@click.option("--learning-rate", default=1e-6, show_default=True, type=float, help="DPO learning rate.")
@click.option("--dpo-epochs", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Epochs over the pairs per round.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--max-length", default=None, type=click.IntRange(2))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--logging-steps", default=10, show_default=True, type=click.IntRange(1))
@click.option("--diagnostic-records", default=256, show_default=True, type=click.IntRange(1),
              help="Records scored by the alignment diagnostics (top-1 match, top-K mass).")
@click.option("--holdout-records", default=None, type=click.IntRange(0),
              help="Records no stage trains on (a seeded random slice), for estimate-posterior's calibration "
              "(default: 10% of the records, at most 256; 0: none).")
@skip_bad_option
def align_proxy_cmd(**kwargs) -> None:
    """Align a proxy to the black-box teacher: SFT on its responses, then rounds of preference optimisation
    (resumable; Proxy-KD)."""
    from bayeskd.distillation.align_proxy import align_proxy

    _run_job(align_proxy, drop=("stages", "config", "diagnostics_before", "diagnostics_after", "training"),
             **kwargs)


@main.group("lab")
def lab_group() -> None:
    """The lab: a teacher whose true distributions are readable, built from Python's own documentation."""


@lab_group.command("run", cls=_Job)
@config_option
@click.option("--preset", default="tiny", show_default=True,
              type=click.Choice(["micro", "tiny", "small", "micro-sharp", "tiny-sharp", "small-sharp"]),
              help="micro: seconds (smoke test); tiny: minutes on a laptop CPU; small: the benchmark preset; "
              "NAME-sharp: that lab's models, its teacher at a temperature < 1 (about 1.4 nats/token).")
@click.option("--root", default="runs/lab", show_default=True, type=click.Path(file_okay=False),
              help="Where the lab models and the run live (reused by later runs).")
@click.option("--seeds", default=None, type=click.IntRange(1), help="Students per method (default: the preset's).")
@click.option("--methods", default=None, help="Comma-separated distillation methods (default: all of "
              "sft,prior-kd,posterior-kd,white-box).")
@click.option("--force", is_flag=True, help="Redo a run made with other settings instead of refusing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def lab_run_cmd(preset, root, seeds, methods, force, quiet) -> None:
    """Build the lab, sample the teacher as a black box, estimate prior and posterior, distill students and
    score everything against the teacher's true distributions (tables in ROOT/PRESET/run/report.md)."""
    from bayeskd.integrity import CorruptOutputError
    from bayeskd.lab.build import LabError
    from bayeskd.lab.run import run_lab
    from bayeskd.locks import OutputLockedError

    try:
        run_lab(root, preset, seeds=seeds, methods=methods.split(",") if methods else None, force=force,
                progress=not quiet, log=click.echo)
    except (LabError, OutputLockedError, CorruptOutputError) as e:  # e.g. another live lab run in ROOT: one line
        raise click.ClickException(str(e)) from e
    except Exception as e:
        _raise_if_disk_full(e, root)
        raise


@main.command("evaluate", cls=_Job)
@config_option
@click.option("--teacher", required=True, help="A readable teacher (causal LM path), e.g. the lab's.")
@click.option("--data", required=True, help="Teacher text: training data to score target shards at its "
              "positions, or held-out teacher text to score students.")
@click.option("--targets", multiple=True, help="NAME=DIR of target shards made for --data (repeatable).")
@click.option("--student", "students", multiple=True, help="NAME=PATH of a student model (repeatable).")
@click.option("--prompts", default=None, help="JSONL of prompts: students also sample their own responses, "
              "scored by KL(teacher‖student) at their positions.")
@click.option("--tokenizer", default=None, help="Tokenizer (default: the teacher's).")
@click.option("--max-records", default=None, type=click.IntRange(1), help="Score only the first N records.")
@click.option("--max-new-tokens", default=48, show_default=True, type=click.IntRange(1))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@skip_bad_option
def evaluate_cmd(**kwargs) -> None:
    """Score target estimates and students against a teacher whose logits can be read."""
    from bayeskd.evaluation.evaluate import evaluate

    _run_job(evaluate, **kwargs)


def _gad_options() -> list[click.Option]:
    from bayeskd.distillation.gad import GADConfig

    return config_options(GADConfig)


@main.command("gad", cls=ConfigJob, make_options=_gad_options)
@config_option
@click.option("--data", required=True, help="Teacher generations (JSONL, Parquet or a saved HF dataset).")
@click.option("--student", required=True, help="Student model (path or hub id): the generator.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory (out/warmup/, out/student/, out/discriminator/); a rerun resumes it.")
@click.option("--discriminator", default=None, help="Where the discriminator starts (default: the student's "
              "backbone with a new scalar head).")
@click.option("--tokenizer", default=None, help="Tokenizer (default: the student's).")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@skip_bad_option
@click.pass_context
def gad_cmd(ctx, data, student, out, discriminator, tokenizer, device, skip_bad, **settings) -> None:
    """Generative adversarial distillation: the student learns by GRPO from a discriminator's score, the
    discriminator learns to tell the teacher's responses from the student's. Every `GADConfig` field is an
    option."""
    from bayeskd.distillation.gad import gad

    _run_job(gad, drop=("history",), data=data, student=student, out=out, discriminator=discriminator,
             tokenizer=tokenizer, device=device, skip_bad=skip_bad, **given(ctx, settings))


@main.command("verify")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
def verify_cmd(directory: str) -> None:
    """Check an output directory (shards against their manifest, safetensors, JSON, priors) and say what is
    intact; exit 1 when something is damaged or missing."""
    from bayeskd.verify import format_findings, verify_dir

    findings = verify_dir(directory)
    click.echo(format_findings(findings, directory))
    if not all(f.ok for f in findings):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
