"""Which GAD settings keep (or make) the student better than its SFT start?

    python experiments/gad_tune.py --preset tiny --seeds 0,1,2 --variants lab,no_std,sft0.5
    python experiments/gad_tune.py --list                      # the variants and what each changes
    python experiments/gad_tune.py --check                     # every variant is still a valid GAD config

Tuning never sees the lab's evaluation prompts. The teacher's TRAINING records (run/teacher_train.jsonl) are split
by prompt (seeded, --val-frac) into a tuning part and a validation part; per seed, an SFT student is trained on the
tuning part only (the lab's SFT recipe), GAD runs from it on the same part, and both are scored on the validation
part: kl_tf (KL(teacher || student) at the teacher's positions of the validation records) and kl_own (the same at
the student's own samples of the validation prompts, temperature 1, as the lab scores students). Every variant is
the lab's GAD settings plus the overrides listed in VARIANTS. Reported: mean ± std over seeds and the paired
difference to the SFT start (negative = better than SFT).

Results are cached per (seed, variant) under --work, so adding variants reruns only the new ones.
Writes experiments/results/gad_tune_<preset>[_<lab root name>][_teacher].json (merged with the variants already
there).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bayeskd import GADConfig, distill, gad
from bayeskd.data import load_teacher_records, load_tokenizer, tokenize_records
from bayeskd.evaluation.evaluate import sample_own, student_metrics
from bayeskd.evaluation.metrics import kl_teacher_to_estimate, summarize
from bayeskd.lab.run import RUN_CONFIGS
from bayeskd.teacher_forcing import target_logprobs as response_logprobs
from common import RESULTS, seed_all, split_records

METRICS_VERSION = 3  # raise when Scorer changes: cached metrics are recomputed (a finished GAD run is reused)

# name -> (GADConfig overrides on top of the lab's GAD settings, what it tests)
VARIANTS: dict[str, tuple[dict, str]] = {
    "lab": ({}, "the lab's GAD: D warm-up 10 steps, 30 GRPO steps, lr 1e-4, T 0.8, kl 0.001, std-normalised"),
    "no_std": ({"scale_rewards": False}, "Dr. GRPO: advantages not divided by the group's std"),
    "teacher_base": ({"baseline": "teacher"}, "advantage baseline D(teacher response) instead of the group mean"),
    "kl0.1": ({"kl_coef": 0.1}, "KL to the SFT start x100"),
    "kl1": ({"kl_coef": 1.0}, "KL to the SFT start x1000"),
    "sft0.5": ({"sft_coef": 0.5}, "+0.5 x cross-entropy on the batch's teacher responses"),
    "sft1": ({"sft_coef": 1.0}, "+1 x cross-entropy on the batch's teacher responses"),
    "sft_only": ({"sft_coef": 1.0, "grpo_off": True}, "control: the SFT term alone (the GRPO term weighted 0)"),
    "t1": ({"temperature": 1.0}, "sampling temperature 1 (the temperature students are scored at)"),
    "dwarm75": ({"warmup_steps": 75, "warmup_d_only_steps": 75}, "D warm-up of one epoch of the tuning prompts"),
    "lr3e-5": ({"learning_rate": 3e-5, "d_lr": 3e-5}, "learning rates / 3"),
    "d_proxy": ({"discriminator": "proxy"}, "D from the lab's open proxy (2 layers, width 128; the student: 1, 64)"),
    "d_proxy_w75": ({"discriminator": "proxy", "warmup_steps": 75, "warmup_d_only_steps": 75},
                    "D from the proxy, warmed up one epoch"),
    # sampling at the teacher data's temperature (1), combined with the other levers
    "t1_sft0.5": ({"temperature": 1.0, "sft_coef": 0.5}, "T 1 + 0.5 x teacher cross-entropy"),
    "t1_sft1": ({"temperature": 1.0, "sft_coef": 1.0}, "T 1 + 1 x teacher cross-entropy"),
    "t1_sft_only": ({"temperature": 1.0, "sft_coef": 1.0, "grpo_off": True}, "control: T 1, the SFT term alone"),
    "t1_no_std": ({"temperature": 1.0, "scale_rewards": False}, "T 1 + Dr. GRPO"),
    "t1_kl0.1": ({"temperature": 1.0, "kl_coef": 0.1}, "T 1 + KL x100"),
    "t1_d_proxy": ({"temperature": 1.0, "discriminator": "proxy"}, "T 1 + D from the proxy"),
    "t1_60": ({"temperature": 1.0, "steps": 60}, "T 1, 60 GRPO steps"),
    "t1_sft1_60": ({"temperature": 1.0, "sft_coef": 1.0, "steps": 60}, "T 1 + teacher cross-entropy, 60 steps"),
    "t1_sft0.5_60": ({"temperature": 1.0, "sft_coef": 0.5, "steps": 60}, "T 1 + 0.5 x teacher cross-entropy, 60 steps"),
    "t1_sft_only_60": ({"temperature": 1.0, "sft_coef": 1.0, "steps": 60, "grpo_off": True},
                       "control: T 1, the SFT term alone, 60 steps"),
    "t1_dlr1e-3": ({"temperature": 1.0, "d_lr": 1e-3}, "T 1, D learning rate x10 (D stays near chance at 1e-4)"),
    "t1_sft1_60_dlr1e-3": ({"temperature": 1.0, "sft_coef": 1.0, "steps": 60, "d_lr": 1e-3},
                           "T 1 + teacher cross-entropy, 60 steps, D learning rate x10"),
}


def lab_settings(preset: str) -> dict:
    """The lab's GAD recipe as it was when this investigation began (spelled out, so the "lab" variant stays
    that recipe whatever the defaults become)."""
    rc = RUN_CONFIGS[preset]
    return dict(warmup_steps=10, warmup_d_only_steps=10, steps=30, group_size=rc.gad_group,
                batch_prompts=rc.gad_batch_prompts, learning_rate=rc.gad_lr, d_lr=rc.gad_lr,
                max_new_tokens=rc.max_new_tokens, temperature=0.8, sft_coef=0.0, scale_rewards=True, baseline="group", kl_coef=0.001)


def variant_settings(preset: str, name: str) -> dict:
    over = dict(VARIANTS[name][0])
    if over.pop("grpo_off", False):  # GRPO term off: advantages scaled to ~0 through a huge eps, no std scaling
        over.update(scale_rewards=True, adv_eps=1e9)
    return {**lab_settings(preset), **over}


def teacher_sized_init(preset: str, root: Path, work: Path) -> Path:
    """A fresh (seeded) student initialisation with the lab teacher's size: 2x the width and layers of the lab's."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from bayeskd.lab.build import PRESETS

    path = work / "student_init"
    if not (path / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(str(root / "student"))
        p = PRESETS[preset]
        torch.manual_seed(p.seed + 2000)
        model = LlamaForCausalLM(p.teacher.llama_config(tok, max(512, 4 * p.seq_len)))
        model.save_pretrained(str(path))
        tok.save_pretrained(str(path))
    return path


class Scorer:
    """The teacher's rows on one seed's validation records, computed once; scores any student on them."""

    def __init__(self, teacher, val_path: Path, tok, max_new_tokens: int, seed: int, own_samples: int):
        self.records, _ = load_teacher_records(str(val_path))
        self.own_samples = own_samples
        self.tok, self.teacher, self.seed, self.max_new = tok, teacher, seed, max_new_tokens
        self.tokd = tokenize_records(self.records, tok)
        self.rows = response_logprobs(teacher, self.tokd)

    def __call__(self, student_dir: Path) -> dict[str, float]:
        from transformers import AutoModelForCausalLM

        # own_samples draws per validation record (each batch has its own seed): kl_own's noise between variants
        # is otherwise as large as their differences
        own = sample_own(str(student_dir), list(self.records) * self.own_samples, self.tok,
                         max_new_tokens=self.max_new, seed=1000 + self.seed)
        model = AutoModelForCausalLM.from_pretrained(str(student_dir))
        m = student_metrics(self.teacher, model, self.tokd, teacher_rows=self.rows)  # nll, kl_tf
        # On the own samples, from one pass of each model: kl_own (as student_metrics computes it), the other
        # direction (what on-policy distillation minimises; mode-seeking RL can lower it while raising kl_own) and
        # the student's entropy (RL tends to sharpen a policy).
        V = int(self.tokd.vocab_size)
        t_lp, valid = response_logprobs(self.teacher, own, vocab_size=V)
        s_lp, _ = response_logprobs(model, own, vocab_size=V)
        m.update(summarize({"kl_own": kl_teacher_to_estimate(t_lp, s_lp), "rkl_own": kl_teacher_to_estimate(s_lp, t_lp),
                            "ent_own": -(s_lp.exp() * s_lp).sum(-1).double()}, valid))
        resp = own.response_sequences()
        m["own_len"] = float(np.mean([len(r) for r in resp]))
        return {k: float(v) for k, v in m.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(RUN_CONFIGS))
    ap.add_argument("--root", default=None, help="lab root (default runs/lab/<preset>)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="lab", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--val-frac", type=float, default=0.15)
    ap.add_argument("--own-samples", type=int, default=4, help="student samples per validation record for kl_own")
    ap.add_argument("--work", default=None, help="scratch dir (default /tmp/gad_tune_<preset>)")
    ap.add_argument("--student-size", default="lab", choices=["lab", "teacher"],
                    help="the student (and so D) at the lab's size, or a fresh init at the teacher's size (scale)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--check", action="store_true", help="validate every variant's settings as a GADConfig, exit")
    args = ap.parse_args()
    if args.check:  # `discriminator` is gad()'s argument, not a config field
        for k in VARIANTS:
            GADConfig(**{f: v for f, v in variant_settings(args.preset, k).items() if f != "discriminator"})
        print(f"{len(VARIANTS)} variants: valid GAD configs")
        return
    if args.list:
        for k, (o, d) in VARIANTS.items():
            print(f"{k:<14} {d}  {o}")
        return
    names = args.variants.split(",")
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; --list shows them")

    t0 = time.perf_counter()
    torch.set_num_threads(2)
    import transformers

    transformers.logging.disable_progress_bar()  # a load / save bar per model would bury the table
    rc = RUN_CONFIGS[args.preset]
    root = Path(args.root or f"runs/lab/{args.preset}")
    run = root / "run"
    suffix = ("" if root.name == args.preset else f"_{root.name}") + \
        ("" if args.student_size == "lab" else f"_{args.student_size}")
    work = Path(args.work or f"/tmp/gad_tune_{args.preset}{suffix}")
    student_init = root / "student" if args.student_size == "lab" else teacher_sized_init(args.preset, root, work)
    seeds = [int(s) for s in args.seeds.split(",")]
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(root / "teacher")).eval()
    results: dict[str, dict[str, dict]] = {}
    for seed in seeds:
        seed_all(seed)
        sdir = work / f"s{seed}"
        tune, val, n_tune, n_val = split_records(run / "teacher_train.jsonl", args.val_frac, seed, sdir)
        sft = sdir / "sft"
        if not (sft / "summary.json").exists():
            distill(str(tune), str(student_init), str(sft), **rc.train_kwargs(seed, progress=False))
        tok = load_tokenizer(str(sft))
        scorer = None
        for name in ["sft"] + names:
            cache = sdir / f"{name}.metrics.json"
            if cache.exists() and json.loads(cache.read_text()).get("metrics_version") == METRICS_VERSION:
                m = json.loads(cache.read_text())
            else:
                scorer = scorer or Scorer(teacher, val, tok, rc.max_new_tokens, seed, args.own_samples)
                t1 = time.perf_counter()
                if name == "sft":
                    m = scorer(sft)
                else:
                    settings = variant_settings(args.preset, name)
                    if settings.get("discriminator") == "proxy":
                        settings["discriminator"] = str(root / "proxy")
                    summary = gad(str(tune), str(sft), str(sdir / name), seed=seed, progress=False, **settings)
                    m = scorer(sdir / name / "student")
                    last = [h for h in summary["history"] if h["stage"] == "gad"][-5:]
                    m["d_acc_last5"] = float(np.mean([h["d_acc"] for h in last]))
                    m["kl_ref_last5"] = float(np.mean([h["kl_ref"] for h in last]))
                m["seconds"] = round(time.perf_counter() - t1, 1)
                m["metrics_version"] = METRICS_VERSION
                cache.write_text(json.dumps(m))
            results.setdefault(name, {})[str(seed)] = m
            print(f"seed {seed} {name:<13} " + " ".join(f"{k}={v:.4f}" for k, v in m.items()
                                                       if k != "metrics_version"), flush=True)

    print(f"\n{args.preset}, seeds {seeds}, validation = {args.val_frac:.0%} of the training prompts; "
          "Δ = variant - SFT start, paired by seed (negative is better)")
    print(f"{'variant':<14} {'kl_tf':>15} {'Δkl_tf':>16} {'kl_own':>15} {'Δkl_own':>16} {'Δrkl_own':>16} "
          f"{'Δent_own':>16} {'own len':>8} {'D acc':>6}")
    table = {}
    for name in ["sft"] + names:
        per = results[name]
        row = {}
        for k in ("kl_tf", "kl_own", "rkl_own", "ent_own"):
            v = np.array([per[str(s)][k] for s in seeds])
            d = v - np.array([results["sft"][str(s)][k] for s in seeds])
            row[k], row["d_" + k] = [float(v.mean()), float(v.std())], [float(d.mean()), float(d.std())]
        row["own_len"] = float(np.mean([per[str(s)]["own_len"] for s in seeds]))
        row["d_acc_last5"] = float(np.mean([per[str(s)].get("d_acc_last5", np.nan) for s in seeds]))
        table[name] = row
        cells = [f"{row[k][0]:{'+' if k.startswith('d_') else ''}.4f}±{row[k][1]:.4f}"
                 for k in ("kl_tf", "d_kl_tf", "kl_own", "d_kl_own", "d_rkl_own", "d_ent_own")]
        print(f"{name:<14} " + " ".join(cells) + f" {row['own_len']:>8.1f} {row['d_acc_last5']:>6.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"gad_tune_{args.preset}{suffix}.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    new = {n: {"settings": variant_settings(args.preset, n) if n != "sft" else None,
               "what": VARIANTS[n][1] if n != "sft" else "SFT start (tuning part)",
               "summary": table[n], "per_seed": results[n]} for n in table}
    out.write_text(json.dumps({"preset": args.preset, "lab": str(root), "student_size": args.student_size,
                               "seeds": seeds, "val_frac": args.val_frac, "own_samples": args.own_samples,
                               "variants": {**old.get("variants", {}), **new}}, indent=1))
    print(f"wrote {out}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
