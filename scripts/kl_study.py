"""The KL trade-off: PPO at several KL coefficients, gold and proxy reward against KL.

    python scripts/kl_study.py --run_dir runs/pipeline --betas 0 0.05 0.2 --iterations 8 \
        --extra --model.init_args.learning_rate 5e-5

Uses the SFT and reward exports of a finished pipeline run (``<run_dir>/{sft,reward}/export``), trains
one PPO policy per beta from ``configs/ppo.yaml`` (the KL coefficient, the number of iterations and the
``--extra`` overrides change), then judges every policy and SFT in one evaluation on the held-out
prompts, sampled as the PPO config samples (SFT is sampled once, not once per beta).

Writes ``<out>/kl_study.{json,png}``. The figure has two panels: the held-out change in gold and proxy
score over SFT against KL, one point per beta, where reward hacking shows as a proxy that gains while
gold does not (Gao et al. 2022); and, per beta, the gold win rate over SFT on the fixed validation
prompts during training (the ``GoldJudge`` callback's ``gold/win_rate`` in TensorBoard) against episodes.
The rollouts' own scores are not used for curves: each iteration samples different training prompts,
whose difficulty moves the scores as much as training does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhf_lightning.demo_data import load_manifest
from rlhf_lightning.evaluation import EvaluationOptions, evaluate, versus
from rlhf_lightning.pipeline import sample_like_ppo, write_stage_config
from rlhf_lightning.report import read_scalars, save_figure
from rlhf_lightning.stages import run_stage


def name_of(beta: float) -> str:
    return f"beta_{beta:g}"


def in_run_curves(tb_dir: Path) -> dict[str, list[float]]:
    """The ``GoldJudge`` verdicts of one PPO run: gold win rate over SFT on the validation prompts, with
    its 95% interval, against the episodes trained on so far."""
    scalars = read_scalars(tb_dir)

    def series(tag: str) -> dict[int, float]:
        return dict(scalars.get(tag, []))

    episodes = series("episode")
    win, low, high = (series(f"gold/win_rate{t}") for t in ("", "_low", "_high"))
    steps = sorted(set(win) & set(episodes))
    return {
        "episodes": [episodes[s] for s in steps],
        "win_rate": [win[s] for s in steps],
        "low": [low[s] for s in steps],
        "high": [high[s] for s in steps],
    }


def plot(results: list[dict], sft: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (held, run) = plt.subplots(1, 2, figsize=(10.5, 3.8))
    kl = [r["kl_to_sft"] for r in results]
    held.plot(
        kl, [r["gold_score"] - sft["gold_score"] for r in results], "o-", color="tab:blue", label="gold"
    )
    held.set_ylabel("gold - SFT's gold", color="tab:blue")
    proxy_axis = held.twinx()
    proxy_axis.plot(
        kl, [r["proxy_score"] - sft["proxy_score"] for r in results], "s--", color="tab:orange", label="proxy"
    )
    proxy_axis.set_ylabel("proxy - SFT's proxy", color="tab:orange")
    for r in results:
        held.annotate(f"β={r['beta']:g}", (r["kl_to_sft"], r["gold_score"] - sft["gold_score"]), fontsize=8,
                      textcoords="offset points", xytext=(4, 4))  # fmt: skip
    held.axhline(0, color="grey", lw=0.8, ls=":")
    held.set_xlabel("KL(policy || SFT) per response, held-out prompts")
    held.set_title("held-out prompts, end of training", fontsize=9)
    held.grid(alpha=0.3)
    for i, r in enumerate(results):
        c = r["curves"]
        run.errorbar(c["episodes"], c["win_rate"], yerr=[[w - lo for w, lo in zip(c["win_rate"], c["low"])],
                     [hi - w for w, hi in zip(c["win_rate"], c["high"])]], fmt="o-", ms=3, capsize=2,
                     color=f"C{i}", alpha=0.8, label=f"β={r['beta']:g}")  # fmt: skip
    run.axhline(0.5, color="grey", lw=0.8, ls=":")
    run.set_xlabel("episodes")
    run.set_ylabel("gold win rate over SFT [95%]")
    run.set_title("during training, validation prompts (GoldJudge)", fontsize=9)
    run.grid(alpha=0.3)
    run.legend(fontsize=7)
    save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run_dir", default="runs/pipeline", help="a finished pipeline run (SFT and reward exports)"
    )
    parser.add_argument("--out", default="runs/kl_study")
    parser.add_argument("--ppo_config", default="configs/ppo.yaml")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.05, 0.2])
    parser.add_argument("--iterations", type=int, default=8, help="PPO iterations per beta")
    parser.add_argument("--samples_per_prompt", type=int, default=1)
    parser.add_argument("--eval_prompts", default="bundled:eval_prompts", help="held-out prompts to judge on")
    parser.add_argument(
        "--extra", nargs=argparse.REMAINDER, default=[], help="more overrides for the PPO stage"
    )
    args = parser.parse_args(argv)
    run, out = Path(args.run_dir), Path(args.out)
    sft, reward = run / "sft" / "export", run / "reward" / "export"
    options = sample_like_ppo(  # as the pipeline's evaluation does
        EvaluationOptions(
            prompts=args.eval_prompts, samples_per_prompt=args.samples_per_prompt, preferences=None
        ),
        Path(args.ppo_config),
    )
    names = [name_of(b) for b in args.betas]
    for beta, name in zip(args.betas, names):
        export = out / name / "export"
        if not (export / "config.json").exists():
            inputs = {"policy": str(sft), "reward_model": str(reward), "kl_coef": beta}
            config = write_stage_config(args.ppo_config, out / name, out / "tb", name, inputs, export)
            iterations = str(args.iterations)
            run_stage(
                "ppo", ["fit", "-c", str(config), "--trainer.limit_train_batches", iterations, *args.extra]
            )
    policies = {n: str(out / n / "export") for n in names} | {"sft": str(sft)}
    temperature = load_manifest()["annotator"]["temperature"]
    report = evaluate(policies, str(sft), str(reward), options, temperature, judged=tuple(names))
    results = []
    for beta, name in zip(args.betas, names):
        results.append({"beta": beta, **versus(report, name), "curves": in_run_curves(out / "tb" / name)})
        print(json.dumps({k: v for k, v in results[-1].items() if k != "curves"}))
    sft_row = {k: report["policies"]["sft"][k] for k in ("gold_score", "proxy_score", "eos_rate")}
    summary = {"n_prompts": report["n_prompts"], "iterations": args.iterations, "extra": args.extra,
               "sft": sft_row, "results": results}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "kl_study.json").write_text(json.dumps(summary, indent=2))
    plot(results, sft_row, out / "kl_study.png")
    print(f"wrote {out / 'kl_study.json'} and {out / 'kl_study.png'}")


if __name__ == "__main__":
    main()
