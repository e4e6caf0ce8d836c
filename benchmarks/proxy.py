"""InMaP proxy learning: the literal loop against inmap's implementation, on the real dev set.

    python benchmarks/proxy.py [--features PATH] [--fast-iters 300] [--no-gpu]

CPU section: real CLIP ViT-B/32 features (2000 ImageNet images, 500 classes). For each method it
runs (a) the method exactly as DESIGN.md states it, in float32 (Pᵀ X recomputed every step, 2000
steps), and (b) `inmap.fit_vision_proxy` with its defaults, in one process, interleaved so that
load from other processes falls on both alike; (c) inmap with fewer iterations shows what speed
costs. GPU section (only with CUDA): synthetic ImageNet-scale data, n=50,000, d=768, C=1000, for
each precision; the target is under 2 s on one H200.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from reference import literal_inmap  # benchmarks/reference.py, beside this file

from inmap.proxy import fit_vision_proxy, predict

DEV_FEATURES = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "clip-vitb32-imagenet500.npz"
)


def compare(X, W, reference) -> tuple[float, float]:
    """(share of images with the same prediction in %, min per-class cosine) of W vs reference."""
    same = (X @ W.T).argmax(1) == (X @ reference.T).argmax(1)
    cosine = torch.nn.functional.normalize(W, dim=1) * torch.nn.functional.normalize(
        reference, dim=1
    )
    return 100.0 * float(same.float().mean()), float(cosine.sum(1).min())


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def cpu_section(features: Path, fast_iters: int) -> None:
    with np.load(features) as data:
        X = torch.from_numpy(data["image_features"])  # float16, as stored
        T = torch.from_numpy(data["text_proxy"])
        labels = torch.from_numpy(data["labels"])
    X32 = torch.nn.functional.normalize(X.float(), dim=1)
    print(f"CPU: {features.name}, n={len(X)}, C={len(T)}, d={X.shape[1]}, "
          f"{torch.get_num_threads()} torch threads")  # fmt: skip
    print("| method | implementation | top-1 | time (s) | iterations | speed-up "
          "| same predictions as literal | min row cosine to literal |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")

    def row(method, implementation, W, seconds, iterations, literal=None, literal_seconds=None):
        top1 = 100.0 * float((predict(X, W, top_k=1).class_ids == labels).float().mean())
        speedup = same = cosine = "-"
        if literal is not None:
            same_share, min_cosine = compare(X32, W, literal)
            speedup = f"{literal_seconds / seconds:.2f}x"
            same, cosine = f"{same_share:.2f}%", f"{min_cosine:.6f}"
        print(f"| {method} | {implementation} | {top1:.2f} | {seconds:.1f} | {iterations} "
              f"| {speedup} | {same} | {cosine} |", flush=True)  # fmt: skip

    row("zero-shot", "-", T, 0.0, 0)
    for method, refine in (("InMaP, no refinement", "none"), ("InMaP + Sinkhorn", "sinkhorn")):
        literal, literal_seconds = timed(
            lambda r=refine: literal_inmap(X, T, refine=r, dtype=torch.float32)
        )
        row(method, "literal loop", literal, literal_seconds, 2000)
        for iters in (2000, fast_iters):
            fit, seconds = timed(
                lambda r=refine, i=iters: fit_vision_proxy(X, T, refine=r, iters=i, device="cpu")
            )
            name = "inmap default" if iters == 2000 else f"inmap iters={iters}"
            row(method, name, fit.vision_proxy, seconds, fit.iterations, literal, literal_seconds)


def gpu_section(n=50_000, d=768, C=1000, device="cuda") -> None:
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(C, d, generator=g, device=device), dim=1)
    labels = torch.arange(n, device=device) % C
    noise = torch.randn(n, d, generator=g, device=device) / d**0.5
    X = torch.nn.functional.normalize(centres[labels] + 1.2 * noise, dim=1)
    T = torch.nn.functional.normalize(
        centres + 1.0 * torch.randn(C, d, generator=g, device=device) / d**0.5, dim=1
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"\nGPU: {name}, synthetic n={n}, d={d}, C={C}; "
          "target < 2 s")  # fmt: skip
    print("| precision | time (s) | iterations | top-1 | same predictions as float32 "
          "| min row cosine to float32 |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    fit_vision_proxy(X[:2000], T, iters=20, device=device)  # CUDA context, kernels, allocator
    reference = None
    for precision in ("float32", "tf32", "bf16"):
        fit, seconds = timed(lambda p=precision: fit_vision_proxy(X, T, precision=p, device=device))
        W = fit.vision_proxy.to(device)  # fit returns CPU tensors: it has synchronised
        reference = W if reference is None else reference
        same, cosine = compare(X, W, reference)
        top1 = 100.0 * float(((X @ W.T).argmax(1) == labels).float().mean())
        print(f"| {precision} | {seconds:.2f} | {fit.iterations} | {top1:.2f} | {same:.2f}% "
              f"| {cosine:.6f} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, default=DEV_FEATURES)
    parser.add_argument("--fast-iters", type=int, default=300)
    parser.add_argument("--no-gpu", action="store_true")
    args = parser.parse_args()
    cpu_section(args.features, args.fast_iters)
    if torch.cuda.is_available() and not args.no_gpu:
        gpu_section()
    else:
        print("\nGPU section skipped: no CUDA device.")


if __name__ == "__main__":
    main()
