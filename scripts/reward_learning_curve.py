"""The reward model's learning curve: held-out accuracy against the number of comparisons it trained on.

    python scripts/reward_learning_curve.py --sft runs/pipeline/sft/export --fractions 0.25 0.5 1

Trains one reward model per fraction of the bundled training rankings (the first rows of
``preferences_train``; every ranking of K responses gives C(K,2) comparisons) with ``configs/reward.yaml``
unchanged otherwise, and measures each on the validation prompts' noise-free rankings (per epoch, from
the stage's own ``val/preference_accuracy``) and on the held-out evaluation pairs (after training).
With ``--labels noise-free`` every training ranking is replaced by the annotator's noise-free one (its
gold order): the same responses and comparisons without label noise, which tells whether the labels or
the model limit what the reward model learns.

Each held-out accuracy is also read as an error on the gold scale: the standard deviation of Gaussian
noise on the gold score that would give the same accuracy on these pairs
(:func:`rlhf_lightning.annotator.error_for_accuracy`), beside the error the goal of 0.85 allows.

Writes ``<out>/reward_learning_curve.{json,png}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

from rlhf_lightning.annotator import SimulatedAnnotator, error_for_accuracy
from rlhf_lightning.data.render import user_text
from rlhf_lightning.data.sources import BUNDLED_DIR
from rlhf_lightning.evaluation import reward_model_accuracy
from rlhf_lightning.models import load_reward_model, load_tokenizer
from rlhf_lightning.pipeline import write_stage_config
from rlhf_lightning.precision import inference_autocast
from rlhf_lightning.report import finish_figure, read_scalars
from rlhf_lightning.stages import run_stage


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    x = [r["comparisons"] for r in results]
    ax.plot(x, [r["held_out_accuracy"] for r in results], "o-", label="held-out pairs (evaluation topics)")
    ax.plot(x, [r["val_accuracy"][-1] for r in results], "s--", label="validation rankings (training topics)")
    ax.plot(
        x, [r["train_accuracy"][-1] for r in results], "^:", label=f"training ({results[0]['labels']} labels)"
    )
    ax.axhline(0.85, color="tab:red", lw=0.8, ls=":", label="goal 0.85")
    ax.set_xscale("log")
    ax.set_xlabel(f"training comparisons ({results[0]['labels']} labels)")
    ax.set_ylabel("pairwise accuracy")
    ax.set_ylim(0.4, 1.0)
    finish_figure(fig, ax, path)


def gold_scores(row: dict, annotator: SimulatedAnnotator) -> list[float]:
    """The annotator's noise-free score of each response of a K-way ranking row."""
    prompt = user_text(row["prompt"])
    return [annotator.score(prompt, r, f) for r, f in zip(row["responses"], row["finished"])]


def noise_free(row: dict, annotator: SimulatedAnnotator | None = None) -> dict:
    """A K-way ranking row with its ranks replaced by the annotator's noise-free order (1 = best)."""
    gold = gold_scores(row, annotator or SimulatedAnnotator())
    order = sorted(range(len(gold)), key=lambda i: -gold[i])
    return {**row, "ranks": [order.index(i) + 1 for i in range(len(gold))]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sft", default="runs/pipeline/sft/export", help="the SFT export the reward model starts from"
    )
    parser.add_argument(
        "--out", default=None, help="default: runs/reward_learning_curve (with _noise_free for those labels)"
    )
    parser.add_argument("--reward_config", default="configs/reward.yaml")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument(
        "--labels",
        choices=("noisy", "noise-free"),
        default="noisy",
        help="the bundled noisy rankings, or each ranking in the annotator's noise-free order",
    )
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more overrides for the stage")
    args = parser.parse_args()
    suffix = "_noise_free" if args.labels == "noise-free" else ""
    out = Path(args.out or f"runs/reward_learning_curve{suffix}")
    rows = (BUNDLED_DIR / "preferences_train.jsonl").read_text().splitlines()
    annotator = SimulatedAnnotator()
    if args.labels == "noise-free":
        rows = [json.dumps(noise_free(json.loads(r), annotator)) for r in rows]
    results = []
    for fraction in args.fractions:
        name = f"fraction_{fraction:g}{suffix}"  # one export per fraction and kind of label
        subset = rows[: max(1, round(fraction * len(rows)))]
        comparisons = sum(len(list(itertools.combinations(json.loads(r)["responses"], 2))) for r in subset)
        stage_dir = out / name
        stage_dir.mkdir(parents=True, exist_ok=True)
        data = stage_dir / "preferences_train.jsonl"
        data.write_text("\n".join(subset) + "\n")
        export = stage_dir / "export"
        if not (export / "config.json").exists():
            inputs = {"model": args.sft}
            config = write_stage_config(args.reward_config, stage_dir, out / "tb", name, inputs, export)
            args_ = ["fit", "-c", str(config), "--data.init_args.train", str(data)]
            # every comparison of the fraction, whatever share of an epoch the config trains on
            run_stage("reward", [*args_, "--trainer.limit_train_batches", "1.0", *args.extra])
        scalars = read_scalars(out / "tb" / name)
        tokenizer = load_tokenizer(str(export))
        model = load_reward_model(str(export), pad_token_id=tokenizer.pad_token_id).eval()
        with inference_autocast():
            held_out = reward_model_accuracy(model, tokenizer, "bundled:eval_preferences")
        results.append({
            "labels": args.labels, "fraction": fraction, "rankings": len(subset), "comparisons": comparisons,
            "train_accuracy": [v for _, v in sorted(scalars.get("train/preference_accuracy_epoch", []))],
            "val_accuracy": [v for _, v in sorted(scalars.get("val/preference_accuracy", []))],
            "held_out_accuracy": held_out,
        })  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    margins = [
        json.loads(r)["gold_margin"]
        for r in (BUNDLED_DIR / "eval_preferences.jsonl").read_text().splitlines()
    ]
    for r in results:
        r["held_out_error_sd"] = error_for_accuracy(margins, r["held_out_accuracy"])
    goal = {"accuracy": 0.85, "error_sd": error_for_accuracy(margins, 0.85)}
    goal["gap_deciles"] = statistics.quantiles([abs(m) for m in margins], n=10)  # how close the pairs are
    gold = [g for row in map(json.loads, rows) for g in gold_scores(row, annotator)]
    goal["gold_sd"] = statistics.pstdev(gold)  # the scale the error is read on
    print(f"held-out accuracy read as gold-scale error: {[round(r['held_out_error_sd'], 3) for r in results]}; "
          f"the goal 0.85 allows {goal['error_sd']:.3f}; gold sd over the training responses {goal['gold_sd']:.3f}; "
          f"deciles of the held-out pairs' gold gaps {[round(q, 3) for q in goal['gap_deciles']]}")  # fmt: skip
    summary = {"labels": args.labels, "goal": goal, "results": results}
    (out / "reward_learning_curve.json").write_text(json.dumps(summary, indent=2))
    plot(results, out / "reward_learning_curve.png")
    print(f"wrote {out / 'reward_learning_curve.json'} and {out / 'reward_learning_curve.png'}")


if __name__ == "__main__":
    main()
