"""Decoding speed against the memory-bandwidth bound (issue #15, item 3).

    python scripts/decode_speed.py --batches 8 32
    python scripts/decode_speed.py --batches 8 32 --no_step_decoder   # through transformers' layers

Decoding one token reads every weight of the model once, whatever the batch, so a step cannot run
faster than the machine streams the weights from memory. The script measures that stream in the same
run (a large ``copy_``: the bytes read per second), loads the model as the evaluation samples with it
(frozen, linear weights in bf16 under bf16-mixed, the precision chosen for the machine), and times
:func:`rlhf_lightning.lm.sample` on the validation prompts at each batch size (temperature 0.7, 48 new
tokens, as PPO's rollout and the evaluation sample); the steps run through
:class:`rlhf_lightning.decoding.StepDecoder` unless ``--no_step_decoder``. The bound in steps per second
is the read bandwidth over the bytes of the model's parameters as stored (a tied LM head counted once);
the share of it a step reaches is what the issue asks to be at least 50% at batch 8.

Writes ``<out>`` (JSON) with the CPU's capability and precision beside every figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rlhf_lightning.data.batching import left_padded
from rlhf_lightning.data.formats import to_prompt_row
from rlhf_lightning.data.render import encode, prompt_text
from rlhf_lightning.data.sources import read_rows
from rlhf_lightning.lm import sample
from rlhf_lightning.models import (
    DEFAULT_MODEL,
    frozen_dtype,
    linear_weights_to,
    load_causal_lm,
    load_tokenizer,
)
from rlhf_lightning.precision import auto_precision, cpu_description, inference_autocast


def read_bandwidth(megabytes: int = 256, repeats: int = 10) -> float:
    """Bytes read per second by the fastest of ``repeats`` ``copy_`` of a ``megabytes`` float32 array
    (each byte read is also written once), after one warm-up copy. The fastest, not the mean: the bound
    is what the machine can stream, and on a shared host single copies varied by 1.6x in one run."""
    source = torch.empty(megabytes * 2**20 // 4).uniform_()
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - began)
    return source.numel() * source.element_size() / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters as stored, each tensor once (a tied LM head is the embedding)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def time_decoding(
    model, tokenizer, prompts: list, batch: int, new_tokens: int, precision: str, repeats: int,
    step_decoder: bool = True,
):  # fmt: skip
    """The fastest of ``repeats`` decodes of the first ``batch`` prompts (after one warm-up):
    ``(seconds, steps, tokens)``, steps being the tokens decoded by the longest row."""
    ids, mask = left_padded(
        [encode(tokenizer, prompt_text(tokenizer, p)) for p in prompts[:batch]], tokenizer.pad_token_id
    )
    best = None
    for _ in range(repeats + 1):
        torch.manual_seed(0)
        began = time.perf_counter()
        with inference_autocast(precision=precision):
            _, response_mask = sample(
                model, ids, mask, max_new_tokens=new_tokens, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, temperature=0.7, step_decoder=step_decoder,
            )  # fmt: skip
        elapsed = time.perf_counter() - began
        result = (elapsed, int(response_mask.sum(-1).max()), int(response_mask.sum()))
        best = result if best is None or elapsed < best[0] else best
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", default="bundled:prompts_val")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--new_tokens", type=int, default=48)
    parser.add_argument("--precision", default="auto", help="auto: bf16-mixed where bf16 matmuls are native")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--no_step_decoder", action="store_true",
        help="decode through transformers' layers instead of rlhf_lightning.decoding.StepDecoder",
    )  # fmt: skip
    parser.add_argument("--out", default="runs/decode_speed.json")
    args = parser.parse_args(argv)
    precision = auto_precision()[0] if args.precision == "auto" else args.precision
    tokenizer = load_tokenizer(args.model)
    model = linear_weights_to(load_causal_lm(args.model).eval(), frozen_dtype(precision))
    for p in model.parameters():
        p.requires_grad_(False)
    rows, _ = read_rows(args.prompts, to_prompt_row)
    prompts = [r.prompt for r in rows]
    while len(prompts) < max(args.batches):
        prompts += prompts
    bandwidth, nbytes = read_bandwidth(), weight_bytes(model)
    bound = bandwidth / nbytes
    results, step_decoder = [], not args.no_step_decoder
    for batch in args.batches:
        seconds, steps, tokens = time_decoding(
            model, tokenizer, prompts, batch, args.new_tokens, precision, args.repeats, step_decoder
        )
        results.append({
            "batch": batch, "seconds": seconds, "steps": steps, "tokens": tokens,
            "steps_per_s": steps / seconds, "tokens_per_s": tokens / seconds,
            "share_of_bound": steps / seconds / bound,
        })  # fmt: skip
        r = results[-1]
        print(f"batch {batch}: {steps} steps in {seconds:.2f} s = {r['steps_per_s']:.1f} steps/s, "
              f"{r['tokens_per_s']:.0f} tokens/s, {r['share_of_bound']:.0%} of the bound", flush=True)  # fmt: skip
    summary = {
        "cpu": cpu_description(), "precision": precision, "model": args.model,
        "step_decoder": step_decoder,
        "read_bandwidth_gb_s": bandwidth / 1e9, "weight_bytes": nbytes, "bound_steps_per_s": bound,
        "new_tokens": args.new_tokens, "results": results,
    }  # fmt: skip
    print(f"{summary['cpu']}, {precision}: read bandwidth {bandwidth / 1e9:.1f} GB/s, weights {nbytes / 1e6:.0f} MB, "
          f"bound {bound:.1f} steps/s")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
