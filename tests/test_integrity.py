"""Integrity under failure: kills, overlapping runs, storage faults, lost commit responses, broken
cache files and odd paths. Whatever happens, the predictions table ends with exactly one row per
image, and a rerun gives the labels of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from inmap import tables
from inmap.errors import UnreadableImagesError
from inmap.options import RunOptions
from tests.conftest import REPO_ROOT, one_row_per_image, read_delta
from tests.faults import FAULT_KINDS, FaultProxy

CLASSES_FILE = REPO_ROOT / "examples" / "classes.txt"
TINY_ARGS = ["--model", "inmap-tiny", "--pretrained", "none", "--device", "cpu"]
TINY = {"model": "inmap-tiny", "pretrained": None, "device": "cpu"}
CLASSES = ["fish", "bird", "dog", "car", "food"]


# --- helpers -------------------------------------------------------------------------------------


def copy_images(sample_images, folder: Path, count: int, step: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for path in sample_images[::step][:count]:
        shutil.copy(path, folder / path.name)
    return folder


def run_flow(source, output, **overrides):
    """The flow in this process (under prefect_harness), with the tiny model."""
    from flows.inmap_flow import inmap_flow

    params = {**TINY, "source": str(source), "classes": CLASSES, "output": str(output),
              "iters": 50, "shard_size": 4}  # fmt: skip
    return inmap_flow(**{**params, **overrides})


def label_command(source, output, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "inmap.cli", "label", str(source),
        "--classes", str(CLASSES_FILE), "--output", str(output), *TINY_ARGS, "--no-progress",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def start():
    """start(command, env, log): `command` in its own process group (so that a kill takes every
    thread and child with it), its output to `log`; whatever still runs at the end is killed."""
    started: list[subprocess.Popen] = []

    def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            started.append(
                subprocess.Popen(
                    command,
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def finish(process: subprocess.Popen, log: Path, timeout: float = 600) -> tuple[int, str]:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError(f"timed out:\n{log.read_text()[-4000:]}") from None
    return process.returncode, log.read_text()


def wait_for(condition, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


def holds_lease(output: Path) -> bool:
    try:
        return bool(live_leases(output))
    except ValueError:  # caught mid-write
        return False


def live_leases(output: Path) -> list[str]:
    now = time.time()
    return [
        lease.name
        for lease in (output / "_lease").glob("*.json")
        if json.loads(lease.read_text())["expires"] > now
    ]


def labels_of(predictions: pl.DataFrame) -> dict[str, tuple]:
    """uri -> (label, top-k labels): what a rerun must reproduce."""
    return {
        row["uri"]: (row["label"], tuple(row["top_k_labels"]))
        for row in predictions.select(["uri", "label", "top_k_labels"]).iter_rows(named=True)
    }


def embedded_uris(output: Path) -> list[str]:
    """The uri of every row of every embedding shard file (all models)."""
    return [
        uri
        for shard in sorted(output.glob("embeddings/*/*.parquet"))
        for uri in pq.read_table(shard, columns=["uri"])["uri"].to_pylist()
    ]


# --- a run killed with SIGKILL, then run again ---------------------------------------------------

# Learning must last long enough to be killed in: bf16 rounding keeps W moving, so the fit runs
# thousands of steps (~2-3 s here) instead of converging in a fraction of a second.
# A killed run's lease lapses LEASE_TTL s after its last renewal; the rerun waits that out.
LEASE_TTL = 30
KILL_ARGS = ["--shard-size", "2", "--iters", "40000", "--precision", "bf16",
             "--lease-ttl", str(LEASE_TTL)]  # fmt: skip
KILL_IMAGES = 40
# Each kill point: the file that appears under the output when the run gets there, and how long
# after it to kill.
KILL_POINTS = {
    "embedding": ("embeddings/*/*.parquet", 0.0),  # the first shard: 19 more to go
    "learning": ("text-proxies/*.parquet", 0.3),  # written just before the fit starts
    "committing": ("predictions/_delta_log/00000000000000000000.json", 0.0),  # table created
    "committed": ("predictions/_delta_log/00000000000000000001.json", 0.0),  # rows committed
}


def kill_when(process: subprocess.Popen, output: Path, pattern: str, delay: float) -> None:
    deadline = time.monotonic() + 300
    while not any(output.glob(pattern)):
        assert process.poll() is None, f"the run ended before {pattern} appeared"
        assert time.monotonic() < deadline, f"{pattern} never appeared"
        time.sleep(0.005)
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(60) == -signal.SIGKILL


@pytest.mark.slow
def test_kill_9_at_any_stage_then_rerun_gives_one_row_per_image_and_the_same_labels(
    prefect_server, sample_images, tmp_path, start
):
    source = copy_images(sample_images, tmp_path / "source", KILL_IMAGES, 25)
    reruns = {}
    for point, (pattern, delay) in KILL_POINTS.items():
        output = tmp_path / point
        command = label_command(source, output, *KILL_ARGS)
        kill_when(start(command, prefect_server, tmp_path / f"{point}-killed.log"), output,
                  pattern, delay)  # fmt: skip
        # The kill hit what it meant to hit.
        if point == "embedding":
            assert 0 < len(list(output.glob(pattern))) < KILL_IMAGES // 2
        if point == "learning":
            assert not any(output.glob("proxies/*.parquet"))
        if point in ("embedding", "learning"):
            assert not (output / "predictions").exists()
        if point == "committed":
            assert read_delta(output / "predictions").height == KILL_IMAGES
        # Rerun at once: it waits for the killed run's lease to expire (--lease-ttl), then takes
        # it over. The reruns wait side by side, so the test waits about LEASE_TTL seconds once.
        log = tmp_path / f"{point}-rerun.log"
        command = label_command(source, output, *KILL_ARGS, "--lease-wait", "240")
        reruns[point] = (start(command, prefect_server, log), log)

    reference = tmp_path / "uninterrupted"
    log = tmp_path / "uninterrupted.log"
    code, text = finish(start(label_command(source, reference, *KILL_ARGS), prefect_server, log),
                        log)  # fmt: skip
    assert code == 0, text[-4000:]
    expected = labels_of(read_delta(reference / "predictions"))
    assert len(expected) == KILL_IMAGES

    for point, (process, log) in reruns.items():
        code, text = finish(process, log)
        assert code == 0, f"{point}: {text[-4000:]}"
        output = tmp_path / point
        # It waited for the killed run's lease (or found it lapsed) and took it over: only then is
        # the dead holder recorded as interrupted.
        runs = read_delta(output / "runs")
        assert sorted(runs["status"]) == ["completed", "interrupted"], f"{point}: {runs}"
        predictions = read_delta(output / "predictions")
        assert predictions.height == KILL_IMAGES and one_row_per_image(predictions), point
        assert labels_of(predictions) == expected, point
        uris = embedded_uris(output)
        assert sorted(uris) == sorted(expected), f"{point}: an image embedded twice or never"
        assert not live_leases(output), f"{point}: the rerun left its lease behind"


# --- two runs on one output at once --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("lease_wait", [0, 300], ids=["no-wait", "waits"])
def test_two_overlapping_runs_on_one_output_label_and_embed_each_image_once(
    lease_wait, prefect_server, sample_images, tmp_path, start
):
    source = copy_images(sample_images, tmp_path / "source", 20, 40)
    output = tmp_path / "out"
    args = ["--shard-size", "2", "--iters", "50", "--lease-wait", str(lease_wait)]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    # The overlap is made certain, not left to timing: the first run is frozen (SIGSTOP) while it
    # holds the lease, the second starts, meets the lease (waits, or gives up), and only then does
    # the first go on. On a quick machine the first otherwise finished before the second began.
    first = start(label_command(source, output, *args), prefect_server, logs[0])
    wait_for(lambda: holds_lease(output) or first.poll() is not None, 300, logs[0])
    assert first.poll() is None, logs[0].read_text()[-4000:]
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        second = start(label_command(source, output, *args), prefect_server, logs[1])
        wait_for(lambda: "is in use by" in logs[1].read_text() or second.poll() is not None, 300,
                 logs[1])  # fmt: skip
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    results = [finish(run, log) for run, log in zip((first, second), logs, strict=True)]

    codes = sorted(code for code, _ in results)
    assert codes == ([0, 0] if lease_wait else [0, 1]), results
    # The later one found the lease held: waited for it, or gave up at once naming the holder.
    loser = [text for code, text in results if code or "is in use by" in text]
    assert len(loser) == 1 and "is in use by run" in loser[0], results
    if not lease_wait:
        assert loser[0].strip().splitlines()[-1].startswith("inmap: error: output ")
        assert "Traceback" not in loser[0]  # an expected condition reads as one line
    predictions = read_delta(output / "predictions")
    assert predictions.height == 20 and one_row_per_image(predictions)
    uris = embedded_uris(output)
    assert len(uris) == len(set(uris)) == 20  # no image embedded twice
    index = read_delta(next(output.glob("embeddings/*/_index")))
    assert index.height == index["uri"].n_unique() == 20


# --- a commit whose response was lost ------------------------------------------------------------


def prediction_rows(job, count: int) -> pa.Table:
    from inmap.schemas import PREDICTIONS_SCHEMA

    now = datetime.now(timezone.utc)
    return pa.Table.from_pylist(
        [
            {
                "uri": f"{job.source}/image-{n:03d}.jpg",
                "etag": f"etag-{n}",
                "label": "dog",
                "class_id": 0,
                "run_id": job.run_id,
                "predicted_at": now,
                "labelset": job.labelset,
            }
            for n in range(count)
        ],
        schema=PREDICTIONS_SCHEMA,
    )


def lose_first_response(monkeypatch) -> list[dict]:
    """The first MERGE commits, then its caller sees a reset connection instead of the answer."""
    from deltalake.table import TableMerger

    real, applied = TableMerger.execute, []

    def execute(self):
        metrics = real(self)
        if not applied:
            applied.append(metrics)
            raise OSError("connection reset by peer")
        return metrics

    monkeypatch.setattr(TableMerger, "execute", execute)
    return applied


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_commit_retried_after_its_response_was_lost_adds_no_duplicate(
    store, tmp_path, monkeypatch, request
):
    from inmap.job import Job
    from inmap.model import resolve_model
    from inmap.prediction import commit_id, commit_predictions

    options: dict = {}
    output = str(tmp_path / "out")
    if store == "s3":
        request.getfixturevalue("s3_credentials_in_env")
        options = request.getfixturevalue("s3_endpoint_options")
        output = f"{request.getfixturevalue('s3_root')}/out"
    job = Job(
        source="s3://drops/2026-11-28",
        output=output,
        model=resolve_model("inmap-tiny", None, "cpu"),
        classes=("dog", "cat"),
        run_id="run-1",
        settings=RunOptions(storage_options=options),
    )
    rows = prediction_rows(job, 12)
    applied = lose_first_response(monkeypatch)

    commit_predictions([rows.slice(0, 5), rows.slice(5)], job)  # retried inside: no error
    assert applied and applied[0]["num_target_rows_inserted"] == 12  # the lost try did commit
    table = f"{output}/predictions"
    predictions = read_delta(table, options)
    assert predictions.height == 12 and one_row_per_image(predictions)
    version = tables.open_table(table, options).version()

    # Prefect retrying the whole task: the run's app transaction id is in the log, so even rows
    # the table lacks are not inserted (the keys alone would let these two in).
    assert tables.committed(table, commit_id(job), options)
    assert commit_predictions([prediction_rows(job, 14)], job) == 0
    assert tables.open_table(table, options).version() == version
    assert read_delta(table, options).height == 12


def test_an_insert_retried_after_its_response_was_lost_inserts_no_key_twice(tmp_path, monkeypatch):
    rows = pa.table({"uri": [f"u{n}" for n in range(6)], "etag": ["e"] * 6, "n": list(range(6))})
    applied = lose_first_response(monkeypatch)
    url = str(tmp_path / "table")
    # No app id: only the MERGE on the keys stands between a retry and duplicates.
    tables.insert_new(url, rows, ["uri", "etag"], app_id=None)  # retried inside: no error
    assert applied[0]["num_target_rows_inserted"] == 6
    assert tables.insert_new(url, rows, ["uri", "etag"]) == 0
    assert sorted(tables.read(url)["uri"].to_pylist()) == rows["uri"].to_pylist()


# --- output paths refused up front ---------------------------------------------------------------


def test_an_output_holding_a_percent_escape_is_refused_in_one_line_before_any_work(
    image_folder, tmp_path
):
    output = tmp_path / "out%41"
    # A Prefect server that does not exist: reaching for it would fail differently.
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    result = subprocess.run(
        label_command(image_folder, output),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("inmap: error: output "), result.stderr
    assert "%" in lines[0] and result.stdout == ""
    assert sorted(os.listdir(tmp_path)) == [image_folder.name]  # nothing written: not out%41,
    # nor outA (what delta-rs would have decoded it to)


# --- broken cache files --------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(
    "kept_bytes, undecodable",
    [
        pytest.param(0, False, id="empty"),
        pytest.param(100, False, id="torn"),
        # The shard's chunk also held two images that do not decode (no rows in the shard): the
        # rerun plans the shard's images without them, so under another shard id.
        pytest.param(
            100,
            True,
            id="torn-beside-undecodable-images",
        ),
    ],
)
def test_a_broken_embedding_shard_is_moved_aside_and_only_its_images_embedded_again(
    kept_bytes, undecodable, sample_images, tmp_path
):
    source = copy_images(sample_images, tmp_path / "source", 12, 50)
    if undecodable:  # sorted last, with the last two images: the third chunk of 5
        (source / "zz-empty.jpg").write_bytes(b"")
        (source / "zz-text.jpg").write_text("not an image")
    output = tmp_path / "out"
    run_flow(source, output, shard_size=5)
    before = sorted(embedded_uris(output))
    broken = min(output.glob("embeddings/*/*.parquet"), key=lambda p: pq.read_metadata(p).num_rows)
    its_images = pq.read_table(broken, columns=["uri"])["uri"].to_pylist()
    assert len(its_images) == 2
    content = broken.read_bytes()
    broken.write_bytes(content[:kept_bytes])

    [summary] = run_flow(source, output, shard_size=5)
    assert (summary.embedded, summary.cached, summary.predicted) == (2, 10, 0)
    [aside] = [p for p in broken.parent.iterdir() if p.name.startswith(f"{broken.name}.broken-")]
    assert aside.read_bytes() == content[:kept_bytes]
    assert sorted(embedded_uris(output)) == before  # each image in one readable shard, once
    predictions = read_delta(output / "predictions")  # every image keeps its one prediction
    assert predictions.height == 12 and one_row_per_image(predictions)


# --- odd paths -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_odd_local_paths_label_every_image_and_every_reader_reads_them(image_folder, tmp_path):
    source = tmp_path / "in [a]"
    shutil.copytree(image_folder, source)
    output = tmp_path / "out[1] #x?"
    [summary] = run_flow(source, output)
    assert summary.predicted == 12
    table = str(output / "predictions")
    # polars' own reader cannot: it reads `out[1]%20%23x%3F/...` (percent-escaped, never decoded)
    # and fails with FileNotFoundError; with use_pyarrow=True it reads through delta-rs.
    predictions = pl.read_delta(table, use_pyarrow=True)
    assert predictions.height == 12 and one_row_per_image(predictions)
    assert predictions["uri"].str.starts_with(f"{source}/").all()
    assert len(DeltaTable(table).to_pandas()) == 12


@pytest.mark.usefixtures("prefect_harness")
def test_odd_s3_prefixes_label_every_image_and_every_reader_reads_them(
    s3_bucket, s3_endpoint_options, s3_credentials_in_env, sample_images
):
    import s3fs

    # Brackets, a space and a star; `#` and `?` break delta-rs's URLs: see the test below.
    prefix = f"s3://{s3_bucket}/[a] *"
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_endpoint_options)
    for path in sample_images[::100][:6]:
        fs.pipe_file(f"{prefix}/src/{path.name}", path.read_bytes())
    [summary] = run_flow(f"{prefix}/src", f"{prefix}/out", storage_options=s3_endpoint_options)
    assert summary.predicted == 6
    table = f"{prefix}/out/predictions"
    options = tables.delta_options(s3_endpoint_options)
    # As for local paths, polars' own reader fails (it asks for `[a]%2520*/...`: NoSuchKey);
    # use_pyarrow=True reads through delta-rs.
    predictions = pl.read_delta(table, storage_options=options, use_pyarrow=True)
    assert predictions.height == 6 and one_row_per_image(predictions)
    assert predictions["uri"].str.starts_with(f"{prefix}/src/").all()
    assert len(DeltaTable(table, storage_options=options).to_pandas()) == 6


def test_delta_tables_under_an_s3_prefix_holding_hash_and_question_mark_stay_apart(
    s3_root, s3_endpoint_options, s3_credentials_in_env
):
    output = f"{s3_root}/[a] #?/out"
    for name in ("predictions", "runs"):
        tables.append(f"{output}/{name}", pa.table({"name": [name]}), s3_endpoint_options,
                      app_id=None)  # fmt: skip
    for name in ("predictions", "runs"):
        read = tables.read(f"{output}/{name}", s3_endpoint_options)
        assert read["name"].to_pylist() == [name]


def test_an_s3_output_holding_a_percent_escape_is_refused_too():
    from inmap.errors import OutputPathError
    from inmap.tables import check_table_path

    with pytest.raises(OutputPathError, match="%"):
        check_table_path("s3://bucket/out%41")


# --- the lease ------------------------------------------------------------------------------------


def test_taking_over_a_killed_runs_lease_clears_the_expired_one_away(tmp_path):
    from inmap import lease

    folder = tmp_path / "out" / "_lease"
    folder.mkdir(parents=True)
    # What a run killed with SIGKILL leaves: its generation, never released, now expired.
    killed = {"run_id": "killed", "host": "h", "pid": 1, "started": 0.0, "expires": 1.0}
    (folder / "000000000001.json").write_text(json.dumps(killed))
    with lease.acquire(str(tmp_path / "out"), "rerun", wait=0) as held:
        assert held.url.endswith("000000000002.json")
        assert os.listdir(folder) == ["000000000002.json"]  # the expired one cleared away
    # Released, the lease stays as a record that has expired: generation numbers only grow.
    assert os.listdir(folder) == ["000000000002.json"]
    assert json.loads((folder / "000000000002.json").read_text())["expires"] == 0.0


# --- S3 faults (FaultProxy in front of moto) -----------------------------------------------------

S3_IMAGES = 12


@pytest.fixture(scope="module")
def s3_drop(moto_endpoint, sample_images, prefect_harness):
    """A bucket with 12 images under src/, labelled once without faults under clean/: (bucket,
    uri -> labels, uri -> embedding)."""
    import uuid

    import s3fs

    with pytest.MonkeyPatch.context() as env:  # keys from the environment, as in every S3 test
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        s3fs.S3FileSystem.clear_instance_cache()
        bucket = f"faults-{uuid.uuid4().hex[:12]}"
        fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=moto_endpoint)
        fs.mkdir(bucket)
        for path in sample_images[7::80][:S3_IMAGES]:
            fs.pipe_file(f"{bucket}/src/{path.name}", path.read_bytes())
        [summary] = run_flow(f"s3://{bucket}/src", f"s3://{bucket}/clean",
                             storage_options={"endpoint_url": moto_endpoint})  # fmt: skip
        assert summary.predicted == S3_IMAGES
        return bucket, *s3_outputs(f"s3://{bucket}/clean", moto_endpoint)


def s3_outputs(output: str, endpoint: str) -> tuple[dict, dict]:
    """(uri -> labels, uri -> embedding) of an output, read straight from moto; checks that the
    predictions hold one row per image, and the shards each image once."""
    import s3fs

    predictions = read_delta(f"{output}/predictions", {"endpoint_url": endpoint})
    assert one_row_per_image(predictions)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=endpoint)
    embeddings: dict[str, np.ndarray] = {}
    for shard in fs.glob(f"{output.removeprefix('s3://')}/embeddings/*/*.parquet"):
        with fs.open(shard, "rb") as f:
            table = pq.read_table(f, columns=["uri", "embedding"])
        for uri, vector in zip(
            table["uri"].to_pylist(), table["embedding"].to_pylist(), strict=True
        ):
            assert uri not in embeddings, f"{uri} embedded twice"
            embeddings[uri] = np.asarray(vector, np.float32)
    return labels_of(predictions), embeddings


def assert_same_outputs(output: str, endpoint: str, expected_labels, expected_embeddings) -> None:
    labels, embeddings = s3_outputs(output, endpoint)
    assert labels == expected_labels
    assert embeddings.keys() == expected_embeddings.keys()
    for uri, vector in embeddings.items():
        np.testing.assert_allclose(vector, expected_embeddings[uri], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_random_s3_faults_on_every_request_change_no_output(
    s3_drop, moto_endpoint, s3_credentials_in_env
):
    bucket, labels, embeddings = s3_drop
    output = f"s3://{bucket}/faulty"
    with FaultProxy(upstream=moto_endpoint) as proxy:
        proxy.seed(7)
        proxy.error_rate = 0.1  # 503 SlowDown or a reset, on reads, writes, lists and commits
        [summary] = run_flow(f"s3://{bucket}/src", output,
                             storage_options={"endpoint_url": proxy.url})  # fmt: skip
        assert proxy.faults > 0
    assert summary.predicted == S3_IMAGES
    assert_same_outputs(output, moto_endpoint, labels, embeddings)


class SourceOutage:
    """FaultProxy.fault_paths: every request for an object under `prefix` fails for `seconds`,
    from the first one on (with error_rate 1)."""

    def __init__(self, prefix: str, seconds: float) -> None:
        self.prefix, self.seconds = prefix, seconds
        self.started: float | None = None
        self.failed = 0

    def __call__(self, path: str) -> bool:
        if not path.startswith(self.prefix):
            return False
        if self.started is None:
            self.started = time.monotonic()
        failing = time.monotonic() - self.started < self.seconds
        self.failed += failing
        return failing


@pytest.mark.slow
@pytest.mark.parametrize(
    "retry_seconds, outage_seconds, kinds",
    [
        pytest.param(1.0, 5.0, FAULT_KINDS, id="retry-1s-outage-5s"),
        pytest.param(30.0, 5.0, FAULT_KINDS, id="retry-30s-outage-5s"),
        # An outage that outlasts every retry, whatever they add up to: the run must fail whole.
        pytest.param(1.0, 30.0, ("reset",), id="retry-1s-outage-30s"),
    ],
)
def test_an_outage_of_image_reads_labels_every_image_or_commits_nothing(
    retry_seconds, outage_seconds, kinds, s3_drop, moto_endpoint, s3_credentials_in_env
):
    bucket, labels, embeddings = s3_drop
    source = f"s3://{bucket}/src"
    output = f"s3://{bucket}/outage-{int(retry_seconds)}-{int(outage_seconds)}"
    outage = SourceOutage(f"/{bucket}/src/", seconds=outage_seconds)
    with FaultProxy(upstream=moto_endpoint) as proxy:
        proxy.fault_paths, proxy.fault_kinds, proxy.error_rate = outage, kinds, 1.0
        options = {"endpoint_url": proxy.url}
        if retry_seconds > outage_seconds:  # the reads outlast the outage
            [summary] = run_flow(source, output, storage_options=options,
                                 read_retry_seconds=retry_seconds)  # fmt: skip
            assert summary.predicted == S3_IMAGES
        else:
            with pytest.raises(UnreadableImagesError):
                run_flow(source, output, storage_options=options, read_retry_seconds=retry_seconds)
            assert tables.open_table(f"{output}/predictions", options) is None
            proxy.error_rate = 0.0  # the outage is over
            [rerun] = run_flow(source, output, storage_options=options)
            assert rerun.predicted == S3_IMAGES and rerun.embedded > 0
        assert outage.failed > 0
    assert_same_outputs(output, moto_endpoint, labels, embeddings)
    errors = tables.read(f"{output}/errors", {"endpoint_url": moto_endpoint})
    assert errors is None or "read" not in errors["stage"].to_pylist()  # cleared once read
