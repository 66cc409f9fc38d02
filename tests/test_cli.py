"""The `bayeskd estimate-prior` command end to end, through click like a user, on a tiny tokenizer."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from bayeskd.cli import main
from bayeskd.core.sparse import CacheMismatchError, ShardReader


def _write_jsonl(path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "module", "returns", "a", "list", "of", "strings", "when", "called", "with", "an", "object"]
    with open(path, "w") as f:
        for i in range(n):
            resp = " ".join(rng.choice(words, size=rng.integers(3, 15)))
            f.write(json.dumps({"prompt": f"Question {i}: what does it do?", "response": resp}) + "\n")
    return path


def _run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


def test_estimate_prior_writes_model_shards_and_summary(tmp_path, tiny_tokenizer_dir):
    data = _write_jsonl(tmp_path / "teacher.jsonl")
    out = tmp_path / "prior"
    res = _run(["estimate-prior", "--data", str(data), "--tokenizer", tiny_tokenizer_dir, "--order", "3",
                "--top-k", "8", "--write-topk", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 40 and summary["tokens"] > 40
    assert len(summary["ngrams_per_order"]) == 3 and all(int(c) > 0 for c in summary["ngrams_per_order"])
    assert summary["model_bytes"] > 0 and summary["reused_model"] is False

    reader = ShardReader(out / "topk", k=8)
    rows = sum(d.num_rows for d, _ in reader)
    assert rows == summary["tokens"]  # one prior row per response token
    dist, extra = reader.read(reader.shard_names[0])
    dist.validate()
    assert int(extra["lengths"].sum()) == dist.num_rows

    # A rerun with the same config reuses the counted model and keeps the shard.
    res2 = _run(["estimate-prior", "--data", str(data), "--tokenizer", tiny_tokenizer_dir, "--order", "3",
                 "--top-k", "8", "--write-topk", "--out", str(out)])
    assert res2.exit_code == 0, res2.output
    assert json.loads((out / "summary.json").read_text())["reused_model"] is True


def test_estimate_prior_config_file_and_override(tmp_path, tiny_tokenizer_dir):
    data = _write_jsonl(tmp_path / "teacher.jsonl", n=10)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {data}\ntokenizer: {tiny_tokenizer_dir}\norder: 2\nsmoothing: witten_bell\n")
    out = tmp_path / "o"
    res = _run(["estimate-prior", "--config", str(cfg), "--order", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoothing"] == "witten_bell" and summary["order"] == 3


def test_estimate_prior_bad_inputs_are_named(tmp_path, tiny_tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b c"}\n{"prompt": "x", "response": \n')
    res = CliRunner().invoke(main, ["estimate-prior", "--data", str(bad), "--tokenizer", tiny_tokenizer_dir,
                                    "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "bad.jsonl:2" in res.output

    res = CliRunner().invoke(main, ["estimate-prior", "--data", str(bad), "--tokenizer", tiny_tokenizer_dir,
                                    "--skip-bad", "--order", "2", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["skipped_records"] == 1

    res = CliRunner().invoke(main, ["estimate-prior", "--data", str(bad), "--tokenizer", tiny_tokenizer_dir,
                                    "--skip-bad", "--top-k", "100000", "--out", str(tmp_path / "o3")])
    assert res.exit_code != 0 and "larger than" in res.output

    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"ordr": 3}')
    res = CliRunner().invoke(main, ["estimate-prior", "--config", str(cfg), "--out", str(tmp_path / "o4")])
    assert res.exit_code != 0 and "ordr" in res.output


def test_topk_cache_from_other_config_is_refused(tmp_path, tiny_tokenizer_dir):
    data = _write_jsonl(tmp_path / "teacher.jsonl", n=10)
    out = tmp_path / "p"
    args = ["estimate-prior", "--data", str(data), "--tokenizer", tiny_tokenizer_dir, "--order", "2",
            "--write-topk", "--top-k", "4", "--out", str(out)]
    assert _run(args).exit_code == 0
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    res = CliRunner().invoke(main, args[:-2] + ["--smoothing", "witten_bell", "--out", str(out)])
    assert res.exit_code != 0 and "another config" in res.output and "smoothing" in res.output
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before  # nothing written is lost


def test_shard_writer_refuses_other_tokenizer(tmp_path, tiny_tokenizer_dir):
    data = _write_jsonl(tmp_path / "teacher.jsonl", n=10)
    out = tmp_path / "p"
    assert _run(["estimate-prior", "--data", str(data), "--tokenizer", tiny_tokenizer_dir, "--order", "2",
                 "--write-topk", "--top-k", "4", "--out", str(out)]).exit_code == 0
    with pytest.raises(CacheMismatchError, match="another tokenizer"):
        ShardReader(out / "topk", tokenizer_fingerprint="0" * 64)


def test_prior_posterior_distill_pipeline_through_the_cli(tmp_path, tiny_tokenizer_dir):
    """The three commands chained as a user runs them, on tiny models saved and loaded by path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import save_tiny_llama

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    paths = {name: save_tiny_llama(tmp_path / name, tok, seed) for name, seed in (("proxy", 1), ("student", 2))}
    data = _write_jsonl(tmp_path / "teacher.jsonl", n=24)

    assert _run(["estimate-prior", "--data", str(data), "--tokenizer", tiny_tokenizer_dir, "--order", "3",
                 "--out", str(tmp_path / "prior")]).exit_code == 0
    res = _run(["estimate-posterior", "--data", str(data), "--prior", str(tmp_path / "prior"), "--proxy",
                paths["proxy"], "--top-k", "16", "--out", str(tmp_path / "targets")])
    assert res.exit_code == 0, res.output
    targets = ShardReader(tmp_path / "targets", k=16)
    assert sum(d.num_rows for d, _ in targets) == json.loads((tmp_path / "prior" / "summary.json").read_text())["tokens"]

    res = _run(["distill", "--data", str(data), "--targets", str(tmp_path / "targets"), "--student",
                paths["student"], "--max-steps", "3", "--per-device-train-batch-size", "4",
                "--out", str(tmp_path / "distilled")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "distilled" / "summary.json").read_text())
    assert summary["mode"] == "sparse-targets" and summary["steps"] == 3
    before = AutoModelForCausalLM.from_pretrained(paths["student"]).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "distilled").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained and saved the result

    # online posterior: the proxy runs inside the training step on the prior's top-K shards
    assert _run(["estimate-prior", "--data", str(data), "--tokenizer", tiny_tokenizer_dir, "--order", "3",
                 "--write-topk", "--top-k", "8", "--out", str(tmp_path / "prior_k")]).exit_code == 0
    res = _run(["distill", "--data", str(data), "--targets", str(tmp_path / "prior_k" / "topk"), "--proxy",
                paths["proxy"], "--posterior-mode", "dirichlet", "--posterior-c", "2", "--student", paths["student"],
                "--max-steps", "2", "--per-device-train-batch-size", "4", "--out", str(tmp_path / "online")])
    assert res.exit_code == 0, res.output
    online = json.loads((tmp_path / "online" / "summary.json").read_text())
    assert online["mode"] == "online-posterior" and online["posterior_mode"] == "dirichlet"

    res = CliRunner().invoke(main, ["distill", "--data", str(data), "--targets", str(tmp_path / "targets"),
                                    "--teacher", paths["proxy"], "--student", paths["student"],
                                    "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "not both" in res.output


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_distill_cut_logits_flag(tmp_path, tiny_tokenizer_dir, monkeypatch, backend):
    """--cut-logits reaches the trainer: the cut kernel with the Triton backend (the interpreter here), the chunked
    op on the PyTorch backend; the summary says which ran."""
    from transformers import AutoTokenizer

    from conftest import save_tiny_llama

    monkeypatch.setenv("BAYESKD_BACKEND", backend)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    student = save_tiny_llama(tmp_path / "student", AutoTokenizer.from_pretrained(tiny_tokenizer_dir), 2)
    data = _write_jsonl(tmp_path / "teacher.jsonl", n=8)
    assert _run(["estimate-prior", "--data", str(data), "--tokenizer", tiny_tokenizer_dir, "--order", "2",
                 "--write-topk", "--top-k", "4", "--out", str(tmp_path / "prior")]).exit_code == 0
    res = _run(["distill", "--data", str(data), "--targets", str(tmp_path / "prior" / "topk"), "--student", student,
                "--max-steps", "1", "--per-device-train-batch-size", "4", "--cut-logits", "--out", str(tmp_path / "d")]
               + (["--bf16"] if backend == "triton" else []))  # bf16 autocast: on the CPU without a GPU
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["lm_head_loss"] == ("cut" if backend == "triton" else "chunked") and summary["steps"] == 1


def test_distill_and_gad_options_are_their_configs_fields():
    """`distill`'s and `gad`'s options are generated from BayesKDConfig / GADConfig: every field (every
    `TrainingArguments` field included) is an option with the field's default and help, so a default is written
    once; the older flag names still parse."""
    import dataclasses

    from bayeskd.distillation.gad import GADConfig
    from bayeskd.distillation.trainer import BayesKDConfig

    for cmd, config in (("gad", GADConfig), ("distill", BayesKDConfig)):
        options = {p.name: p for p in main.commands[cmd].params}
        no_cli_form = {"output_dir", "parallelism_config"}  # --out; an object
        for f in dataclasses.fields(config):
            if f.name in no_cli_form:
                continue
            assert f.name in options, (cmd, f.name)
            p = options[f.name]
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            default = getattr(default, "value", default)  # an Enum member
            if p.multiple:
                default = list(default) if isinstance(default, (list, tuple)) else None
            assert p.default == default, (cmd, f.name, p.default)
            assert p.help == f.metadata.get("help"), (cmd, f.name)
    distill = {opt for p in main.commands["distill"].params for opt in p.opts + p.secondary_opts}
    assert {"--bf16", "--gradient-checkpointing", "--deepspeed", "--fsdp", "--fsdp-config", "--report-to",
            "--push-to-hub", "--lr-scheduler-type", "--warmup-steps", "--weight-normalization", "--save-steps",
            "--per-device-train-batch-size", "--use-peft", "--lora-r", "--lora-target-modules", "--out"} <= distill


def test_gad_takes_every_training_argument_honours_some_and_refuses_the_rest(tmp_path, monkeypatch):
    """Every TrainingArguments field is a `gad` option; the old flags (--lr, --warmup-steps: GAD's SFT warm-up,
    --weight-decay, --max-grad-norm) parse to the same fields; the LR warm-up is --lr-warmup-steps; a field GAD's
    loop cannot honour, set, is a one-line usage error naming it."""
    import dataclasses

    import transformers

    import bayeskd.distillation.gad as gad_module

    options = {p.name for p in main.commands["gad"].params}
    assert {f.name for f in dataclasses.fields(transformers.TrainingArguments)} - options == {
        "output_dir", "parallelism_config"}  # --out; an object
    seen = {}

    def fake_gad(data, student, out, **kw):
        seen.update(kw)
        seen["config"] = gad_module.GADConfig(**{k: v for k, v in kw.items() if k not in (
            "discriminator", "tokenizer", "device", "skip_bad")})
        return {}

    real_gad = gad_module.gad
    monkeypatch.setattr(gad_module, "gad", fake_gad)
    base = ["gad", "--data", "d", "--student", "s", "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(main, base + ["--lr", "3e-4", "--warmup-steps", "2", "--weight-decay", "0.1",
                                           "--max-grad-norm", "0.5", "--lr-warmup-steps", "3", "--lr-scheduler-type",
                                           "cosine", "--bf16", "--adam-beta2", "0.95"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    c = seen["config"]
    assert (c.learning_rate, c.warmup_steps, c.weight_decay, c.max_grad_norm, c.lr_warmup_steps) == (
        3e-4, 2, 0.1, 0.5, 3)
    assert (c.lr_scheduler_type.value, c.bf16, c.adam_beta2, c.seed, c.d_lr) == ("cosine", True, 0.95, 42, 1e-5)
    assert "lr" not in seen and "learning_rate" in seen
    monkeypatch.setattr(gad_module, "gad", real_gad)  # the config is checked before anything is read
    for flags, name in ((["--deepspeed", "ds.json"], "deepspeed"), (["--report-to", "wandb"], "report_to"),
                        (["--eval-strategy", "steps"], "eval_strategy"), (["--push-to-hub"], "push_to_hub"),
                        (["--max-steps", "3"], "max_steps")):
        res = CliRunner().invoke(main, base + flags)
        assert res.exit_code == 1 and f"gad cannot honour {name}=" in res.output, (flags, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output


def test_training_arguments_reach_distill_from_the_command_line_and_config(tmp_path, monkeypatch):
    """Any TrainingArguments field reaches the BayesKDConfig that distill trains with, from the command line or a
    YAML --config (a mapping for a JSON-valued one); only the options given are passed, the rest are the config's
    defaults."""
    import yaml

    import bayeskd.distillation.trainer as trainer

    seen = {}

    def fake_distill(data, student, out, **kw):
        seen.update(kw)
        seen["config"] = trainer.BayesKDConfig(output_dir=out, **{k: v for k, v in kw.items() if k not in (
            "targets", "teacher", "proxy", "prior", "teacher_url", "teacher_model", "tokenizer", "skip_bad")})
        return {}

    monkeypatch.setattr(trainer, "distill", fake_distill)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"lr_scheduler_type": "cosine", "warmup_steps": 7, "report_to": ["tensorboard"],
                                   "lr_scheduler_kwargs": {"num_cycles": 0.25}, "gradient_checkpointing": True}))
    res = CliRunner().invoke(main, ["distill", "--config", str(cfg), "--data", "d", "--student", "s", "--out",
                                    str(tmp_path / "o"), "--weight-decay", "0.1", "--max-grad-norm", "0.5",
                                    "--optim", "adamw_torch", "--lora-r", "4", "--lora-target-modules", "q_proj",
                                    "--lora-target-modules", "v_proj"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    c = seen["config"]
    assert (c.lr_scheduler_type, c.warmup_steps, c.report_to, c.lr_scheduler_kwargs, c.gradient_checkpointing) == (
        "cosine", 7, ["tensorboard"], {"num_cycles": 0.25}, True)
    assert (c.weight_decay, c.max_grad_norm, c.optim, c.lora_r, c.lora_target_modules) == (
        0.1, 0.5, "adamw_torch", 4, ["q_proj", "v_proj"])
    assert "learning_rate" not in seen and c.num_train_epochs == 1.0 and c.logging_steps == 10  # defaults: once
    res = CliRunner().invoke(main, ["distill", "--data", "d", "--student", "s", "--out", "o",
                                    "--per-device-train-batch-size", "0"])
    assert res.exit_code == 2 and "--per-device-train-batch-size" in res.output


def test_the_cli_starts_without_torch():
    """`import bayeskd.cli` loads neither torch nor transformers: a SIGTERM in a job's first moments then meets the
    job's handler rather than Python's default (the drill saw a GAD run killed outright, exit -15, while the CLI
    module was still importing torch)."""
    import subprocess
    import sys

    code = "import sys, bayeskd, bayeskd.cli; print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_sigterm_while_a_command_builds_its_options_stops_cleanly():
    """A command whose options come from its config imports its job's module while parsing: a SIGTERM then is a
    clean stop (exit 130, the resume hint), not a kill."""
    import os
    import signal
    import time

    from click.testing import CliRunner

    from bayeskd import cli
    from bayeskd.cli_config import ConfigCommand

    def make_options():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        return []

    class Unhandled(Exception):
        pass

    def unhandled(signum, frame):  # stands for the default action (death) so a regression fails, not kills pytest
        raise Unhandled("SIGTERM reached the handler outside the CLI's")

    before = signal.signal(signal.SIGTERM, unhandled)
    cli.main.add_command(ConfigCommand("sigterm-probe", make_options=make_options, callback=lambda: None))
    try:
        t0 = time.monotonic()
        result = CliRunner().invoke(cli.main, ["sigterm-probe"])
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the caller's handler is back
    finally:
        cli.main.commands.pop("sigterm-probe")
        signal.signal(signal.SIGTERM, before)
    assert not isinstance(result.exception, Unhandled), result.exception
    assert result.exit_code == 130, result.output
    assert cli.RESUME_HINT in result.output
    assert time.monotonic() - t0 < 4


# The other jobs' configs: (command, module, config class, the flags the command had before its options were generated)
JOB_CONFIGS = [
    ("estimate-prior", "bayeskd.priors.estimate", "EstimatePriorConfig",
     "--alpha --beta --codec --kind --leave-one-out --max-levels --max-support --no-leave-one-out --no-write-topk "
     "--num-proc --order --smoothing --top-k --write-topk --data --tokenizer --max-records --skip-bad --out"),
    ("estimate-posterior", "bayeskd.posterior.estimate", "EstimatePosteriorConfig",
     "--a --b --batch-size --c --calibrate --calibrate-on-training-records --calibration-records --codec --device "
     "--dtype --evidence --evidence-mode --evidence-top-k --keep-top --leave-one-out --mode --no-calibrate "
     "--no-evidence --no-leave-one-out --no-teacher-logprob --proxy-top-k --sample-seed --samples --shard-records "
     "--sliding-window --teacher-logprob --top-k --w --data --prior --proxy --tokenizer --max-records --skip-bad "
     "--out"),
    ("align-proxy", "bayeskd.distillation.align_proxy", "AlignProxyConfig",
     "--batch-size --beta --diagnostic-records --dpo-epochs --holdout-records --learning-rate --logging-steps "
     "--max-length --max-new-tokens --nll-weight --rounds --seed --sft-epochs --sft-learning-rate --temperature "
     "--data --proxy --out --tokenizer --skip-bad"),
    ("generate", "bayeskd.teachers.generate", "GenerateConfig",
     "--api-key-env --backend --base-url --concurrency --device --endpoint --keep-empty --max-prompts --max-retries "
     "--max-tokens --model --n --ordered --prompts --out --quiet --requests-per-minute --seed --skip-bad --stop "
     "--system --teacher-tokenizer --temperature --timeout --tokens-per-minute --top-logprobs --top-p"),
    ("evaluate", "bayeskd.evaluation.evaluate", "EvaluateConfig",
     "--data --max-new-tokens --max-records --out --prompts --skip-bad --student --targets --teacher --tokenizer"),
    ("lab run", "bayeskd.lab.run", "LabRunConfig", "--preset --root --seeds --methods --force --quiet"),
]


def _command(cmd):
    group = main
    for name in cmd.split():
        group = group.commands[name]
    return group


@pytest.mark.parametrize("cmd, module, config", [j[:3] for j in JOB_CONFIGS], ids=[j[0] for j in JOB_CONFIGS])
def test_job_options_are_their_configs_fields(cmd, module, config):
    """Every job's options come from its config dataclass: every field is an option with the field's default and
    help (so a default is written once, in the dataclass), and every flag the command had still parses."""
    import dataclasses
    import importlib

    cls = getattr(importlib.import_module(module), config)
    options = {p.name: p for p in _command(cmd).params}
    for f in dataclasses.fields(cls):
        assert f.name in options, (cmd, f.name)
        p = options[f.name]
        default = list(f.default) if p.multiple and f.default is not None else f.default
        assert p.default == default, (cmd, f.name, p.default, f.default)
        assert f.metadata.get("help") and p.help == f.metadata["help"], (cmd, f.name)
    flags = {opt for p in _command(cmd).params for opt in p.opts + p.secondary_opts}
    before = set(next(j[3] for j in JOB_CONFIGS if j[0] == cmd).split())
    assert before <= flags, sorted(before - flags)
    assert "--no-no-evidence" not in flags  # a `no_x` switch stays the one flag --no-x


def test_compact_targets_are_the_one_default():
    """The codec's default is written once: compact, for the library and the command line alike."""
    from bayeskd.posterior.estimate import EstimatePosteriorConfig
    from bayeskd.priors.estimate import EstimatePriorConfig

    assert EstimatePosteriorConfig().codec == EstimatePriorConfig().codec == "compact"
    for cmd in ("estimate-prior", "estimate-posterior"):
        assert next(p for p in main.commands[cmd].params if p.name == "codec").default == "compact"


@pytest.mark.parametrize("cmd, module, job, args, yaml_values, expect", [
    ("estimate-prior", "bayeskd.priors.estimate", "estimate_prior", ["--out", "o", "--order", "2"],
     {"smoothing": "witten_bell", "write_topk": True}, {"order": 2, "smoothing": "witten_bell", "write_topk": True}),
    ("estimate-posterior", "bayeskd.posterior.estimate", "estimate_posterior",
     ["--proxy", "p", "--out", "o", "--top-k", "8", "--no-evidence"],
     {"codec": "raw", "calibration-records": 12, "mode": "mixture"},
     {"top_k": 8, "no_evidence": True, "codec": "raw", "calibration_records": 12, "mode": "mixture"}),
    ("align-proxy", "bayeskd.distillation.align_proxy", "align_proxy",
     ["--data", "d", "--proxy", "p", "--out", "o", "--rounds", "1"], {"beta": 0.2, "holdout-records": 0},
     {"rounds": 1, "beta": 0.2, "holdout_records": 0}),
    ("generate", "bayeskd.teachers.generate", "generate",
     ["--prompts", "p", "--out", "o", "--model", "m", "--stop", "a", "--stop", "b"],
     {"n": 3, "keep_empty": True, "backoff": 0.0}, {"stop": ["a", "b"], "n": 3, "keep_empty": True, "backoff": 0.0}),
    ("evaluate", "bayeskd.evaluation.evaluate", "evaluate", ["--teacher", "t", "--data", "d"],
     {"max_records": 5, "one_hot_eps": 0.2}, {"max_records": 5, "one_hot_eps": 0.2}),
    ("lab run", "bayeskd.lab.run", "run_lab", ["--preset", "micro", "--methods", "sft,gad", "--k-values", "4"],
     {"seeds": 2, "align": False}, {"methods": ["sft", "gad"], "k_values": [4], "seeds": 2, "align": False}),
], ids=[j[0] for j in JOB_CONFIGS])
def test_a_config_field_reaches_the_job_from_the_command_line_and_yaml(tmp_path, monkeypatch, cmd, module, job,
                                                                        args, yaml_values, expect):
    """A field set on the command line or in a YAML --config reaches the job; the fields not given are not passed
    (the job's config supplies their defaults); the config built from what is passed is the one the job runs."""
    import dataclasses
    import importlib

    import yaml

    mod = importlib.import_module(module)
    cls = getattr(mod, next(j[2] for j in JOB_CONFIGS if j[0] == cmd))
    fields = {f.name for f in dataclasses.fields(cls)}
    seen = {}

    def fake(*a, **kw):
        seen.update(kw)
        seen["config"] = cls(**{k: v for k, v in kw.items() if k in fields})
        return {}

    monkeypatch.setattr(mod, job, fake)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(yaml_values))
    res = CliRunner().invoke(main, [*cmd.split(), "--config", str(cfg), *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    passed = {k: v for k, v in seen.items() if k in fields}
    assert passed == expect
    c = seen["config"]
    assert all(getattr(c, k) == v for k, v in expect.items())
    defaults = cls()
    assert all(getattr(c, f) == getattr(defaults, f) for f in fields - set(expect))  # the rest: the config's own


def test_a_job_takes_its_config_or_keywords_not_both(tmp_path):
    """`job(config=Config(...))` and `job(field=...)` are the same call; both at once, or an unknown field, are
    refused before any work."""
    from bayeskd.posterior.estimate import EstimatePosteriorConfig, estimate_posterior
    from bayeskd.priors.estimate import EstimatePriorConfig, estimate_prior

    with pytest.raises(ValueError, match="not both"):
        estimate_posterior("d", None, "p", str(tmp_path / "a"), config=EstimatePosteriorConfig(), top_k=4)
    with pytest.raises(ValueError, match="unknown setting.*topk"):
        estimate_prior("d", "t", out=str(tmp_path / "b"), topk=4)
    with pytest.raises(ValueError, match="codec"):
        EstimatePriorConfig(codec="zip")
