"""The real deployment path: a Prefect server, `python -m deployments.serve`, and
`prefect deployment run inmap/label-bucket --watch`, over a moto S3 bucket."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
import s3fs

from tests.conftest import REPO_ROOT, one_row_per_image, read_delta, wait_for

pytestmark = pytest.mark.slow


def test_deployment_run_labels_the_bucket(
    prefect_server, s3_bucket, s3_storage_options, s3_endpoint_options, real_images, tmp_path
):
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options)
    for path in real_images[:6]:
        fs.pipe(f"{s3_bucket}/incoming/{path.name}", path.read_bytes())
    fs.pipe(f"{s3_bucket}/incoming/broken.jpg", real_images[0].read_bytes()[:1000])
    fs.pipe(f"{s3_bucket}/classes.txt", b"fish\nbird\nreptile\n")

    # The serving process has the credentials; the run's parameters never do.
    env = {**prefect_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    serve_log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "deployments.serve", "--cron", ""],
        cwd=REPO_ROOT,
        env=env,
        stdout=serve_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    params = {
        "source": f"s3://{s3_bucket}/incoming",
        "classes": f"s3://{s3_bucket}/classes.txt",
        "output": f"s3://{s3_bucket}/inmap",
        "model": "inmap-tiny",
        "pretrained": None,
        "device": "cpu",
        "storage_options": s3_endpoint_options,  # the keys are in the serving process's env
    }
    try:
        api = prefect_server["PREFECT_API_URL"]

        def deployments_registered() -> bool:
            request = urllib.request.Request(
                f"{api}/deployments/filter",
                data=b"{}",
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                names = {d["name"] for d in json.load(response)}
            return {"label-bucket", "backfill", "maintain"} <= names

        wait_for(deployments_registered, 120, "deployments to be served", serve)

        def run_deployment() -> subprocess.CompletedProcess:
            return subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "deployment",
                    "run",
                    "inmap/label-bucket",
                    "--params",
                    json.dumps(params),
                    "--watch",
                ],
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=400,
            )

        first = run_deployment()
        assert first.returncode == 0, first.stdout + first.stderr
        output = params["output"]
        predictions = read_delta(f"{output}/predictions", s3_endpoint_options)
        assert predictions.height == 6 and one_row_per_image(predictions)
        errors = read_delta(f"{output}/errors", s3_endpoint_options)
        assert [uri.rsplit("/", 1)[1] for uri in errors["uri"].to_list()] == ["broken.jpg"]

        second = run_deployment()
        assert second.returncode == 0, second.stdout + second.stderr
        runs = read_delta(f"{output}/runs", s3_endpoint_options).sort("started_at")
        assert runs["embedded"].to_list() == [6, 0] and runs["cached"].to_list() == [0, 6]
        assert runs["status"].to_list() == ["completed", "completed"]
    finally:
        serve.terminate()
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()
        serve_log.close()
