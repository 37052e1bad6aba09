"""Best-of-n from the SFT policy: the gold a policy can gain per nat of KL, and where the proxy misleads.

    python scripts/best_of_n.py --run_dir runs/pipeline --prompts bundled:prompts_val --n 64 --opponents 16 \
        --policy ppo=runs/val_eval.json

Samples ``n + opponents`` responses per prompt from the run's SFT export (sampled as the PPO stage
samples: its response length and temperature), scores each with the run's reward model (the proxy) and
the noise-free annotator (gold), and for every n in 1, 2, 4, ... and ``--n`` and each selector (the
proxy, or gold itself) reports the expected gold, proxy and rubric terms of the response best-of-n keeps
(mean over every n-subset of the first ``--n`` samples), its win rate over a fresh SFT sample (the last
``--opponents`` samples of the same prompt; ties half), 95% intervals over prompts, and its KL to SFT,
``log n - (n - 1) / n`` (an upper bound). Best-of-n by gold is the frontier of gold per nat of KL;
best-of-n by the proxy is what the reward model alone buys, and a proxy that gains while gold stalls
is reward hacking made visible (Gao et al. 2022).

``--samples_from DIR`` reuses the ``samples.json`` of an earlier run (drawn from the same SFT export)
instead of sampling, and ``--reward_model`` scores them with another reward model: what a better reward
model would buy, at the cost of scoring only. A re-scored response is encoded from its text as the
reward model's training data is (prompt, then the response and EOS when it finished), which may split
a few words into other tokens than the sampled ones; the script reports how closely re-scoring with the
samples' own reward model reproduces their stored scores.

``--policy NAME=FILE`` (repeatable) adds a trained policy as a point: an ``rlhf-lightning evaluate``
output on the same prompts (its measured KL, gold gain over its SFT samples and win rate).

It also reports how often the proxy orders two SFT samples of a prompt as gold does (the reward
model's accuracy on the pairs RL asks it about, beside its accuracy on the fixed held-out pairs).

Writes ``<out>/best_of_n.{json,png}`` and ``<out>/samples.json`` (every sample, per prompt).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from pathlib import Path

import torch

from rlhf_lightning.data.batching import mask_of, pad
from rlhf_lightning.data.render import encode_pair
from rlhf_lightning.demo_data import load_manifest
from rlhf_lightning.evaluation import EvaluationOptions, evaluate, outcome_interval, pair_outcomes
from rlhf_lightning.lm import sequence_scores
from rlhf_lightning.models import frozen_dtype, linear_weights_to, load_reward_model, load_tokenizer
from rlhf_lightning.pipeline import sample_like_ppo
from rlhf_lightning.precision import auto_precision, inference_autocast
from rlhf_lightning.report import save_figure
from rlhf_lightning.rl.best_of_n import best_of_n_kl, best_of_n_weights

SELECTORS = ("proxy", "gold")


def by_prompt(items: list, per_prompt: int) -> list[list]:
    """The evaluation's flat sample list (each prompt's samples consecutive) as one list per prompt."""
    if len(items) % per_prompt:
        raise ValueError(f"{len(items)} samples are not a whole number of prompts of {per_prompt}")
    return [items[i : i + per_prompt] for i in range(0, len(items), per_prompt)]


def mean_with_interval(values: list[float], low: float = -math.inf, high: float = math.inf) -> dict:
    """Mean over prompts and its 95% interval (each prompt one observation; normal approximation),
    kept within [``low``, ``high``]."""
    mean = statistics.fmean(values)
    half = 1.959964 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return {"mean": mean, "interval": [max(low, mean - half), min(high, mean + half)]}


def selection_curve(
    pools: list[list[dict]], opponents: list[list[dict]], sizes: list[int], selector: str
) -> list[dict]:
    """Best-of-n by ``selector`` ("proxy" or "gold") for each n of ``sizes``.

    ``pools[p]`` are prompt p's samples best-of-n chooses among, ``opponents[p]`` its other SFT samples,
    each an evaluation example: ``gold``, ``proxy`` and ``terms`` (the weighted rubric terms).
    """
    rows = []
    for n in sizes:
        gold, gain, proxy, win, terms = [], [], [], [], {}
        for pool, others in zip(pools, opponents, strict=True):
            weights = best_of_n_weights([s[selector] for s in pool], n)
            gold.append(sum(w * s["gold"] for w, s in zip(weights, pool)))
            gain.append(gold[-1] - statistics.fmean(s["gold"] for s in pool))
            proxy.append(sum(w * s["proxy"] for w, s in zip(weights, pool)))
            opponent_gold = [o["gold"] for o in others]
            win.append(sum(w * sum(pair_outcomes([s["gold"]] * len(others), opponent_gold)) / len(others)
                           for w, s in zip(weights, pool)))  # fmt: skip
            for w, s in zip(weights, pool):
                for term, value in s["terms"].items():
                    terms[term] = terms.get(term, 0.0) + w * value / len(pools)
        rows.append({
            "n": n,
            "kl": best_of_n_kl(n),
            "gold": mean_with_interval(gold),
            "gold_gain": mean_with_interval(gain),  # over sampling (n = 1), paired per prompt
            "proxy": sum(proxy) / len(proxy),
            "win_rate": mean_with_interval(win, 0.0, 1.0),
            "gold_terms": terms,
        })  # fmt: skip
    return rows


@torch.no_grad()
def rescore(samples: list[dict], reward_model: str, batch_size: int = 32) -> list[float]:
    """Scores of ``reward_model`` for ``samples``, in order, each encoded from its prompt and response
    texts as the reward model's training data is."""
    tokenizer = load_tokenizer(reward_model)
    precision = auto_precision()[0]
    model = load_reward_model(reward_model, pad_token_id=tokenizer.pad_token_id).eval()
    linear_weights_to(model, frozen_dtype(precision))
    sequences = [sum(encode_pair(tokenizer, s["prompt"], s["response"], s["finished"]), []) for s in samples]
    scores = []
    with inference_autocast(precision=precision):
        for begin in range(0, len(sequences), batch_size):
            chunk = sequences[begin : begin + batch_size]
            ids, mask = pad(chunk, tokenizer.pad_token_id), mask_of(chunk)
            scores += sequence_scores(model, ids, mask).float().tolist()
    return scores


def proxy_agreement(pools: list[list[dict]]) -> dict:
    """How often the proxy orders two samples of a prompt as gold does (pairs gold does not tie; a proxy
    tie counts half): the reward model's accuracy on the policy's own samples, the pairs RL asks it
    about, overall (95% interval over prompts) and by the rubric term that decides the pair."""
    outcomes, groups, by_term = [], [], {}
    for index, pool in enumerate(pools):
        for a, b in itertools.combinations(pool, 2):
            if a["gold"] == b["gold"]:
                continue
            same = (a["proxy"] - b["proxy"]) * (a["gold"] - b["gold"])
            outcome = 1.0 if same > 0 else 0.5 if same == 0 else 0.0
            outcomes.append(outcome)
            groups.append(index)
            term = max(a["terms"], key=lambda t: abs(a["terms"][t] - b["terms"][t]))
            by_term.setdefault(term, []).append(outcome)
    if not outcomes:
        return {"pairs": 0, "accuracy": None, "interval": None, "by_deciding_term": {}}
    return {
        "pairs": len(outcomes),
        "accuracy": sum(outcomes) / len(outcomes),
        "interval": list(outcome_interval(outcomes, groups)),
        "by_deciding_term": {t: {"pairs": len(v), "accuracy": sum(v) / len(v)} for t, v in by_term.items()},
    }


def policy_point(name: str, path: Path, prompts: str) -> dict:
    """A trained policy's figures from an ``rlhf-lightning evaluate`` output on the same prompts."""
    report = json.loads(path.read_text())
    if report["options"]["prompts"] != prompts:
        raise SystemExit(f"{path}: evaluated on {report['options']['prompts']!r}, not on {prompts!r}")
    ppo, sft = report["policies"]["ppo"], report["policies"]["sft"]
    return {
        "name": name,
        "file": str(path),
        "kl": ppo["kl_to_sft"],
        "gold_gain": ppo["gold_score"] - sft["gold_score"],
        "win_rate": report["win_rates"]["ppo_vs_sft"],
        "win_rate_interval": report["win_rate_intervals"]["ppo_vs_sft"],
        "samples": report["n_samples"],
    }


def plot(curves: dict[str, list[dict]], points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gain, win) = plt.subplots(1, 2, figsize=(10.5, 4.8))
    styles = {
        "gold": ("tab:green", "best-of-n by gold"),
        "proxy": ("tab:blue", "best-of-n by the reward model"),
    }
    for selector, rows in curves.items():
        color, label = styles[selector]
        kl = [r["kl"] for r in rows]
        gain.plot(kl, [r["gold_gain"]["mean"] for r in rows], "o-", ms=3, color=color, label=f"{label}: gold")
        lows, highs = zip(*(r["gold_gain"]["interval"] for r in rows))
        gain.fill_between(kl, lows, highs, color=color, alpha=0.15)
        lows, highs = zip(*(r["win_rate"]["interval"] for r in rows))
        win.plot(kl, [r["win_rate"]["mean"] for r in rows], "o-", ms=3, color=color, label=label)
        win.fill_between(kl, lows, highs, color=color, alpha=0.15)
    proxy_axis = gain.twinx()
    rows = curves["proxy"]
    proxy_axis.plot([r["kl"] for r in rows], [r["proxy"] - rows[0]["proxy"] for r in rows], "s--", ms=3,
                    color="tab:orange", label="best-of-n by the reward model: proxy")  # fmt: skip
    proxy_axis.set_ylabel("proxy - SFT's proxy", color="tab:orange")
    for i, p in enumerate(points):
        gain.plot(p["kl"], p["gold_gain"], "D", color=f"C{i + 3}", label=p["name"])
        low, high = p["win_rate_interval"]
        win.errorbar(p["kl"], p["win_rate"], yerr=[[p["win_rate"] - low], [high - p["win_rate"]]], fmt="D",
                     capsize=3, color=f"C{i + 3}", label=p["name"])  # fmt: skip
    (g_low, g_high), (_, p_high) = gain.get_ylim(), proxy_axis.get_ylim()
    if g_low < 0 < g_high and p_high > 0:
        proxy_axis.set_ylim(g_low / g_high * p_high, p_high)  # both zeros at one height
    gain.set_ylabel("gold - SFT's gold")
    win.set_ylabel("gold win rate over an SFT sample [95%]")
    win.axhline(0.5, color="grey", lw=0.8, ls=":")
    for ax in (gain, win):
        ax.set_xlabel("KL to SFT (nats per response; best-of-n: log n - (n-1)/n)")
        ax.grid(alpha=0.3)
    handles = gain.get_legend_handles_labels()[0] + proxy_axis.get_legend_handles_labels()[0]
    below = {"fontsize": 7, "loc": "upper center", "bbox_to_anchor": (0.5, -0.16), "ncol": 2}
    gain.legend(handles=handles, **below)
    win.legend(**below)
    save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run_dir", default="runs/pipeline", help="a finished run (SFT and reward exports)")
    parser.add_argument(
        "--prompts", default="bundled:prompts_val", help="prompts to sample (any prompt format)"
    )
    parser.add_argument(
        "--n", type=int, default=64, help="largest n; also the samples per prompt it chooses among"
    )
    parser.add_argument(
        "--opponents", type=int, default=16, help="more SFT samples per prompt, to judge against"
    )
    parser.add_argument(
        "--ppo_config", default="configs/ppo_rloo.yaml", help="sample as this PPO stage samples"
    )
    parser.add_argument("--policy", action="append", default=[], metavar="NAME=FILE",
                        help="a trained policy's `rlhf-lightning evaluate` output on the same prompts")  # fmt: skip
    parser.add_argument("--out", default="runs/best_of_n")
    parser.add_argument("--samples_from", default=None, metavar="DIR",
                        help="reuse DIR/samples.json (and its best_of_n.json's settings) instead of sampling")  # fmt: skip
    parser.add_argument("--reward_model", default=None,
                        help="score the samples with this reward model (default: the run's reward export)")  # fmt: skip
    parser.add_argument("--plot_from", default=None, help="only redraw the figure of this best_of_n.json")
    args = parser.parse_args(argv)
    if args.plot_from:
        summary = json.loads(Path(args.plot_from).read_text())
        curves = summary["best_of_n"]
        path = Path(args.plot_from).with_suffix(".png")
        plot(curves, summary["policies"], path)
        print(f"wrote {path}")
        return
    if args.n < 1 or args.opponents < 1:
        raise SystemExit(f"--n and --opponents must be at least 1, got {args.n} and {args.opponents}")
    run, out = Path(args.run_dir), Path(args.out)
    sft = run / "sft" / "export"
    reward = Path(args.reward_model) if args.reward_model else run / "reward" / "export"
    points = []
    for spec in args.policy:
        name, sep, file = spec.partition("=")
        if not sep:
            raise SystemExit(f"--policy {spec!r}: expected NAME=FILE")
        points.append(policy_point(name, Path(file), args.prompts))
    rescoring = None
    if args.samples_from:
        earlier = json.loads((Path(args.samples_from) / "best_of_n.json").read_text())
        samples = json.loads((Path(args.samples_from) / "samples.json").read_text())
        args.n, args.opponents, args.prompts = earlier["pool"], earlier["opponents"], earlier["prompts"]
        sampling, precision, sft_row = earlier["sampling"], earlier["precision"], earlier["sft"]
        flat = [s for prompt_samples in samples for s in prompt_samples]
        stored, new_scores = [s["proxy"] for s in flat], rescore(flat, str(reward))
        for s, score in zip(flat, new_scores, strict=True):
            s["proxy"] = score
        rescoring = {"samples_from": args.samples_from, "reward_model": str(reward),
                     "correlation_with_stored_scores": statistics.correlation(stored, new_scores)}  # fmt: skip
        sft_row = {**sft_row, "proxy_score": statistics.fmean(new_scores)}
        print(f"re-scored {len(new_scores)} samples with {reward}: correlation with the stored scores "
              f"{rescoring['correlation_with_stored_scores']:.4f}")  # fmt: skip
    else:
        per_prompt = args.n + args.opponents
        options = sample_like_ppo(
            EvaluationOptions(prompts=args.prompts, samples_per_prompt=per_prompt, preferences=None),
            Path(args.ppo_config),
        )
        temperature = load_manifest()["annotator"]["temperature"]
        report = evaluate({"sft": str(sft)}, str(sft), str(reward), options, temperature, judged=())
        samples = by_prompt(report["policies"]["sft"]["examples"], per_prompt)
        sampling = {"max_new_tokens": options.max_new_tokens, "temperature": options.temperature}
        precision = report["precision"]
        sft_row = {k: report["policies"]["sft"][k] for k in ("gold_score", "proxy_score", "eos_rate")}
    pools, opponents = [s[: args.n] for s in samples], [s[args.n :] for s in samples]
    sizes = sorted({2**i for i in range(args.n.bit_length())} | {args.n})
    curves = {selector: selection_curve(pools, opponents, sizes, selector) for selector in SELECTORS}
    summary = {
        "prompts": args.prompts,
        "n_prompts": len(samples),
        "pool": args.n,
        "opponents": args.opponents,
        "sampling": sampling,
        "precision": precision,
        "reward_model": str(reward),
        "rescoring": rescoring,
        "sft": sft_row,
        "proxy_agreement_on_sft_samples": proxy_agreement(pools),
        "best_of_n": curves,
        "policies": points,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "best_of_n.json").write_text(json.dumps(summary, indent=2))
    (out / "samples.json").write_text(json.dumps(samples))  # per prompt: its pool, then its opponents
    plot(curves, points, out / "best_of_n.png")
    for selector, rows in curves.items():
        for r in rows:
            low, high = r["win_rate"]["interval"]
            print(f"by {selector:5s} n={r['n']:3d} KL {r['kl']:.2f}  gold {r['gold']['mean']:.3f} "
                  f"({r['gold_gain']['mean']:+.3f})  "
                  f"proxy {r['proxy']:+.3f}  win {r['win_rate']['mean']:.3f} [{low:.3f}, {high:.3f}]")  # fmt: skip
    agreement = summary["proxy_agreement_on_sft_samples"]
    print(f"proxy orders {agreement['pairs']} pairs of SFT samples as gold does: {agreement['accuracy']}")
    for p in points:
        print(f"{p['name']}: KL {p['kl']:.2f}  gold gain {p['gold_gain']:+.3f}  win {p['win_rate']:.3f}")
    print(f"wrote {out / 'best_of_n.json'} and {out / 'best_of_n.png'}")


if __name__ == "__main__":
    main()
