"""The KL trade-off: PPO at several KL coefficients on a short budget, gold and proxy reward against KL.

    python scripts/kl_study.py --run_dir runs/pipeline --betas 0 0.05 0.2 0.5 --iterations 6

Uses the SFT and reward exports of a finished pipeline run (``<run_dir>/{sft,reward}/export``), trains
one PPO policy per beta from ``configs/ppo.yaml`` (only the KL coefficient and the number of iterations
change), evaluates each on the held-out prompts, and writes ``<out>/kl_study.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhf_lightning.demo_data import load_manifest
from rlhf_lightning.evaluation import EvaluationOptions, evaluate
from rlhf_lightning.pipeline import write_stage_config
from rlhf_lightning.report import finish_figure
from rlhf_lightning.stages import run_stage


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    kl = [r["kl_to_sft"] for r in results]
    ax.plot(kl, [r["gold_score"] for r in results], "o-", label="gold (annotator)")
    ax.plot(kl, [r["proxy_score"] for r in results], "s--", label="proxy (reward model)")
    for r in results:
        ax.annotate(
            f"β={r['beta']:g}",
            (r["kl_to_sft"], r["gold_score"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.axhline(results[0]["sft_gold"], color="grey", lw=0.8, ls=":", label="SFT gold")
    ax.set_xlabel("KL(policy || SFT) per response (nats)")
    ax.set_ylabel("mean score on held-out prompts")
    finish_figure(fig, ax, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run_dir", default="runs/pipeline", help="a finished pipeline run (SFT and reward exports)"
    )
    parser.add_argument("--out", default="runs/kl_study")
    parser.add_argument("--ppo_config", default="configs/ppo.yaml")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.05, 0.2, 0.5])
    parser.add_argument("--iterations", type=int, default=6, help="PPO iterations per beta")
    parser.add_argument("--samples_per_prompt", type=int, default=1)
    parser.add_argument("--eval_prompts", default="bundled:eval_prompts", help="held-out prompts to judge on")
    args = parser.parse_args()
    run, out = Path(args.run_dir), Path(args.out)
    sft, reward = run / "sft" / "export", run / "reward" / "export"
    options = EvaluationOptions(
        prompts=args.eval_prompts, samples_per_prompt=args.samples_per_prompt, preferences=None
    )
    temperature = load_manifest()["annotator"]["temperature"]
    results = []
    for beta in args.betas:
        name = f"beta_{beta:g}"
        export = out / name / "export"
        if not (export / "config.json").exists():
            inputs = {"policy": str(sft), "reward_model": str(reward), "kl_coef": beta}
            config = write_stage_config(args.ppo_config, out / name, out / "tb", name, inputs, export)
            iterations = str(args.iterations)
            run_stage("ppo", ["fit", "-c", str(config), "--trainer.limit_train_batches", iterations,
                              "--trainer.val_check_interval", iterations])  # fmt: skip
        report = evaluate({"ppo": str(export), "sft": str(sft)}, str(sft), str(reward), options, temperature)
        ppo = report["policies"]["ppo"]
        results.append({"beta": beta, "kl_to_sft": ppo["kl_to_sft"], "gold_score": ppo["gold_score"],
                        "proxy_score": ppo["proxy_score"], "eos_rate": ppo["eos_rate"],
                        "win_rate_vs_sft": report["win_rates"]["ppo_vs_sft"],
                        "win_rate_interval": report["win_rate_intervals"]["ppo_vs_sft"],
                        "sft_gold": report["policies"]["sft"]["gold_score"]})  # fmt: skip
        print(json.dumps(results[-1]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "kl_study.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "kl_study.png")
    print(f"wrote {out / 'kl_study.json'} and {out / 'kl_study.png'}")


if __name__ == "__main__":
    main()
