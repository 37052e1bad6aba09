"""Remake the bundled demo data (src/rlhf_lightning/data/bundled) with the bundled model.

python scripts/make_demo_data.py                      # the shipped files (about 31 minutes on 2 cores)
python scripts/make_demo_data.py --model tiny:llama --n-prompts 20 --n-eval 5 --out /tmp/demo
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from rlhf_lightning.data.sources import BUNDLED_DIR
from rlhf_lightning.demo_data import add_training_responses, annotate_and_split, sample_demo_responses
from rlhf_lightning.models import DEFAULT_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(BUNDLED_DIR), help="output directory")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model that samples the responses")
    parser.add_argument("--n-prompts", type=int, default=480, help="training prompts")
    parser.add_argument("--n-eval", type=int, default=240, help="held-out evaluation prompts (other topics)")
    parser.add_argument("--k", type=int, default=4, help="responses sampled per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="as configs/ppo.yaml samples")
    parser.add_argument(
        "--add-k",
        type=int,
        nargs="*",
        default=[4, 8],
        help="rounds of more responses per training prompt (the i-th sampled with seed + i), for the reward "
        "model's rankings: the defaults make K = 4 + 4 + 8 = 16",
    )
    parser.add_argument(
        "--demo-candidates",
        type=int,
        default=8,
        help="each SFT demonstration is the best finished response among a prompt's first N (the SFT data "
        "of K = 8, before the rankings grew to 16)",
    )
    parser.add_argument(
        "--annotate-only", action="store_true", help="reuse OUT/samples.jsonl: only rank and split"
    )
    args = parser.parse_args()
    # the recipe that remakes the files from nothing (--annotate-only reuses samples.jsonl, same result)
    recipe = [a for a in sys.argv[1:] if a != "--annotate-only"]
    command = ("python scripts/make_demo_data.py " + shlex.join(recipe)).strip()
    if not args.annotate_only:
        sample_demo_responses(
            args.out, args.model, args.n_prompts, args.n_eval, args.k, args.seed, args.max_new_tokens
        )
        for i, extra in enumerate(args.add_k, start=1):
            add_training_responses(args.out, extra, args.seed + i)
    manifest = annotate_and_split(
        args.out, seed=args.seed, command=command, demo_candidates=args.demo_candidates
    )
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
