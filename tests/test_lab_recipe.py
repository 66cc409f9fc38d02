"""The lab's KD recipe (chosen on validation prompts) and learning curves (`bayeskd.lab.recipe`), with stand-in
training and scoring functions; the micro lab run (tests/test_lab_run.py) runs them for real."""
import json
from pathlib import Path

import pytest

from bayeskd.lab.recipe import choose_recipe, format_curves, format_recipe, learning_curves, split_heldout


def _records(texts):
    return [{"prompt": t, "response": "r"} for t in texts]


def test_split_heldout_is_disjoint_by_text_and_deterministic():
    texts = [f"prompt number {i}" for i in range(21)]
    records = _records(texts + texts[:5])  # a prompt asked twice lands on one side with both records
    valid, test = split_heldout(records)
    assert sorted(valid + test) == list(range(len(records)))
    v_texts, t_texts = {records[i]["prompt"] for i in valid}, {records[i]["prompt"] for i in test}
    assert not v_texts & t_texts and len(v_texts) == 10 and len(t_texts) == 11
    assert split_heldout(list(reversed(records))) != (valid, test)  # indices follow the records...
    again = split_heldout(_records(texts))  # ...the side of a text does not depend on what else is there
    assert {texts[i] for i in again[0]} == v_texts
    with pytest.raises(ValueError, match="at least 2"):
        split_heldout(_records(["only", "only"]))


def _stand_ins(kl_of):
    """A train that records its calls and a score that looks up kl_of[(method, ce, k)] (+ a seed jitter)."""
    calls = []

    def train(method, seed, name, **kw):
        calls.append((method, seed, name, kw))
        return Path(json.dumps([method, kw["ce_weight"], kw.get("whitebox_top_k"), seed]))

    def score(path, seed):
        method, ce, k, s = json.loads(str(path))
        return {"kl_tf": kl_of[(method, ce, k)] + 0.001 * s}

    return train, score, calls


def test_choose_recipe_takes_the_best_mean_over_methods():
    # posterior-KD alone would pick CE 0.1, white-box alone CE 0; their mean picks 0.1; at 0.1 white-box's best K
    # is the whole vocabulary (0)
    kl = {("posterior-kd", 0.0, None): 0.70, ("posterior-kd", 0.1, None): 0.60, ("posterior-kd", 1.0, None): 0.80,
          ("white-box", 0.0, 64): 0.58, ("white-box", 0.0, 0): 0.57, ("white-box", 0.1, 64): 0.62,
          ("white-box", 0.1, 0): 0.61, ("white-box", 1.0, 64): 0.75, ("white-box", 1.0, 0): 0.74}
    train, score, calls = _stand_ins(kl)
    r = choose_recipe(("sft", "posterior-kd", "white-box"), (0.0, 0.1, 1.0), (64, 0), 2, train, score,
                      log=lambda _: None)
    assert (r["ce_weight"], r["whitebox_top_k"]) == (0.1, 0)
    assert len(calls) == 2 * (3 + 3 * 2) and {c[0] for c in calls} == {"posterior-kd", "white-box"}
    assert len({c[2] for c in calls}) == len(calls)  # every grid point and seed trains into its own directory
    assert r["score"]["0.1"] == pytest.approx((0.6005 + 0.6105) / 2)
    assert next(g for g in r["grid"] if g["method"] == "white-box" and g["ce_weight"] == 1.0
                and g["whitebox_top_k"] == 0)["kl_tf"]["n"] == 2
    md = "\n".join(format_recipe(r, 64))
    assert "64 validation records" in md and "CE weight 0.1 for every KD student" in md and "K all" in md
    # a grid of one point trains nothing; no KD method to choose on trains nothing either
    for methods, ces in ((("posterior-kd", "white-box"), (0.5,)), (("sft",), (0.0, 1.0))):
        train, score, calls = _stand_ins(kl)
        r = choose_recipe(methods, ces, (0,), 3, train, score, log=lambda _: None)
        assert calls == [] and r["ce_weight"] == ces[0] and r["grid"] == []


def test_learning_curves_score_the_checkpoints_at_each_budget(tmp_path):
    def train(method, seed, name, num_train_epochs, save_strategy, save_steps, save_only_model, root=tmp_path):
        out = root / name
        steps = int(num_train_epochs * 6)
        for step in range(save_steps, steps, save_steps):  # like the Trainer: the last step is the model itself
            (out / f"checkpoint-{step}").mkdir(parents=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"steps": steps, "train_tokens": 100 * steps}))
        return out

    scored = []

    def score(path, seed):
        step = int(path.name.split("-")[1]) if path.name.startswith("checkpoint") else 24
        method = path.parent.name if path.name.startswith("checkpoint") else path.name
        scored.append((method, step))
        base = {"sft-s0": 1.0, "sft-s1": 1.0, "white-box-s0": 0.9, "white-box-s1": 0.9}[method]
        # white-box learns faster early on; sft overtakes nothing: the ranking is the same at every budget
        return {"kl_tf": base - 0.01 * step, "kl_own": base - 0.005 * step}

    c = learning_curves(("sft", "white-box"), (0.5, 1.0, 4.0), 2, 6, train, score, log=lambda _: None)
    assert sorted({s for _, s in scored}) == [3, 6, 24] and len(scored) == 2 * 2 * 3
    row = next(r for r in c["summary"] if r["method"] == "sft" and r["steps"] == 6)
    assert row["epochs"] == 1.0 and row["tokens"] == 600 and row["kl_tf"]["mean"] == pytest.approx(0.94)
    assert c["ranking_kl_tf"] == {"3": ["white-box", "sft"], "6": ["white-box", "sft"], "24": ["white-box", "sft"]}
    md = "\n".join(format_curves(c))
    assert "| sft | 0.9700 / 0.9850 | 0.9400 / 0.9700 | 0.7600 / 0.8800 |" in md
    assert "24 steps (2400 tokens)" in md

    def lost(method, seed, name, **kw):  # a checkpoint that is not there is an error naming it
        out = train(method, seed, name, root=tmp_path / "lost", **kw)
        (out / "checkpoint-3").rmdir()
        return out

    with pytest.raises(FileNotFoundError, match="checkpoint-3"):
        learning_curves(("sft",), (0.5, 1.0), 1, 6, lost, score, log=lambda _: None)
