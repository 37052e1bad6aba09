"""The run report: a markdown summary and PNG plots written beside a pipeline run."""

from __future__ import annotations

from pathlib import Path

GOALS = {
    "win_rate_vs_sft": 0.75,  # with the 95% interval's lower bound above 0.65
    "win_rate_low": 0.65,
    "reward_model_accuracy": 0.85,
    "minutes": 20.0,
    "peak_rss_gb": 8.0,
}


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the TensorBoard event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return series


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Tight layout; write ``path`` and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def finish_figure(fig, ax, path: Path) -> None:
    """Legend and grid, then :func:`save_figure` (the scripts' single-panel plots)."""
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_ppo_curves(scalars: dict, path: Path) -> Path | None:
    """Reward, KL and preference accuracy over PPO iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (("objective/scores",), "reward-model score (normalised)"),
        (("gold/score",), "gold score of the rollouts"),
        (("objective/kl",), "KL(policy || SFT) per response"),
        (
            ("gold/win_rate", "gold/win_rate_low", "gold/win_rate_high"),
            "gold win rate over SFT (val prompts)",
        ),
    ]
    panels = [(tags, title) for tags, title in panels if scalars.get(tags[0])]
    if not panels:
        return None
    episodes = dict(scalars.get("episode", []))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2))
    for ax, (tags, title) in zip(list(axes) if len(panels) > 1 else [axes], panels):
        for tag, style in zip(tags, ("-", ":", ":")):
            points = sorted(scalars.get(tag, []))
            x = [episodes.get(step, step) for step, _ in points]
            ax.plot(x, [v for _, v in points], style, marker="." if style == "-" else None, color="tab:blue")
        if tags[0] == "gold/win_rate":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("PPO episodes" if episodes else "step")
        ax.grid(alpha=0.3)
    save_figure(fig, path)
    return path


def plot_evaluation(report: dict, path: Path) -> Path:
    """Gold vs proxy score per policy, and the win rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["policies"])
    gold = [report["policies"][n]["gold_score"] for n in names]
    proxy = [report["policies"][n]["proxy_score"] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    x = range(len(names))
    left.bar([i - 0.2 for i in x], gold, width=0.4, label="gold (annotator)")
    left.bar([i + 0.2 for i in x], proxy, width=0.4, label="proxy (reward model)")
    left.set_xticks(list(x), names)
    left.set_title("mean score on held-out prompts", fontsize=9)
    left.legend(fontsize=8)
    rates = report.get("win_rates", {})
    right.bar(list(rates), list(rates.values()), color="tab:green")
    right.axhline(0.5, color="grey", lw=0.8, ls="--")
    intervals = report.get("win_rate_intervals", {})
    for i, pair in enumerate(rates):
        if pair in intervals:
            low, high = intervals[pair]
            right.plot([i, i], [low, high], color="black", lw=1.5)
    right.axhline(GOALS["win_rate_vs_sft"], color="tab:red", lw=0.8, ls=":", label="goal vs SFT (0.75)")
    right.set_ylim(0, 1)
    right.set_title("annotator win rate of PPO", fontsize=9)
    right.legend(fontsize=8)
    save_figure(fig, path)
    return path


def _verdict(value: float | None, goal: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "not measured"
    met = value >= goal if higher_is_better else value <= goal
    return "met" if met else "NOT met"


def _cell(example: dict) -> str:
    text = example["response"].replace("|", "\\|").replace("\n", " ")[:240]
    return f"{text} ({example['gold']:.2f} / {example['proxy']:.2f})"


def _side_by_side(report: dict, n: int = 4) -> list[str]:
    """A few held-out prompts with the SFT and PPO responses and their gold and proxy scores."""
    ppo = report["policies"].get("ppo", {}).get("examples", [])
    sft = report["policies"].get("sft", {}).get("examples", [])
    if not ppo or not sft:
        return []
    lines = ["| prompt | SFT response (gold / proxy) | PPO response (gold / proxy) |", "|---|---|---|"]
    step = max(1, len(ppo) // n)
    for a, b in list(zip(sft, ppo))[::step][:n]:
        lines.append(f"| {a['prompt']} | {_cell(a)} | {_cell(b)} |")
    return lines


def _term_counts(counts: dict[str, int]) -> str:
    """``on_topic 60, finished 31`` (most first), or ``none``."""
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return ", ".join(f"{term} {n}" for term, n in ranked) or "none"


def write_report(
    run_dir: Path,
    report: dict,
    timings: dict[str, float],
    ppo_log_dir: Path | None,
    peak_rss_gb: float | None = None,
) -> Path:
    """``report.md`` and the plots in ``run_dir``; returns the markdown path."""
    scalars = read_scalars(ppo_log_dir) if ppo_log_dir and ppo_log_dir.exists() else {}
    curves = plot_ppo_curves(scalars, run_dir / "ppo_curves.png")
    plot_evaluation(report, run_dir / "evaluation.png")
    total_min = sum(timings.values()) / 60
    win_sft = report.get("win_rates", {}).get("ppo_vs_sft")
    low, high = report.get("win_rate_intervals", {}).get("ppo_vs_sft", (None, None))
    rm_acc = report.get("reward_model_accuracy")
    ppo = report["policies"].get("ppo", {})
    win_met = (
        None
        if win_sft is None
        else float(win_sft >= GOALS["win_rate_vs_sft"] and low > GOALS["win_rate_low"])
    )
    win_text = "not measured" if win_sft is None else f"{win_sft:.3f} [{low:.3f}, {high:.3f}]"
    lines = [
        "# RLHF run report",
        "",
        f"{report.get('n_prompts', '?')} held-out prompts, {report.get('n_samples', '?')} samples per policy, "
        f"judged by the noise-free annotator; precision {report.get('precision', '?')}.",
        "",
        "| goal | target | measured | verdict |",
        "|---|---|---|---|",
        f"| PPO preferred over SFT by the annotator [95% interval] | >= 0.75, interval above 0.65 | "
        f"{win_text} at KL {ppo.get('kl_to_sft', float('nan')):.2f} | {_verdict(win_met, 1.0)} |",
        f"| reward-model accuracy, held-out noise-free pairs | >= 0.85 | "
        f"{rm_acc if rm_acc is None else f'{rm_acc:.3f}'} | {_verdict(rm_acc, GOALS['reward_model_accuracy'])} |",
        f"| wall time of the pipeline | <= 20 min | {total_min:.1f} min | "
        f"{_verdict(total_min, GOALS['minutes'], higher_is_better=False)} |",
        f"| peak memory (RSS) | <= 8 GB | "
        f"{'not measured' if peak_rss_gb is None else f'{peak_rss_gb:.1f} GB'} | "
        f"{_verdict(peak_rss_gb, GOALS['peak_rss_gb'], higher_is_better=False)} |",
        "",
        "## Policies on held-out prompts",
        "",
        "| policy | gold (annotator) | proxy (reward model) | KL to SFT | length (tokens) | ends with EOS |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in report["policies"].items():
        lines.append(
            f"| {name} | {p['gold_score']:.3f} | {p['proxy_score']:.3f} | {p['kl_to_sft']:.2f} | "
            f"{p['response_length']:.1f} | {p['eos_rate']:.0%} |"
        )
    terms = [name for name, p in report["policies"].items() if p.get("gold_terms")]
    if terms:
        columns = list(report["policies"][terms[0]]["gold_terms"])
        lines += [
            "",
            "Gold score by rubric term (mean weighted contribution; they sum to the gold score):",
            "",
        ]
        lines += ["| policy | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for name in terms:
            values = report["policies"][name]["gold_terms"]
            lines.append(f"| {name} | " + " | ".join(f"{values[c]:.3f}" for c in columns) + " |")
    lines += ["", "## Win rates of the PPO policy (annotator, noise-free; ties count half; 95% interval)", ""]
    for pair, rate in report.get("win_rates", {}).items():
        noisy = report.get("noisy_win_rates", {}).get(pair)
        interval = report.get("win_rate_intervals", {}).get(pair)
        counts = report.get("outcomes", {}).get(pair)
        lines.append(
            f"- {pair.replace('_', ' ')}: {rate:.3f}"
            + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
            + (f" (with label noise: {noisy:.3f})" if noisy else "")
            + (f"; {counts['wins']} wins, {counts['ties']} ties, {counts['losses']} losses" if counts else "")
        )
        decided = report.get("decided_by", {}).get(pair)
        if decided:
            lines.append(
                "  - the rubric term that decided them: "
                + "; ".join(f"{side}: {_term_counts(decided[side])}" for side in ("wins", "losses"))
            )
    lines += ["", "## Stage times", ""]
    lines += [f"- {stage}: {seconds / 60:.1f} min" for stage, seconds in timings.items()]
    lines += ["", "## Plots", ""]
    if curves:
        lines.append("![PPO curves](ppo_curves.png)")
    lines += ["![Evaluation](evaluation.png)", "", "## SFT and PPO on the same held-out prompts", ""]
    lines += _side_by_side(report)
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
