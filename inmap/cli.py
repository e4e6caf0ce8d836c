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
import logging
import os
import sys
import warnings

# Prefect's embedded server gets this long to start (its default, 20 s, is too short on a busy
# laptop); a user's own setting wins.
EPHEMERAL_STARTUP_SECONDS = "120"
EXIT_INPUT_ERROR = 2
EXIT_FAILED = 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _Parser.given, _Parser.root = list(sys.argv[1:] if argv is None else argv), parser
    args = parser.parse_args(argv)
    _prefect_defaults()
    if args.command == "label" and _embedded_api():
        ANSWER.hold_until_exit()
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        return _report_error(error, args)
    finally:
        # A long run leaves a large heap: collecting it at exit takes seconds, for nothing.
        gc.freeze()


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line: an unknown option names the nearest known one, even
    when it also left a required option missing (`--clases` for `--classes`)."""

    given: list[str] = []  # the command line being parsed (set by `main`)
    root: argparse.ArgumentParser | None = None

    def error(self, message: str):
        import difflib

        known = {flag for parser in _parsers(self.root or self) for action in parser._actions
                 for flag in action.option_strings}  # fmt: skip
        typos = [word.split("=", 1)[0] for word in self.given if word.startswith("--")]
        # A prefix of a known flag is argparse's abbreviation, not a typo.
        typos = [typo for typo in typos if not any(flag.startswith(typo) for flag in known)]
        if typos or message.startswith("unrecognized arguments:"):
            if not message.startswith("unrecognized arguments:"):
                message = f"unrecognized arguments: {' '.join(typos)}"
            for typo in typos:
                near = difflib.get_close_matches(typo, known, n=1)
                if near:
                    message += f" (did you mean {near[0]}?)"
            message += "; see inmap COMMAND --help"
            self.exit(2, f"inmap: error: {message}\n")
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")  # no usage dump


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="inmap",
        description="Label images in object storage with CLIP and InMaP vision proxies.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    label = commands.add_parser(
        "label",
        help="label the images under SOURCE and write predictions to OUTPUT",
        description="Run the inmap flow: list, embed, learn the vision proxy, predict, commit.",
        epilog=LABEL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    labels.add_argument(
        "--unknown-only",
        action="store_true",
        help="only images flagged as none of the classes (runs with --unknown auto)",
    )
    labels.set_defaults(handler=_labels_command)

    errors = commands.add_parser("errors", help="images that failed, with reasons")
    _output_arguments(errors)
    errors.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    errors.set_defaults(handler=_errors_command)

    maintain = commands.add_parser(
        "maintain", help="compact the output's tables and remove files no reader needs"
    )
    _output_arguments(maintain, formats=False)
    from inmap.options import MaintainRequest

    add_options(maintain, MaintainRequest, only={"retention_hours"})
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


LABEL_EXAMPLES = (
    "examples:\n"
    "  # a local folder, on this machine, with Prefect's embedded server\n"
    "  inmap label ./images --classes classes.txt --output ./out\n"
    "  # S3, the credentials in a Prefect block (never in an option)\n"
    "  inmap label s3://bucket/drops/2026-12-06 --classes s3://bucket/classes.txt \\\n"
    "      --output s3://bucket/inmap --credentials-block my-aws\n"
)


def _label_arguments(parser: argparse.ArgumentParser) -> None:
    from inmap.options import MethodOptions, RunnerOptions, RunRequest

    hyperparameters = set(MethodOptions.model_fields)
    first = ("source", "classes", "output")
    add_options(parser, RunRequest, positional="source", only=first)
    add_options(parser, RunRequest, skip={*first, *hyperparameters})
    add_options(parser, RunnerOptions)
    parser.add_argument(
        "--no-progress", action="store_true", help="log lines instead of a live progress display"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also print Prefect's own log lines (run logs keep them either way)",
    )
    hyper = parser.add_argument_group("InMaP hyper-parameters (the paper's by default)")
    add_options(hyper, RunRequest, only=hyperparameters)


def add_options(parser, model, *, positional: str | None = None, skip=(), only=None) -> None:
    """One flag per field of an `inmap.options` model: its type, choices, default and help come
    from the declaration. Defaults stay unset here, so the model fills them in (and knows which
    options a user gave)."""
    from inmap import options

    for name, field in model.model_fields.items():
        if name in skip or (only is not None and name not in only):
            continue
        choices = options.choices(field.annotation)
        plain_choices = choices if options.is_literal(field.annotation) else None
        help_text = (field.description or "").replace("%", "%%")
        if choices and plain_choices is None:
            help_text += f" (choices: {', '.join(map(str, choices))})"
        if not field.is_required() and not (field.default is None and "default" in help_text):
            help_text += f" (default: {_shown(field.default)})"
        kind = options.scalar_type(field.annotation)
        settings = {"help": help_text, "default": argparse.SUPPRESS}
        if name == positional:
            many = options.takes_list(field.annotation)
            parser.add_argument(name, nargs="+" if many else None, help=help_text)
            continue
        if kind is bool:
            settings["action"] = "store_true"
        else:
            settings["type"] = kind
            settings["metavar"] = name.upper() if plain_choices is None else None
            if plain_choices is not None:
                settings["choices"] = plain_choices
        if field.is_required():
            settings["required"] = True
        parser.add_argument(options.flag(name), **settings)


def _shown(default) -> str:
    return "none" if default is None else str(default)


def _label_command(args: argparse.Namespace) -> int:
    from inmap.classes import read_classes
    from inmap.cluster import absolute_local
    from inmap.listing import check_local_source
    from inmap.options import RunnerOptions, RunRequest
    from inmap.tables import check_table_path

    given = _given(args, RunRequest)
    # Local paths are this machine's: absolute before the run goes anywhere (a Dask worker would
    # resolve a relative one in its own working directory).
    sources = [absolute_local(source) for source in args.source]
    given["source"] = sources[0] if len(sources) == 1 else sources
    given["output"] = absolute_local(args.output)
    if not str(args.classes).lstrip().startswith("["):
        given["classes"] = absolute_local(args.classes)
    request = RunRequest.parse(given, flags=True)
    runner = RunnerOptions.parse(_given(args, RunnerOptions), flags=True)
    # Mistakes that need no server are caught before one starts.
    kind = runner.runner
    check_table_path(request.output)
    for source in request.partitions:
        check_local_source(source)
    if not request.credentials_block:
        read_classes(request.classes, request.storage_options)
    from inmap.model import resolve_model

    # Fetches the weights, or says why not; on Dask the workers judge the device.
    resolve_model(request.model, request.pretrained, request.device, device_here=kind == "thread")
    _say_server_start()
    # The run's log says so already, in its place; the Python warning would say it twice.
    warnings.filterwarnings("ignore", message=".* has RANDOM weights")

    from flows.inmap_flow import inmap_flow, make_task_runner

    flow = inmap_flow.with_options(task_runner=make_task_runner(runner))
    # Only what the user gave: the flow's own defaults are the declaration's.
    parameters = request.model_dump(exclude_unset=True)
    from inmap import watchdog
    from inmap.console import run_with_console

    # A killed CLI cannot stop the embedded server it started; the watchdog does.
    guard = None if os.environ.get("PREFECT_API_URL") else watchdog.start()
    try:
        summaries = run_with_console(
            flow, parameters, live=not args.no_progress, verbose=args.verbose
        )
        if kind == "dask" and _embedded_api():
            _let_the_server_catch_up()
    finally:
        if guard is not None:
            guard.terminate()
            guard.wait()
    for summary in summaries:
        for warning in summary.warnings:
            ANSWER.say(f"warning: {warning}", sys.stderr)
    for summary in summaries:  # the answer is the last thing printed
        look = "errors" if summary.failed else "labels"
        ANSWER.say(f"{summary.line()}; see: inmap {look} {_quoted(request.output)}")
    return 0


class _Answer:
    """The command's last lines: the summary or the error. When this process starts Prefect's
    temporary server, they are held and printed at exit, after the server's own shutdown (its
    exit handler, registered later, runs first), so the answer is the last thing on the console."""

    def __init__(self) -> None:
        self.held: list[tuple[str, object]] | None = None

    def hold_until_exit(self) -> None:
        import atexit

        self.held = []
        atexit.register(self._print_held)

    def say(self, text: str, file=None) -> None:
        if self.held is None:
            print(text, file=file or sys.stdout)
        else:
            self.held.append((text, file))

    def _print_held(self) -> None:
        for text, file in self.held or []:
            print(text, file=file or sys.stdout, flush=True)


ANSWER = _Answer()


def _let_the_server_catch_up(seconds: float = 15.0) -> None:
    """Dask workers report their task runs to this process's temporary server as events, which
    it records a moment later; before the server stops with this process, wait (a bounded time)
    until every task run it knows is finished and their number holds still."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import TaskRunSort

    deadline, seen = time.monotonic() + seconds, None
    try:
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                runs = client.read_task_runs(sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=200)
                now = (len(runs), sum(bool(r.state and r.state.is_final()) for r in runs))
                if now == seen and now[0] == now[1]:
                    return
                seen = now
                time.sleep(0.5)
    except Exception as error:  # a courtesy to the run's records; never a reason to fail
        logging.getLogger("inmap").debug("could not wait for the server's records: %s", error)


def _embedded_api() -> bool:
    """Whether this run uses a Prefect server this process starts (no PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL

    return not PREFECT_API_URL.value()


def _quoted(text: str) -> str:
    import shlex

    return shlex.quote(text)


# --- looking at results ---------------------------------------------------------------------


def _output_arguments(parser: argparse.ArgumentParser, *, formats: bool = True) -> None:
    from inmap.options import MaintainRequest, StorageAccess

    add_options(parser, MaintainRequest, positional="output", only={"output"})
    add_options(parser, StorageAccess)
    if formats:
        parser.add_argument(
            "--format",
            choices=["table", "csv", "json", "parquet"],
            default="table",
            help="table for people; csv, json (an array of rows) or parquet for programs "
            "(default: table)",
        )
        parser.add_argument(
            "--to",
            default=None,
            metavar="FILE",
            help="write to this file (default: stdout; parquet only when stdout is not a terminal)",
        )


def _storage_options(args: argparse.Namespace) -> dict | None:
    from inmap.credentials import merge_options
    from inmap.options import StorageAccess

    access = StorageAccess.parse(_given(args, StorageAccess), flags=True)
    block = None
    if access.credentials_block:
        from tasks.credentials import block_options

        block = block_options(access.credentials_block)
    return merge_options(access.storage_options, block)


def _given(args: argparse.Namespace, model) -> dict:
    """The options of `model` that were given on the command line."""
    return {name: value for name, value in vars(args).items() if name in model.model_fields}


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
    runs = results.recent_runs(args.output, _storage_options(args), limit=args.limit)
    results.write_result(runs, args.format, args.to, results.runs_text)
    return 0


def _labels_command(args: argparse.Namespace) -> int:
    from inmap import results

    _inmap_output(args)
    table = results.latest_labels(
        args.output,
        _storage_options(args),
        labelset=args.labelset,
        unknown_only=args.unknown_only,
    )
    results.write_result(table, args.format, args.to, results.labels_text)
    return 0


def _errors_command(args: argparse.Namespace) -> int:
    from inmap import results

    _inmap_output(args)
    errors = results.recent_errors(args.output, _storage_options(args), limit=None)
    limited = errors.slice(0, args.limit)
    results.write_result(
        errors if args.format == "table" else limited,
        args.format,
        args.to,
        lambda table: results.errors_text(table, args.limit),
    )
    return 0


def _maintain_command(args: argparse.Namespace) -> int:
    from inmap import maintenance
    from inmap.options import MaintainRequest

    request = MaintainRequest.parse(_given(args, MaintainRequest), flags=True)
    report = maintenance.maintain(
        request.output, _storage_options(args), retention_hours=request.retention_hours
    )
    for line in report:
        print(line)
    return 0


# --- inmap eval ------------------------------------------------------------------------------


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    from inmap.options import EncoderOptions, EvalRequest, MethodOptions

    own = set(EvalRequest.model_fields) - set(EncoderOptions.model_fields)
    own -= set(MethodOptions.model_fields)
    add_options(parser, EvalRequest, positional="source", only=own)
    add_options(parser.add_argument_group("model"), EncoderOptions)
    hyper = parser.add_argument_group("InMaP hyper-parameters (the paper's by default)")
    add_options(hyper, MethodOptions, skip={"refine", "precision"})  # --methods names refinements
    from inmap.evaluate import SCENARIOS

    parser.epilog = "scenarios: " + "; ".join(f"{k}: {v}" for k, v in SCENARIOS.items())


def _eval_command(args: argparse.Namespace) -> int:
    """Print the table of top-1 per scenario and method."""
    from inmap.classes import read_classes
    from inmap.evaluate import DEFAULT_METHODS, SCENARIOS, ZERO_SHOT, format_table, run_eval
    from inmap.labeled import Embedder, EvalInputError, load_labeled_set
    from inmap.options import EvalRequest
    from inmap.proxy import PSEUDO_LABELERS

    given = {name: getattr(args, name) for name in EvalRequest.model_fields if name in args}
    request = EvalRequest.parse(given, flags=True)
    scenarios = _listed(request.scenarios, SCENARIOS)
    methods = _listed(request.methods, DEFAULT_METHODS)
    unknown = [s for s in scenarios if s not in SCENARIOS]
    unknown += [m for m in methods if m != ZERO_SHOT and m not in PSEUDO_LABELERS]
    if unknown:
        raise EvalInputError(
            f"unknown scenario or method {', '.join(unknown)}; scenarios: {', '.join(SCENARIOS)}; "
            f"methods: {ZERO_SHOT}, {', '.join(PSEUDO_LABELERS)}"
        )
    labeled = load_labeled_set(
        request.source,
        classes=read_classes(request.classes) if request.classes else None,
        text_proxy=request.text_proxy,
        embedder=Embedder(
            model=request.model,
            pretrained=request.pretrained,
            device=request.device,
            templates=request.templates
            if isinstance(request.templates, str)
            else tuple(request.templates),
            batch_size=request.batch_size,
        ),
    )
    config = request.hyperparameters
    seeds = range(request.first_seed, request.first_seed + request.seeds)
    print(
        f"{len(labeled.labels)} labelled images, {len(labeled.classnames)} classes; "
        f"{len(scenarios)} scenarios x {request.seeds} seeds from seed {request.first_seed}",
        file=sys.stderr,
    )
    table = run_eval(
        labeled,
        scenarios=scenarios,
        seeds=seeds,
        methods=methods,
        config=config,
        progress=lambda r: print(
            f"  {r.scenario} seed {r.seed}: {r.n_images} images, "
            + ", ".join(f"{m} {v:.2f}" for m, v in r.top1.items()),
            file=sys.stderr,
        ),
    )
    print(format_table(table))
    if request.open_set:
        from inmap.evaluate import OPEN_SET_VOCABULARY, format_open_set_table, run_open_set_eval

        vocabulary = OPEN_SET_VOCABULARY if request.vocabulary is None else request.vocabulary
        open_set = run_open_set_eval(
            labeled,
            seeds=seeds,
            vocabulary=int(vocabulary) if vocabulary >= 1 else vocabulary,
            config=config,
            progress=lambda r: print(
                f"  open set, {r.unlisted_share:.0%} unlisted, seed {r.seed}: "
                + ", ".join(f"AUROC {name} {value:.1f}" for name, value in r.auroc.items()),
                file=sys.stderr,
            ),
        )
        print(format_open_set_table(open_set))
    return 0


def _listed(text: str | None, default) -> list[str]:
    """The names of a comma-separated option, or all of `default`."""
    if text is None:
        return list(default)
    return [name.strip() for name in text.split(",") if name.strip()]


# --- plumbing ------------------------------------------------------------------------------------


def _json(text: str | None, option: str):
    from inmap.errors import InputError

    if not text:
        return {}
    try:
        return json.loads(text)
    except ValueError as error:
        raise InputError(f"{option} is not valid JSON ({error}): {text}") from None


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
    ANSWER.say(f"inmap: error: {cause}", sys.stderr)
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
