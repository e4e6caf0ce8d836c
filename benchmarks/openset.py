"""Open-set drops of the real dev set: how well unknown scores separate unlisted images from
listed ones (AUROC), the label-free threshold's precision and recall, and top-1 on the listed
images (CLIP ViT-B/32 features of 500 ImageNet classes x 4 images).

    python benchmarks/openset.py                      # report seeds 100-101 (not used for tuning)
    python benchmarks/openset.py --first-seed 0 --seeds 4   # seeds 0-3, the tuning seeds

Each drop splits the 500 classes at random: `--vocabulary` classes are held out and only their
text proxies are used, as the negative vocabulary; of the rest, 25% or 50% are left off the class
list (unlisted) and the others listed. The drop holds every image of the listed and unlisted
classes. See inmap.evaluate.OPEN_SET_SCORES for the scores compared.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from inmap.config import ProxyConfig
from inmap.evaluate import (
    OPEN_SET_SCORES,
    OPEN_SET_SHARES,
    format_open_set_table,
    run_open_set_eval,
)
from inmap.labeled import load_labeled_set

DEV_SET = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "clip-vitb32-imagenet500.npz"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default=str(DEV_SET), help="labelled .npz (dev set format)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--shares", default=",".join(f"{s:g}" for s in OPEN_SET_SHARES))
    parser.add_argument("--vocabulary", type=int, default=250,
                        help="classes held out as the negative vocabulary")  # fmt: skip
    parser.add_argument("--iters", type=int, default=None, help="default: the paper's 2000")
    args = parser.parse_args()

    labeled = load_labeled_set(args.features)
    config = ProxyConfig() if args.iters is None else ProxyConfig(iters=args.iters)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    started = time.perf_counter()
    results = run_open_set_eval(
        labeled,
        seeds=seeds,
        shares=[float(s) for s in args.shares.split(",")],
        vocabulary=args.vocabulary,
        config=config,
        progress=lambda r: print(
            f"{time.perf_counter() - started:7.1f}s {r.unlisted_share:.0%} unlisted, seed "
            f"{r.seed}: " + ", ".join(f"{m} {v:.1f}" for m, v in r.auroc.items()),
            file=sys.stderr,
            flush=True,
        ),
    )
    print(
        f"seeds {seeds.start}-{seeds.stop - 1}, vocabulary of {args.vocabulary} held-out class "
        f"names, proxy iterations {config.iters}; AUROC of unlisted vs listed images, in percent"
    )
    print(format_open_set_table(results))
    mcm = np.mean([r.auroc["mcm"] for r in results])
    print()
    for name, what in OPEN_SET_SCORES.items():
        gain = np.mean([r.auroc[name] for r in results]) - mcm
        print(f"- {name}: {what}; mean {gain:+.1f} over mcm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
