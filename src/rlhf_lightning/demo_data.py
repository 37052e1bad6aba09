"""The bundled demo data, made by the project's own code: the InstructGPT data recipe, offline.

For each prompt the base model samples K responses; the simulated annotator ranks them. From that:

* ``sft_train`` / ``sft_val``: the noise-free best *finished* response of each training prompt, standing
  in for the demonstrations contractors write;
* ``preferences_train``: the annotator's noisy K-way rankings (C(K,2) pairs each), with ``finished``
  flags: a response that ran out of tokens is encoded without EOS, as PPO's are;
* ``preferences_val``: noise-free rankings of the validation prompts, to choose the reward model's
  epochs and learning rate on (never the evaluation's pairs);
* ``prompts_train`` / ``prompts_val``: the training prompts, for PPO, and the validation prompts, for
  PPO's in-run win rate (:class:`~rlhf_lightning.callbacks.GoldJudge`);
* ``eval_prompts``: held-out prompts about topics no training prompt mentions; no stage trains on them;
* ``eval_preferences``: held-out pairs labelled by the *noise-free* gold score, to measure the reward
  model's accuracy against the annotator's true preference;
* ``manifest.json``: how the files were made (model, seed, sizes, sampling, annotator temperature).

Remake with ``python scripts/make_demo_data.py`` (the manifest records the exact command); sampling
(``samples.jsonl``, the slow step) and annotation are separate, so the annotation can be redone alone
with ``--annotate-only``.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import asdict
from pathlib import Path

import torch

from rlhf_lightning.annotator import (
    INSTRUCTGPT_AGREEMENT,
    SimulatedAnnotator,
    calibrate_temperature,
    expected_agreement,
    truth_agreement,
)
from rlhf_lightning.data.batching import left_padded
from rlhf_lightning.data.render import decode_response, encode, prompt_text
from rlhf_lightning.lm import sample
from rlhf_lightning.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer
from rlhf_lightning.precision import auto_precision, inference_autocast

# Prompts that can be answered within the response length PPO samples (48 tokens): InstructGPT's
# labelers judged whole answers, and an answer that cannot finish cannot be judged finished.
TASKS = {
    "explain": [
        "Explain {t} in one sentence.",
        "In a few words, what is {t}?",
        "What is {t}? Answer in one short sentence.",
        "Name one fun fact about {t}.",
    ],
    "advice": [
        "Give me one quick tip for {a}.",
        "What is one simple way to get better at {a}?",
        "Share one short piece of advice for a beginner at {a}.",
    ],
    "support": [
        "I feel nervous about {e}. Give me one short piece of advice.",
        "Write a one-sentence kind note to a friend who is worried about {e}.",
        "Say something encouraging, in one sentence, to someone facing {e}.",
    ],
    "creative": [
        "Write a two-line poem about {t}.",
        "Tell a two-sentence story about {t}.",
        "Describe {t} in one sentence.",
    ],
    "compare": [
        "What is the difference between {t} and {u}? Answer briefly.",
        "In one sentence, how are {t} and {u} different?",
    ],
}
TOPICS = [
    "photosynthesis",
    "gravity",
    "rainbows",
    "volcanoes",
    "the moon",
    "electricity",
    "clouds",
    "the ocean",
    "bees",
    "recycling",
    "the internet",
    "music",
    "friendship",
    "winter",
    "trees",
    "rivers",
    "stars",
    "dinosaurs",
    "bread",
    "coffee",
    "sleep",
    "the heart",
    "magnets",
    "sound",
    "deserts",
    "tigers",
    "penguins",
    "earthquakes",
    "tornadoes",
    "lightning",
    "snow",
    "glaciers",
    "forests",
    "mountains",
    "islands",
    "bicycles",
    "trains",
    "airplanes",
    "rockets",
    "computers",
    "robots",
    "books",
    "libraries",
    "chocolate",
    "honey",
    "apples",
    "tomatoes",
    "butterflies",
    "spiders",
    "whales",
    "dolphins",
    "owls",
    "frogs",
    "mushrooms",
    "comets",
    "planets",
    "the sun",
    "wind",
    "fire",
    "the brain",
    "bones",
    "vaccines",
    "soap",
    "umbrellas",
    "candles",
    "bridges",
    "castles",
    "pyramids",
    "kites",
]
ACTIVITIES = [
    "cooking",
    "running",
    "drawing",
    "public speaking",
    "learning a language",
    "saving money",
    "gardening",
    "studying",
    "writing",
    "chess",
    "swimming",
    "photography",
    "making friends",
    "time management",
    "reading",
    "yoga",
    "baking",
    "cycling",
    "knitting",
    "singing",
    "playing guitar",
    "hiking",
    "dancing",
    "painting",
    "typing",
    "juggling",
    "camping",
    "fishing",
    "meditation",
    "coding",
]
EVENTS = [
    "a job interview",
    "an exam",
    "moving to a new city",
    "a first day at school",
    "a big presentation",
    "a doctor visit",
    "a long flight",
    "a new job",
    "a driving test",
    "a dentist appointment",
    "a first date",
    "a wedding speech",
    "a piano recital",
    "a marathon",
    "a hospital stay",
    "starting college",
    "a difficult conversation",
    "a team tryout",
    "a surgery",
    "a move abroad",
]
HELD_OUT_SHARE = 0.3  # of each topic list: only held-out prompts use these
FILES = (
    "sft_train",
    "sft_val",
    "preferences_train",
    "preferences_val",
    "prompts_train",
    "prompts_val",
    "eval_prompts",
    "eval_preferences",
)


def split_fills(seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """Topics, activities and events split into ``train`` and ``held_out``: held-out prompts are about
    subjects no training prompt mentions, so the evaluation measures what generalises."""
    rng = random.Random(seed)
    out: dict[str, dict[str, list[str]]] = {"train": {}, "held_out": {}}
    for key, items in (("t", TOPICS), ("a", ACTIVITIES), ("e", EVENTS)):
        items = sorted(items)
        rng.shuffle(items)
        n_held = round(HELD_OUT_SHARE * len(items))
        out["held_out"][key], out["train"][key] = items[:n_held], items[n_held:]
    return out


def _prompt_pool(fills: dict[str, list[str]]) -> list[dict]:
    pool = []
    for task, templates in TASKS.items():
        for template in templates:
            if "{u}" in template:
                choices = [{"t": t, "u": u} for t, u in itertools.combinations(fills["t"], 2)]
            else:
                key = next(k for k in ("a", "e", "t") if "{" + k + "}" in template)
                choices = [{key: x} for x in fills[key]]
            pool.extend({"task": task, "text": template.format(**f)} for f in choices)
    return pool


def demo_prompts(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` distinct prompts of ``split`` (``train`` or ``held_out``) spread evenly over the task types,
    each ``{"task", "text"}``."""
    pool = _prompt_pool(split_fills(seed)[split])
    rng = random.Random(seed)
    by_task = {task: [p for p in pool if p["task"] == task] for task in TASKS}
    for items in by_task.values():
        rng.shuffle(items)
    chosen = []
    for group in itertools.zip_longest(*by_task.values()):  # round-robin keeps the task mix even
        chosen.extend(p for p in group if p is not None)
    if n > len(chosen):
        raise ValueError(f"only {len(chosen)} distinct {split} demo prompts exist, asked for {n}")
    return chosen[:n]


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@torch.no_grad()
def generate_responses(
    model_name: str,
    prompts: list[str],
    k: int,
    seed: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
) -> list[list[tuple[str, bool]]]:
    """``k`` sampled ``(text, finished)`` responses per prompt."""
    from tqdm.auto import tqdm

    tokenizer = load_tokenizer(model_name)
    model = load_causal_lm(model_name).eval()
    torch.manual_seed(seed)
    out: list[list[tuple[str, bool]]] = []
    for begin in tqdm(range(0, len(prompts), batch_size), desc="sampling responses"):
        chunk = prompts[begin : begin + batch_size]
        ids = [encode(tokenizer, prompt_text(tokenizer, _messages(p))) for p in chunk for _ in range(k)]
        responses, mask = sample(
            model,
            *left_padded(ids, tokenizer.pad_token_id),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            temperature=temperature,
            top_p=top_p,
        )
        for i in range(0, len(ids), k):
            group = []
            for row, row_mask in zip(responses[i : i + k], mask[i : i + k]):
                text, finished, _ = decode_response(tokenizer, row, row_mask)
                group.append((text, finished))
            out.append(group)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def sample_demo_responses(
    out_dir: str | Path,
    model: str = DEFAULT_MODEL,
    n_prompts: int = 480,
    n_eval: int = 240,
    k: int = 4,
    seed: int = 0,
    max_new_tokens: int = 48,
    temperature: float = 0.7,
    top_p: float = 1.0,
    batch_size: int = 32,
) -> Path:
    """Step 1: sample K responses per demo prompt into ``samples.jsonl`` (the slow part).

    The defaults are the PPO stage's sampling settings (``configs/ppo.yaml``: 48 tokens, temperature
    0.7, no top-p), so the reward model is trained on responses like the ones PPO will ask it to score.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = [dict(p, split="train") for p in demo_prompts(n_prompts, seed, "train")]
    prompts += [dict(p, split="held_out") for p in demo_prompts(n_eval, seed, "held_out")]
    with inference_autocast():
        samples = generate_responses(
            model, [p["text"] for p in prompts], k, seed, max_new_tokens, temperature, top_p, batch_size
        )
    rows = [
        {
            "task": p["task"],
            "split": p["split"],
            "prompt": p["text"],
            "responses": [t for t, _ in group],
            "finished": [f for _, f in group],
        }
        for p, group in zip(prompts, samples)
    ]
    _write_jsonl(out / "samples.jsonl", rows)
    sampling = {
        "model": model,
        "seed": seed,
        "k": k,
        "prompts": n_prompts,
        "held_out_prompts": n_eval,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "precision": auto_precision()[0],
    }
    (out / "sampling.json").write_text(json.dumps(sampling, indent=2))
    return out / "samples.jsonl"


def add_training_responses(out_dir: str | Path, extra: int = 4, seed: int = 1, batch_size: int = 32) -> Path:
    """Step 1b: sample ``extra`` more responses for every training prompt (not the held-out ones), with
    the settings of step 1 and another seed, and append them to ``samples.jsonl``; each call is one
    round, recorded in ``sampling.json``.

    A ranking of K responses gives C(K,2) comparisons for K sequences the reward model must read:
    K=16 gives 120 from 16, K=8 28 from 8 (InstructGPT ranked 4 to 9), K=4 6 from 4.
    """
    out = Path(out_dir)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    sampling = json.loads((out / "sampling.json").read_text())
    train = [r for r in rows if r["split"] == "train"]
    with inference_autocast():
        samples = generate_responses(
            sampling["model"], [r["prompt"] for r in train], extra, seed,
            sampling["max_new_tokens"], sampling["temperature"], sampling["top_p"], batch_size,
        )  # fmt: skip
    for row, group in zip(train, samples):
        row["responses"] += [t for t, _ in group]
        row["finished"] += [f for _, f in group]
    _write_jsonl(out / "samples.jsonl", rows)
    sampling["added_training_responses"] = [
        *sampling.get("added_training_responses", []),
        {"k": extra, "seed": seed},
    ]
    (out / "sampling.json").write_text(json.dumps(sampling, indent=2))
    return out / "samples.jsonl"


def annotate_and_split(
    out_dir: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    command: str = "",
    demo_candidates: int | None = None,
) -> dict:
    """Step 2: rank the samples with the simulated annotator and write the stage files and the manifest.

    A prompt's demonstration is its best finished response among the first ``demo_candidates`` sampled
    (``None``: all of them), so more responses for the reward model's rankings can leave the SFT data as
    it was; the rankings hold every distinct response.

    Responses that ran out of tokens keep a ``finished: false`` flag, so the reward model sees what the
    annotator judges (no EOS) exactly as it will see a truncated PPO response. A prompt needs two
    distinct responses to be ranked, and a finished one to give an SFT demonstration. Held-out
    prompts (about topics no training prompt mentions) give the evaluation prompts and pairs.
    """
    out = Path(out_dir)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    annotator = SimulatedAnnotator()
    rows = []
    for sample_row in samples:
        gold, done = {}, {}
        for text, finished in zip(sample_row["responses"], sample_row["finished"]):
            if text and text not in gold:
                gold[text] = annotator.score(sample_row["prompt"], text, finished)
                done[text] = finished
        candidates = set(sample_row["responses"][:demo_candidates])
        if len(gold) >= 2:
            rows.append(
                {
                    "task": sample_row["task"],
                    "split": sample_row["split"],
                    "prompt": sample_row["prompt"],
                    "gold": gold,
                    "finished": done,
                    "demo_candidates": [x for x in gold if x in candidates and done[x]],
                }
            )

    held = [r for r in rows if r["split"] == "held_out"]
    train_pool = [r for r in rows if r["split"] == "train"]
    if not held or not train_pool:
        raise ValueError(
            f"need training and held-out prompts with two distinct responses each, got {len(rows)}"
        )
    random.Random(seed).shuffle(train_pool)
    n_val = max(1, round(val_fraction * len(train_pool)))
    val, train = train_pool[:n_val], train_pool[n_val:]

    gaps = [a - b for r in train_pool for a, b in itertools.combinations(r["gold"].values(), 2)]
    annotator.temperature = calibrate_temperature(gaps, INSTRUCTGPT_AGREEMENT)
    rng = random.Random(seed + 1)

    def demos(rows):
        for r in rows:
            if r["demo_candidates"]:
                best = max(r["demo_candidates"], key=r["gold"].get)
                yield {"prompt": _messages(r["prompt"]), "completion": best}

    def ranking(r, noisy=True):
        responses = list(r["gold"])
        golds = [r["gold"][x] for x in responses]
        order = annotator.rank(golds, rng) if noisy else sorted(range(len(golds)), key=lambda i: -golds[i])
        ranks = [order.index(i) + 1 for i in range(len(responses))]
        finished = [r["finished"][x] for x in responses]
        return {
            "prompt": _messages(r["prompt"]),
            "responses": responses,
            "ranks": ranks,
            "finished": finished,
        }

    def gold_pairs(r):
        for a, b in itertools.combinations(r["gold"], 2):
            if r["gold"][a] != r["gold"][b]:
                pair = [a, b] if r["gold"][a] > r["gold"][b] else [b, a]
                yield {
                    "prompt": _messages(r["prompt"]),
                    "responses": pair,
                    "finished": [r["finished"][x] for x in pair],
                    "gold_margin": abs(r["gold"][a] - r["gold"][b]),
                }

    files = {
        "sft_train": list(demos(train)),
        "sft_val": list(demos(val)),
        "preferences_train": [ranking(r) for r in train],
        "preferences_val": [ranking(r, noisy=False) for r in val],
        "prompts_train": [{"prompt": _messages(r["prompt"]), "task": r["task"]} for r in train],
        "prompts_val": [{"prompt": _messages(r["prompt"]), "task": r["task"]} for r in val],
        "eval_prompts": [
            {"prompt": _messages(p["prompt"]), "task": p["task"]} for p in samples if p["split"] == "held_out"
        ],
        "eval_preferences": [p for r in held for p in gold_pairs(r)],
    }
    for name, content in files.items():
        _write_jsonl(out / f"{name}.jsonl", content)
    n_responses = sum(len(s["responses"]) for s in samples)
    manifest = {
        "command": command,
        "sampling": json.loads((out / "sampling.json").read_text()),
        "prompts_sampled": len(samples),
        "finished_rate": sum(sum(s["finished"]) for s in samples) / n_responses,
        "prompts_kept": len(rows),
        "annotator": {
            "temperature": annotator.temperature,
            "target_agreement": INSTRUCTGPT_AGREEMENT,
            "expected_agreement": expected_agreement(gaps, annotator.temperature),
            "agreement_with_noise_free_ranking": truth_agreement(gaps, annotator.temperature),
            "rubric": asdict(annotator.rubric),
        },
        "split_seed": seed,
        "demo_candidates": demo_candidates,
        "sizes": {name: len(content) for name, content in files.items()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def load_manifest(directory: str | Path | None = None) -> dict:
    """The manifest of a demo-data directory (the bundled one by default)."""
    from rlhf_lightning.data.sources import BUNDLED_DIR

    return json.loads((Path(directory or BUNDLED_DIR) / "manifest.json").read_text())
