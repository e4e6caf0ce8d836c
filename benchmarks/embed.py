"""Embedding throughput: a naive loop beside inmap's pipeline, decode-only and end to end.

    python benchmarks/embed.py --limit 200                 # a couple of minutes on 2 CPU cores
    python benchmarks/embed.py --limit 1000 --sources local s3 --models inmap-tiny ViT-B-32
    python benchmarks/embed.py --draft-check --limit 1000  # cosine of draft vs full decode
    python benchmarks/embed.py --model-only --device cuda --models ViT-B-32 ViT-L-14-336

Images are the real ImageNet JPEGs in ../shared/data/imagenet-sample, read from the local folder
and from a moto S3 server started in a child process. Models have random weights unless
--pretrained is given: throughput does not depend on the weights. Contenders take turns
(--repeat N keeps each one's best of N). On a shared machine, OMP_WAIT_POLICY=PASSIVE keeps idle
OpenMP threads from spinning on cores that other processes need.

- naive: what a first script does (and clip-retrieval's files mode, per image): in the main thread,
  one image at a time, open the file (s3fs `fs.open` for S3), PIL decode, `.convert("RGB")`,
  open_clip's preprocess; end to end, stack `--batch-size` of them and run the model.
- inmap: `inmap.batches.decode_batches` (concurrent reads, decode + resize in worker threads, JPEG
  draft) and, end to end, `inmap.batches.embed_images`.
Decode-only stops at a normalised float batch for both, i.e. the same model input.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from inmap import storage
from inmap.batches import Throughput, decode_batches, default_num_workers, embed_images
from inmap.decode import Preprocessing, decode_pixels, normalize
from inmap.encoder import RandomWeightsWarning, load_encoder

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared next to the checkout here; shared/ inside it on machines that copy the tree.
SAMPLE_IMAGES = next(
    (
        folder
        for folder in (
            REPO_ROOT.parent / "shared" / "data" / "imagenet-sample",
            REPO_ROOT / "shared" / "data" / "imagenet-sample",
        )
        if folder.is_dir()
    ),
    REPO_ROOT.parent / "shared" / "data" / "imagenet-sample",
)


# --- sources -------------------------------------------------------------------------------------


def start_moto() -> tuple[subprocess.Popen, str]:
    """A moto S3 server in a child process, so it does not share this process's GIL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return server, endpoint
        except OSError:
            time.sleep(0.2)
    server.terminate()
    raise RuntimeError("moto server did not start")


def upload(paths: list[Path], endpoint: str) -> tuple[list[str], dict]:
    import s3fs

    options = {"key": "bench", "secret": "bench", "endpoint_url": endpoint}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    fs.mkdir("bench")
    fs.pipe({f"bench/images/{path.name}": path.read_bytes() for path in paths})
    return [f"s3://bench/images/{path.name}" for path in paths], options


# --- the two pipelines ---------------------------------------------------------------------------


def naive_inputs(uris: list[str], preprocess, storage_options: dict | None):
    """One image at a time in this thread: open, decode, convert, preprocess."""
    fs = None
    if uris and uris[0].startswith("s3://"):
        fs, _ = storage.url_to_fs(uris[0], storage_options)
    for uri in uris:
        if fs is None:
            image = Image.open(uri).convert("RGB")
        else:
            with fs.open(uri, "rb") as f:
                image = Image.open(f).convert("RGB")
        yield preprocess(image)


def naive_decode(encoder, uris, storage_options, batch_size) -> int:
    count = 0
    for tensor in naive_inputs(uris, encoder.preprocess, storage_options):
        count += tensor is not None
    return count


def naive_end_to_end(encoder, uris, storage_options, batch_size) -> int:
    batch, count = [], 0
    for tensor in naive_inputs(uris, encoder.preprocess, storage_options):
        batch.append(tensor)
        if len(batch) == batch_size:
            count += len(encoder.encode_images(torch.stack(batch)))
            batch = []
    if batch:
        count += len(encoder.encode_images(torch.stack(batch)))
    return count


def inmap_decode(encoder, uris, storage_options, batch_size, workers) -> int:
    """inmap's reading and decoding, up to the same normalised float batch the model gets.

    As in `embed_images`: on the CPU, decoding and normalising take turns (prefetch 0).
    """
    count = 0
    for _, results in decode_batches(
        [(uri, "") for uri in uris],
        encoder.preprocessing,
        prefetch=0 if encoder.device.type == "cpu" else 2,
        storage_options=storage_options,
        throughput=Throughput(batch_size=batch_size, num_workers=workers),
    ):
        pixels = torch.stack([pixels for pixels, _ in results])
        count += len(normalize(pixels, encoder.preprocessing))
    return count


def inmap_end_to_end(encoder, uris, storage_options, batch_size, workers) -> int:
    result = embed_images(
        encoder,
        [(uri, "") for uri in uris],
        storage_options=storage_options,
        throughput=Throughput(batch_size=batch_size, num_workers=workers),
    )
    assert not result.failures, result.failures[:3]
    return len(result.embeddings)


def measure(runs: list, expected: int, repeat: int) -> list[tuple[float, float]]:
    """(images/s, CPU ms per image) of each of `runs`, each the best of `repeat`.

    The runs take turns, so a busy spell on a shared machine hits them alike. CPU time is this
    process's, all threads (the moto server is another process): unlike images/s, it does not
    depend on how many cores were free.
    """
    wall = [float("inf")] * len(runs)
    cpu = [float("inf")] * len(runs)
    for _ in range(repeat):
        for index, run in enumerate(runs):
            start, start_cpu = time.perf_counter(), time.process_time()
            count = run()
            wall[index] = min(wall[index], time.perf_counter() - start)
            cpu[index] = min(cpu[index], time.process_time() - start_cpu)
            assert count == expected, (count, expected)
    return [(expected / w, 1000 * c / expected) for w, c in zip(wall, cpu, strict=True)]


def model_only(encoder, batch_size: int, batches: int) -> float:
    """Images/s of the model alone on ready, normalised batches already on its device."""
    size = encoder.image_size
    images = torch.randn(batch_size, 3, size, size, device=encoder.device)
    encoder.encode_images(images)  # warm-up: kernels, autotuning, allocator
    start = time.perf_counter()
    for _ in range(batches):
        encoder.encode_images(images)  # returns host numpy, so each batch is finished
    return batch_size * batches / (time.perf_counter() - start)


# --- draft check ---------------------------------------------------------------------------------


def draft_check(encoder, paths: list[Path], margins: list[float], batch_size: int) -> list[dict]:
    """Cosine of draft-decoded vs fully decoded embeddings, on the images draft actually shrinks."""
    items = [(str(path), "") for path in paths]
    full_pre = replace(encoder.preprocessing, draft=False)
    full = embed_images(
        replace(encoder, preprocessing=full_pre), items, throughput=Throughput(batch_size)
    ).embeddings
    full_vectors = _matrix(full)
    rng = np.random.default_rng(0)
    others = rng.permutation(len(paths))
    unrelated = (full_vectors * full_vectors[others]).sum(1)[others != np.arange(len(paths))]
    rows = []
    for margin in margins:
        pre = replace(encoder.preprocessing, draft=True, draft_margin=margin)
        drafted_size = int(np.ceil(margin * pre.size))
        shrunk = [
            i
            for i, path in enumerate(paths)
            if min(Image.open(path).size) >= 2 * drafted_size and Image.open(path).format == "JPEG"
        ]
        row = {
            "model": encoder.model_name,
            "input": pre.size,
            "margin": margin,
            "images": len(paths),
            "drafted": len(shrunk),
            "unrelated_cosine_mean": float(unrelated.mean()),
        }
        if shrunk:
            subset = [items[i] for i in shrunk]
            drafted = embed_images(
                replace(encoder, preprocessing=pre), subset, throughput=Throughput(batch_size)
            ).embeddings
            cosine = (_matrix(drafted) * full_vectors[shrunk]).sum(1)
            psnr = [_psnr(paths[i].read_bytes(), pre, full_pre) for i in shrunk[:200]]
            row.update(
                cosine_min=float(cosine.min()),
                cosine_mean=float(cosine.mean()),
                pixel_psnr_db_mean=float(np.mean(psnr)),
            )
        rows.append(row)
    return rows


def _psnr(data: bytes, drafted: Preprocessing, full: Preprocessing) -> float:
    a = decode_pixels(data, drafted)[0].float()
    b = decode_pixels(data, full)[0].float()
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def _matrix(table) -> np.ndarray:
    column = table["embedding"].combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return values.reshape(len(table), -1)


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=SAMPLE_IMAGES)
    parser.add_argument("--limit", type=int, default=200, help="images to use (default 200)")
    parser.add_argument("--models", nargs="+", default=["inmap-tiny", "ViT-B-32"])
    parser.add_argument(
        "--pretrained", default=None, help="weights for every model (default random)"
    )
    parser.add_argument("--sources", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    parser.add_argument(
        "--stages", nargs="+", choices=["decode", "end-to-end"], default=["decode", "end-to-end"]
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="decode threads (default: CPUs)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=1, help="report the best of N runs")
    parser.add_argument("--model-only", action="store_true", help="also time the model alone")
    parser.add_argument("--model-batches", type=int, default=20)
    parser.add_argument("--draft-check", action="store_true", help="only the draft cosine check")
    parser.add_argument("--margins", nargs="+", type=float, default=[1.5, 1.0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    paths = sorted(args.images.glob("*.JPEG"))[: args.limit]
    if not paths:
        sys.exit(f"no *.JPEG images under {args.images}")
    for path in paths:  # warm the page cache for every contender alike
        path.read_bytes()
    workers = args.workers or default_num_workers()
    warnings.simplefilter("ignore", RandomWeightsWarning)
    print(
        f"# {len(paths)} images, batch {args.batch_size}, {workers} decode workers, "
        f"{os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    if args.draft_check:
        rows = []
        for model in args.models:
            encoder = load_encoder(model, args.pretrained, device=args.device)
            rows += draft_check(encoder, paths, args.margins, args.batch_size)
        print(
            "| model | input px | margin | drafted / images | cosine min | cosine mean "
            "| pixel PSNR dB | cosine of unrelated images |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            nan = float("nan")
            cells = [
                r["model"],
                r["input"],
                r["margin"],
                f"{r['drafted']} / {r['images']}",
                f"{r.get('cosine_min', nan):.4f}",
                f"{r.get('cosine_mean', nan):.4f}",
                f"{r.get('pixel_psnr_db_mean', nan):.1f}",
                f"{r['unrelated_cosine_mean']:.3f}",
            ]
            print("| " + " | ".join(str(cell) for cell in cells) + " |")
        _write_json(args.json, rows)
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the moto server
    sources: dict[str, tuple[list[str], dict | None]] = {}
    server = None
    try:
        if "local" in args.sources:
            sources["local"] = ([str(path) for path in paths], None)
        if "s3" in args.sources:
            server, endpoint = start_moto()
            sources["s3 (moto)"] = upload(paths, endpoint)
        rows = []
        for model in args.models:
            encoder = load_encoder(model, args.pretrained, device=args.device)
            if args.model_only:
                rate = model_only(encoder, args.batch_size, args.model_batches)
                rows.append(_row(model, "-", "model only", None, (rate, float("nan"))))
                print(_format(rows[-1]), flush=True)
            encoder.encode_images(torch.zeros(1, 3, encoder.image_size, encoder.image_size))
            for source, (uris, options) in sources.items():
                for stage in args.stages:
                    naive_run = naive_decode if stage == "decode" else naive_end_to_end
                    inmap_run = inmap_decode if stage == "decode" else inmap_end_to_end
                    naive_call = partial(naive_run, encoder, uris, options, args.batch_size)
                    inmap_call = partial(
                        inmap_run, encoder, uris, options, args.batch_size, workers
                    )
                    naive, inmap = measure([naive_call, inmap_call], len(uris), args.repeat)
                    rows.append(_row(model, source, stage, naive, inmap))
                    print(_format(rows[-1]), flush=True)
        print()
        print(HEADER)
        for row in rows:
            print(_format(row))
        _write_json(args.json, rows)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)


def _row(model, source, stage, naive, inmap) -> dict:
    row = {"model": model, "source": source, "stage": stage}
    row["naive_img_s"], row["naive_cpu_ms"] = naive if naive else (None, None)
    row["inmap_img_s"], row["inmap_cpu_ms"] = inmap
    return row


HEADER = (
    "| model | source | stage | naive img/s | inmap img/s | speed-up "
    "| naive CPU ms/img | inmap CPU ms/img |\n|---|---|---|---|---|---|---|---|"
)


def _format(row: dict) -> str:
    if row["naive_img_s"] is None:
        naive = speedup = naive_cpu = "-"
    else:
        naive = f"{row['naive_img_s']:.1f}"
        speedup = f"{row['inmap_img_s'] / row['naive_img_s']:.2f}x"
        naive_cpu = f"{row['naive_cpu_ms']:.2f}"
    cells = [
        row["model"],
        row["source"],
        row["stage"],
        naive,
        f"{row['inmap_img_s']:.1f}",
        speedup,
        naive_cpu,
        "-" if np.isnan(row["inmap_cpu_ms"]) else f"{row['inmap_cpu_ms']:.2f}",
    ]
    return "| " + " | ".join(cells) + " |"


def _write_json(path: Path | None, rows: list[dict]) -> None:
    if path is not None:
        path.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
