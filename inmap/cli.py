"""The `inmap` command. `inmap label` runs the `inmap` flow with the embedded defaults: Prefect's
ephemeral server (unless PREFECT_API_URL points at one) and local folders or any fsspec URL."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

from inmap.proxy import ProxyConfig


def _add_label_arguments(parser: argparse.ArgumentParser) -> None:
    from inmap.encoder import DEFAULT_MODEL, DEFAULT_PRETRAINED

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
        help=f"pretrained tag, local checkpoint path, or 'none' for random weights "
        f"(default {DEFAULT_PRETRAINED})",
    )
    parser.add_argument(
        "--templates",
        default="paper",
        help="prompt templates: 'paper' (7), 'openai' (80), or a JSON list",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
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
        "--storage-options",
        default=None,
        help='JSON dict for fsspec/s3fs, e.g. \'{"endpoint_url": "http://..."}\'',
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
    hyper = parser.add_argument_group("InMaP hyper-parameters")
    for item in fields(ProxyConfig):
        if item.name == "device":
            continue
        kind = type(item.default) if item.default is not None else str
        hyper.add_argument(
            f"--{item.name.replace('_', '-')}",
            type=kind,
            default=None,
            help=f"default {item.default}",
        )


def _label_command(args: argparse.Namespace) -> int:
    from flows.inmap_flow import inmap_flow, make_task_runner

    overrides = {
        item.name: getattr(args, item.name)
        for item in fields(ProxyConfig)
        if item.name != "device" and getattr(args, item.name) is not None
    }
    templates = json.loads(args.templates) if args.templates.startswith("[") else args.templates
    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    runner = "dask" if args.dask_address else args.task_runner
    flow = inmap_flow.with_options(
        task_runner=make_task_runner(
            runner,
            dask_address=args.dask_address,
            dask_workers=args.dask_workers,
            gpu_resources=args.dask_gpus,
        )
    )
    summaries = flow(
        source=args.source[0] if len(args.source) == 1 else args.source,
        classes=args.classes,
        output=args.output,
        model=args.model,
        pretrained=pretrained,
        templates=templates,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        device=args.device,
        hyperparameters=ProxyConfig(**overrides),
        max_train_images=args.max_train_images,
        top_k=args.top_k,
        storage_options=json.loads(args.storage_options) if args.storage_options else None,
    )
    for summary in summaries:
        counts = summary["counts"]
        print(
            f"{summary['source']}: {counts['predicted']} predicted, {counts['embedded']} embedded,"
            f" {counts['cached']} cached, {counts['failed']} failed"
            f" -> {summary['output']}/predictions/{summary['labelset']}/"
        )
        for warning in summary.get("warnings", []):
            print(f"warning: {warning}", file=sys.stderr)
    return 0


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
    _add_label_arguments(label)
    label.set_defaults(handler=_label_command)
    try:
        from inmap.evaluate import add_eval_arguments, eval_command
    except ImportError:  # the evaluation harness is optional at import time
        pass
    else:
        evaluate = commands.add_parser(
            "eval",
            help="compare zero-shot, InMaP and refinements on labelled features or images",
            description="Build skewed drops from a labelled set and print top-1 per method.",
        )
        add_eval_arguments(evaluate)
        evaluate.set_defaults(handler=eval_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The embedded ephemeral server should not phone home (and logs errors when offline).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # inmap's own progress lines (embedding, proxy learning) go to Prefect's console and run logs.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "inmap")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a clear one-line message; the traceback is in Prefect's log
        from inmap.errors import is_user_error

        if not is_user_error(error):
            raise
        print(f"inmap: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
