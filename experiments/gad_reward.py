"""Does GAD's discriminator reward track closeness to the teacher?

    python experiments/gad_reward.py --preset tiny            # the finished tiny lab in runs/lab/tiny (~2 min CPU)
    python experiments/gad_reward.py --preset micro           # builds a micro lab in /tmp/gadlab if missing
    python experiments/gad_reward.py --preset tiny --first-recipe   # the lab's first GAD recipe (T 0.8, no SFT term)

The teacher's TRAINING records (run/teacher_train.jsonl) are split by prompt into a tuning part (GAD trains on
it) and a validation part (never seen by D or by the GRPO stage; the lab's evaluation prompts are never used).
GAD runs with the lab's GAD settings (`bayeskd.lab.run.RUN_CONFIGS[preset]`) from the lab's SFT student of the
same seed, in pieces: the adversarial stage is run to a few step counts in turn (each run resumes the last; a
resumed run is bit-identical to an uninterrupted one), so the checkpoints after warm-up (out/warmup), mid and end
(out/) are scored without any change to the library.

At each point, on the validation prompts: `group_size` student samples per prompt (the GAD rollout, same
temperature and length limit), the teacher's recorded responses (exactly as GAD's D sees them) and fresh samples
drawn from the teacher model itself (temperature 1, the lab's sampling setting). For every response: D's score,
the teacher's log-likelihood (sum and per token, temperature 1), length, ends-with-EOS, first token. Reported:
Spearman of D with teacher log-likelihood (pooled, and within each prompt's group, which is what GRPO's group
advantages see), with length and with EOS; D on teacher vs student responses (AUC = share of pairs ranked
teacher > student) next to how well length / EOS / teacher likelihood alone separate them (the shortcut check).

Writes experiments/results/gad_reward_<preset>.json (the table: rows per point and seed, their aggregate) and
gad_reward_<preset>.png (D against the teacher's likelihood, every response), and the per-response values behind
the plot to experiments/results/raw/gad_reward_<preset>_scatter.json (~0.7 MB, not in git).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from scipy.stats import mannwhitneyu, spearmanr

from bayeskd.data import load_teacher_records, load_tokenizer, tokenize_records
from bayeskd import GADConfig, gad
from bayeskd.distillation.gad import rollout
from bayeskd.distillation.gad_parts import Discriminator
from bayeskd.lab.run import RUN_CONFIGS
from bayeskd.teacher_forcing import pad_prompt_response, token_logprobs
from common import RAW, RESULTS, seed_all, split_records


# ---------------------------------------------------------------------------------------------------- GAD's inputs
# As `bayeskd.distillation.gad` forms them: prompts cut from the left, teacher responses and samples cut at
# max_new_tokens; `group_size` samples per prompt, each cut after its first EOS.

def prompt_response_ids(data: Path, tok, cfg: GADConfig) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, teacher response ids) of the records in `data`, cut as GAD cuts them."""
    records, _ = load_teacher_records(str(data))
    tokd = tokenize_records(records, tok)
    prompts, responses = [], []
    for ids, p in zip(tokd.input_ids, tokd.prompt_lengths):
        p = int(p)
        prompts.append(ids[max(0, p - cfg.max_prompt_tokens):p].tolist())
        responses.append(ids[p:p + cfg.max_new_tokens].tolist())
    return prompts, responses


# ---------------------------------------------------------------------------------------------------- measures

@torch.no_grad()
def d_scores(D, prompts, responses, pad, bs=64) -> np.ndarray:
    out = []
    for i in range(0, len(prompts), bs):
        s = pad_prompt_response(prompts[i:i + bs], responses[i:i + bs], pad)
        out.append(D(input_ids=s["input_ids"], attention_mask=s["attention_mask"]).numpy())
    return np.concatenate(out)


@torch.no_grad()
def teacher_ll(teacher, prompts, responses, pad, bs=64) -> tuple[np.ndarray, np.ndarray]:
    """(sum, per-token) log-likelihood of each response under the teacher at temperature 1."""
    sums = []
    for i in range(0, len(prompts), bs):
        s = pad_prompt_response(prompts[i:i + bs], responses[i:i + bs], pad)
        lp = token_logprobs(teacher, s, 1.0, explicit_positions=True)
        m = s["response_mask"][:, 1:].to(lp.dtype)
        sums.append((lp * m).sum(1).numpy())
    tot = np.concatenate(sums).astype(np.float64)
    n = np.array([len(r) for r in responses], dtype=np.float64)
    return tot, np.where(n > 0, tot / np.maximum(n, 1), np.nan)


def describe(D, teacher, prompts, responses, pad, eos) -> dict[str, np.ndarray]:
    ll_sum, ll_tok = teacher_ll(teacher, prompts, responses, pad)
    return {"d": d_scores(D, prompts, responses, pad), "ll_sum": ll_sum, "ll_tok": ll_tok,
            "len": np.array([len(r) for r in responses], dtype=np.float64),
            "eos": np.array([float(bool(r) and r[-1] == eos) for r in responses]),
            "first": np.array([r[0] if r else -1 for r in responses])}


def rho(a, b) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def within_group_rho(a, b, groups) -> float:
    vals = [rho(a[groups == g], b[groups == g]) for g in np.unique(groups)]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def auc(pos, neg) -> float:
    """P(pos > neg) + 0.5 P(tie): how well a feature ranks teacher (pos) above student (neg) responses."""
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def first_token_tv(a, b) -> float:
    ca, cb = Counter(a.tolist()), Counter(b.tolist())
    return 0.5 * sum(abs(ca[k] / len(a) - cb[k] / len(b)) for k in set(ca) | set(cb))


def score_point(name, ckpt: Path, teacher, tok, val_prompts, val_teacher, fresh, cfg: GADConfig, seed: int) -> dict:
    from transformers import AutoModelForCausalLM

    G = AutoModelForCausalLM.from_pretrained(str(ckpt / "student")).eval()
    D = Discriminator.from_pretrained(str(ckpt / "discriminator")).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = tok.eos_token_id
    torch.manual_seed(seed)  # the same sampling seed at every point
    samples = rollout(G, val_prompts, cfg.group_size, cfg.temperature, cfg.max_new_tokens, pad, eos)
    n = cfg.group_size
    s_prompts = [val_prompts[i // n] for i in range(len(samples))]
    groups = np.arange(len(samples)) // n
    S = describe(D, teacher, s_prompts, samples, pad, eos)
    T = describe(D, teacher, *val_teacher, pad, eos)
    F = describe(D, teacher, *fresh, pad, eos)
    # first-token "teacher-likeness": log ratio of the teacher records' to the student samples' first-token shares
    ct, cs = Counter(T["first"].tolist()), Counter(S["first"].tolist())
    ft_lr = np.array([np.log((ct[f] + .5) / (len(T["first"]) + .5)) - np.log((cs[f] + .5) / (len(S["first"]) + .5))
                      for f in S["first"].tolist()])
    row = {
        "point": name, "checkpoint": str(ckpt), "n_student": len(samples), "n_teacher": len(T["d"]),
        "n_teacher_fresh": len(F["d"]),
        "rho_d_ll_tok": rho(S["d"], S["ll_tok"]), "rho_d_ll_sum": rho(S["d"], S["ll_sum"]),
        "rho_d_len": rho(S["d"], S["len"]), "rho_d_eos": rho(S["d"], S["eos"]),
        "rho_d_first_tok_ratio": rho(S["d"], ft_lr),
        "rho_ll_tok_len": rho(S["ll_tok"], S["len"]),
        "wg_rho_d_ll_tok": within_group_rho(S["d"], S["ll_tok"], groups),
        "wg_rho_d_ll_sum": within_group_rho(S["d"], S["ll_sum"], groups),
        "wg_rho_d_len": within_group_rho(S["d"], S["len"], groups),
        "wg_rho_d_eos": within_group_rho(S["d"], S["eos"], groups),
        "d_teacher_rec": float(np.mean(T["d"])), "d_teacher_fresh": float(np.mean(F["d"])),
        "d_student": float(np.mean(S["d"])),
        "auc_d_rec_vs_student": auc(T["d"], S["d"]), "auc_d_fresh_vs_student": auc(F["d"], S["d"]),
        "auc_d_rec_vs_fresh": auc(T["d"], F["d"]),
        "auc_len_rec_vs_student": auc(T["len"], S["len"]), "auc_eos_rec_vs_student": auc(T["eos"], S["eos"]),
        "auc_lltok_rec_vs_student": auc(T["ll_tok"], S["ll_tok"]),
        "eos_rate": {"teacher_rec": float(T["eos"].mean()), "teacher_fresh": float(F["eos"].mean()),
                     "student": float(S["eos"].mean())},
        "mean_len": {"teacher_rec": float(T["len"].mean()), "teacher_fresh": float(F["len"].mean()),
                     "student": float(S["len"].mean())},
        "mean_ll_tok": {"teacher_rec": float(np.nanmean(T["ll_tok"])), "teacher_fresh": float(np.nanmean(F["ll_tok"])),
                        "student": float(np.nanmean(S["ll_tok"]))},
        "first_token_tv": {"rec_vs_student": first_token_tv(T["first"], S["first"]),
                           "fresh_vs_student": first_token_tv(F["first"], S["first"]),
                           "rec_vs_fresh": first_token_tv(T["first"], F["first"])},
        "top_first_tokens": {k: [[tok.decode([t]) if t >= 0 else "<empty>", c / len(v)]
                                 for t, c in Counter(v.tolist()).most_common(5)]
                             for k, v in (("teacher_rec", T["first"]), ("teacher_fresh", F["first"]),
                                          ("student", S["first"]))},
    }
    # D restricted to one length/EOS stratum: does it still rank teacher above student without the cue?
    for label, ts, ss in (("eos", T["eos"] == 1, S["eos"] == 1), ("no_eos", T["eos"] == 0, S["eos"] == 0)):
        row[f"auc_d_rec_vs_student_{label}_only"] = auc(T["d"][ts], S["d"][ss])
        row[f"n_{label}"] = [int(ts.sum()), int(ss.sum())]
    scatter = {k: {f: v[f].tolist() for f in ("d", "ll_tok", "ll_sum", "len", "eos")}
               for k, v in (("student", S), ("teacher_rec", T), ("teacher_fresh", F))}
    return row, scatter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="micro", choices=sorted(RUN_CONFIGS))
    ap.add_argument("--root", default=None, help="lab root (default: runs/lab/tiny for tiny, /tmp/gadlab/micro for micro)")
    ap.add_argument("--seeds", default="0", help="comma-separated GAD seeds (each uses the lab's sft-s<seed>)")
    ap.add_argument("--val-frac", type=float, default=0.1)
    ap.add_argument("--points", type=int, default=3, help="adversarial checkpoints scored after the warm-up")
    ap.add_argument("--steps", type=int, default=None, help="override the lab's gad_steps (default: the lab's)")
    ap.add_argument("--work", default=None, help="scratch dir (default /tmp/gad_reward_<preset>)")
    ap.add_argument("--first-recipe", action="store_true",
                    help="the lab's first GAD recipe (T 0.8, no SFT term, 30 steps; writes gad_reward_<preset>_first.*)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    torch.set_num_threads(2)
    rc = RUN_CONFIGS[args.preset]
    root = Path(args.root or ("runs/lab/tiny" if args.preset == "tiny" else f"/tmp/gadlab/{args.preset}"))
    if not (root / "run" / "teacher_train.jsonl").exists():
        lab_root = root.parent
        print(f"building the {args.preset} lab under {lab_root} ...", flush=True)
        subprocess.run([str(Path(sys.executable).parent / "bayeskd"), "lab", "run", "--preset", args.preset,
                        "--root", str(lab_root)], check=True)
    run = root / "run"
    tag = args.preset + ("_first" if args.first_recipe else "")
    work = Path(args.work or f"/tmp/gad_reward_{tag}")
    seeds = [int(s) for s in args.seeds.split(",")]
    gad_steps = args.steps or (30 if args.first_recipe else rc.gad_steps)
    points = sorted({max(1, round(gad_steps * i / args.points)) for i in range(1, args.points + 1)})
    settings = dict(warmup_steps=rc.gad_d_warmup, warmup_d_only_steps=rc.gad_d_warmup, group_size=rc.gad_group,
                    batch_prompts=rc.gad_batch_prompts, learning_rate=rc.gad_lr, d_lr=rc.gad_lr,
                    max_new_tokens=rc.max_new_tokens, temperature=rc.gad_temperature, sft_coef=rc.gad_sft_coef)
    if args.first_recipe:  # the recipe this diagnostic was first run on: T 0.8, no SFT term
        settings.update(temperature=0.8, sft_coef=0.0)
    print(f"preset={args.preset} lab={root} seeds={seeds} gad settings={settings} steps={gad_steps} points={points}",
          flush=True)

    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(root / "teacher")).eval()
    rows, scatters, splits = [], {}, {}
    for seed in seeds:
        print(f"--- seed {seed}", flush=True)
        seed_all(seed)
        sdir = work / f"s{seed}"
        tune, val, n_tune, n_val = split_records(run / "teacher_train.jsonl", args.val_frac, seed, sdir)
        splits[seed] = {"tune_prompts": n_tune, "val_prompts": n_val}
        sft = run / "students" / f"sft-s{seed}"
        if not sft.exists():
            raise SystemExit(f"{sft} missing: run the lab with --seeds {seed + 1}")
        tok = load_tokenizer(str(sft))
        cfg = GADConfig(seed=seed, steps=gad_steps, **settings)
        vp, vt = prompt_response_ids(val, tok, cfg)
        # one teacher record per prompt for the prompt list; all records as the teacher's responses
        uniq = list(dict.fromkeys(tuple(p) for p in vp))
        val_prompts = [list(p) for p in uniq]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        torch.manual_seed(seed + 1000)
        fresh_r = rollout(teacher, val_prompts, 2, 1.0, cfg.max_new_tokens, pad, tok.eos_token_id)
        fresh = ([val_prompts[i // 2] for i in range(len(fresh_r))], fresh_r)
        out = sdir / "gad"
        ckpts = []
        for k, steps in enumerate(points):
            t1 = time.perf_counter()
            gad(str(tune), str(sft), str(out), **{**settings, "steps": steps}, seed=seed, progress=False)
            print(f"  gad to step {steps}: {time.perf_counter() - t1:.1f} s", flush=True)
            if k == 0:
                ckpts.append(("warmup", out / "warmup"))
            snap = sdir / f"ckpt_{steps}"  # copy: the next run overwrites out/
            subprocess.run(["rm", "-rf", str(snap)], check=True)
            subprocess.run(["cp", "-r", str(out), str(snap)], check=True)
            ckpts.append((f"gad{steps}", snap))
        for name, ck in ckpts:
            row, sc = score_point(name, ck, teacher, tok, val_prompts, (vp, vt), fresh, cfg, seed + 2000)
            row["seed"] = seed
            rows.append(row)
            scatters[f"s{seed}/{name}"] = sc
            print(f"  scored {name}: rho(D, ll/tok)={row['rho_d_ll_tok']:+.3f} auc(D)={row['auc_d_rec_vs_student']:.3f}",
                  flush=True)

    # aggregate per point over seeds
    names = list(dict.fromkeys(r["point"] for r in rows))
    keys = [k for k, v in rows[0].items() if isinstance(v, float)]
    agg = {}
    for nm in names:
        rs = [r for r in rows if r["point"] == nm]
        agg[nm] = {k: [float(np.nanmean([r[k] for r in rs])), float(np.nanstd([r[k] for r in rs]))] for k in keys}
        for d in ("eos_rate", "mean_len", "mean_ll_tok", "first_token_tv"):
            agg[nm][d] = {kk: float(np.mean([r[d][kk] for r in rs])) for kk in rs[0][d]}

    cols = [("rho_d_ll_tok", "ρ(D,ll/tok)"), ("rho_d_ll_sum", "ρ(D,ll)"), ("wg_rho_d_ll_tok", "ρwg(D,ll/tok)"),
            ("rho_d_len", "ρ(D,len)"), ("wg_rho_d_len", "ρwg(D,len)"), ("rho_d_eos", "ρ(D,eos)"),
            ("rho_d_first_tok_ratio", "ρ(D,1st)"), ("d_teacher_rec", "D(T rec)"), ("d_teacher_fresh", "D(T fresh)"),
            ("d_student", "D(S)"), ("auc_d_rec_vs_student", "AUC D rec>S"), ("auc_d_fresh_vs_student", "AUC D fresh>S"),
            ("auc_d_rec_vs_fresh", "AUC D rec>fresh")]
    print(f"\nseed(s) {seeds}; mean over seeds (± std where >1 seed); ρ = Spearman on student samples of val prompts, "
          "ρwg = mean within-prompt-group Spearman")
    print("point    " + " ".join(f"{c:>14}" for _, c in cols))
    for nm in names:
        print(f"{nm:<8} " + " ".join(f"{agg[nm][k][0]:>+8.3f}±{agg[nm][k][1]:.3f}" for k, _ in cols))
    sc = [("auc_len_rec_vs_student", "AUC len rec>S"), ("auc_eos_rec_vs_student", "AUC eos rec>S"),
          ("auc_lltok_rec_vs_student", "AUC ll/tok rec>S"), ("auc_d_rec_vs_student_eos_only", "AUC D (EOS only)"),
          ("auc_d_rec_vs_student_no_eos_only", "AUC D (no EOS)"), ("rho_ll_tok_len", "ρ(ll/tok,len)")]
    print("\nshortcut check: how well single features separate teacher records from student samples")
    print("point    " + " ".join(f"{c:>17}" for _, c in sc) + "   eos rate rec/fresh/S   len rec/fresh/S   "
          "ll/tok rec/fresh/S   1st-token TV rec-S/fresh-S/rec-fresh")
    for nm in names:
        a = agg[nm]
        print(f"{nm:<8} " + " ".join(f"{a[k][0]:>+11.3f}±{a[k][1]:.3f}" for k, _ in sc)
              + "   " + "/".join(f"{a['eos_rate'][x]:.2f}" for x in ("teacher_rec", "teacher_fresh", "student"))
              + "   " + "/".join(f"{a['mean_len'][x]:.1f}" for x in ("teacher_rec", "teacher_fresh", "student"))
              + "   " + "/".join(f"{a['mean_ll_tok'][x]:.2f}" for x in ("teacher_rec", "teacher_fresh", "student"))
              + "   " + "/".join(f"{a['first_token_tv'][x]:.2f}" for x in ("rec_vs_student", "fresh_vs_student",
                                                                            "rec_vs_fresh")))

    RESULTS.mkdir(exist_ok=True)
    RAW.mkdir(parents=True, exist_ok=True)
    raw = RAW / f"gad_reward_{tag}_scatter.json"  # every response's values: large, outside git
    raw.write_text(json.dumps(scatters))
    res = {"preset": args.preset, "lab": str(root), "seeds": seeds, "gad_settings": {**settings, "steps": gad_steps},
           "points": names, "splits": splits, "val_frac": args.val_frac, "aggregate": agg, "rows": rows,
           "seconds": round(time.perf_counter() - t0, 1), "scatter_file": str(raw.relative_to(RESULTS))}
    jpath = RESULTS / f"gad_reward_{tag}.json"
    jpath.write_text(json.dumps(res, indent=1))
    plot(scatters, names, seeds, RESULTS / f"gad_reward_{tag}.png", rows)
    print(f"\nwrote {jpath}, {jpath.with_suffix('.png')} and {raw}; {res['seconds']:.0f} s")


def plot(scatters, names, seeds, path: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), sharey=False, squeeze=False)
    for ax, nm in zip(axes[0], names):
        for seed in seeds:
            sc = scatters[f"s{seed}/{nm}"]
            s = sc["student"]
            eos = np.array(s["eos"], bool)
            x, y = np.array(s["ll_tok"]), np.array(s["d"])
            lab = seed == seeds[0]
            ax.scatter(x[eos], y[eos], s=6, alpha=.4, c="tab:blue", label="student, ends EOS" if lab else None)
            ax.scatter(x[~eos], y[~eos], s=6, alpha=.4, c="tab:orange", label="student, cut off" if lab else None)
            t = sc["teacher_rec"]
            ax.scatter(t["ll_tok"], t["d"], s=10, marker="x", c="k", alpha=.5, label="teacher record" if lab else None)
            f = sc["teacher_fresh"]
            ax.scatter(f["ll_tok"], f["d"], s=10, marker="+", c="tab:green", alpha=.5,
                       label="teacher fresh sample" if lab else None)
        r = np.nanmean([q["rho_d_ll_tok"] for q in rows if q["point"] == nm])
        ax.set_title(f"{nm}: Spearman(D, ll/tok) on student = {r:+.2f}", fontsize=9)
        ax.set_xlabel("teacher log-likelihood per token")
        ax.set_ylabel("D score")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
