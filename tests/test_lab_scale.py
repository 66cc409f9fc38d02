"""The lab at scale (`bayeskd.lab.scale`, the scale presets of `bayeskd.lab.run`): the sentence prompt pool, stamps
that the new settings leave alone at their defaults, and the estimation-cost measurement."""
import json
from dataclasses import fields, replace

import pytest

from bayeskd.corpus import embedded_corpus
from bayeskd.lab.build import PRESETS, LabError, split_corpus
from bayeskd.lab.run import (DATA_SETTINGS, LATE_SETTINGS, RECORDS_VERSION, RUN_CONFIGS, SCALE_PRESETS, UNSTAMPED,
                             LabRunConfig, _check_stamps, resolve_preset, train_prompts)
from bayeskd.lab.scale import estimation_costs, sentence_prompts, shares_text

from conftest import save_tiny_llama

# the settings the lab run had before the scale ones: what runs made then stamped
NEW = ("prompt_pool", "evidence_prompts", "sample_max_batch", "sample_concurrency", "student_max_steps", "curve_scale",
       "curve_students", "align_records", "records_format")


@pytest.mark.parametrize("name", ["micro", "tiny"])
def test_sentence_pool_is_large_deterministic_and_disjoint_from_heldout(name):
    preset = PRESETS[name]
    pool = train_prompts(preset, "sentences")
    assert pool == train_prompts(preset, "sentences")  # deterministic (shuffled with the preset's seed)
    documents = train_prompts(preset)
    assert len(set(pool)) == len(pool) and len(pool) >= 5000 and len(pool) >= 8 * len(set(documents))
    _, _, held = split_corpus(embedded_corpus(), preset.n_prompts, preset.seed)
    held = [r["prompt"] for r in held]
    assert not any(shares_text(p, h) for p in pool for h in held)
    with pytest.raises(ValueError, match="prompt pool"):
        train_prompts(preset, "paragraph")


def test_sentence_prompts_drop_any_prompt_sharing_text_with_a_heldout_one():
    docs = ["The first sentence here. The second one follows. A third closes it.",
            "Another document starts. The second one follows. And ends."]
    pool = sentence_prompts(docs, held_prompts=["The second one follows."])
    assert pool == ["The first sentence here.", "Another document starts."]  # singles and pairs with it dropped
    pool = sentence_prompts(docs, held_prompts=["document"])  # a held-out prompt inside a training one
    assert "Another document starts." not in pool and "The second one follows." in pool
    assert "The first sentence here. The second one follows." in pool  # a sentence with the one before it


def _old_stamps(cfg: LabRunConfig) -> tuple[dict, dict]:
    """train.json and run.json as a run made before the scale settings wrote them."""
    settings = {k: v for k, v in cfg.to_dict().items()
                if k not in ("seeds", "methods", "cross_tokenizer") + NEW and not k.startswith("onpolicy_")}
    old_data = [k for k in DATA_SETTINGS if k not in NEW]
    return settings, {**{k: settings[k] for k in old_data}, "records": RECORDS_VERSION}


def test_new_settings_at_their_defaults_leave_existing_runs_valid(tmp_path):
    assert set(NEW) <= {f.name for f in fields(LabRunConfig)} and set(NEW) <= set(LATE_SETTINGS) | set(UNSTAMPED)
    for name in ("tiny", "micro"):
        cfg = RUN_CONFIGS[name]
        run = tmp_path / name / "run"
        (run / "students" / "sft-s0").mkdir(parents=True)
        train, data = _old_stamps(cfg)
        (run / "train.json").write_text(json.dumps(train))
        (run / "run.json").write_text(json.dumps(data))
        # only the transport and the report's columns changed: nothing is redone
        _check_stamps(run, replace(cfg, sample_max_batch=32, sample_concurrency=32, curve_scale=True,
                                   curve_students=(0.5,)), force=False)
        assert (run / "students" / "sft-s0").exists()
        assert json.loads((run / "train.json").read_text()) == train
        assert json.loads((run / "run.json").read_text()) == data
        _check_stamps(run, replace(cfg, student_max_steps=10), force=False)  # a training setting: students redone
        assert not (run / "students").exists()
        with pytest.raises(LabError, match="prompt_pool"):  # a data setting: the samples are refused
            _check_stamps(run, replace(cfg, prompt_pool="sentences"), force=False)


def test_scale_presets_reuse_their_labs_in_their_own_run_directory():
    for name, lab in SCALE_PRESETS.items():
        preset, run_name = resolve_preset(name)
        assert preset is PRESETS[lab] and run_name == f"run-{name}"
        cfg = RUN_CONFIGS[name]
        assert cfg.prompt_pool == "sentences" and cfg.curve_scale and cfg.student_max_steps
        assert cfg.sample_concurrency * cfg.samples_per_prompt >= cfg.sample_max_batch  # the server can batch
        assert not cfg.cross_tokenizer and not cfg.curve_epochs and "gad" not in cfg.methods
        assert set(cfg.curve_students) < set(cfg.corpus_fractions)  # students where the curve recalibrated
    assert resolve_preset("tiny") == (PRESETS["tiny"], "run")
    # tiny's settings did not move (its methods add the on-policy headline, at equal steps only; a narrower grid)
    d = LabRunConfig()
    assert replace(RUN_CONFIGS["tiny"], methods=d.methods, ce_weights=d.ce_weights, whitebox_ks=d.whitebox_ks,
                   onpolicy_equal_time_max_epochs=d.onpolicy_equal_time_max_epochs,
                   sample_max_batch=d.sample_max_batch, sample_concurrency=d.sample_concurrency) == d
    assert LabRunConfig().train_kwargs(0, False).get("max_steps") is None
    assert LabRunConfig(student_max_steps=7).train_kwargs(0, False)["max_steps"] == 7


def test_estimation_costs_measure_time_and_memory_in_a_fresh_process(tmp_path, tiny_tokenizer, tiny_tokenizer_dir):
    proxy = save_tiny_llama(tmp_path / "proxy", tiny_tokenizer, seed=0)
    docs = embedded_corpus()[:40]
    data = tmp_path / "teacher.jsonl"
    data.write_text("".join(json.dumps({"prompt": d[:30], "response": d[30:200]}) + "\n" for d in docs))
    costs = estimation_costs(str(data), 24, tiny_tokenizer_dir, proxy, order=3, top_k=8, workdir=tmp_path)
    assert costs["tokens"] > 0
    for job in ("estimate-prior", "estimate-posterior"):
        c = costs[job]
        assert c["records"] == 24 and c["seconds"] > 0 and c["seconds_per_1k_tokens"] > 0
        assert c["peak_rss_mb"] >= c["import_rss_mb"] > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("curve_cost_")] == []  # outputs removed


def test_scale_targets_and_tables_from_a_report():
    from bayeskd.lab.report import check_targets
    from bayeskd.lab.scale import format_scale, scale_targets

    def point(tokens, post, cost):
        job = {"seconds": cost * tokens / 1000, "seconds_per_1k_tokens": cost, "peak_rss_mb": 300 + tokens / 1e4,
               "import_rss_mb": 250.0, "records": tokens // 30}
        return {"samples": tokens // 30, "tokens": tokens, "prior": 1.0, "proxy": 0.9, "posterior": post,
                "suffix prior": 0.95, "suffix_margin": -0.05, "n-gram posterior (recalibrated)": post,
                "suffix posterior (recalibrated)": post + 0.01, "chosen posterior": post, "best_component": 0.9,
                "costs": {"tokens": tokens, "estimate-prior": job, "estimate-posterior": dict(job)}}

    report = {"corpus_curve": [{"samples": 0, "tokens": 0, "proxy": 0.9}, point(10_000, 0.85, 1.0),
                               point(41_000, 0.8, 0.5), point(1_100_000, 0.45, 0.6)],
              "students": {"summary": {m: {"kl_tf": {"mean": v, "std": 0.0}} for m, v in
                                       (("sft", 1.2), ("posterior-kd-text", 0.7), ("white-box", 0.63))}}}
    t = scale_targets(report)
    assert t["scale_reference_tokens"] == 41_000 and t["scale_posterior_over_reference"] == pytest.approx(0.45 / 0.8)
    assert t["scale_posterior_le_0.6_reference"] and t["scale_posterior_below_every_component"]
    assert t["scale_estimate-prior_cost_per_token_ratio"] == pytest.approx(1.2)
    assert t["scale_estimate-posterior_cost_per_token_growth_le_1.5x"]
    assert t["scale_gap_closed_posterior_kd_text_ge_85pct"]  # (1.2 - 0.7) / (1.2 - 0.63) = 0.877
    assert check_targets(report)["scale_posterior_le_0.6_reference"]
    md = "\n".join(format_scale(report))
    assert "| 1100000 |" in md and "estimate-posterior s" in md
    assert scale_targets({"corpus_curve": report["corpus_curve"][:1]}) == {}  # no scale columns: no targets


def _sampled_records(n: int) -> list[dict]:
    """Records as the lab samples them: the first ones with top-3 log-probabilities (float32 values), the rest text."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        words = [f" w{j}" for j in rng.integers(0, 50, size=int(rng.integers(1, 6)))]
        rec = {"key": f"k/{i}", "prompt": f"prompt {i}", "response": "".join(words), "finish_reason": "stop"}
        if i < n // 2:
            lp = [float(np.float32(-x)) for x in rng.random(len(words) * 4)]
            rec["logprobs"] = [{"token": w, "bytes": list(w.encode()), "logprob": lp[4 * t],
                                "top_logprobs": [{"token": f" a{a}", "bytes": list(f" a{a}".encode()),
                                                  "logprob": lp[4 * t + 1 + a]} for a in range(3)]}
                               for t, w in enumerate(words)]
        out.append(rec)
    return out


def test_head_records_cut_parquet_and_jsonl_to_their_first_records(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from bayeskd import record_parquet
    from bayeskd.data import load_teacher_records
    from bayeskd.lab.records import count_records, head_records, to_parquet
    from bayeskd.record_parquet import FORMAT_KEY, plain_record

    monkeypatch.setattr(record_parquet, "BATCH", 4)  # the cut falls inside a row batch, after whole ones
    jsonl = tmp_path / "teacher_train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _sampled_records(23)))
    full = tmp_path / "teacher_train.parquet"
    assert to_parquet(jsonl, full)["records"] == 23 and to_parquet(jsonl, full) is None  # converted once
    assert count_records(full) == count_records(jsonl) == 23
    want = [plain_record(r) for r in load_teacher_records(str(full))[0]]
    assert want == load_teacher_records(str(jsonl))[0]  # lossless
    for n in (1, 10, 23, 40):
        sub = tmp_path / f"sub{n}.parquet"
        head_records(full, sub, n)
        schema = pq.read_schema(sub)
        assert schema.metadata[FORMAT_KEY] == pq.read_schema(full).metadata[FORMAT_KEY]
        assert schema.field("top_logprob").type == pq.read_schema(full).field("top_logprob").type  # float32 kept
        got = [plain_record(r) for r in load_teacher_records(str(sub))[0]]
        assert count_records(sub) == len(got) == min(n, 23) and got == want[:n]
        head_records(jsonl, tmp_path / f"sub{n}.jsonl", n)
        assert (tmp_path / f"sub{n}.jsonl").read_text().splitlines() == jsonl.read_text().splitlines()[:n]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_records_format_is_stamped_and_redoes_what_read_the_records(tmp_path):
    from bayeskd.lab.records import train_records

    cfg = RUN_CONFIGS["micro"]
    assert cfg.records_format == "jsonl" and train_records(tmp_path, cfg) == tmp_path / "teacher_train.jsonl"
    assert all(c.records_format == "jsonl" for c in RUN_CONFIGS.values())  # no preset's results move
    run = tmp_path / "micro" / "run"
    _check_stamps(run, cfg, force=False)
    assert "records_format" not in json.loads((run / "train.json").read_text())  # the default: as before
    for d in ("prior", "posterior", "aligned_proxy", "students/sft-s0"):
        (run / d).mkdir(parents=True)
    (run / "teacher_train.jsonl").write_text("{}\n")
    parquet = replace(cfg, records_format="parquet")
    assert train_records(run, parquet) == run / "teacher_train.parquet"
    _check_stamps(run, parquet, force=False)  # not a data setting: the samples stay, all read from them goes
    assert json.loads((run / "train.json").read_text())["records_format"] == "parquet"
    assert (run / "teacher_train.jsonl").exists()
    assert not any((run / d).exists() for d in ("prior", "posterior", "aligned_proxy", "students"))
    (run / "prior").mkdir()
    _check_stamps(run, parquet, force=False)  # the same format again: resumed
    assert (run / "prior").exists()


def test_point_proxy_knows_no_record_beyond_the_point(tmp_path):
    """The proxy at a point of the scale curve: the pipeline's when its alignment read only records among the
    point's first n; else aligned on the point's own records (scored and calibration ones held out); the base proxy
    when none is left; the point's directory holds exactly its first n records."""
    from bayeskd.lab.records import count_records
    from bayeskd.lab.scale import point_dir, point_proxy

    run = tmp_path / "run"
    run.mkdir()
    records = _sampled_records(48)
    (run / "teacher_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "teacher_heldout.jsonl").write_text(json.dumps(records[0]) + "\n")
    calls = []

    def align(data, out, holdout):
        calls.append((data, out, list(holdout)))
        return {"final": str(out / "final")}

    paths = {"proxy": "base"}
    cfg = replace(RUN_CONFIGS["micro"], align=True, align_records=None)  # scored + calibration: 32 records
    assert point_proxy(paths, run, replace(cfg, align=False), 40, "pipe", align) == ("pipe", 0)
    assert point_proxy(paths, run, cfg, 48, "pipe", align) == ("pipe", 16)  # it aligned on records 32..47
    assert point_proxy(paths, run, cfg, 24, "pipe", align) == ("base", 0)  # nothing left after the held-out 32
    assert calls == []
    d = run / "curve_students" / "records_40"
    assert point_proxy(paths, run, cfg, 40, "pipe", align) == (str(d / "aligned_proxy" / "final"), 8)
    assert calls == [(str(d / "teacher_train.jsonl"), d / "aligned_proxy", list(range(32)))]
    assert count_records(d / "teacher_train.jsonl") == 40
    assert (d / "teacher_train.jsonl").read_text().splitlines() == \
        (run / "teacher_train.jsonl").read_text().splitlines()[:40]
    assert (d / "teacher_heldout.jsonl").read_bytes() == (run / "teacher_heldout.jsonl").read_bytes()
    # with align_records the pipeline's proxy read records 32..35 only: every point beyond them keeps it
    assert point_proxy(paths, run, replace(cfg, align_records=4), 40, "pipe", align) == ("pipe", 4)
    assert point_dir(run, cfg, 40) == d and len(calls) == 1
