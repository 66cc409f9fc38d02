"""The `bayeskd` command line: parse and validate, then call one library function."""
from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterator

import click

from bayeskd.cli_config import (TRAINING_LIMITS, ConfigCommand, config_option, config_options, given,
                                max_records_option, skip_bad_option)





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


def _generate_options() -> list[click.Option]:
    from bayeskd.teachers.generate import GenerateConfig

    return config_options(GenerateConfig)


@main.command("generate", cls=ConfigJob, make_options=_generate_options)
@config_option
@click.option("--prompts", required=True, help="Prompts: JSONL, Parquet or a saved HF dataset with 'prompt' or chat "
              "'messages' (and an optional 'id').")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Teacher records (JSONL), appended as they complete; OUT's .summary.json, .failed.jsonl and "
              ".empty.jsonl beside it.")
@click.option("--model", required=True, help="The teacher's model name at the API (or a local path with --backend hf).")
@click.option("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
              "(default: OpenAI's).")
@click.option("--teacher-tokenizer", default=None, metavar="PATH_OR_HF_NAME",
              help="The teacher's tokenizer, for APIs that do not report it: its fingerprint goes into the records, "
              "so a student with this tokenizer keeps the teacher's tokens and uses its log-probabilities exactly "
              "(records without one: unknown tokenizer, re-tokenized, lower bounds). serve-teacher reports its own.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@skip_bad_option
@click.pass_context
def generate_cmd(ctx, prompts, out, model, base_url, teacher_tokenizer, quiet, skip_bad, **settings) -> None:
    """Sample a teacher (an OpenAI-compatible API or a local model) into teacher records, resumably, once each.
    Every `GenerateConfig` field is an option."""
    from bayeskd.teachers.generate import GenerateError, generate

    try:
        _run_job(generate, drop=("settings",), prompts=prompts, out=out, model=model, base_url=base_url,
                 teacher_tokenizer=teacher_tokenizer, skip_bad=skip_bad, progress=not quiet, **given(ctx, settings))
    except GenerateError as e:
        raise click.ClickException(str(e)) from e


def _score_options() -> list[click.Option]:
    from bayeskd.teachers.score import ScoreConfig

    return config_options(ScoreConfig)


@main.command("score", cls=ConfigJob, make_options=_score_options)
@config_option
@click.option("--records", required=True, help="Texts to score: teacher records or {prompt, response} lines (JSONL, "
              "Parquet or a saved HF dataset).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Teacher records with the response tokens' logprobs (JSONL), appended as they complete; OUT's "
              ".summary.json, .failed.jsonl and .skipped.jsonl beside it.")
@click.option("--model", required=True, help="The teacher's model name at the API.")
@click.option("--base-url", default=None, help="OpenAI-compatible endpoint whose /completions answers echo with "
              "logprobs, e.g. http://127.0.0.1:8000/v1 (vLLM, SGLang, bayeskd serve-teacher).")
@click.option("--teacher-tokenizer", default=None, metavar="PATH_OR_HF_NAME",
              help="The teacher's tokenizer, for servers that do not report it (as generate's).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@skip_bad_option
@click.pass_context
def score_cmd(ctx, records, out, model, base_url, teacher_tokenizer, quiet, skip_bad, **settings) -> None:
    """Score texts with a teacher: per response token its log-probability and top-k alternatives (echo with
    logprobs), as teacher records, resumably, once each. Every `ScoreConfig` field is an option."""
    from bayeskd.teachers.generate import GenerateError
    from bayeskd.teachers.score import score

    try:
        _run_job(score, drop=("settings",), records=records, out=out, model=model, base_url=base_url,
                 teacher_tokenizer=teacher_tokenizer, skip_bad=skip_bad, progress=not quiet, **given(ctx, settings))
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
@click.option("--max-batch", default=1, show_default=True, type=click.IntRange(1),
              help="Decode up to this many samples of concurrent requests together (1: one request at a time, "
              "bit-exact; more: tokens reproducible, log-probabilities to their low bits; see docs/design.md).")
@click.option("--batch-wait", default=0.005, show_default=True, type=click.FloatRange(0),
              help="Seconds to wait for more requests before starting a batch that is not full.")
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


def _estimate_prior_options() -> list[click.Option]:
    from bayeskd.priors.estimate import EstimatePriorConfig

    return config_options(EstimatePriorConfig)


@main.command("estimate-prior", cls=ConfigJob, make_options=_estimate_prior_options)
@config_option
@click.option("--data", default=None, help="Teacher generations: JSONL, Parquet or a saved HF dataset. "
              "Default: the embedded corpus (Python's own documentation).")
@click.option("--tokenizer", default=None, help="Student tokenizer (path or hub id). Default: a BPE tokenizer "
              "trained on the embedded corpus.")
@skip_bad_option
@max_records_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.pass_context
def estimate_prior_cmd(ctx, data, tokenizer, skip_bad, max_records, out, **settings) -> None:
    """Count the teacher's text into a smoothed prior (and optionally its top-K shards). Every
    `EstimatePriorConfig` field is an option."""
    from bayeskd.priors.estimate import estimate_prior

    _run_job(estimate_prior, data=data, tokenizer=tokenizer, out=out, skip_bad=skip_bad, max_records=max_records,
             **given(ctx, settings))


def _estimate_posterior_options() -> list[click.Option]:
    from bayeskd.posterior.estimate import EstimatePosteriorConfig

    return config_options(EstimatePosteriorConfig)


@main.command("estimate-posterior", cls=ConfigJob, make_options=_estimate_posterior_options)
@config_option
@click.option("--data", default=None, help="Teacher generations (default: the data named in the prior's summary.json).")
@click.option("--prior", "prior_dir", default=None, type=click.Path(file_okay=False),
              help="An estimate-prior output directory (or a saved NGramPrior directory); 'none' or omitted: "
              "proxy-only targets (the proxy's own top-K rows; then --data is needed).")
@click.option("--proxy", required=True, help="Proxy causal LM (path or hub id) sharing the student tokenizer.")
@click.option("--tokenizer", default=None, help="Student tokenizer (default: the one named in the prior's summary.json).")
@skip_bad_option
@max_records_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.pass_context
def estimate_posterior_cmd(ctx, data, prior_dir, proxy, tokenizer, skip_bad, max_records, out, **settings) -> None:
    """Combine the n-gram prior with a proxy LM into per-position top-K posterior shards (resumable). Every
    `EstimatePosteriorConfig` field is an option."""
    from bayeskd.posterior.estimate import estimate_posterior

    _run_job(estimate_posterior, data=data, prior_dir=prior_dir, proxy=proxy, out=out, tokenizer=tokenizer,
             skip_bad=skip_bad, max_records=max_records, **given(ctx, settings))


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
@click.option("--prior", default=None, help="On-policy posterior targets (--onpolicy-fraction > 0 with --proxy): "
              "the prior itself (an estimate-prior output), queried at the student's samples.")
@click.option("--teacher-url", default=None, help="On-policy scored targets: an OpenAI-compatible server that "
              "scores the student's samples (echo + logprobs: serve-teacher, vLLM, SGLang), e.g. "
              "http://127.0.0.1:8000/v1; probed at the start.")
@click.option("--teacher-model", default=None, help="The model name the --teacher-url server serves.")
@click.option("--tokenizer", default=None, help="Tokenizer (default: the student's).")
@click.option("--out", "--output-dir", "out", required=True, type=click.Path(file_okay=False),
              help="Output directory: the student, its checkpoints, summary.json.")
@skip_bad_option
@click.pass_context
def distill_cmd(ctx, data, student, targets, teacher, proxy, prior, teacher_url, teacher_model, tokenizer, out,
                skip_bad, **training_args) -> None:
    """Train a student on the teacher's text and the estimated (or white-box) token distributions. Every
    `BayesKDConfig` field is an option: the loss settings, the LoRA adapter, and every transformers
    `TrainingArguments` field (bf16, gradient checkpointing, DeepSpeed/FSDP configs, report_to, push_to_hub, the
    scheduler and warm-up, ...)."""
    from bayeskd.distillation.trainer import distill
    from bayeskd.teachers.generate import GenerateError

    try:
        _run_job(distill, drop=("log_history",), data=data, student=student, out=out, targets=targets,
                 teacher=teacher, proxy=proxy, prior=prior, teacher_url=teacher_url, teacher_model=teacher_model,
                 tokenizer=tokenizer, skip_bad=skip_bad, **given(ctx, training_args))
    except GenerateError as e:  # the teacher server cannot score (the probe's reason), or stopped answering
        raise click.ClickException(str(e)) from e
    finally:
        _end_distributed()


def _align_proxy_options() -> list[click.Option]:
    from bayeskd.distillation.align_proxy import AlignProxyConfig

    return config_options(AlignProxyConfig)


@main.command("align-proxy", cls=ConfigJob, make_options=_align_proxy_options)
@config_option
@click.option("--data", required=True, help="Teacher generations (JSONL, Parquet or a saved HF dataset).")
@click.option("--proxy", required=True, help="Proxy causal LM (path or hub id) to align.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory: sft/, round_<i>/, final/ (the aligned proxy), summary.json.")
@click.option("--tokenizer", default=None, help="Tokenizer (default: the proxy's).")
@skip_bad_option
@click.pass_context
def align_proxy_cmd(ctx, data, proxy, out, tokenizer, skip_bad, **settings) -> None:
    """Align a proxy to the black-box teacher: SFT on its responses, then rounds of preference optimisation
    (resumable; Proxy-KD). Every `AlignProxyConfig` field is an option."""
    from bayeskd.distillation.align_proxy import align_proxy

    _run_job(align_proxy, drop=("stages", "config", "diagnostics_before", "diagnostics_after", "training"),
             data=data, proxy=proxy, out=out, tokenizer=tokenizer, skip_bad=skip_bad, **given(ctx, settings))


@main.group("lab")
def lab_group() -> None:
    """The lab: a teacher whose true distributions are readable, built from Python's own documentation."""


def _lab_run_options() -> list[click.Option]:
    from bayeskd.lab.run import LabRunConfig

    options = config_options(LabRunConfig)
    for option in options:  # an option not given takes the preset's value, not the dataclass default
        option.show_default = False
    return options


@lab_group.command("run", cls=ConfigJob, make_options=_lab_run_options)
@config_option
@click.option("--preset", default="tiny", show_default=True,
              type=click.Choice(["micro", "tiny", "small", "micro-sharp", "tiny-sharp", "small-sharp", "tiny-gpt2",
                                 "tiny-gpt2-sharp", "tiny-1m", "tiny-sharp-1m"]),
              help="micro: seconds (smoke test); tiny: minutes on a laptop CPU; small: the benchmark preset; "
              "tiny-gpt2: tiny's sizes with GPT-2's real tokenizer and Whisper's for teacher B (pip install -e "
              "'.[lab-real]'); NAME-sharp: that lab's models, its teacher at a temperature < 1 (about 1.4 "
              "nats/token); tiny-1m, tiny-sharp-1m: the lab at scale, another run of that lab's models with >= 1M "
              "teacher tokens (hours on a CPU; ROOT/LAB/run-PRESET/).")
@click.option("--root", default="runs/lab", show_default=True, type=click.Path(file_okay=False),
              help="Where the lab models and the run live (reused by later runs).")
@click.option("--force", is_flag=True, help="Redo a run made with other settings instead of refusing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def lab_run_cmd(ctx, preset, root, force, quiet, **settings) -> None:
    """Build the lab, sample the teacher as a black box, estimate prior and posterior, distill students and
    score everything against the teacher's true distributions (tables in ROOT/PRESET/run/report.md). Every
    `LabRunConfig` field is an option; one not given takes the preset's value."""
    from bayeskd.integrity import CorruptOutputError
    from bayeskd.lab.build import LabError
    from bayeskd.lab.run import run_lab
    from bayeskd.locks import OutputLockedError

    settings = given(ctx, settings)
    if "methods" in settings:  # --methods a,b or repeated
        settings["methods"] = [m for value in settings["methods"] for m in value.split(",") if m]
    try:
        run_lab(root, preset, force=force, progress=not quiet, log=click.echo, **settings)
    except (LabError, OutputLockedError, CorruptOutputError) as e:  # e.g. another live lab run in ROOT: one line
        raise click.ClickException(str(e)) from e
    except Exception as e:
        _raise_if_disk_full(e, root)
        raise


def _evaluate_options() -> list[click.Option]:
    from bayeskd.evaluation.evaluate import EvaluateConfig

    return config_options(EvaluateConfig)


@main.command("evaluate", cls=ConfigJob, make_options=_evaluate_options)
@config_option
@click.option("--teacher", required=True, help="A readable teacher (causal LM path), e.g. the lab's.")
@click.option("--data", required=True, help="Teacher text: training data to score target shards at its "
              "positions, or held-out teacher text to score students.")
@click.option("--targets", multiple=True, help="NAME=DIR of target shards made for --data (repeatable).")
@click.option("--student", "students", multiple=True, help="NAME=PATH of a student model (repeatable).")
@click.option("--prompts", default=None, help="JSONL of prompts: students also sample their own responses, "
              "scored by KL(teacher‖student) at their positions.")
@click.option("--tokenizer", default=None, help="Tokenizer (default: the teacher's).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@skip_bad_option
@click.pass_context
def evaluate_cmd(ctx, teacher, data, targets, students, prompts, tokenizer, out, skip_bad, **settings) -> None:
    """Score target estimates and students against a teacher whose logits can be read. Every `EvaluateConfig`
    field is an option."""
    from bayeskd.evaluation.evaluate import evaluate

    _run_job(evaluate, teacher=teacher, data=data, targets=targets, students=students, prompts=prompts,
             tokenizer=tokenizer, out=out, skip_bad=skip_bad, **given(ctx, settings))


def _gad_options() -> list[click.Option]:
    from bayeskd.distillation.gad import GADConfig

    return config_options(GADConfig, skip=("output_dir",), extra=TRAINING_LIMITS)


@main.command("gad", cls=ConfigJob, make_options=_gad_options)
@config_option
@click.option("--data", required=True, help="Teacher generations (JSONL, Parquet or a saved HF dataset).")
@click.option("--student", required=True, help="Student model (path or hub id): the generator.")
@click.option("--out", "--output-dir", "out", required=True, type=click.Path(file_okay=False),
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
    option, every transformers `TrainingArguments` field included: GAD's loop honours the optimizer's, the LR
    schedule (--lr-scheduler-type, --lr-warmup-steps), --seed, --bf16/--fp16, --gradient-checkpointing,
    --logging-steps and --disable-tqdm, and refuses any other one set (--warmup-steps is GAD's SFT warm-up)."""
    from bayeskd.distillation.gad import gad

    _run_job(gad, drop=("history",), data=data, student=student, out=out, discriminator=discriminator,
             tokenizer=tokenizer, device=device, skip_bad=skip_bad, **given(ctx, settings))


@main.command("convert-records")
@click.argument("src", metavar="IN")
@click.argument("dst", metavar="OUT")
@click.option("--split", default="train", show_default=True, help="Split of a saved or hub dataset IN.")
@click.option("--float32/--exact", "float32", default=None,
              help="Parquet log-probabilities as float32 even where that rounds them (about half the size), or "
                   "always as read (float64 unless every value is a float32). Default: float32 only where exact.")
@skip_bad_option
def convert_records_cmd(src: str, dst: str, split: str, float32: bool | None, skip_bad: bool) -> None:
    """Convert teacher records between JSONL (logprobs inline) and columnar Parquet (compact; every stage reads it
    like JSONL), by OUT's extension (.jsonl / .parquet); IN: any records input. Prints a summary."""
    from bayeskd.records import convert_records

    _run_job(convert_records, src=src, dst=dst, split=split, skip_bad=skip_bad, float32=float32)


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
