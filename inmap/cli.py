"""The `inmap` command.

    inmap label SOURCE... --classes C --output OUT   run the inmap flow (Prefect's embedded server
                                                     unless PREFECT_API_URL names one)
    inmap runs OUT | labels OUT | errors OUT         look at what runs did
    inmap maintain OUT                               compact and clean the output's tables
    inmap eval SOURCE                                compare methods on labelled data

Heavy libraries (torch, open_clip, Prefect) load only once a command runs, so `--help` is quick.
A mistake in the input prints one line and exits 2; a run that could not finish exits 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import warnings
from dataclasses import fields

from inmap.config import DEFAULT_MODEL, DEFAULT_PRETRAINED, FitOptions, ProxyConfig

# Prefect's embedded server gets this long to start (its default, 20 s, is too short on a busy
# laptop); a user's own setting wins.
EPHEMERAL_STARTUP_SECONDS = "120"
EXIT_INPUT_ERROR = 2
EXIT_FAILED = 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _prefect_defaults()
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        return _report_error(error, args)
    finally:
        # A long run leaves a large heap: collecting it at exit takes seconds, for nothing.
        gc.freeze()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inmap",
        description="Label images in object storage with CLIP and InMaP vision proxies.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    label = commands.add_parser(
        "label",
        help="label the images under SOURCE and write predictions to OUTPUT",
        description="Run the inmap flow: list, embed, learn the vision proxy, predict, commit.",
    )
    _label_arguments(label)
    label.set_defaults(handler=_label_command)

    runs = commands.add_parser("runs", help="recent runs on an output: counts, proxy, failures")
    _output_arguments(runs)
    runs.add_argument("--limit", type=int, default=20, help="how many runs (default 20)")
    runs.set_defaults(handler=_runs_command)

    labels = commands.add_parser(
        "labels", help="the latest label of each image, with score and zero-shot label"
    )
    _output_arguments(labels)
    labels.add_argument("--labelset", default=None, help="one labelset (default: the latest)")
    labels.add_argument("--format", choices=["table", "csv", "parquet"], default="table")
    labels.add_argument("--to", dest="to", default=None, help="write to this file (- for stdout)")
    labels.set_defaults(handler=_labels_command)

    errors = commands.add_parser("errors", help="images that failed, with reasons")
    _output_arguments(errors)
    errors.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    errors.set_defaults(handler=_errors_command)

    maintain = commands.add_parser(
        "maintain", help="compact the output's tables and remove files no reader needs"
    )
    _output_arguments(maintain)
    maintain.add_argument(
        "--retention-hours",
        type=_hours,
        default=168,
        help="keep unreferenced table files this long, for readers of older versions (default 168)",
    )
    maintain.set_defaults(handler=_maintain_command)

    evaluate = commands.add_parser(
        "eval",
        help="compare zero-shot, InMaP and refinements on labelled features or images",
        description="Build skewed drops from a labelled set and print top-1 per method.",
    )
    _eval_arguments(evaluate)
    evaluate.set_defaults(handler=_eval_command)
    return parser


# --- inmap label ---------------------------------------------------------------------------------


def _label_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", nargs="+", help="image prefix(es): a folder, s3://bucket/prefix, ..."
    )
    parser.add_argument(
        "--classes",
        required=True,
        help="class names: a text file (one per line) or a JSON list, any URL",
    )
    parser.add_argument("--output", required=True, help="output prefix (folder or s3://...)")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"open_clip model (default {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--pretrained",
        default=DEFAULT_PRETRAINED,
        help="pretrained tag, local checkpoint path, or 'none' for random weights "
        f"(default {DEFAULT_PRETRAINED})",
    )
    parser.add_argument(
        "--templates",
        default="paper",
        help="prompt templates: 'paper' (7), 'openai' (80), or a JSON list",
    )
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (every stage)"
    )
    parser.add_argument("--shard-size", type=int, default=2000, help="images per embedding shard")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model batch")
    parser.add_argument(
        "--max-train-images",
        type=int,
        default=200_000,
        help="learn the proxy on a uniform sample above this many images",
    )
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument(
        "--relearn",
        choices=["grown", "always", "never"],
        default="grown",
        help="learn a new proxy: when the archive grew by 10%% (default), every run, or never",
    )
    parser.add_argument(
        "--listing",
        choices=["full", "after-last"],
        default="full",
        help="list everything (default), or only keys after the last run's (drops whose keys "
        "sort by arrival)",
    )
    parser.add_argument(
        "--read-retry-seconds",
        type=float,
        default=120.0,
        help="keep retrying an object that fails to read for this long (default 120)",
    )
    parser.add_argument(
        "--pixel-budget",
        type=int,
        default=None,
        help="decoded pixels in flight across decode threads (default 256 million)",
    )
    parser.add_argument(
        "--storage-options",
        default=None,
        help='JSON dict of non-secret fsspec/s3fs options, e.g. \'{"endpoint_url": "http://..."}\'',
    )
    parser.add_argument(
        "--credentials-block",
        default=None,
        help="name of a Prefect AwsCredentials block holding the S3 credentials",
    )
    parser.add_argument(
        "--lease-wait",
        type=float,
        default=300.0,
        help="seconds to wait for another run on the same output (default 300)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="log lines instead of a live progress display"
    )
    parser.add_argument("--task-runner", choices=["thread", "dask"], default="thread")
    parser.add_argument(
        "--dask-address",
        default=None,
        help="tcp://host:8786 of an existing Dask cluster (implies --task-runner dask)",
    )
    parser.add_argument("--dask-workers", type=int, default=2, help="local Dask cluster size")
    parser.add_argument(
        "--dask-gpus",
        action="store_true",
        help="each embedding task holds one GPU (workers need --resources GPU=1)",
    )
    hyper = parser.add_argument_group("InMaP hyper-parameters (the paper's by default)")
    for item in fields(ProxyConfig):
        hyper.add_argument(
            f"--{item.name.replace('_', '-')}",
            type=type(item.default),
            default=None,
            help=f"default {item.default}",
        )
    precisions = [f.default for f in fields(FitOptions) if f.name == "precision"]
    hyper.add_argument(
        "--precision",
        choices=["float32", "tf32", "bf16"],
        default=precisions[0],
        help="proxy-learning arithmetic; tf32/bf16 are faster on GPUs (default float32)",
    )


def _label_command(args: argparse.Namespace) -> int:
    from inmap.classes import read_classes
    from inmap.credentials import refuse_secrets
    from inmap.listing import check_local_source
    from inmap.tables import check_table_path

    # Mistakes that need no server are caught before one starts.
    storage_options = refuse_secrets(_json(args.storage_options, "--storage-options"))
    check_table_path(args.output)
    for source in args.source:
        check_local_source(source)
    if not args.credentials_block:
        read_classes(args.classes, storage_options or None)
    _say_server_start()
    from inmap.model import resolve_model

    resolve_model(args.model, args.pretrained, args.device)  # fetches the weights, or says why not
    # The run's log says so already, in its place; the Python warning would say it twice.
    warnings.filterwarnings("ignore", message=".* has RANDOM weights")

    from flows.inmap_flow import inmap_flow, make_task_runner

    overrides = {
        item.name: getattr(args, item.name)
        for item in fields(ProxyConfig)
        if getattr(args, item.name) is not None
    }
    runner = "dask" if args.dask_address else args.task_runner
    flow = inmap_flow.with_options(
        task_runner=make_task_runner(
            runner,
            dask_address=args.dask_address,
            dask_workers=args.dask_workers,
            gpu_resources=args.dask_gpus,
        )
    )
    parameters = {
        "source": args.source[0] if len(args.source) == 1 else args.source,
        "classes": args.classes,
        "output": args.output,
        "model": args.model,
        "pretrained": args.pretrained,
        "templates": _json(args.templates, "--templates")
        if args.templates.startswith("[")
        else args.templates,
        "device": args.device,
        "hyperparameters": ProxyConfig(**overrides),
        "precision": args.precision,
        "shard_size": args.shard_size,
        "batch_size": args.batch_size,
        "max_train_images": args.max_train_images,
        "top_k": args.top_k,
        "relearn": args.relearn,
        "listing": args.listing,
        "read_retry_seconds": args.read_retry_seconds,
        "storage_options": storage_options or None,
        "credentials_block": args.credentials_block,
        "lease_wait": args.lease_wait,
    }
    if args.pixel_budget is not None:
        parameters["pixel_budget"] = args.pixel_budget
    from inmap import watchdog
    from inmap.console import run_with_console

    # A killed CLI cannot stop the embedded server it started; the watchdog does.
    guard = None if os.environ.get("PREFECT_API_URL") else watchdog.start()
    try:
        summaries = run_with_console(flow, parameters, live=not args.no_progress)
    finally:
        if guard is not None:
            guard.terminate()
            guard.wait()
    for summary in summaries:
        print(summary.line())
        for warning in summary.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return 0


# --- looking at results ---------------------------------------------------------------------


def _output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="the output prefix given to `inmap label --output`")
    parser.add_argument(
        "--storage-options", default=None, help="JSON dict of non-secret fsspec/s3fs options"
    )
    parser.add_argument(
        "--credentials-block", default=None, help="a Prefect AwsCredentials block name"
    )


def _storage_options(args: argparse.Namespace) -> dict | None:
    from inmap.credentials import refuse_secrets

    options = refuse_secrets(_json(args.storage_options, "--storage-options"))
    if args.credentials_block:
        from tasks.credentials import block_options

        options = {**options, **(block_options(args.credentials_block) or {})}
    return options or None


def _inmap_output(args: argparse.Namespace) -> None:
    """Refuse a path where no inmap run ever wrote (a typo reads as an empty output otherwise)."""
    from inmap import layout, tables
    from inmap.errors import OutputPathError

    options = _storage_options(args)
    if all(tables.open_table(url, options) is None for url in
           (layout.runs_dir(args.output), layout.predictions_dir(args.output))):  # fmt: skip
        raise OutputPathError(
            f"no inmap output at {args.output}: no run has recorded anything there; check the "
            "path (it is what `inmap label --output` was given)"
        )


def _runs_command(args: argparse.Namespace) -> int:
    from inmap import results

    _inmap_output(args)
    print(results.runs_text(args.output, _storage_options(args), limit=args.limit))
    return 0


def _labels_command(args: argparse.Namespace) -> int:
    from inmap import results

    _inmap_output(args)
    table = results.latest_labels(args.output, _storage_options(args), labelset=args.labelset)
    results.write_labels(table, args.format, args.to)
    return 0


def _errors_command(args: argparse.Namespace) -> int:
    from inmap import results

    _inmap_output(args)
    print(results.errors_text(args.output, _storage_options(args), limit=args.limit))
    return 0


def _maintain_command(args: argparse.Namespace) -> int:
    from inmap import maintenance

    report = maintenance.maintain(
        args.output, _storage_options(args), retention_hours=args.retention_hours
    )
    for line in report:
        print(line)
    return 0


# --- inmap eval ------------------------------------------------------------------------------


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    from inmap.evaluate import DEFAULT_METHODS, SCENARIOS, ZERO_SHOT

    parser.add_argument(
        "source",
        help="labelled features (.npz, Parquet file or folder) or a folder of labelled images "
        "(class per sub-folder, or nXXXXXXXX_<class>.JPEG names)",
    )
    parser.add_argument(
        "--classes",
        default=None,
        help="class names: a text file (one per line) or JSON list; default the npz's classnames "
        "or the distinct labels",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated drops to draw (default all): "
        + "; ".join(f"{k}: {v}" for k, v in SCENARIOS.items()).replace("%", "%%"),
    )
    parser.add_argument("--seeds", type=int, default=5, help="drops per scenario (default 5)")
    parser.add_argument("--first-seed", type=int, default=0, help="seed of the first drop")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated: {ZERO_SHOT} and refine= values such as adaptive, sinkhorn, none "
        f"(default {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--text-proxy",
        default=None,
        help=".npy (C, d) zero-shot weights in class order, instead of building them with --model",
    )
    parser.add_argument("--iters", type=int, default=None, help="proxy-learning iterations")
    parser.add_argument("--model", default=None, help="open_clip model, for images or text")
    parser.add_argument(
        "--pretrained",
        default="default",
        help="pretrained tag, checkpoint path, or 'none' for random weights",
    )
    parser.add_argument("--templates", default="paper", help="'paper', 'openai' or a JSON list")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model batch")


def _eval_command(args: argparse.Namespace) -> int:
    """Print the table of top-1 per scenario and method."""
    from inmap.classes import read_classes
    from inmap.evaluate import SCENARIOS, ZERO_SHOT, format_table, run_eval
    from inmap.labeled import Embedder, EvalInputError, load_labeled_set
    from inmap.proxy import PSEUDO_LABELERS

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown += [m for m in methods if m != ZERO_SHOT and m not in PSEUDO_LABELERS]
    if unknown:
        raise EvalInputError(
            f"unknown scenario or method {', '.join(unknown)}; scenarios: {', '.join(SCENARIOS)}; "
            f"methods: {ZERO_SHOT}, {', '.join(PSEUDO_LABELERS)}"
        )
    templates = (
        _json(args.templates, "--templates") if args.templates.startswith("[") else args.templates
    )
    labeled = load_labeled_set(
        args.source,
        classes=read_classes(args.classes) if args.classes else None,
        text_proxy=args.text_proxy,
        embedder=Embedder(
            model=args.model,
            pretrained=args.pretrained,
            device=args.device,
            templates=templates if isinstance(templates, str) else tuple(templates),
            batch_size=args.batch_size,
        ),
    )
    config = ProxyConfig() if args.iters is None else ProxyConfig(iters=args.iters)
    print(
        f"{len(labeled.labels)} labelled images, {len(labeled.classnames)} classes; "
        f"{len(scenarios)} scenarios x {args.seeds} seeds from seed {args.first_seed}",
        file=sys.stderr,
    )
    table = run_eval(
        labeled,
        scenarios=scenarios,
        seeds=range(args.first_seed, args.first_seed + args.seeds),
        methods=methods,
        config=config,
        progress=lambda r: print(
            f"  {r.scenario} seed {r.seed}: {r.n_images} images, "
            + ", ".join(f"{m} {v:.2f}" for m, v in r.top1.items()),
            file=sys.stderr,
        ),
    )
    print(format_table(table))
    return 0


# --- plumbing ------------------------------------------------------------------------------------


def _json(text: str | None, option: str):
    from inmap.errors import InputError

    if not text:
        return {}
    try:
        return json.loads(text)
    except ValueError as error:
        raise InputError(f"{option} is not valid JSON ({error}): {text}") from None


def _hours(text: str) -> float:
    try:
        hours = float(text)
    except ValueError:
        hours = -1.0
    if not hours >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of hours >= 0")
    return hours


def _say_server_start() -> None:
    if not os.environ.get("PREFECT_API_URL"):
        timeout = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "20")
        print(
            f"inmap: starting; Prefect's embedded server gets up to {timeout}s to start on a busy "
            "machine (set PREFECT_API_URL to use a running one)",
            file=sys.stderr,
        )


def _prefect_defaults() -> None:
    """Settings for the embedded defaults, unless the user set them."""
    os.environ.setdefault(
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_SECONDS
    )
    # The embedded ephemeral server and the client should not phone home (and log errors when
    # offline).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # inmap's own log lines go to Prefect's console and run logs.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "inmap")


def _report_error(error: Exception, args: argparse.Namespace) -> int:
    """One line for inmap's own errors (exit 2 for input mistakes, 1 otherwise); a bug keeps its
    traceback."""
    from inmap.errors import InputError

    cause = _inmap_cause(error)
    if cause is None:
        raise error
    print(f"inmap: error: {cause}", file=sys.stderr)
    return EXIT_INPUT_ERROR if isinstance(cause, InputError) else EXIT_FAILED


def _inmap_cause(error: BaseException):
    from inmap.errors import InmapError

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InmapError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
