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
3. **What the backbone's features hold** (with ``--probe_model``, e.g. the SFT export the reward model
   starts from; a few minutes). Every distinct response is run once through the *frozen* model; a
   linear Bradley-Terry head is fitted to the same noisy training rankings on its hidden states at each
   of ``--probe_layers``, read at the last token or at the last token and the mean over the response's
   tokens. The layer, reading and L2 penalty are chosen on the validation prompts' noise-free rankings;
   the chosen probe is scored on the held-out pairs (by deciding term, and against the number of
   training rankings it saw). It says how much of the preference these features expose to a linear
   head, and how fast that grows with data.

Writes ``--output`` (default ``runs/reward_diagnostics.json``) and prints a summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from rlhf_lightning.annotator import SimulatedAnnotator
from rlhf_lightning.data.batching import mask_of, pad
from rlhf_lightning.data.render import encode_pair, user_text
from rlhf_lightning.data.sources import read_records
from rlhf_lightning.evaluation import outcome_interval, pair_outcomes, reward_model_outcomes
from rlhf_lightning.models import backbone, load_causal_lm, load_reward_model, load_tokenizer
from rlhf_lightning.precision import inference_autocast
from rlhf_lightning.rl.ranking import bradley_terry_loss

TERMS = ("warmth", "on_topic", "concise", "finished", "fresh")


def term_features(annotator: SimulatedAnnotator, prompt: str, response: str, finished: bool) -> list[float]:
    """The rubric's terms of one response, unweighted, in :data:`TERMS` order."""
    c = annotator.components(prompt, response, finished)
    return [c[t] for t in TERMS]


def ranking_pairs(rows: list[dict]) -> list[tuple[int, int, int]]:
    """``(row, winner, loser)`` for every comparison of K-way ranking rows (rank 1 = best)."""
    pairs = []
    for n, row in enumerate(rows):
        for i, j in itertools.combinations(range(len(row["responses"])), 2):
            pairs.append((n, i, j) if row["ranks"][i] < row["ranks"][j] else (n, j, i))
    return pairs


def ranking_differences(rows: list[dict], annotator: SimulatedAnnotator) -> torch.Tensor:
    """``features(winner) - features(loser)`` for every comparison of K-way ranking rows."""
    feats = [
        [
            term_features(annotator, user_text(row["prompt"]), r, f)
            for r, f in zip(row["responses"], row["finished"])
        ]
        for row in rows
    ]
    diffs = [[a - b for a, b in zip(feats[n][win], feats[n][lose])] for n, win, lose in ranking_pairs(rows)]
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


@torch.no_grad()
def response_features(
    model, tokenizer, rows: list[dict], layers: list[int], batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """Hidden states of the frozen ``model`` for every response of ``rows``, in row order: at each of
    ``layers`` (0 = the embeddings), ``"last"`` at the response's last token ``(responses, layers,
    hidden)`` and ``"mean"`` over its tokens. Each row is one prompt with its responses."""
    encoded = [
        encode_pair(tokenizer, row["prompt"], response, finished)
        for row in rows
        for response, finished in zip(row["responses"], row["finished"])
    ]
    order = sorted(range(len(encoded)), key=lambda i: sum(map(len, encoded[i])))
    hidden = backbone(model).config.hidden_size
    out = {k: torch.zeros(len(encoded), len(layers), hidden) for k in ("last", "mean")}
    for begin in range(0, len(order), batch_size):
        index = order[begin : begin + batch_size]
        sequences = [encoded[i][0] + encoded[i][1] for i in index]
        ids, mask = pad(sequences, tokenizer.pad_token_id), mask_of(sequences)
        response = pad([[0] * len(encoded[i][0]) + [1] * len(encoded[i][1]) for i in index], 0).float()
        states = backbone(model)(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        last = mask.sum(-1) - 1
        for k, layer in enumerate(layers):
            h = states[layer].float()
            out["last"][index, k] = h[torch.arange(len(index)), last]
            out["mean"][index, k] = (h * response[..., None]).sum(1) / response.sum(1, keepdim=True)
    return out


def probe_scores(features: torch.Tensor, train_pairs: torch.Tensor, l2: float) -> torch.Tensor:
    """Scores of a linear Bradley-Terry head fitted on standardised ``features`` to ``train_pairs``
    (``(winner, loser)`` rows of indices into ``features``)."""
    seen = features[train_pairs.flatten()]
    z = ((features - seen.mean(0)) / (seen.std(0) + 1e-6)).double()
    w = fit_bradley_terry(z[train_pairs[:, 0]] - z[train_pairs[:, 1]], l2)
    return (z @ w).float()


def backbone_probe(
    model_path: str,
    train: list[dict],
    val: list[dict],
    held_out: list[dict],
    held_out_terms: list[str],
    layers: list[int],
    l2s: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0),
    fractions: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0),
) -> dict:
    """Linear heads on a frozen model's features (see the module's docstring, point 3)."""
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path).eval()
    rows = train + val + held_out
    with inference_autocast():
        features = response_features(model, tokenizer, rows, layers)
    offsets = [0]
    for row in rows:
        offsets.append(offsets[-1] + len(row["responses"]))

    def indices(pairs: list[tuple[int, int, int]], first_row: int) -> torch.Tensor:
        return torch.tensor([(offsets[first_row + n] + i, offsets[first_row + n] + j) for n, i, j in pairs])

    train_pairs = indices(ranking_pairs(train), 0)
    val_pairs = indices(ranking_pairs(val), len(train))
    held_out_pairs = indices([(n, 0, 1) for n in range(len(held_out))], len(train) + len(val))
    prompts = [user_text(r["prompt"]) for r in held_out]

    def accuracy(scores: torch.Tensor, pairs: torch.Tensor) -> list[float]:
        return pair_outcomes(scores[pairs[:, 0]].tolist(), scores[pairs[:, 1]].tolist())

    def judged(scores: torch.Tensor) -> dict[str, float]:
        val, held = accuracy(scores, val_pairs), accuracy(scores, held_out_pairs)
        return {"validation": sum(val) / len(val), "held_out": sum(held) / len(held)}

    readings = {"last": lambda k: features["last"][:, k]}
    readings["mean+last"] = lambda k: torch.cat([features["last"][:, k], features["mean"][:, k]], -1)
    results = [
        {"layer": layer, "reading": reading, "l2": l2, **judged(probe_scores(read(k), train_pairs, l2))}
        for k, layer in enumerate(layers)
        for reading, read in readings.items()
        for l2 in l2s
    ]
    best = max(results, key=lambda r: r["validation"])
    read = readings[best["reading"]](layers.index(best["layer"]))
    outcomes = accuracy(probe_scores(read, train_pairs, best["l2"]), held_out_pairs)
    curve = []
    for fraction in fractions:
        n_rows = max(1, round(fraction * len(train)))
        subset = train_pairs[: len(ranking_pairs(train[:n_rows]))]  # the pairs are in row order
        scores = probe_scores(read, subset, best["l2"])
        curve.append({"rankings": n_rows, "comparisons": len(subset), **judged(scores)})
    return {
        "model": model_path,
        "by_layer": results,
        "chosen": {**best, **summary(outcomes, prompts, held_out_terms)},
        "learning_curve": curve,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reward", default="runs/pipeline/reward/export", help="a reward-model export")
    parser.add_argument("--train", default="bundled:preferences_train", help="the noisy training rankings")
    parser.add_argument("--held_out", default="bundled:eval_preferences", help="noise-free held-out pairs")
    parser.add_argument("--val", default="bundled:preferences_val", help="noise-free rankings (probe choice)")
    parser.add_argument("--output", default="runs/reward_diagnostics.json")
    parser.add_argument("--probe_model", default=None, help="a frozen model to probe (e.g. the SFT export)")
    parser.add_argument("--probe_layers", type=int, nargs="+", default=[8, 16, 22, 30])
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

    train = [r for r, _ in read_records(args.train)]
    weights = fit_bradley_terry(ranking_differences(train, annotator))
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
    if args.probe_model:
        val = [r for r, _ in read_records(args.val)]
        report["backbone_probe"] = backbone_probe(
            args.probe_model, train, val, held_out, deciding, args.probe_layers
        )
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
    if args.probe_model:
        probe = report["backbone_probe"]
        chosen = probe["chosen"]
        print(
            f"linear head on {args.probe_model} (frozen), chosen on validation: layer {chosen['layer']}, "
            f"{chosen['reading']}, l2 {chosen['l2']}: held-out {chosen['accuracy']:.3f} "
            f"[{chosen['interval'][0]:.3f}, {chosen['interval'][1]:.3f}]"
        )
        for term, stats in chosen["by_deciding_term"].items():
            print(f"  {term:<10} {stats['pairs']:>6} {stats['accuracy']:>8.3f}")
        for point in probe["learning_curve"]:
            print(
                f"  {point['rankings']:>4} rankings ({point['comparisons']} comparisons): "
                f"validation {point['validation']:.3f}, held-out {point['held_out']:.3f}"
            )
    return report


if __name__ == "__main__":
    main()
