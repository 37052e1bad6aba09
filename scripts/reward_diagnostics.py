"""Where the reward model fails, and whether its labels could have taught it more.

    python scripts/reward_diagnostics.py --reward runs/pipeline/reward/export

Two measurements on the bundled demo data:

1. **Accuracy by deciding term.** Each held-out noise-free pair is assigned the rubric term whose
   weighted difference between its two responses is largest (``SimulatedAnnotator.deciding_term``),
   and the reward model's accuracy is reported per term: which part of the preference it learned.
2. **What the labels carry.** A Bradley-Terry model over the annotator's own five terms (warmth,
   on topic, concise, finished, fresh: one weight each, no knowledge of the rubric's weights) is fitted
   to the *same noisy training rankings* the reward model learns from, and scored on the same held-out
   pairs. If it ranks them well, the labels hold the preference and the reward model's shortfall is
   the model's: it does not compute these terms from text well enough.

Writes ``--output`` (default ``runs/reward_diagnostics.json``) and prints a summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from rlhf_lightning.annotator import SimulatedAnnotator
from rlhf_lightning.data.render import user_text
from rlhf_lightning.data.sources import read_records
from rlhf_lightning.evaluation import outcome_interval, pair_outcomes, reward_model_outcomes
from rlhf_lightning.models import load_reward_model, load_tokenizer
from rlhf_lightning.precision import inference_autocast
from rlhf_lightning.rl.ranking import bradley_terry_loss

TERMS = ("warmth", "on_topic", "concise", "finished", "fresh")


def term_features(annotator: SimulatedAnnotator, prompt: str, response: str, finished: bool) -> list[float]:
    """The rubric's terms of one response, unweighted, in :data:`TERMS` order."""
    c = annotator.components(prompt, response, finished)
    return [c[t] for t in TERMS]


def ranking_differences(rows: list[dict], annotator: SimulatedAnnotator) -> torch.Tensor:
    """``features(winner) - features(loser)`` for every comparison of K-way ranking rows (rank 1 = best)."""
    diffs = []
    for row in rows:
        prompt = user_text(row["prompt"])
        feats = [term_features(annotator, prompt, r, f) for r, f in zip(row["responses"], row["finished"])]
        for i, j in itertools.combinations(range(len(feats)), 2):
            win, lose = (i, j) if row["ranks"][i] < row["ranks"][j] else (j, i)
            diffs.append([a - b for a, b in zip(feats[win], feats[lose])])
    return torch.tensor(diffs, dtype=torch.float64)


def fit_bradley_terry(differences: torch.Tensor, l2: float = 1e-4) -> torch.Tensor:
    """Weights ``w`` maximising ``sum log sigmoid(w . d)`` over winner-minus-loser feature differences
    ``d`` (a linear Bradley-Terry model; a small L2 penalty keeps separable data finite)."""
    w = torch.zeros(differences.shape[1], dtype=differences.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = bradley_terry_loss(differences @ w, 0.0).mean() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def summary(outcomes: list[float], prompts: list[str], terms: list[str]) -> dict:
    """Accuracy with its 95% interval, overall and over the pairs each term decides."""
    out = {"accuracy": sum(outcomes) / len(outcomes), "interval": outcome_interval(outcomes, prompts)}
    out["by_deciding_term"] = {}
    for term in TERMS:
        keep = [i for i, t in enumerate(terms) if t == term]
        if keep:
            o, p = [outcomes[i] for i in keep], [prompts[i] for i in keep]
            out["by_deciding_term"][term] = {
                "pairs": len(o),
                "accuracy": sum(o) / len(o),
                "interval": outcome_interval(o, p),
            }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reward", default="runs/pipeline/reward/export", help="a reward-model export")
    parser.add_argument("--train", default="bundled:preferences_train", help="the noisy training rankings")
    parser.add_argument("--held_out", default="bundled:eval_preferences", help="noise-free held-out pairs")
    parser.add_argument("--output", default="runs/reward_diagnostics.json")
    args = parser.parse_args(argv)
    annotator = SimulatedAnnotator()
    held_out = [record for record, _ in read_records(args.held_out)]
    prompts = [user_text(r["prompt"]) for r in held_out]
    deciding = [annotator.deciding_term(p, r["responses"], r["finished"]) for p, r in zip(prompts, held_out)]

    tokenizer = load_tokenizer(args.reward)
    model = load_reward_model(args.reward, pad_token_id=tokenizer.pad_token_id).eval()
    with torch.no_grad(), inference_autocast():
        outcomes = reward_model_outcomes(model, tokenizer, args.held_out)
    if len(outcomes) != len(held_out):
        raise ValueError(f"{args.held_out}: {len(held_out)} pairs, but only {len(outcomes)} could be scored")

    weights = fit_bradley_terry(ranking_differences([r for r, _ in read_records(args.train)], annotator))
    feature_scores = [
        [
            float(torch.tensor(term_features(annotator, prompt, r, f), dtype=weights.dtype) @ weights)
            for r, f in zip(row["responses"], row["finished"])
        ]
        for prompt, row in zip(prompts, held_out)
    ]
    feature_outcomes = pair_outcomes([p[0] for p in feature_scores], [p[1] for p in feature_scores])

    report = {
        "reward": args.reward,
        "held_out": args.held_out,
        "pairs": len(outcomes),
        "reward_model": summary(outcomes, prompts, deciding),
        "rubric_terms_fitted_to_the_training_labels": {
            "weights": dict(zip(TERMS, weights.tolist())),
            **summary(feature_outcomes, prompts, deciding),
        },
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"{report['pairs']} held-out pairs; accuracy by the term that decides each pair:")
    print(f"{'term':<10} {'pairs':>6} {'reward model':>14} {'rubric terms fit':>17}")
    rm, ft = report["reward_model"], report["rubric_terms_fitted_to_the_training_labels"]
    for term, stats in rm["by_deciding_term"].items():
        print(
            f"{term:<10} {stats['pairs']:>6} {stats['accuracy']:>14.3f} {ft['by_deciding_term'][term]['accuracy']:>17.3f}"
        )
    print(f"{'all':<10} {report['pairs']:>6} {rm['accuracy']:>14.3f} {ft['accuracy']:>17.3f}")
    return report


if __name__ == "__main__":
    main()
