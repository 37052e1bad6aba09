"""One table of alignment methods: PPO, RLOO, GRPO and DPO from the same SFT export and preference data.

    python scripts/compare_methods.py --run_dir runs/pipeline --budget_min 7.5

Uses a finished pipeline run's SFT and reward exports (``<run_dir>/{sft,reward}/export``). Each method
runs as its own ``rlhf-lightning`` process from the shipped configs, changed only as ``METHODS`` says,
with ``trainer.max_time`` set to the budget: no method trains longer than the others on any machine
(on this repository's 2-core machine each finishes its configured schedule within it). Then one
evaluation judges every policy with the pipeline's protocol: the same held-out prompts, one sample per
prompt and policy, the noise-free annotator, win rates over SFT with their 95% intervals (over prompts,
ties half). Writes ``<out>/comparison.{json,md,png}``: the table, and gold win rate against KL.

DPO trains on the preference set the reward model learned from (``configs/dpo.yaml``); the three RL
methods optimise that reward model's score. A method whose export exists is not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from rlhf_lightning.demo_data import load_manifest
from rlhf_lightning.evaluation import EvaluationOptions, evaluate, versus
from rlhf_lightning.pipeline import sample_like_ppo, write_stage_config
from rlhf_lightning.report import finish_figure

ROOT = Path(__file__).resolve().parents[1]
K = 4  # samples per prompt of the critic-free methods
CRITIC_FREE = [f"--model.init_args.samples_per_prompt={K}"]
# method -> (stage, extra arguments to its shipped config): the three RL methods see the same episodes
# per iteration (PPO: 32 prompts x 1; RLOO, GRPO: 8 prompts x 4) and the same number of iterations
METHODS = {
    "ppo": ("ppo", []),
    "rloo": ("ppo", ["--model.init_args.advantage_estimator=rloo", *CRITIC_FREE]),
    "grpo": (
        "ppo",
        ["--model.init_args.advantage_estimator=grpo", "--model.init_args.kl_penalty=loss", *CRITIC_FREE],
    ),
    "dpo": ("dpo", []),
}


def train(method: str, run: Path, out: Path, budget_s: float, config_dir: Path) -> dict:
    """Train one method in its own process; returns its wall time and the process's peak RSS."""
    stage, extra = METHODS[method]
    sft, reward = run / "sft" / "export", run / "reward" / "export"
    inputs = {"policy": str(sft), "reward_model": str(reward)} if stage == "ppo" else {"model": str(sft)}
    export = out / method / "export"
    if "--model.init_args.samples_per_prompt" in " ".join(extra):  # as many episodes, from 1/K the prompts
        batch_size = yaml.safe_load((config_dir / "ppo.yaml").read_text())["data"]["init_args"]["batch_size"]
        extra = [*extra, f"--data.init_args.batch_size={batch_size // K}"]
    path = write_stage_config(
        str(config_dir / f"{stage}.yaml"), out / method, out / "tb", method, inputs, export
    )
    days, rest = divmod(int(budget_s), 86400)
    max_time = f"{days:02d}:{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    command = [sys.executable, "-m", "rlhf_lightning", stage, "fit", "-c", str(path),
               f"--trainer.max_time={max_time}", *extra]  # fmt: skip
    print(f"[compare] {method}: {' '.join(command[2:])}", flush=True)
    began = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status) != 0 or not (export / "config.json").exists():
        raise SystemExit(f"[compare] {method} failed (exit status {os.waitstatus_to_exitcode(status)})")
    record = {"method": method, "train_min": wall / 60, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9}
    (out / method / "timing.json").write_text(json.dumps(record))
    return record


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for r in rows:
        low, high = r["win_rate_interval"]
        ax.errorbar(r["kl_to_sft"], r["win_rate"], yerr=[[r["win_rate"] - low], [high - r["win_rate"]]],
                    fmt="o", capsize=3, label=r["method"].upper())  # fmt: skip
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance (= SFT)")
    ax.set_xlabel("KL(policy || SFT) per response (nats)")
    ax.set_ylabel("gold win rate over SFT [95%]")
    finish_figure(fig, ax, path)


def table(rows: list[dict], sft: dict) -> str:
    lines = [
        "| method | win rate over SFT [95%] | gold | proxy | KL to SFT | length | finished | train min | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["win_rate_interval"]
        lines.append(
            f"| {r['method'].upper()} | **{r['win_rate']:.3f}** [{low:.3f}, {high:.3f}] | {r['gold_score']:.3f} | "
            f"{r['proxy_score']:.3f} | {r['kl_to_sft']:.2f} | {r['response_length']:.1f} | {r['eos_rate']:.0%} | "
            f"{r['train_min']:.1f} | {r['peak_rss_gb']:.2f} |"
        )
    lines.append(
        f"| SFT | 0.5 | {sft['gold_score']:.3f} | {sft['proxy_score']:.3f} | 0.00 | "
        f"{sft['response_length']:.1f} | {sft['eos_rate']:.0%} | | |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run_dir", default="runs/pipeline", help="a finished pipeline run (SFT and reward exports)"
    )
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument(
        "--budget_min", type=float, default=7.5, help="wall-clock cap of each method's training"
    )
    parser.add_argument("--eval_prompts", default="bundled:eval_prompts", help="held-out prompts to judge on")
    parser.add_argument("--config_dir", default=str(ROOT / "configs"), help="where ppo.yaml and dpo.yaml are")
    args = parser.parse_args(argv)
    run, out = Path(args.run_dir).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    for method in args.methods:
        done = out / method / "timing.json"
        timings[method] = (
            json.loads(done.read_text())
            if done.exists()
            else train(method, run, out, args.budget_min * 60, Path(args.config_dir).resolve())
        )
    sft, reward = run / "sft" / "export", run / "reward" / "export"
    options = sample_like_ppo(  # as the pipeline's evaluation does
        EvaluationOptions(prompts=args.eval_prompts, preferences=None), Path(args.config_dir) / "ppo.yaml"
    )
    policies = {m: str(out / m / "export") for m in args.methods} | {"sft": str(sft)}
    temperature = load_manifest()["annotator"]["temperature"]
    report = evaluate(policies, str(sft), str(reward), options, temperature, judged=tuple(args.methods))
    rows = []
    for method in args.methods:
        rows.append({"method": method, **timings[method], **versus(report, method)})
    sft_row = report["policies"]["sft"]
    text = table(rows, sft_row)
    summary = {"budget_min": args.budget_min, "n_prompts": report["n_prompts"], "rows": rows,
               "sft": {k: v for k, v in sft_row.items() if k != "examples"},
               "win_rates": report["win_rates"], "win_rate_intervals": report["win_rate_intervals"]}  # fmt: skip
    (out / "comparison.json").write_text(json.dumps(summary, indent=2))
    (out / "comparison.md").write_text(text + "\n")
    plot(rows, out / "comparison.png")
    print(text)
    print(f"wrote {out / 'comparison.json'}, {out / 'comparison.md'} and {out / 'comparison.png'}")


if __name__ == "__main__":
    main()
