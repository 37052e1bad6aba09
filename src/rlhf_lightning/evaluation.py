"""Did RLHF work? Held-out win rates judged by the simulated annotator, and the reward-hacking gap.

For each policy (PPO, SFT, base) the evaluation samples responses to held-out prompts and reports:

* the annotator's win rate of PPO over SFT and over the base model (noise-free gold scores, ties
  count half) - the InstructGPT headline, where the 1.3B RLHF model beat 175B GPT-3 85% of the time;
* the reward model's accuracy on held-out pairs labelled by the noise-free gold score;
* KL(policy || SFT) per response, estimated on the policy's own samples (sum of k1 over tokens);
* mean response length and the share of responses that end with EOS;
* mean proxy (reward-model) score next to mean gold (annotator) score: when PPO games the proxy, the
  first rises while the second does not.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from rlhf_lightning.annotator import SimulatedAnnotator, decisive_term
from rlhf_lightning.data.batching import left_padded
from rlhf_lightning.data.formats import SkipRow, to_preference_row, to_prompt_row
from rlhf_lightning.data.preference import (
    collate_preferences,
    comparisons,
    encode_preference,
    preference_example,
)
from rlhf_lightning.data.render import decode_response, encode, prompt_text, user_text
from rlhf_lightning.data.sources import read_rows
from rlhf_lightning.lm import (
    SHARED_PROMPT_ATTENTION,
    attention_implementation,
    ranking_scores,
    response_logprobs,
    sample,
    sequence_scores,
    suppressed_token,
)
from rlhf_lightning.models import linear_weights_to, load_causal_lm, load_reward_model, load_tokenizer
from rlhf_lightning.precision import auto_precision, inference_autocast
from rlhf_lightning.rl.ranking import pair_accuracy


@dataclass
class EvaluationOptions:
    """How the held-out evaluation samples and judges.

    Args:
        prompts: Held-out prompts (any prompt format).
        preferences: Held-out pairs labelled by the noise-free annotator, for reward-model accuracy.
        samples_per_prompt: Responses sampled per prompt and policy.
        max_new_tokens: Longest response; ``None``: the PPO stage's (the pipeline reads its config),
            else 32.
        temperature: Sampling temperature; ``None``: the PPO stage's, else 0.7.
        batch_size: Prompts per generation batch (decoding is memory-bound: large batches are nearly free).
        seed: Sampling seed; every policy sees the same one.
        precision: ``bf16-mixed`` or ``32-true``; ``None``: chosen for the machine
            (:func:`rlhf_lightning.precision.auto_precision`).
    """

    prompts: str = "bundled:eval_prompts"
    preferences: str | None = "bundled:eval_preferences"
    samples_per_prompt: int = 1
    max_new_tokens: int | None = None
    temperature: float | None = None
    batch_size: int = 64
    seed: int = 1234
    precision: Literal["bf16-mixed", "32-true"] | None = None


@dataclass
class PolicySamples:
    """One policy's responses to the held-out prompts, and what was measured on them."""

    texts: list[str] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    gold: list[float] = field(default_factory=list)
    proxy: list[float] = field(default_factory=list)
    kl_to_sft: list[float] = field(default_factory=list)
    terms: list[dict[str, float]] = field(default_factory=list)  # each sample's weighted rubric terms


def win_rate(gold_a: list[float], gold_b: list[float]) -> float:
    """Share of paired samples where ``a`` scores higher; ties count half."""
    return sum(pair_outcomes(gold_a, gold_b)) / len(gold_a)


def pair_outcomes(gold_a: list[float], gold_b: list[float]) -> list[float]:
    """Per pair: 1 if ``a`` scores higher, 0.5 on a tie, 0 otherwise."""
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold_a, gold_b)]


def win_rate_interval(
    gold_a: list[float], gold_b: list[float], groups: list[int] | None = None, z: float = 1.959964
) -> tuple[float, float]:
    """95% confidence interval of :func:`win_rate` (:func:`outcome_interval` of the paired outcomes;
    ``groups`` gives each sample's prompt, ``None``: one sample per prompt)."""
    return outcome_interval(pair_outcomes(gold_a, gold_b), groups, z)


def outcome_interval(
    outcomes: list[float], groups: list[Hashable] | None = None, z: float = 1.959964
) -> tuple[float, float]:
    """95% confidence interval of the mean of ``outcomes`` (normal approximation).

    Outcomes of one group (the samples or the pairs of one prompt) are not independent, so the variance
    comes from each group's deviation from the mean, weighted by its size (the ratio estimator of a
    clustered mean; with equal groups, the variance of the per-group means over their number).
    ``None``: every outcome its own group.
    """
    groups = groups if groups is not None else list(range(len(outcomes)))
    per_group: dict[Hashable, list[float]] = {}
    for g, o in zip(groups, outcomes, strict=True):
        per_group.setdefault(g, []).append(o)
    n, total = len(per_group), len(outcomes)
    mean = sum(outcomes) / total
    if n < 2:
        return mean, mean
    variance = n / (n - 1) * sum((sum(v) - len(v) * mean) ** 2 for v in per_group.values()) / total**2
    stderr = variance**0.5
    return max(0.0, mean - z * stderr), min(1.0, mean + z * stderr)


@torch.no_grad()
def _sample_policy(
    name: str,
    model_dir: str,
    prompts: list[str],
    options: EvaluationOptions,
    tokenizer,
    reward_model,
    reference,
    reference_dir: str,
    annotator: SimulatedAnnotator,
    prompt_texts: list[str],
    dtype: torch.dtype,
) -> PolicySamples:
    is_reference = model_dir == reference_dir  # the SFT policy: its KL to itself is 0, no second copy
    model = reference if is_reference else linear_weights_to(load_causal_lm(model_dir).eval(), dtype)
    out = PolicySamples()
    torch.manual_seed(options.seed)
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    from tqdm.auto import tqdm

    for begin in tqdm(range(0, len(prompts), options.batch_size), desc=f"sampling {name}", disable=None):
        chunk = [encode(tokenizer, p) for p in prompts[begin : begin + options.batch_size]]
        ids, mask = left_padded(chunk, pad_id)
        responses, response_mask = sample(
            model,
            ids,
            mask,
            max_new_tokens=options.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad_id,
            temperature=options.temperature,
        )
        full = torch.cat([ids, responses], 1)
        full_mask = torch.cat([mask, response_mask.long()], 1)
        out.proxy += sequence_scores(reward_model, full, full_mask).float().tolist()
        if is_reference:
            out.kl_to_sft += [0.0] * len(chunk)
        else:
            start, suppress = ids.shape[1], suppressed_token(pad_id, eos)
            logp = response_logprobs(model, full, full_mask, start, options.temperature, suppress)
            ref_logp = response_logprobs(reference, full, full_mask, start, options.temperature, suppress)
            out.kl_to_sft += ((logp - ref_logp) * response_mask).sum(-1).tolist()
        for i, (row, row_mask) in enumerate(zip(responses, response_mask)):
            text, done, length = decode_response(tokenizer, row, row_mask)
            out.texts.append(text)
            out.finished.append(done)
            out.lengths.append(length)
            terms = annotator.weighted_components(prompt_texts[begin + i], text, done)
            out.terms.append(terms)
            out.gold.append(sum(terms.values()))  # the annotator's score
    return out


@torch.no_grad()
def reward_model_accuracy(
    reward_model, tokenizer, source: str, max_length: int = 512, batch_size: int = 16
) -> float:
    """Share of held-out pairs where the reward model scores the chosen response higher."""
    outcomes = reward_model_outcomes(reward_model, tokenizer, source, max_length, batch_size)
    return sum(outcomes) / len(outcomes)


def reward_model_outcomes(
    reward_model, tokenizer, source: str, max_length: int = 512, batch_size: int = 16
) -> list[float]:
    """Per comparison of ``source``, in file order: 1 if the reward model scores the preferred response
    higher, 0.5 on a tie, 0 otherwise (a row that cannot be encoded gives none)."""
    rows, _ = read_rows(source, to_preference_row)
    examples = []
    for row in rows:
        try:
            examples.append(encode_preference(tokenizer, row, max_length))
        except (
            SkipRow
        ):  # counted by read_rows' callers elsewhere; here a pair that cannot be scored is left out
            continue
    from tqdm.auto import tqdm

    # Every distinct response of a prompt is scored once (held-out pairs reuse a prompt's responses),
    # all of them in one share-prompt row where the attention takes a block mask, batches sorted by size.
    # Neither changes a score beyond float rounding.
    def keys(example: dict) -> list[tuple[tuple, tuple]]:  # (prompt ids, response ids) of each response
        p = example["prompt_length"]
        return [(tuple(s[:p]), tuple(s[p:])) for s in example["sequences"]]

    distinct: dict[tuple, dict[tuple, None]] = {}
    for example in examples:
        for prompt, response in keys(example):
            distinct.setdefault(prompt, {})[response] = None
    groups = sorted(distinct.items(), key=lambda item: len(item[0]) + sum(map(len, item[1])))
    share = attention_implementation(reward_model) in SHARED_PROMPT_ATTENTION
    scores = {}
    for begin in tqdm(range(0, len(groups), batch_size), desc="reward-model accuracy", disable=None):
        chunk = groups[begin : begin + batch_size]
        encoded = [
            preference_example(list(prompt), list(map(list, rs)), None, max_length) for prompt, rs in chunk
        ]
        batch = collate_preferences(encoded, tokenizer.pad_token_id, share)
        chunk_keys = [(prompt, response) for prompt, rs in chunk for response in rs]
        scores.update(zip(chunk_keys, ranking_scores(reward_model, batch).float().tolist()))
    rewards = torch.tensor([scores[key] for example in examples for key in keys(example)])
    pairs = comparisons(examples)["pairs"]
    return pair_accuracy(rewards, pairs).tolist()


def evaluate(
    policies: dict[str, str],
    sft: str,
    reward_model: str,
    options: EvaluationOptions | None = None,
    annotator_temperature: float = 0.3,
    judged: tuple[str, ...] = ("ppo",),
) -> dict:
    """Evaluate ``policies`` (name -> model) against the SFT model; returns every figure of the report.

    Win rates (``<judged>_vs_<other>``) are computed for each policy named in ``judged`` over every other.
    """
    options = options or EvaluationOptions()
    options = replace(
        options,
        max_new_tokens=options.max_new_tokens or 32,
        temperature=options.temperature or 0.7,
    )
    tokenizer = load_tokenizer(sft)
    rows, _ = read_rows(options.prompts, to_prompt_row)
    prompt_texts, rendered, prompt_ids = [], [], []
    for index, row in enumerate(rows):
        user = user_text(row.prompt)
        for _ in range(options.samples_per_prompt):
            prompt_ids.append(index)
            prompt_texts.append(user)
            rendered.append(prompt_text(tokenizer, row.prompt))
    annotator = SimulatedAnnotator(temperature=annotator_temperature)
    precision, reason = (
        (options.precision, "set by evaluation.precision") if options.precision else auto_precision()
    )
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    print(f"evaluation: {len(rendered)} samples per policy, precision {precision} ({reason})")
    rm = linear_weights_to(load_reward_model(reward_model, pad_token_id=tokenizer.pad_token_id).eval(), dtype)
    reference = linear_weights_to(load_causal_lm(sft).eval(), dtype)
    with inference_autocast(precision=precision):
        samples = {
            name: _sample_policy(
                name, path, rendered, options, tokenizer, rm, reference, sft, annotator, prompt_texts, dtype
            )
            for name, path in policies.items()
        }
    report: dict = {
        "options": asdict(options),
        "precision": precision,
        "policies": {},
        "win_rates": {},
        "win_rate_intervals": {},
        "n_samples": len(rendered),
        "n_prompts": len(rows),
    }
    for name, s in samples.items():
        n = len(s.gold)
        report["policies"][name] = {
            "gold_score": sum(s.gold) / n,
            "gold_score_se": statistics.pstdev(s.gold) / math.sqrt(n),  # standard error of that mean
            "proxy_score": sum(s.proxy) / n,
            "kl_to_sft": sum(s.kl_to_sft) / n,
            "response_length": sum(s.lengths) / n,
            "eos_rate": sum(s.finished) / n,
            "gold_terms": mean_terms(s.terms),
            "examples": [
                {"prompt": p, "response": t, "gold": g, "proxy": q, "finished": f, "terms": c}
                for p, t, g, q, f, c in zip(prompt_texts, s.texts, s.gold, s.proxy, s.finished, s.terms)
            ],
        }
    for judged_name in (name for name in judged if name in samples):
        for other in samples:
            if other == judged_name:
                continue
            key, a, b = f"{judged_name}_vs_{other}", samples[judged_name].gold, samples[other].gold
            report["win_rates"][key] = win_rate(a, b)
            report["win_rate_intervals"][key] = win_rate_interval(a, b, prompt_ids)
            outcomes = pair_outcomes(a, b)
            report.setdefault("outcomes", {})[key] = {
                "wins": outcomes.count(1.0),
                "ties": outcomes.count(0.5),
                "losses": outcomes.count(0.0),
            }
            report.setdefault("decided_by", {})[key] = decided_by(
                samples[judged_name].terms, samples[other].terms, outcomes
            )
            noisy = [annotator.prefer_probability(x, y) for x, y in zip(a, b)]
            report.setdefault("noisy_win_rates", {})[key] = sum(noisy) / len(noisy)
    if options.preferences:
        with inference_autocast(precision=precision):
            report["reward_model_accuracy"] = reward_model_accuracy(rm, tokenizer, options.preferences)
    return report


def gold_terms(
    annotator: SimulatedAnnotator, prompts: list[str], texts: list[str], finished: list[bool]
) -> dict[str, float]:
    """Mean contribution of each rubric term to the gold score over the samples (they sum to the mean
    gold score): which terms a policy gained or lost."""
    zipped = zip(prompts, texts, finished, strict=True)
    return mean_terms([annotator.weighted_components(p, t, f) for p, t, f in zipped])


def mean_terms(terms: list[dict[str, float]]) -> dict[str, float]:
    """Each rubric term's mean over samples' weighted terms (:meth:`SimulatedAnnotator.weighted_components`)."""
    totals: dict[str, float] = {}
    for each in terms:
        for term, value in each.items():
            totals[term] = totals.get(term, 0.0) + value
    return {term: total / len(terms) for term, total in totals.items()}


def decided_by(
    terms_a: list[dict[str, float]], terms_b: list[dict[str, float]], outcomes: list[float]
) -> dict[str, dict[str, int]]:
    """How many of ``a``'s wins and losses against ``b`` (paired samples' weighted rubric terms and the
    :func:`pair_outcomes`) each rubric term decided (:func:`~rlhf_lightning.annotator.decisive_term`):
    which behaviour the policy wins on and which one it still loses on. Ties are left out."""
    counts: dict[str, dict[str, int]] = {"wins": {}, "losses": {}}
    for a, b, outcome in zip(terms_a, terms_b, outcomes, strict=True):
        if outcome == 0.5:
            continue
        side = counts["wins" if outcome == 1.0 else "losses"]
        term = decisive_term(a, b)
        side[term] = side.get(term, 0) + 1
    return counts


def versus(report: dict, name: str, other: str = "sft") -> dict:
    """One judged policy's scalar figures from an :func:`evaluate` report (its samples and gold terms
    left out), with its win rate over ``other``, the 95% interval and the wins / ties / losses."""
    key = f"{name}_vs_{other}"
    figures = {k: v for k, v in report["policies"][name].items() if k not in ("examples", "gold_terms")}
    return {
        **figures,
        "win_rate": report["win_rates"][key],
        "win_rate_interval": report["win_rate_intervals"][key],
        "outcomes": report["outcomes"][key],
    }


def main(argv: list[str] | None = None) -> int:
    """``rlhf-lightning evaluate``: evaluate exported policies and print the figures as JSON."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="rlhf-lightning evaluate", description=__doc__)
    parser.add_argument("--policy", required=True, help="the RLHF (PPO) policy to judge")
    parser.add_argument("--sft", required=True, help="the SFT policy (also the KL reference)")
    parser.add_argument("--base", default=None, help="the base model, for the win rate over it")
    parser.add_argument("--reward_model", required=True, help="the reward model (the proxy)")
    parser.add_argument("--output", default=None, help="write the figures to this JSON file")
    parser.add_argument("--annotator_temperature", type=float, default=0.3)
    parser.add_class_arguments(EvaluationOptions, "evaluation")
    args = parser.parse_args(argv)
    policies = {"ppo": args.policy, "sft": args.sft}
    if args.base:
        policies["base"] = args.base
    options = EvaluationOptions(**vars(args.evaluation))
    report = evaluate(policies, args.sft, args.reward_model, options, args.annotator_temperature)
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    return 0
