"""Listing: peak memory per object and time of `inmap.listing.list_images`, beside the old way.

    python benchmarks/listing.py                       # moto S3 at 10k and 100k, local at 100k, 1M
    python benchmarks/listing.py --s3-sizes 100000 --local-sizes 1000000
    python benchmarks/listing.py --local-sizes         # S3 only (an empty list skips a store)

Contenders, each measured in a fresh Python process of its own (one per size and contender):

- inmap: `inmap.listing.list_images` (S3: pages of 1000 keys straight into Arrow, the source's
  sub-prefixes listed concurrently; local: an os.scandir walk into Arrow batches).
- inmap, sequential: the same with `inmap.listing.S3_CONCURRENCY = 1` (S3 only).
- find (old): inmap's listing before the streaming one (``git show 2476497:inmap/storage.py``):
  ``fs.find(path, detail=True)``, a list of tuples, sorted, then one Arrow table.

Peak memory is the process's resident high-water mark (VmHWM), reset through
``/proc/self/clear_refs`` once the filesystem client is built and warm, minus the resident size at
that moment: so it counts Python objects, Arrow buffers and everything native alike. The table
gives that peak per object *above the final manifest* (``manifest.nbytes``), and the marginal
cost between two sizes (which leaves out fixed costs such as buffers and thread pools).

S3 is a moto server in a child process (not measured), filled through moto's own backend
(~20 us per object instead of ~4 ms per PUT); its ETags are the real MD5s. Objects are spread
over 30 date prefixes (``drops/day=DD/``), as drops usually are. moto lists a 1M-object bucket
far too slowly (each page scans the bucket), so 1M is measured on a local folder tree of empty
files (no data blocks: 1M inodes, no disk space).

The concurrency table times the same S3 listing with sub-prefixes listed at once (the default,
16) and one after the other, against moto as it is (CPU-bound in one process on this machine)
and with `--latency-ms` added to every request, as a stand-in for a real store's per-request
latency (S3 answers a LIST of 1000 keys in tens to hundreds of ms).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve()
PREFIXES = 30  # date prefixes the objects are spread over
MIB = 2**20


# --- a moto S3 server in a child process, filled through its backend -----------------------------


class MotoChild:
    """moto's S3 server in a child process, controlled by JSON lines on its stdin.

    `fill` creates objects in moto's backend directly (no HTTP), `latency` delays every request.
    """

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE), "--serve-moto"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.endpoint = self._reply()["endpoint"]

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the moto child process stopped")
        return json.loads(line)

    def command(self, op: str, **arguments) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def fill(self, bucket: str, root: str, start: int, stop: int, prefixes: int = PREFIXES) -> None:
        """Objects ``root/day=DD/img-NNNNNNN.jpg`` for start <= N < stop; each holds its own
        number, so every ETag differs."""
        self.command("fill", bucket=bucket, root=root, start=start, stop=stop, prefixes=prefixes)

    def create_bucket(self, bucket: str) -> None:
        self.fill(bucket, "", 0, 0)

    def latency(self, seconds: float) -> None:
        self.command("latency", seconds=seconds)

    def stop(self) -> None:
        stop_child(self.process)


def stop_child(process: subprocess.Popen) -> None:
    """End a child that serves lines on its stdin: close it, then kill it if it lingers."""
    if process.poll() is None:
        process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def object_key(root: str, number: int, prefixes: int = PREFIXES) -> str:
    return f"{root}/day={number % prefixes:02d}/img-{number:07d}.jpg"


def _serve_moto() -> None:
    """The child: a threaded moto server (as ThreadedMotoServer) behind an optional delay."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    delay = {"seconds": 0.0}
    app = DomainDispatcherApplication(create_backend_app)

    def delayed(environ, start_response):
        if delay["seconds"]:
            time.sleep(delay["seconds"])
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, delayed, True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(json.dumps({"endpoint": f"http://127.0.0.1:{server.server_port}"}), flush=True)
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "fill":
            bucket = command["bucket"]
            if bucket not in backend.buckets:
                backend.create_bucket(bucket, "us-east-1")
            for number in range(command["start"], command["stop"]):
                key = object_key(command["root"], number, command["prefixes"])
                backend.put_object(bucket, key, b"%d" % number)
        elif command["op"] == "latency":
            delay["seconds"] = float(command["seconds"])
        print(json.dumps({"ok": True}), flush=True)
    server.shutdown()


# --- the contenders ------------------------------------------------------------------------------


def inmap_listing(source: str, storage_options: dict | None):
    from inmap.listing import list_images

    return list_images(source, storage_options).images


def find_listing(source: str, storage_options: dict | None):
    """inmap's listing before the streaming one, as it was (storage.list_images at 2476497)."""
    import pyarrow as pa

    from inmap import storage
    from inmap.listing import is_image_name
    from inmap.schemas import MANIFEST_SCHEMA

    fs, path = storage.url_to_fs(source, storage_options)
    fs.invalidate_cache()
    try:
        entries = fs.find(path, withdirs=False, detail=True)
    except FileNotFoundError:
        entries = {}
    root = path.rstrip("/")
    rows = []
    for name, info in entries.items():
        if info.get("type", "file") != "file" or not is_image_name(name):
            continue
        if name.startswith(root + "/"):
            uri = source.rstrip("/") + name[len(root) :]
        else:
            uri = fs.unstrip_protocol(name) if "://" in source else name
        size = info.get("size")
        rows.append((uri, _old_etag(info), None if size is None else int(size)))
    rows.sort()
    return pa.table(
        {
            "uri": [row[0] for row in rows],
            "etag": [row[1] for row in rows],
            "size": [row[2] for row in rows],
        },
        schema=MANIFEST_SCHEMA,
    )


def _old_etag(info: dict) -> str:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    modified = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
    if isinstance(modified, datetime):
        modified = modified.timestamp()
    return f"{info.get('size')}-{float(modified):.6f}"


CONTENDERS = {"inmap": inmap_listing, "find": find_listing}


# --- one measurement, in a fresh process ---------------------------------------------------------


def proc_status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Make VmHWM the current resident size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure(args: argparse.Namespace) -> None:
    """The child: list `args.source` once to warm up on a one-object prefix, then measure."""
    import pyarrow as pa

    import inmap.listing

    if args.concurrency:
        inmap.listing.S3_CONCURRENCY = args.concurrency
    options = {"endpoint_url": args.endpoint} if args.endpoint else None
    run = CONTENDERS[args.method]
    assert len(run(args.warmup, options)) == 1  # the filesystem, its client, Arrow's kernels
    gc.collect()
    reset_peak()
    before = proc_status("VmRSS")
    arrow_before = pa.default_memory_pool().max_memory()
    started = time.perf_counter()
    manifest = run(args.source, options)
    seconds = time.perf_counter() - started
    peak = proc_status("VmHWM") - before
    print(
        json.dumps(
            {
                "objects": manifest.num_rows,
                "seconds": seconds,
                "peak": peak,
                "manifest": manifest.nbytes,
                "arrow_peak": pa.default_memory_pool().max_memory() - arrow_before,
            }
        )
    )


def measure(
    method: str,
    source: str,
    warmup: str,
    endpoint: str | None = None,
    concurrency: int | None = None,
) -> dict:
    command = [sys.executable, str(HERE), "--measure", "--method", method]
    command += ["--source", source, "--warmup", warmup]
    if endpoint:
        command += ["--endpoint", endpoint]
    if concurrency:
        command += ["--concurrency", str(concurrency)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"measurement failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- filling a local tree ------------------------------------------------------------------------


def fill_local(root: Path, start: int, stop: int) -> None:
    """Empty files ``root/day=DD/img-NNNNNNN.jpg``: the listing reads names and stat only."""
    for day in range(PREFIXES):
        (root / f"day={day:02d}").mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT
    for number in range(start, stop):
        os.close(os.open(root.parent / object_key(root.name, number), flags, 0o644))


# --- the run -------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def run_store(
    store: str, sizes: list[int], fill, source: str, warmup: str, endpoint: str | None
) -> list[dict]:
    rows = []
    done = 0
    contenders = [("inmap", None), ("find", None)]
    if store != "local":
        contenders.insert(1, ("inmap", 1))
    for size in sorted(sizes):
        started = time.perf_counter()
        fill(done, size)
        done = size
        log(f"{store}: filled to {size} objects in {time.perf_counter() - started:.0f}s")
        for method, concurrency in contenders:
            row = measure(method, source, warmup, endpoint, concurrency)
            assert row["objects"] == size, (row["objects"], size)
            name = "find (old)" if method == "find" else "inmap"
            if concurrency == 1:
                name += ", sequential"
            row.update(store=store, method=name, concurrency=concurrency)
            rows.append(row)
            log(
                f"{store} {size} {name}: {row['seconds']:.1f}s, peak {row['peak'] / MIB:.0f} MiB, "
                f"{per_object(row):.0f} B/object above the manifest"
            )
    return rows


def per_object(row: dict) -> float:
    return (row["peak"] - row["manifest"]) / max(row["objects"], 1)


def marginal(row: dict, rows: list[dict]) -> str:
    """Peak above the manifest per object between this size and the next smaller one."""
    smaller = [
        other
        for other in rows
        if other["store"] == row["store"]
        and other["method"] == row["method"]
        and other["objects"] < row["objects"]
    ]
    if not smaller:
        return ""
    other = max(smaller, key=lambda r: r["objects"])
    extra = (row["peak"] - row["manifest"]) - (other["peak"] - other["manifest"])
    return f"{extra / (row['objects'] - other['objects']):.0f}"


def print_tables(rows: list[dict], speed: list[dict], target: float) -> None:
    print(
        "| store | objects | listing | seconds | peak MiB | manifest MiB | Arrow peak MiB "
        "| peak B/object above manifest | marginal B/object |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['store']} | {row['objects']:,} | {row['method']} | {row['seconds']:.1f} "
            f"| {row['peak'] / MIB:.1f} | {row['manifest'] / MIB:.1f} "
            f"| {row['arrow_peak'] / MIB:.1f} | {per_object(row):.0f} | {marginal(row, rows)} |"
        )
    largest = max((r for r in rows if r["method"] == "inmap"), key=lambda r: r["objects"])
    verdict = "meets" if per_object(largest) <= target else "misses"
    print(
        f"\ninmap at {largest['objects']:,} objects ({largest['store']}): "
        f"{per_object(largest):.0f} B/object above the manifest, {verdict} the target of "
        f"<= {target:.0f} B."
    )
    if speed:
        print(
            "\n| store | objects | prefixes | concurrent (16) s | sequential s | speed-up |\n"
            "|---|---:|---:|---:|---:|---:|"
        )
        for row in speed:
            print(
                f"| {row['store']} | {row['objects']:,} | {PREFIXES} | {row['concurrent']:.1f} "
                f"| {row['sequential']:.1f} | {row['sequential'] / row['concurrent']:.1f}x |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--s3-sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--local-sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--local-root", type=Path, default=None, help="default: a temporary dir")
    parser.add_argument(
        "--latency-ms", type=float, default=50.0, help="delay per request for the 2nd speed test"
    )
    parser.add_argument("--target", type=float, default=300.0, help="B/object above the manifest")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    # internal: the child processes
    parser.add_argument("--serve-moto", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_moto:
        return _serve_moto()
    if args.measure:
        return _measure(args)

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    print(
        f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; peak = VmHWM of a "
        "fresh process per measurement, above its resident size before listing",
        flush=True,
    )
    rows: list[dict] = []
    speed: list[dict] = []
    if args.s3_sizes:
        moto = MotoChild()
        try:
            moto.fill("bench", "warmup", 0, 1, prefixes=1)

            def fill_s3(start: int, stop: int) -> None:
                moto.fill("bench", "drops", start, stop)

            rows += run_store(
                "S3 (moto)",
                args.s3_sizes,
                fill_s3,
                "s3://bench/drops",
                "s3://bench/warmup",
                moto.endpoint,
            )
            times = {
                row["concurrency"]: row["seconds"]
                for row in rows
                if row["objects"] == max(args.s3_sizes) and row["method"].startswith("inmap")
            }
            speed.append(
                {
                    "store": "S3 (moto)",
                    "objects": max(args.s3_sizes),
                    "concurrent": times[None],
                    "sequential": times[1],
                }
            )
            if args.latency_ms:
                moto.latency(args.latency_ms / 1000)
                timed = {}
                for concurrency in (None, 1):
                    timed[concurrency] = measure(
                        "inmap", "s3://bench/drops", "s3://bench/warmup", moto.endpoint, concurrency
                    )["seconds"]
                speed.append(
                    {
                        "store": f"S3 (moto + {args.latency_ms:.0f} ms per request)",
                        "objects": max(args.s3_sizes),
                        "concurrent": timed[None],
                        "sequential": timed[1],
                    }
                )
                moto.latency(0.0)
        finally:
            moto.stop()
    if args.local_sizes:
        temporary = args.local_root is None
        top = Path(tempfile.mkdtemp(prefix="inmap-listing-")) if temporary else args.local_root
        try:
            root = top / "drops"
            fill_local(top / "warmup", 0, 1)
            rows += run_store(
                "local",
                args.local_sizes,
                lambda start, stop: fill_local(root, start, stop),
                str(root),
                str(top / "warmup" / "day=00"),
                None,
            )
        finally:
            if temporary:
                log(f"removing {top}")
                shutil.rmtree(top, ignore_errors=True)
    print()
    print_tables(rows, speed, args.target)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "speed": speed}, indent=1))


if __name__ == "__main__":
    main()
