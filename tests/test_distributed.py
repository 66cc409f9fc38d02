"""Data-parallel runs under torchrun on CPU (gloo, 2 processes): `estimate-posterior` writes the same shards as a
single process, merged into one manifest; `distill` trains with DDP and logs the loss of a single-process run
with the same global batch."""
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bayeskd.core.sparse import ShardReader

pytestmark = pytest.mark.e2e  # each test launches torchrun (2 processes) a few times: a minute or two in all


def _write_jsonl(path, n=24, seed=0):
    """Teacher records whose responses all tokenize to the same length (a permutation of the same words after a
    fixed first word), so a per-device token mean averaged over ranks equals the global batch's token mean."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = ["module", "returns", "a", "list", "of", "strings", "when", "called", "with", "an", "object"]
    with open(path, "w") as f:
        for i in range(n):
            resp = "the " + " ".join(rng.permutation(words))
            f.write(json.dumps({"prompt": f"Question {i}: what does it do?", "response": resp}) + "\n")
    return path


def _write_unequal_jsonl(path, lengths=(2, 3, 14, 21), seed=0):
    """Teacher records whose responses have very different lengths: however the global batch is split over the
    ranks, the ranks hold different numbers of response tokens, so a per-rank mean averaged over ranks weighs the
    tokens differently from the global token mean."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = ["module", "returns", "a", "list", "of", "strings", "when", "called", "with", "an", "object"]
    with open(path, "w") as f:
        for i, n in enumerate(lengths):
            resp = " ".join(rng.choice(words, size=n))
            f.write(json.dumps({"prompt": f"Question {i}: what does it do?", "response": resp}) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _run(args, nproc=None, timeout=120):
    launch = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    res = subprocess.run(launch + args, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from conftest import save_tiny_llama

    tmp = tmp_path_factory.mktemp("dist")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    paths = {name: save_tiny_llama(tmp / name, tok, seed) for name, seed in (("proxy", 1), ("student", 2))}
    data = _write_jsonl(tmp / "teacher.jsonl", n=4)
    _run(["-m", "bayeskd.cli", "estimate-prior", "--data", str(data), "--tokenizer", tiny_tokenizer_dir,
          "--order", "3", "--out", str(tmp / "prior")])
    return tmp, data, paths


def _posterior_args(tmp, data, paths, out):
    return ["-m", "bayeskd.cli", "estimate-posterior", "--data", str(data), "--prior", str(tmp / "prior"),
            "--proxy", paths["proxy"], "--top-k", "16", "--shard-records", "1", "--batch-size", "2",
            "--out", str(out)]


def test_estimate_posterior_two_ranks_matches_one_process(tiny_setup):
    tmp, data, paths = tiny_setup
    _run(_posterior_args(tmp, data, paths, tmp / "single"))
    _run(_posterior_args(tmp, data, paths, tmp / "ddp"), nproc=2)

    single, ddp = ShardReader(tmp / "single", k=16), ShardReader(tmp / "ddp", k=16)
    assert len(single.shard_names) == 4  # 4 records, 1 a shard; ranks own shards {0, 2} and {1, 3}
    assert ddp.shard_names == single.shard_names
    assert ddp.manifest == single.manifest  # same schema, rows and checksums
    for name in single.shard_names:
        assert _sha(tmp / "ddp" / name) == _sha(tmp / "single" / name), name
    assert sorted(p.name for p in (tmp / "ddp").glob("*.safetensors")) == single.shard_names
    assert not list((tmp / "ddp").glob("manifest.rank*.json"))  # merged and removed
    summary = json.loads((tmp / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["complete"] and summary["shards_written"] == 4
    assert sum(d.num_rows for d, _ in ddp) == summary["rows"]


def test_estimate_posterior_two_ranks_resumes_from_rank_manifests(tiny_setup):
    """An interrupted 2-rank run leaves per-rank manifests; a rerun (any world size) keeps their shards."""
    tmp, data, paths = tiny_setup
    out = tmp / "resume"
    _run(_posterior_args(tmp, data, paths, out), nproc=2)
    ref = {n: _sha(out / n) for n in ShardReader(out).shard_names}
    # simulate a crash before the merge: rank 0 finished shard 0, rank 1 shard 1, and a finished shard 2 is
    # listed in an old merged manifest
    # edited by hand below, so without the manifest's sha256 of itself (a stale one would read as damage)
    manifest = {k: v for k, v in json.loads((out / "manifest.json").read_text()).items() if k != "manifest_sha256"}
    for rank, keep in ((0, ["shard-00000.safetensors"]), (1, ["shard-00001.safetensors"])):
        part = {**manifest, "shards": {n: manifest["shards"][n] for n in keep}}
        (out / f"manifest.rank{rank}.json").write_text(json.dumps(part))
    (out / "manifest.json").write_text(json.dumps(
        {**manifest, "shards": {"shard-00002.safetensors": manifest["shards"]["shard-00002.safetensors"]}}))
    (out / "shard-00003.safetensors").unlink()
    res = _run(_posterior_args(tmp, data, paths, out), nproc=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_skipped"] == 3 and summary["shards_written"] == 1 and summary["complete"], res.stdout
    assert {n: _sha(out / n) for n in ShardReader(out).shard_names} == ref
    assert not list(out.glob("manifest.rank*.json"))


_DISTILL = """
import json, os, sys
from bayeskd.distillation.trainer import distill
data, student, targets, out, bs, fused = sys.argv[1:7]
# plain SGD (no momentum, constant lr): the update is proportional to the loss scale, so a wrong weighting of the
# ranks' tokens changes the weights (Adam would normalise much of it away)
s = distill(data, student, out, targets=targets, max_steps=3, per_device_train_batch_size=int(bs),
            logging_steps=1, seed=0, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
            warmup_steps=0, fused_linear=fused == "fused", fused_backend="torch")  # gloo + use_cpu under torchrun
import torch.distributed as dist
if dist.is_initialized():  # as the CLI does: gloo's threads can abort the process when left to shutdown
    dist.destroy_process_group()
"""


def test_distill_two_ranks_ddp(tiny_setup):
    """Per-device batch 2 on 2 ranks vs batch 4 on 1: the 4 records are one global batch either way, with
    responses of very different lengths, and plain SGD: the trained weights agree only when every rank weighs
    its tokens by the global token count (the loss is the mean over the global batch's response tokens)."""
    from transformers import AutoModelForCausalLM

    tmp, _, paths = tiny_setup
    data = _write_unequal_jsonl(tmp / "teacher_unequal.jsonl")
    _run(["-m", "bayeskd.cli", "estimate-prior", "--data", str(data), "--tokenizer", str(Path(paths["student"])),
          "--order", "3", "--out", str(tmp / "prior_unequal")])
    targets = tmp / "targets_unequal"
    _run(["-m", "bayeskd.cli", "estimate-posterior", "--data", str(data), "--prior", str(tmp / "prior_unequal"),
          "--proxy", paths["proxy"], "--top-k", "16", "--out", str(targets)])
    script = tmp / "distill_script.py"
    script.write_text(_DISTILL)
    _run([str(script), str(data), paths["student"], str(targets), str(tmp / "d1"), "4", "plain"])
    _run([str(script), str(data), paths["student"], str(targets), str(tmp / "d2"), "2", "plain"], nproc=2)
    # --fused-linear under DDP: the lm_head is used outside the model's forward; gradients must still be averaged
    _run([str(script), str(data), paths["student"], str(targets), str(tmp / "d3"), "2", "fused"], nproc=2)

    one = json.loads((tmp / "d1" / "summary.json").read_text())
    two = json.loads((tmp / "d2" / "summary.json").read_text())
    assert one["steps"] == two["steps"] == 3
    assert one["train_tokens"] == two["train_tokens"]  # summed over the ranks
    # The logged loss under DDP is rank 0's own batch mean (the two ranks see different records), so compare
    # what DDP must get right: gradients averaged over ranks equal the one-process gradient of the same global
    # batch (equal token counts per rank), hence the same weights after every step.
    w1 = AutoModelForCausalLM.from_pretrained(tmp / "d1").state_dict()
    w2 = AutoModelForCausalLM.from_pretrained(tmp / "d2").state_dict()
    before = AutoModelForCausalLM.from_pretrained(paths["student"]).state_dict()
    moved = max((w1[k].float() - before[k].float()).abs().max().item() for k in w1)
    worst = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    # tolerance well below the move: a per-rank mean averaged over the ranks is off by a good fraction of it
    assert worst < 1e-3 * moved, (worst, moved)
    w3 = AutoModelForCausalLM.from_pretrained(tmp / "d3").state_dict()
    worst = max((w1[k].float() - w3[k].float()).abs().max().item() for k in w1)
    assert worst < 1e-3 * moved, (worst, moved)
