"""Shared fixtures: the real data in ../shared/data, located from the repository root."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEV_FEATURES = SHARED_DATA / "clip-vitb32-imagenet500.npz"
SAMPLE_IMAGES = SHARED_DATA / "imagenet-sample"


@pytest.fixture(scope="session")
def dev_set() -> dict[str, np.ndarray]:
    """Real CLIP ViT-B/32 ImageNet features: image_features, labels, text_proxy, classnames."""
    assert DEV_FEATURES.exists(), f"real dev features not found at {DEV_FEATURES}"
    with np.load(DEV_FEATURES, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    """The 1000 real ImageNet JPEGs, sorted by name."""
    assert SAMPLE_IMAGES.exists(), f"sample images not found at {SAMPLE_IMAGES}"
    return sorted(SAMPLE_IMAGES.glob("*.JPEG"))
