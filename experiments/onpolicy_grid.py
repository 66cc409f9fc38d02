"""Where does on-policy distillation pay? White-box on-policy KD against off-policy white-box KD at the same steps,
from the lab's on-policy warm starts, over λ, sampling temperature and steps. Scored on the validation half of the
held-out prompts (the study's test half is left alone): kl_tf and kl_own pooled over 4 own samples per prompt.

    python experiments/onpolicy_grid.py --root /tmp/lab27 --preset tiny --seeds 0,1

Needs a lab run with the on-policy study (`--methods offpolicy-more,...`: its warm starts in run/onpolicy/).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import RESULTS

VARIANTS = {  # name: (λ, temperature, epochs)
    "base": (1.0, 1.0, 1.0),
    "lambda0.5": (0.5, 1.0, 1.0),
    "t0.7": (1.0, 0.7, 1.0),
    "epochs3": (1.0, 1.0, 3.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from bayeskd.data import load_teacher_records, load_tokenizer, tokenize_records
    from bayeskd.distillation.trainer import distill
    from bayeskd.evaluation.evaluate import response_logprobs, sample_own, student_metrics
    from bayeskd.lab.build import build_lab
    from bayeskd.lab.recipe import split_heldout
    from bayeskd.lab.run import RUN_CONFIGS

    paths = build_lab(args.root, args.preset, progress=False)
    run = Path(paths["root"]) / "run"
    cfg = RUN_CONFIGS["tiny"]
    tok = load_tokenizer(paths["tokenizer"])
    held, _ = load_teacher_records(str(run / "teacher_heldout.jsonl"))
    held_tok = tokenize_records(held, tok)
    valid_idx, _ = split_heldout(held)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"])
    t_valid = response_logprobs(teacher, held_tok, valid_idx)
    own_prompts = [held[i] for i in valid_idx] * 4

    def score(model_dir: Path, seed: int) -> dict[str, float]:
        samples = sample_own(str(model_dir), own_prompts, tok, max_new_tokens=cfg.max_new_tokens, seed=2000 + seed)
        return student_metrics(teacher, AutoModelForCausalLM.from_pretrained(str(model_dir)), held_tok,
                               indices=valid_idx, teacher_rows=t_valid, own_samples=samples)

    out_dir = run / "onpolicy_grid"
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        warm = json.loads((run / "report.json").read_text())  # the warm start the study chose
        start = next(Path(w["best"]["dir"]) for s, w in warm["students"]["onpolicy"]["warm_start"].items()
                     if int(s) == seed)
        for name in args.variants.split(","):
            lam, temp, epochs = VARIANTS[name]
            base = dict(teacher=paths["teacher"], whitebox_top_k=0, ce_weight=0.0, num_train_epochs=epochs,
                        per_device_train_batch_size=cfg.batch_size, learning_rate=1e-3, lr_scheduler_type="constant",
                        warmup_steps=0, seed=seed, data_seed=seed, save_strategy="no", disable_tqdm=True,
                        report_to=[])
            result = {"seed": seed, "variant": name, "lambda": lam, "temperature": temp, "epochs": epochs}
            for kind, extra in (("off", {}), ("on", dict(onpolicy_fraction=lam, onpolicy_temperature=temp,
                                                          onpolicy_targets="teacher",
                                                          onpolicy_max_new_tokens=cfg.max_new_tokens))):
                out = out_dir / (f"off-e{epochs:g}-s{seed}" if kind == "off" else f"{name}-s{seed}")
                if not (out / "summary.json").exists():
                    distill(str(run / "teacher_train.jsonl"), str(start), str(out), **base, **extra)
                s = json.loads((out / "summary.json").read_text())
                m = score(out, seed)
                result[kind] = {**m, "seconds": s["train_seconds"], "steps": s["steps"]}
            result["gain_kl_own"] = result["off"]["kl_own"] - result["on"]["kl_own"]
            rows.append(result)
            print(f"seed {seed} {name}: off kl_own {result['off']['kl_own']:.4f}, on {result['on']['kl_own']:.4f}, "
                  f"gain {result['gain_kl_own']:+.4f}", flush=True)
    summary = {name: {"gain_kl_own_mean": float(np.mean([r["gain_kl_own"] for r in rows if r["variant"] == name])),
                      "gains": [r["gain_kl_own"] for r in rows if r["variant"] == name]}
               for name in args.variants.split(",")}
    path = RESULTS / f"onpolicy_grid_{args.preset}.json"
    path.write_text(json.dumps({"command": "python experiments/onpolicy_grid.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items()), "variants": VARIANTS, "rows": rows, "summary": summary},
        indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
