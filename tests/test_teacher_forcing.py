"""Every caller of `bayeskd.teacher_forcing` gives a model's rows at the response positions in the same order and
with the same position-0 rule (see that module's docstring).

The expected rows are computed here independently and plainly: each record alone through the model, and for its
response token at position p >= 1 the row log_softmax(logits[p - 1]). A response token at position 0 (empty prompt,
no BOS) has no model row: in target-row order its row is uniform / invalid / tail 1; batch-row callers (the trainer,
Proxy-KD, GAD, the white-box teacher) have no row for it at all.
"""
import numpy as np
import pytest
import torch

from bayeskd.data import TokenizedData, tokenize_records
from bayeskd.teacher_forcing import pad_batch, select_rows
from conftest import save_tiny_llama

MODEL_SEED = 1234
ATOL = 1e-5
BATCH = 2  # several batches, and `record_batches` reorders by length within them
RECORDS = [
    {"prompt": "the module returns", "response": "a list of strings when called"},
    {"prompt": "", "response": "when called with an object"},  # BOS only: the first response token is at 1
    {"prompt": "", "response": "the list of strings"},  # BOS removed below: the first response token is at 0
    {"prompt": "a list of strings when called with an object the module", "response": "returns"},
    {"prompt": "an object", "response": "the module returns a list"},
]
AT0 = 2  # the record whose response starts at position 0
ORDER = [3, 2, 0, 4, 1]  # the records asked for, in this order

CALLERS = ["target_logprobs", "proxy_topk", "trainer", "trainer_targets", "proxy_kd", "gad", "whitebox"]


@pytest.fixture(scope="module")
def tf(tmp_path_factory, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    print(f"tiny llama seed {MODEL_SEED}")
    d = tmp_path_factory.mktemp("teacher_forcing")
    path = save_tiny_llama(d / "model", tiny_tokenizer, seed=MODEL_SEED, layers=2)
    model = AutoModelForCausalLM.from_pretrained(path).float().eval()
    tok = tokenize_records(RECORDS, tiny_tokenizer)
    ids, plens = [np.asarray(x) for x in tok.input_ids], tok.prompt_lengths.copy()
    assert plens[AT0] == 1 and ids[AT0][0] == tiny_tokenizer.bos_token_id
    ids[AT0], plens[AT0] = ids[AT0][1:], 0  # no BOS: the response's first token sits at position 0
    tok = TokenizedData(ids, [np.arange(len(x)) >= p for x, p in zip(ids, plens)], plens.astype(np.int32),
                        tok.tokenizer_fingerprint, tok.vocab_size, tok.eos_token_id)
    assert len(set(tok.lengths.tolist())) > 2 and plens[1] == 1

    V = tok.vocab_size
    rows, valid, tokens = [], [], []
    with torch.no_grad():
        for q in ORDER:
            x = torch.as_tensor(tok.input_ids[q], dtype=torch.long)
            lp = torch.log_softmax(model(input_ids=x[None]).logits[0, :, :V].float(), dim=-1)
            for p in range(int(tok.prompt_lengths[q]), len(x)):
                rows.append(lp[p - 1] if p >= 1 else torch.full((V,), -float(np.log(V))))
                valid.append(p >= 1)
                tokens.append(int(x[p]))
    exp = {"rows": torch.stack(rows), "valid": torch.tensor(valid), "tokens": torch.tensor(tokens)}
    exp["ctx_rows"], exp["ctx_tokens"] = exp["rows"][exp["valid"]], exp["tokens"][exp["valid"]]
    exp["ctx_lp"] = exp["ctx_rows"].gather(1, exp["ctx_tokens"][:, None])[:, 0]
    # per row: log p(teacher token), 0.0 without context
    exp["row_lp"] = torch.tensor([float(exp["rows"][r].gather(0, exp["tokens"][r])) if exp["valid"][r] else 0.0
                                  for r in range(len(rows))])
    n_rows = [len(tok.input_ids[q]) - int(tok.prompt_lengths[q]) for q in ORDER]
    exp["record_of_row"] = torch.repeat_interleave(torch.arange(len(ORDER)), torch.tensor(n_rows))
    assert int((~exp["valid"]).sum()) == 1
    return {"path": path, "model": model, "tok": tok, "V": V, "pad": tiny_tokenizer.pad_token_id, "exp": exp,
            "dir": d}


def _dense(sd, V: int) -> torch.Tensor:
    """The dense log-probabilities [N, V] of a SparseDist listing every token (-inf where a row lists none)."""
    out = torch.full((sd.num_rows, V), -float("inf"))
    for r in range(sd.num_rows):
        keep = sd.indices[r] >= 0
        out[r, sd.indices[r][keep].long()] = sd.logprobs[r][keep].float()
    return out


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(b.shape)}"
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert err <= ATOL, f"{what}: max abs difference {err:.3g} from the expected rows (tolerance {ATOL})"


def _prompts_responses(tok, order):
    return ([tok.input_ids[q][:int(tok.prompt_lengths[q])].tolist() for q in order],
            [tok.input_ids[q][int(tok.prompt_lengths[q]):].tolist() for q in order])


@pytest.mark.parametrize("caller", CALLERS)
def test_row_order_and_position_zero(tf, caller):
    model, tok, V, pad, exp = tf["model"], tf["tok"], tf["V"], tf["pad"], tf["exp"]
    valid = exp["valid"]
    batches = [ORDER[s:s + BATCH] for s in range(0, len(ORDER), BATCH)]

    if caller == "target_logprobs":  # evaluation's response_logprobs
        from bayeskd.evaluation.evaluate import response_logprobs

        lp, got_valid = response_logprobs(model, tok, ORDER, batch_size=BATCH)
        assert torch.equal(got_valid, valid), f"valid mask {got_valid.tolist()} != {valid.tolist()}"
        _close(lp, exp["rows"], "target_logprobs")

    elif caller == "proxy_topk":
        from bayeskd.posterior.proxy import ProxyPosterior
        from bayeskd.core.names import TEACHER_LOGPROB

        pp = ProxyPosterior(model, device="cpu", batch_size=BATCH, top_k=V)
        sd = pp.proxy_topk(tok, ORDER, V, teacher_logprob=True, top_k=V)
        assert sd.num_rows == len(valid) and sd.vocab_size == V
        dense = _dense(sd, V)
        _close(dense[valid], exp["ctx_rows"], "proxy_topk rows with context")
        _close(sd.tail[valid], torch.zeros(int(valid.sum())), "proxy_topk tail with context")
        at0 = ~valid
        assert (sd.indices[at0] == -1).all() and torch.isinf(sd.logprobs[at0]).all(), "position-0 row lists entries"
        assert torch.equal(sd.tail[at0], torch.ones(1)), f"position-0 row tail {sd.tail[at0].tolist()} != [1.0]"
        _close(sd.extras[TEACHER_LOGPROB], exp["row_lp"], "proxy_topk teacher-token log-probabilities")

    elif caller in ("trainer", "trainer_targets"):  # what BayesKDTrainer.compute_loss and _proxy_rows select
        from types import SimpleNamespace

        from bayeskd.distillation.targets import BayesKDCollator, TeacherTargetsDataset
        from bayeskd.distillation.trainer import BayesKDTrainer

        targets = None
        if caller == "trainer_targets":  # proxy-only target shards written by the posterior stage, read back
            from bayeskd.posterior.proxy import ProxyPosterior

            targets = str(tf["dir"] / "targets")
            if not (tf["dir"] / "targets" / "summary.json").exists():
                ProxyPosterior(model, device="cpu", batch_size=BATCH, top_k=V).estimate(
                    tok, None, targets, shard_records=2, progress=False)
        ds, collate = TeacherTargetsDataset(tok, targets), BayesKDCollator(pad)
        student, tokens, proxy, tgt = [], [], [], []
        with torch.no_grad():
            for b in batches:
                inputs = collate([ds[q] for q in b])
                ids, att, rmask = inputs["input_ids"], inputs["attention_mask"], inputs["response_mask"]
                logits = model(input_ids=ids, attention_mask=att).logits
                student.append(torch.log_softmax(select_rows(logits, rmask)[:, :V].float(), -1))
                tokens.append(select_rows(ids[:, 1:], rmask, shifted=True))
                assert torch.equal(inputs["labels"][rmask], tokens[-1]), "labels disagree with the selected tokens"
                proxy.append(torch.log_softmax(BayesKDTrainer._proxy_rows(SimpleNamespace(proxy_model=model), ids,
                                                                          att, rmask, V), -1))
                if targets is not None:
                    from bayeskd.core.sparse import SparseDist

                    tgt.append(_dense(SparseDist(inputs["target_indices"], inputs["target_logprobs"],
                                                 inputs["target_tail"], V), V))
        _close(torch.cat(student), exp["ctx_rows"], "trainer student rows")
        _close(torch.cat(proxy), exp["ctx_rows"], "trainer _proxy_rows")
        assert torch.equal(torch.cat(tokens), exp["ctx_tokens"]), "trainer tokens are not in record order"
        if targets is not None:  # the dataset dropped the position-0 target row; the rest line up with the student
            _close(torch.cat(tgt), exp["ctx_rows"], "trainer target rows")

    elif caller == "proxy_kd":
        from bayeskd.distillation.align_proxy import _response_logprobs, alignment_diagnostics, sequence_logprobs

        seqs = [tok.input_ids[q] for q in ORDER]
        masks = [tok.response_mask[q] for q in ORDER]
        lp, tokens, item = _response_logprobs(model, seqs, masks, pad, "cpu")
        _close(lp[:, :V], exp["ctx_rows"], "proxy_kd _response_logprobs")
        assert torch.equal(tokens.cpu(), exp["ctx_tokens"]), "_response_logprobs tokens are not in record order"
        assert torch.equal(item.cpu(), exp["record_of_row"][valid]), "_response_logprobs items are wrong"
        prompts, responses = _prompts_responses(tok, ORDER)
        seq = sequence_logprobs(model, prompts, responses, pad_token_id=pad, batch_size=BATCH)
        want = torch.zeros(len(ORDER), dtype=torch.float64).index_add_(0, exp["record_of_row"], exp["row_lp"].double())
        _close(seq, want, "proxy_kd sequence_logprobs (position-0 token contributes nothing)")
        diag = alignment_diagnostics(model, tok, batch_size=BATCH, pad_token_id=pad)  # all records, in data order
        n_ctx = sum(len(x) - max(int(p), 1) for x, p in zip(tok.input_ids, tok.prompt_lengths))
        assert diag["positions"] == n_ctx == int(valid.sum()), f"{diag['positions']} positions, expected {n_ctx}"
        assert diag["teacher_token_logprob"] == pytest.approx(float(exp["ctx_lp"].double().mean()), abs=ATOL)

    elif caller == "gad":
        from bayeskd.distillation.gad import _pack, _token_logprobs

        got = []
        with torch.no_grad():
            for b in batches:
                s = _pack(*_prompts_responses(tok, b), pad, "cpu")
                got.append(select_rows(_token_logprobs(model, s), s["response_mask"], shifted=True))
        _close(torch.cat(got), exp["ctx_lp"], "gad _token_logprobs")

    elif caller == "whitebox":
        from bayeskd.teachers.local import WhiteBoxTeacher

        teacher = WhiteBoxTeacher(tf["path"])
        got = []
        for b in batches:
            batch = pad_batch([tok.input_ids[q] for q in b], [tok.response_mask[q] for q in b], pad)
            got.append(select_rows(teacher.logprobs(batch["input_ids"], batch["attention_mask"]),
                                   batch["response_mask"])[:, :V])
        lp = torch.cat(got)
        # the teacher's rows are log-softmax over the whole output width; the tiny model's equals V
        _close(lp, exp["ctx_rows"], "WhiteBoxTeacher.logprobs")
        one = teacher.logprobs(tok.input_ids[AT0])  # one record, 1-D: row t predicts token t + 1
        assert one.shape[:2] == (1, len(tok.input_ids[AT0]))
        r0 = int(np.nonzero(exp["record_of_row"].numpy() == ORDER.index(AT0))[0][0])
        _close(one[0, :-1, :V], exp["rows"][r0 + 1:r0 + len(tok.input_ids[AT0])], "WhiteBoxTeacher.logprobs 1-D")

    else:
        raise AssertionError(caller)


@pytest.mark.parametrize("window", [2, 3, 4, 7, 64])
def test_sliding_windows_cover_every_row_once_with_half_a_window_of_context(window):
    """record_batches(max_length=W): each target row exactly once, predicting the right token, from a window no
    longer than W in which it has min(its position, W - W // 2) tokens or more before it; records no longer than W
    give the same batches as without windows."""
    from bayeskd.teacher_forcing import record_batches, target_row_layout

    rng = np.random.default_rng(window)
    seqs = [rng.integers(3, 50, size=int(n)) for n in rng.integers(1, 30, size=12)]
    plens = [int(rng.integers(0, len(s))) for s in seqs]
    data = TokenizedData(input_ids=seqs, response_mask=[np.arange(len(s)) >= p for s, p in zip(seqs, plens)],
                         prompt_lengths=np.array(plens), tokenizer_fingerprint="t", vocab_size=50)
    indices = [5, 0, 3, 11, 2, 7]
    _, plen, offsets = target_row_layout(data, indices)
    seen = np.zeros(int(offsets[-1]), int)
    for rb in record_batches(data, indices, batch_size=3, max_length=window):
        assert rb.input_ids.shape[1] <= window
        for b, pos, row in zip(rb.batch_index.tolist(), rb.position.tolist(), rb.target_row.tolist()):
            q = int(np.searchsorted(offsets, row, side="right") - 1)
            p = int(plen[q]) + row - int(offsets[q])  # the token this row predicts, in its record
            assert rb.input_ids[b, pos + 1] == seqs[indices[q]][p]
            assert pos + 1 >= min(p, window - window // 2)  # tokens of context before it in the window
            seen[row] += 1
    first = [int(offsets[q]) for q in range(len(indices)) if plen[q] == 0 and offsets[q + 1] > offsets[q]]
    expect = np.ones_like(seen)
    expect[first] = 0  # a response token at position 0 has no context: no row
    np.testing.assert_array_equal(seen, expect)
    longest = max(len(seqs[i]) for i in indices)
    a = list(record_batches(data, indices, 3, max_length=longest))
    b = list(record_batches(data, indices, 3))
    assert len(a) == len(b) and all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.target_row, y.target_row)
                                    and torch.equal(x.position, y.position) for x, y in zip(a, b))
