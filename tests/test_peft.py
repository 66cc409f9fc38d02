"""A student trained through a LoRA adapter (`distill --use-peft`, the `peft` extra): only the adapter trains, the
output holds the merged student and the adapter, both load back and agree, and the student learned."""
import json

import pytest
import torch
from click.testing import CliRunner

from bayeskd.cli import main
from conftest import save_tiny_llama

peft = pytest.importorskip("peft")


def _teacher_ce(model, tok, records) -> float:
    """Mean CE of the teacher's response tokens under `model` (prompt + response, teacher forced)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for r in records:
            p = tok(r["prompt"])["input_ids"]
            ids = torch.tensor([p + tok(" " + r["response"], add_special_tokens=False)["input_ids"]])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            tgt = ids[0, 1:]
            rows = torch.arange(len(p) - 1, len(tgt))
            total -= float(lp[rows, tgt[rows]].sum())
            n += len(rows)
    return total / n


def test_lora_student_trains_only_its_adapter_and_loads_back(tmp_path, tiny_tokenizer_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    student = save_tiny_llama(tmp_path / "student", tok, seed=0, layers=2)
    records = [{"prompt": f"Question {i}: what does it return?",
                "response": "the module returns a list of strings when called with an object ."} for i in range(16)]
    data = tmp_path / "teacher.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "lora"
    res = CliRunner().invoke(main, ["distill", "--data", str(data), "--student", student, "--out", str(out),
                                    "--use-peft", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
                                    "--max-steps", "20", "--learning-rate", "5e-2",
                                    "--per-device-train-batch-size", "8", "--logging-steps", "5", "--seed", "0"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "sft" and summary["steps"] == 20
    # every linear layer but the lm_head: per layer q, k, v, o [32 -> 32] and gate, up [32 -> 64], down [64 -> 32]
    assert summary["adapter"]["trainable_params"] == 2 * (4 * 4 * (32 + 32) + 3 * 4 * (32 + 64))

    before = AutoModelForCausalLM.from_pretrained(student)
    merged = AutoModelForCausalLM.from_pretrained(out)  # the student with the adapter merged
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), out / "adapter")
    from safetensors.torch import load_file
    assert all("lora_" in k for k in load_file(str(out / "adapter" / "adapter_model.safetensors")))
    b, m = before.state_dict(), merged.state_dict()
    assert b.keys() == m.keys()
    changed = {k for k in b if not torch.equal(b[k], m[k])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in (  # the adapted layers only
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    ids = torch.tensor([tok("Question 3: what does it return? the module")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    # it learned the response (0.26 nats in 20 steps here: the tiny model's lm_head, frozen at init std 0.02, keeps
    # every logit within about +-0.6, so CE cannot fall far below log V = 6.24 through the adapter)
    assert _teacher_ce(merged, tok, records) < _teacher_ce(before, tok, records) - 0.1
    assert summary["final_loss"] < summary["first_loss"]


def test_peft_config_on_the_trainer(tmp_path, tiny_tokenizer_dir):
    """`BayesKDTrainer(peft_config=...)` as TRL's trainers: the model it trains is the adapter-wrapped one, whose
    only trainable parameters are the adapter's."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bayeskd.distillation.trainer import BayesKDConfig, BayesKDTrainer, lora_config

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "s", tok, seed=0))
    trainer = BayesKDTrainer(model=model, args=BayesKDConfig(output_dir=str(tmp_path / "o")),
                             peft_config=LoraConfig(r=2, target_modules=["o_proj"]))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "o_proj" in n for n in trainable)
    assert lora_config(BayesKDConfig(output_dir="unused")) is None
    cfg = lora_config(BayesKDConfig(output_dir="unused", use_peft=True, lora_r=3))
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules) == (3, 32, "all-linear")
