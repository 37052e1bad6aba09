"""Side-by-side speed and memory of our stages and TRL's on identical inputs.

    pip install -e .[benchmark]          # TRL 1.12, the last release with PPOTrainer; benchmark only
    python scripts/benchmark.py                              # SFT, reward, DPO, PPO (4 and 1 epochs)
    python scripts/benchmark.py --stages ppo4 --steps 3 --rounds 1

Every (stage, implementation) pair runs in a fresh process, so peak RSS is that run's own; the pairs
alternate (ours, TRL, TRL, ours, ...) over ``--rounds`` so drift on a shared machine hits both. Each
process loads the same model directory (SmolLM2-135M-Instruct for every role, the cache the
``bundled:`` loader writes), the same tokenizer (pad ``<|endoftext|>``) and the same rows, runs
``--warmup`` untimed iterations and then ``--steps`` timed ones. An iteration is timed from the end of
the previous one to its own end, so data loading, logging and the optimizer are inside. Our worker tunes
glibc's malloc as the ``rlhf-lightning`` command does (``rlhf_lightning.allocator``; TRL's runs with the
defaults, as a TRL user's would); ``RLHF_LIGHTNING_MALLOC=default`` runs ours with the defaults too.

Settings (equal on both sides, as in the issue's anchor): SFT batch 8 x max length 128; reward 8 pairs,
max length 128; DPO 8 pairs, max length 128, beta 0.1, sigmoid loss, a frozen reference model (with
``--options '{"precompute_reference": true}'`` ours and TRL's ``precompute_ref_log_probs`` both precompute).
Our reward and DPO steps run as the shipped configs do, with the prompt of a pair computed once
(``PreferenceDataModule(share_prompt=True)``; TRL 1.12 has no such option; ``--options
'{"share_prompt": false}'`` turns it off); PPO rollout batch 8, responses up to 32 tokens (stop at EOS), 1 minibatch of 8,
4 or 1 PPO epochs, separate critic, temperature 0.7, k1 KL at beta 0.05. ``--precision`` sets ours and
``--trl-precision`` TRL's; both default to ``auto``, the precision our stages choose on this machine
(bf16-mixed where bf16 matmuls are native, else fp32: equal precision on every CPU).

Model FLOPs are the work the step needs, counted the same for both: 2 x (non-embedding parameters)
per token forward plus causal attention, the LM head only on positions a loss or a sample reads,
x3 for a training forward + backward. MFU divides achieved model FLOP/s by a square matmul measured in
this run at fp32 and at bf16 (2048^2, or smaller where a dtype is slow: bf16 without native support runs
~400x slower than fp32 and would stall the script for many minutes). The results record the CPU's
capability (``torch.backends.cpu.get_cpu_capability()`` and its native bf16 flags) beside the rates.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("sft", "reward", "dpo", "ppo4", "ppo1")
BATCH, MAX_LENGTH, RESPONSE_LENGTH = 8, 128, 32


# -- inputs ---------------------------------------------------------------------------------------
def model_dir() -> str:
    from rlhf_lightning.models import DEFAULT_MODEL, resolve

    return resolve(DEFAULT_MODEL)  # converts the bundled GGUF once if needed


def _cut(tokenizer, text: str, n: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < n:
        ids = ids + ids
    return tokenizer.decode(ids[:n])


def write_inputs(folder: Path, rows: int) -> dict[str, float]:
    """SFT rows longer than 128 tokens (both sides truncate to exactly 128), preference pairs of one
    fixed length (~110 tokens, so no padding), and PPO prompts, from the bundled data."""
    from rlhf_lightning.data.formats import to_prompt_row, to_sft_row
    from rlhf_lightning.data.render import encode, prompt_text
    from rlhf_lightning.data.sources import read_rows
    from rlhf_lightning.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir())
    demos, _ = read_rows("bundled:sft_train", to_sft_row, "train")
    demos = [d for d in demos if not isinstance(d.prompt, str)][:rows]
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    assistant = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    sft, pairs = [], []
    for i in range(rows):
        demo = demos[i % len(demos)]
        question = _cut(tokenizer, demo.prompt[-1]["content"], 12)
        sft.append({"prompt": user(question), "completion": assistant(_cut(tokenizer, demo.completion, 160))})
        other = demos[(i + 1) % len(demos)].completion
        pairs.append(
            {
                "prompt": user(question),
                "chosen": assistant(_cut(tokenizer, demo.completion, 32)),
                "rejected": assistant(_cut(tokenizer, other, 32)),
            }
        )
    prompts, _ = read_rows("bundled:prompts_train", to_prompt_row, "train")
    files = {
        "sft.jsonl": sft,
        "pairs.jsonl": pairs,
        "prompts.jsonl": [{"prompt": p.prompt} for p in prompts[:rows]],
    }
    for name, records in files.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))

    def prompt_tokens(rows):
        return statistics.mean(len(encode(tokenizer, prompt_text(tokenizer, r["prompt"]))) for r in rows)

    return {
        "sft_prompt_tokens": prompt_tokens(sft),
        "ppo_prompt_tokens": prompt_tokens(files["prompts.jsonl"]),
    }


# -- FLOPs --------------------------------------------------------------------------------------
def forward_flops(config, tokens: float, context: float, head_tokens: float) -> float:
    """Forward FLOPs: matmuls of the body on ``tokens`` tokens of average causal context ``context``, and
    the LM head on ``head_tokens``."""
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    ffn = config.intermediate_size
    body = layers * (2 * d * d + 2 * d * kv + 3 * d * ffn)  # q,o + k,v + gate,up,down
    attention = layers * 2 * d * context  # QK^T and AV, each 2*d per key, over context/2 keys on average
    return 2 * body * tokens + 2 * attention * tokens + 2 * d * vocab * head_tokens


def matmul_rates(budget_s: float = 0.5) -> dict[str, float]:
    """FLOP/s of a square matmul in fp32 and bf16: 2048^2, or the largest power-of-two size up to it
    whose single product takes under ``budget_s`` (a slow dtype is timed on small matrices); each timed
    for about ``budget_s`` (at least 3 products) after a warm-up."""
    import torch

    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        size = 128
        while True:
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            a @ b
            began = time.perf_counter()
            a @ b
            once = time.perf_counter() - began
            if size >= 2048 or once * 8 > budget_s:  # the next size costs 8x
                break
            size *= 2
        n = max(3, int(budget_s / max(once, 1e-6)))
        began = time.perf_counter()
        for _ in range(n):
            a @ b
        rates[name] = 2 * size**3 * n / (time.perf_counter() - began)
        rates[f"{name}_size"] = size
    return rates


# -- workers: one (stage, implementation) per process ----------------------------------------------
class StepClock:
    """Seconds between consecutive iteration ends, from the first iteration's start."""

    def __init__(self):
        self.marks = [time.perf_counter()]
        self.extra: list[dict] = []

    def tick(self, **extra) -> None:
        self.marks.append(time.perf_counter())
        self.extra.append(extra)

    def times(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.marks[warmup:], self.marks[warmup + 1 :])]


def ours(stage: str, folder: Path, steps: int, precision: str, options: dict) -> dict:
    import lightning as L

    from rlhf_lightning.allocator import keep_freed_memory

    keep_freed_memory()  # as the rlhf-lightning command does at start-up (RLHF_LIGHTNING_MALLOC=default: off)

    from rlhf_lightning.data.preference import PreferenceDataModule
    from rlhf_lightning.data.prompts import PromptDataModule
    from rlhf_lightning.data.sft import SFTDataModule
    from rlhf_lightning.modules.dpo import DPOModule
    from rlhf_lightning.modules.ppo import PPOModule
    from rlhf_lightning.modules.reward import RewardModule
    from rlhf_lightning.modules.sft import SFTModule

    path = model_dir()
    clock = StepClock()
    stats: list[dict] = []

    class Clock(L.Callback):
        def on_train_start(self, trainer, module):
            clock.marks = [time.perf_counter()]

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            metrics = {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("time/", "obj"))
            }
            if "objective/response_length" in metrics:
                metrics["response_length"] = metrics["objective/response_length"]
            elif "attention_mask" in batch:
                metrics["tokens"] = float(batch["attention_mask"].sum())
            stats.append(metrics)
            clock.tick()

    data_args = {"tokenizer": path, "batch_size": BATCH, "max_length": MAX_LENGTH}
    if stage in ("sft", "reward", "dpo"):
        module_class, data_class, rows = {
            "sft": (SFTModule, SFTDataModule, "sft.jsonl"),
            "reward": (RewardModule, PreferenceDataModule, "pairs.jsonl"),
            "dpo": (DPOModule, PreferenceDataModule, "pairs.jsonl"),
        }[stage]
        data_options = {"share_prompt": options.get("share_prompt", True)} if stage != "sft" else {}
        extra = {k: v for k, v in options.items() if k not in ("gradient_checkpointing", "share_prompt")}
        module = module_class(
            model=path,
            export_dir=None,
            gradient_checkpointing=options["gradient_checkpointing"],
            **(extra if stage == "dpo" else {}),
        )
        data = data_class(train=str(folder / rows), **data_args, **data_options)
    else:
        module = PPOModule(
            policy=path,
            reward_model=path,
            normalize_reward=False,
            max_new_tokens=RESPONSE_LENGTH,
            temperature=0.7,
            kl_coef=0.05,
            ppo_epochs=int(stage[3:]),
            minibatch_size=BATCH,
            learning_rate=3e-6,
            export_dir=None,
            **options,
        )
        # equal episodes per iteration: BATCH responses, as BATCH / K prompts x K samples when critic-free
        data_args["batch_size"] = BATCH // options.get("samples_per_prompt", 1)
        data = PromptDataModule(train=str(folder / "prompts.jsonl"), **data_args)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        limit_train_batches=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Clock()],
    )
    trainer.fit(module, datamodule=data)
    return {"clock": clock, "stats": stats}


def trl(stage: str, folder: Path, steps: int, precision: str, options: dict) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    from rlhf_lightning.models import load_tokenizer

    path = model_dir()
    tokenizer = load_tokenizer(path)
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    common = {
        "output_dir": out_dir,
        "per_device_train_batch_size": BATCH,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "use_cpu": True,
        "bf16": precision.startswith("bf16"),
        "seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "gradient_checkpointing": options.get("gradient_checkpointing", False),
    }
    read = lambda name: datasets.Dataset.from_json(str(folder / name))  # noqa: E731
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(max_length=MAX_LENGTH, max_steps=steps, learning_rate=2e-5, **common)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=read("sft.jsonl"), processing_class=tokenizer
        )
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
        tokens = BATCH * statistics.mean(lengths)
    elif stage == "reward":
        from trl import RewardConfig, RewardTrainer

        config = RewardConfig(max_length=MAX_LENGTH, max_steps=steps, learning_rate=1e-5, **common)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype="float32")
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = RewardTrainer(
            model=model, args=config, train_dataset=read("pairs.jsonl"), processing_class=tokenizer
        )
        dataset = trainer.train_dataset
        lengths = [len(a) + len(b) for a, b in zip(dataset["chosen_ids"], dataset["rejected_ids"])]
        tokens = BATCH * statistics.mean(lengths)
    elif stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(
            max_length=MAX_LENGTH,
            max_steps=steps,
            learning_rate=5e-7,
            beta=0.1,
            loss_type="sigmoid",
            precompute_ref_log_probs=bool(options.get("precompute_reference", False)),
            **common,
        )
        load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype="float32")  # noqa: E731
        trainer = DPOTrainer(
            model=load(),
            ref_model=load(),
            args=config,
            train_dataset=read("pairs.jsonl"),
            processing_class=tokenizer,
        )
        dataset = trainer.train_dataset
        lengths = [
            2 * len(p) + len(c) + len(r)
            for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])
        ]
        tokens = BATCH * statistics.mean(lengths)
    else:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        import trl.experimental.ppo.ppo_trainer as ppo_trainer
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        from rlhf_lightning.data.prompts import PromptDataModule

        data = PromptDataModule(train=str(folder / "prompts.jsonl"), tokenizer=path, max_length=MAX_LENGTH)
        data.setup("fit")  # the very token ids our PromptDataModule feeds PPOModule
        prompts = datasets.Dataset.from_list([{"input_ids": e["input_ids"]} for e in data.train_data])
        tokenizer.padding_side = "left"
        generated: list[dict] = []
        original = ppo_trainer.batch_generation

        def timed_generation(model, queries, *args, **kwargs):
            began = time.perf_counter()
            query_responses, logits = original(model, queries, *args, **kwargs)
            responses = query_responses[:, queries.shape[1] :]
            is_eos = (responses == tokenizer.eos_token_id).long()
            length = (is_eos.cumsum(-1) - is_eos == 0).sum(-1).float().mean()
            generated.append({"generate_s": time.perf_counter() - began, "response_length": float(length)})
            return query_responses, logits

        ppo_trainer.batch_generation = timed_generation
        config = PPOConfig(
            num_ppo_epochs=int(stage[3:]),
            num_mini_batches=1,
            gradient_accumulation_steps=1,
            response_length=RESPONSE_LENGTH,
            stop_token="eos",
            temperature=0.7,
            kl_coef=0.05,
            learning_rate=3e-6,
            total_episodes=BATCH * steps,
            local_rollout_forward_batch_size=BATCH,
            num_sample_generations=0,
            **common,
        )
        load = lambda cls, **kw: cls.from_pretrained(path, dtype="float32", **kw)  # noqa: E731
        value, reward = (load(AutoModelForSequenceClassification, num_labels=1) for _ in range(2))
        for m in (value, reward):
            m.config.pad_token_id = tokenizer.pad_token_id
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=load(AutoModelForCausalLM),
            ref_model=load(AutoModelForCausalLM),
            reward_model=reward,
            value_model=value,
            train_dataset=prompts,
            eval_dataset=prompts,
        )
        tokens = None
    trainer.add_callback(Clock())
    trainer.train()
    stats = [{"tokens": tokens}] * steps if stage in ("sft", "reward", "dpo") else generated
    return {"clock": clock, "stats": stats}


def worker(args) -> None:
    import torch

    from rlhf_lightning.models import load_tokenizer  # noqa: F401  (imports transformers before timing)

    torch.manual_seed(0)
    run = ours if args.worker == "ours" else trl
    precision = args.precision if args.worker == "ours" else args.trl_precision
    options = {"gradient_checkpointing": args.gradient_checkpointing, **json.loads(args.options)}
    result = run(args.stage, Path(args.inputs), args.warmup + args.steps, precision, options)
    times = result["clock"].times(args.warmup)
    stats = result["stats"][args.warmup :]
    summary = {
        "times": times,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "stats": stats,
    }
    print("RESULT " + json.dumps(summary), flush=True)


# -- driver --------------------------------------------------------------------------------------
def run_worker(impl: str, stage: str, args, inputs: Path) -> dict:
    command = [
        sys.executable, __file__, "--worker", impl, "--stage", stage, "--inputs", str(inputs),
        "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--precision", args.precision, "--trl-precision", args.trl_precision, "--options", args.options,
        *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
    ]  # fmt: skip
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-6000:])
        raise SystemExit(f"benchmark worker {impl}/{stage} failed (exit {done.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def step_flops(
    stage: str, config, stats: list[dict], lengths: dict, critic_body: bool = True, reference: bool = True
) -> float:
    """Model FLOPs of one iteration (see the module docstring); ``reference``: DPO's reference forward is
    in the step (not precomputed)."""
    if stage == "sft":
        tokens = statistics.mean(s["tokens"] for s in stats)
        prompt = lengths["sft_prompt_tokens"] * BATCH  # the head runs on completion positions only
        return 3 * forward_flops(config, tokens, tokens / BATCH, tokens - prompt)
    if stage == "reward":
        tokens = statistics.mean(s["tokens"] for s in stats)
        return 3 * forward_flops(config, tokens, tokens / (2 * BATCH), 0)
    if stage == "dpo":  # 2 x BATCH sequences; the head reads response positions only
        tokens = statistics.mean(s["tokens"] for s in stats)
        head = tokens - 2 * BATCH * lengths["sft_prompt_tokens"]
        return (3 + reference) * forward_flops(config, tokens, tokens / (2 * BATCH), head)
    epochs = int(stage[3:])
    response = statistics.mean(s["response_length"] for s in stats if "response_length" in s)
    prompt = lengths["ppo_prompt_tokens"]
    seq = prompt + response
    total, generated = BATCH * seq, BATCH * response
    rollout = forward_flops(config, total, seq, generated)  # generation: prefill + one token at a time
    rollout += forward_flops(config, total, seq, generated)  # reference log-probs
    critic = forward_flops(config, total, seq, 0) if critic_body else 0.0  # a separate critic's body
    rollout += forward_flops(config, total, seq, 0) + critic  # reward, values
    update = epochs * 3 * (forward_flops(config, total, seq, generated) + critic)
    return rollout + update


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--steps", type=int, default=4, help="timed iterations per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each implementation, alternating")
    parser.add_argument(
        "--precision",
        default="auto",
        help="ours: a Lightning precision, or auto (what our stages choose here)",
    )
    parser.add_argument("--trl-precision", default="auto", help="TRL: 32-true, bf16-mixed or auto (as ours)")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="on both sides (TRL's own default is on)"
    )
    parser.add_argument(
        "--options",
        default="{}",
        help="JSON of extra PPOModule / DPOModule arguments (ours; precompute_reference: both; share_prompt: "
        "our preference data's layout, default true)",
    )
    parser.add_argument("--impls", nargs="+", default=["ours", "trl"], choices=("ours", "trl"))
    parser.add_argument("--out", default="runs/benchmark/results.json")
    parser.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--table-from", nargs="+", metavar="JSON", help="print one table from saved results")
    args = parser.parse_args()
    from rlhf_lightning.precision import auto_precision, cpu_description

    chosen, reason = auto_precision()
    args.precision = chosen if args.precision == "auto" else args.precision
    args.trl_precision = chosen if args.trl_precision == "auto" else args.trl_precision
    if args.worker:
        return worker(args)
    if args.table_from:
        print(table(merge([json.loads(Path(path).read_text())["results"] for path in args.table_from])))
        return

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir())
    inputs = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    lengths = write_inputs(inputs, BATCH * (args.warmup + args.steps))
    rates = matmul_rates()
    cpu = cpu_description()
    print(
        f"{cpu}; matmul fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s ({rates['fp32_size']}^2), "
        f"bf16 {rates['bf16'] / 1e9:.1f} GFLOP/s ({rates['bf16_size']}^2); "
        f"ours {args.precision}, TRL {args.trl_precision} (auto: {chosen}, {reason})"
    )
    ours_options = json.loads(args.options)
    results = []
    for stage in args.stages:
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        for r in range(args.rounds):
            for impl in ("ours", "trl") if r % 2 == 0 else ("trl", "ours"):
                if impl not in args.impls:
                    continue
                runs[impl].append(run_worker(impl, stage, args, inputs))
                print(f"  {stage:6s} {impl:4s} round {r}: {[round(t, 2) for t in runs[impl][-1]['times']]} s")
        row = {"stage": stage}
        for impl, done in runs.items():
            if not done:
                continue
            times = [t for run in done for t in run["times"]]
            stats = [s for run in done for s in run["stats"]]
            median = statistics.median(times)
            options = ours_options if impl == "ours" else {}
            critic_body = (
                not options.get("share_critic_backbone", False)
                and options.get("advantage_estimator", "gae") == "gae"
            )
            precomputed = bool(ours_options.get("precompute_reference", False))  # both sides, or neither
            flops = step_flops(stage, config, stats, lengths, critic_body, reference=not precomputed)
            precision = args.precision if impl == "ours" else args.trl_precision
            row[impl] = {
                "precision": precision,
                "options": options,
                "median_s": median,
                "times": times,
                "samples_per_s": BATCH / median,
                "tokens_per_s": (
                    statistics.mean(s["tokens"] for s in stats) / median
                    if stage in ("sft", "reward", "dpo")
                    else BATCH
                    * statistics.mean(s["response_length"] for s in stats if "response_length" in s)
                    / median
                ),
                "peak_rss_gb": max(run["peak_rss_gb"] for run in done),
                "model_tflops": flops / 1e12,
                "mfu_fp32": flops / median / rates["fp32"],
                "mfu_bf16": flops / median / rates["bf16"],
                "mfu": flops / median / rates["bf16" if precision.startswith("bf16") else "fp32"],
                "stats": stats,
            }
        if len(args.impls) == 2:
            row["time_ratio"] = row["ours"]["median_s"] / row["trl"]["median_s"]
            row["memory_ratio"] = row["ours"]["peak_rss_gb"] / row["trl"]["peak_rss_gb"]
            print_row(row)
        results.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "cpu": cpu,
        "matmul_flops": rates,
    }
    out.write_text(json.dumps({**meta, "args": vars(args), "results": results}, indent=1))
    print(table(results))
    print(f"wrote {out}")


def print_row(row: dict) -> None:
    print(
        f"  {row['stage']}: ours {row['ours']['median_s']:.2f} s / {row['ours']['peak_rss_gb']:.2f} GB, "
        f"TRL {row['trl']['median_s']:.2f} s / {row['trl']['peak_rss_gb']:.2f} GB, "
        f"ratio time {row['time_ratio']:.2f} memory {row['memory_ratio']:.2f}",
        flush=True,
    )


def merge(runs: list[list[dict]]) -> list[dict]:
    """Rows of several result files; a row with only our side gets its ratios against the first TRL
    fp32 row of the same stage (measured in another run of the script: less exact than alternation)."""
    rows = [row for results in runs for row in results]
    trl = {}
    for row in rows:
        if "trl" in row and row["trl"].get("precision") == "32-true":
            trl.setdefault(row["stage"], row["trl"])
    for row in rows:
        if "ours" in row and "trl" not in row and row["stage"] in trl:
            row["time_ratio"] = row["ours"]["median_s"] / trl[row["stage"]]["median_s"]
            row["memory_ratio"] = row["ours"]["peak_rss_gb"] / trl[row["stage"]]["peak_rss_gb"]
    return rows


def table(results: list[dict]) -> str:
    """A markdown table: one row per (stage, implementation), ratios on our rows."""
    names = {
        "sft": "SFT step",
        "reward": "reward step",
        "dpo": "DPO step",
        "ppo4": "PPO update, 4 epochs",
        "ppo1": "PPO update, 1 epoch",
    }
    lines = [
        "| stage | implementation | precision | median s/iter | samples/s | tokens/s | peak RSS GB | MFU | ours/TRL time | ours/TRL memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        for impl in ("ours", "trl"):
            if impl not in row:
                continue
            r = row[impl]
            name = "ours" if impl == "ours" else "TRL 1.12"
            if r.get("options", {}).get("share_critic_backbone"):
                name += ", shared critic backbone"
            ratios = " | "
            if impl == "ours" and "time_ratio" in row:
                ratios = f"**{row['time_ratio']:.2f}** | **{row['memory_ratio']:.2f}**"
            lines.append(
                f"| {names[row['stage']]} | {name} | {r.get('precision', '')} | {r['median_s']:.2f} | "
                f"{r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_gb']:.2f} | {r['mfu']:.0%} | {ratios} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
