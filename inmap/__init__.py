"""inmap: label images in object storage with CLIP and InMaP vision proxies.

import inmap
proxy = inmap.learn_vision_proxy(image_features, text_proxy)
prediction = inmap.predict(image_features, proxy)
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("inmap")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# The public API, imported on first use so that `import inmap.storage` does not load torch.
_EXPORTS = {
    "FitOptions": "inmap.config",
    "Prediction": "inmap.proxy",
    "ProxyConfig": "inmap.config",
    "ProxyFit": "inmap.proxy",
    "fit_vision_proxy": "inmap.proxy",
    "learn_vision_proxy": "inmap.proxy",
    "predict": "inmap.proxy",
    "TEMPLATES": "inmap.text",
    "text_proxy": "inmap.text",
    "unknown_scores": "inmap.openset",
    "unknown_threshold": "inmap.openset",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'inmap' has no attribute {name!r}")
