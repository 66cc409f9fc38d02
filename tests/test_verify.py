"""`bayeskd verify DIR` (issue 15 item 2): an intact output says so; a flipped byte, a truncated file and a deleted
shard are each named with what is wrong, and the exit code says it."""
import json

from click.testing import CliRunner

from bayeskd.cli import main
from bayeskd.priors.estimate import estimate_prior
from bayeskd.verify import verify_dir


def _prior_out(tmp_path, tok):
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"word{i % 5} and more words {i}"}) + "\n"
                            for i in range(30)))
    out = tmp_path / "prior"
    estimate_prior(str(data), tok, out=str(out), order=2, top_k=4, write_topk=True)
    return out


def test_verify_names_what_is_damaged(tmp_path, tiny_tokenizer_dir):
    out = _prior_out(tmp_path, tiny_tokenizer_dir)
    res = CliRunner().invoke(main, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    assert "0 damaged or missing" in res.output and "prior" in res.output and "shard" in res.output

    shard = next((out / "topk").glob("shard-*.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a flipped byte in the data
    shard.write_bytes(bytes(raw))
    tables = out / "prior" / "tables.safetensors"
    tables.write_bytes(tables.read_bytes()[:-16])  # a truncated file
    (out / "summary.json").write_text("{not json")
    bad = {f.path: f.detail for f in verify_dir(out) if not f.ok}
    assert "checksum mismatch" in bad[str(shard)]
    # checked against the prior's checksum record: named with the size; the prior does not load either
    assert "truncated" in bad[str(tables)] and str(out / "prior") in bad
    assert "size is" in bad[str(out / "summary.json")]  # in estimate-prior's record
    shard.unlink()
    assert "missing" in {f.path: f.detail for f in verify_dir(out)}[str(shard)]
    res = CliRunner().invoke(main, ["verify", str(out)])
    assert res.exit_code == 1 and "BAD shard" in res.output and "missing" in res.output
