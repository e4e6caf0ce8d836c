"""Devices are decided where the model runs: a job for Dask workers keeps "auto" undecided, and
the process that loads the model resolves it for itself and records it in every shard.
(tests/test_cluster.py runs it on real workers, from a client that claims a GPU it lacks.)"""

from __future__ import annotations

import socket

import pytest
import torch

from inmap import encoder as encoder_module
from inmap.errors import InputError
from inmap.model import TINY_MODEL, resolve_model


@pytest.fixture
def fresh_encoders():
    encoder_module._load_encoder.cache_clear()
    encoder_module._loaded.clear()
    yield
    encoder_module._load_encoder.cache_clear()
    encoder_module._loaded.clear()


def test_a_job_for_workers_leaves_the_device_to_them(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_model(TINY_MODEL, None, "auto", device_here=False).device is None
    assert resolve_model(TINY_MODEL, None, "cuda:1", device_here=False).device == "cuda:1"
    with pytest.raises(InputError, match="CUDA is not available"):
        resolve_model(TINY_MODEL, None, "cuda", device_here=True)
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        resolve_model(TINY_MODEL, None, "gpu0", device_here=False)


def test_the_loading_process_resolves_auto_and_records_it(monkeypatch, fresh_encoders):
    spec = resolve_model(TINY_MODEL, None, "auto", device_here=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this "worker" has no GPU
    loaded = encoder_module.load_encoder(spec)
    assert loaded.device == torch.device("cpu")
    metadata = loaded.metadata()
    assert metadata["device"] == "cpu" and metadata["host"] == socket.gethostname()


def test_cuda_is_refused_by_a_loading_process_without_it(monkeypatch, fresh_encoders):
    spec = resolve_model(TINY_MODEL, None, "cuda", device_here=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match=f"CUDA is not available on {socket.gethostname()}"):
        encoder_module.load_encoder(spec)
    # Planning needs only how images are fed, which does not depend on the device.
    assert encoder_module.preprocessing_id(spec) == encoder_module.preprocessing_id(
        resolve_model(TINY_MODEL, None, "cpu")
    )
