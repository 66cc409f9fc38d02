"""Garbage in through the command line (issue 15, item 5): a bad record or config value is one line on the
terminal with exit code 1 (bad data) or 2 (bad usage), never a traceback; `--skip-bad` is offered by every command
that reads records and its summary counts what it skipped."""
import json
import subprocess
import sys

import click
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bayeskd.cli import main

GOOD = [{"prompt": f"Question {i}: what?", "response": "the module returns a list of strings"} for i in range(12)]


def _invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error_lines(result) -> list[str]:
    return [ln for ln in result.output.splitlines() if ln.startswith("Error:")]


def test_every_command_that_reads_records_offers_skip_bad():
    readers = []
    for name, cmd in main.commands.items():
        cmds = cmd.commands.items() if isinstance(cmd, click.Group) else [(name, cmd)]
        for sub, c in cmds:
            opts = {p.name for p in c.params}
            if opts & {"data", "prompts"}:
                readers.append(sub)
                assert "skip_bad" in opts, f"`bayeskd {sub}` reads records but has no --skip-bad"
    assert {"generate", "estimate-prior", "estimate-posterior", "distill", "align-proxy", "gad",
            "evaluate"} <= set(readers)


def test_bad_record_is_one_line_and_skip_bad_counts_it(tmp_path, tiny_tokenizer_dir):
    data = tmp_path / "teacher.jsonl"
    lines = [json.dumps(r) for r in GOOD]
    lines[3] = '{"prompt": "a", "response": 5}'
    lines[7] = '{"prompt": "a", "response": "\\udc80"}'
    data.write_text("\n".join(lines) + "\n")
    args = ["estimate-prior", "--data", data, "--tokenizer", tiny_tokenizer_dir, "--order", "2"]
    res = _invoke(args + ["--out", tmp_path / "a"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert _error_lines(res) == [f"Error: {data}:4: field 'response' must be a string, got int"]
    assert not (tmp_path / "a" / "summary.json").exists()

    res = _invoke(args + ["--skip-bad", "--out", tmp_path / "b"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["skipped_records"] == 2 and summary["records"] == len(GOOD) - 2


def test_bad_config_value_in_a_real_process_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("order: [1, 2]\n")
    res = subprocess.run([sys.executable, "-m", "bayeskd.cli", "estimate-prior", "--config", str(cfg), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")] == [
        f"Error: Invalid value for '--config': {cfg}: option 'order' must be a single value, got list [1, 2]"]


# key -> values that are wrong for it (an integer range, a float, a choice, a flag, a repeatable-free string)
ILL_TYPED = {
    "order": [[1, 2], {"a": 1}, "four", True, 99, 2.5],
    "alpha": [[1.0], "much", False, {"x": 1}],
    "smoothing": ["kneser-nay", 3, ["kneser_ney"]],
    "skip_bad": ["maybe", [True], {"on": 1}],
    "top_k": [0, -3, "all", [8]],
    "data": [["a.jsonl", "b.jsonl"], {"path": "a.jsonl"}],
}


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(ILL_TYPED)).flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(ILL_TYPED[k]))),
       st.booleans(), st.booleans())
def test_ill_typed_config_values_are_usage_errors_naming_the_key(tmp_path_factory, kv, yaml_file, dashed):
    key, value = kv
    d = tmp_path_factory.mktemp("cfg")
    name = key.replace("_", "-") if dashed else key
    cfg = d / ("c.yaml" if yaml_file else "c.json")
    cfg.write_text(json.dumps({name: value}))  # JSON is YAML too
    res = _invoke(["estimate-prior", "--config", cfg, "--out", d / "o"])
    assert res.exit_code == 2 and not isinstance(res.exception, (TypeError, ValueError)), res.output
    assert "Traceback" not in res.output
    errors = _error_lines(res)
    assert len(errors) == 1 and f"option '{name}'" in errors[0], res.output
    assert not (d / "o").exists()


def test_null_config_value_means_the_default_and_unknown_keys_are_named(tmp_path, tiny_tokenizer_dir):
    data = tmp_path / "teacher.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"order": None, "data": str(data), "tokenizer": tiny_tokenizer_dir}))
    res = _invoke(["estimate-prior", "--config", cfg, "--out", tmp_path / "o"])
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "o" / "summary.json").read_text())["ngrams_per_order"]) == 4  # the default
    cfg.write_text(json.dumps({"ordr": 3}))
    res = _invoke(["estimate-prior", "--config", cfg, "--out", tmp_path / "p"])
    assert res.exit_code == 2 and _error_lines(res) == [
        f"Error: Invalid value for '--config': {cfg}: unknown option(s) ordr"]
    cfg.write_bytes(b"\xff\xfe order: 3")
    res = _invoke(["estimate-prior", "--config", cfg, "--out", tmp_path / "p"])
    assert res.exit_code == 2 and "cannot parse config" in _error_lines(res)[0]


@pytest.mark.parametrize("cmd", ["estimate-posterior", "distill", "align-proxy", "gad"])
def test_training_commands_name_the_bad_line(tmp_path, tiny_tokenizer_dir, cmd):
    """They fail on the bad record before loading any model (the model paths here do not even exist)."""
    data = tmp_path / "teacher.jsonl"
    data.write_text(json.dumps(GOOD[0]) + "\n" + '{"messages": [{"role": "user", "content": "hi"}]}\n')
    model = {"estimate-posterior": "--proxy", "distill": "--student", "align-proxy": "--proxy", "gad": "--student"}
    args = [cmd, "--data", data, model[cmd], tmp_path / "no-model", "--tokenizer", tiny_tokenizer_dir,
            "--out", tmp_path / "o"]
    res = _invoke(args)
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert _error_lines(res) == [f"Error: {data}:2: field 'messages' must end with the assistant's message (the "
                                 "response), last role is 'user'"]


def test_posterior_refuses_a_record_longer_than_the_proxy_context(tmp_path, tiny_tokenizer):
    """Posterior targets cover whole responses (no truncation): a record past the proxy's 256 positions is named
    before any work, not an index error deep in the model."""
    from conftest import save_tiny_llama

    proxy = save_tiny_llama(tmp_path / "proxy", tiny_tokenizer, seed=0)
    data = tmp_path / "teacher.jsonl"
    data.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps({"prompt": "q", "response": "word " * 400}) + "\n")
    res = _invoke(["estimate-posterior", "--data", data, "--proxy", proxy, "--out", tmp_path / "o"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert len(_error_lines(res)) == 1 and "record 1 " in res.output and "proxy's context (256)" in res.output
    assert "--sliding-window" in res.output  # the refusal names the way on
    assert not (tmp_path / "o" / "summary.json").exists()


def test_posterior_reads_a_long_record_in_sliding_windows(tmp_path, tiny_tokenizer):
    """Issue 27 item 8: --sliding-window gives the long record its targets (every row, the proxy's context never
    exceeded) without dropping it, so the rows line up with the data and distill trains on them."""
    from conftest import save_tiny_llama

    from bayeskd.data import load_teacher_records, tokenize_records
    from bayeskd.core.sparse import ShardReader

    proxy = save_tiny_llama(tmp_path / "proxy", tiny_tokenizer, seed=0)
    data = tmp_path / "teacher.jsonl"
    data.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps({"prompt": "q", "response": "word " * 400}) + "\n")
    res = _invoke(["estimate-posterior", "--data", data, "--proxy", proxy, "--top-k", "8", "--sliding-window",
                   "--out", tmp_path / "o"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["records_in_windows"] == 1
    tokenized = tokenize_records(load_teacher_records(str(data))[0], tiny_tokenizer)
    assert tokenized.lengths[1] > 256
    rows = sum(d.num_rows for d, _ in ShardReader(tmp_path / "o"))
    assert rows == int((tokenized.lengths - tokenized.prompt_lengths).sum())
    for d, _ in ShardReader(tmp_path / "o"):
        assert torch.isfinite(d.logprobs[d.indices >= 0]).all() and (d.indices >= 0).any(1).all()
    res = _invoke(["distill", "--data", data, "--targets", tmp_path / "o", "--student", proxy, "--max-steps", "1",
                   "--max-length", "512", "--out", tmp_path / "s"])
    assert res.exit_code == 0, res.output
