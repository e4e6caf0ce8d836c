"""Settings that need no heavy imports (so `inmap --help` is quick): the default model, the
method's hyper-parameters and how a fit runs."""

from __future__ import annotations

from dataclasses import dataclass

# The paper's features and our dev set are OpenAI CLIP ViT-B/32, downloaded through the Hugging
# Face cache on first use; see the README ("Offline?") for local checkpoints.
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"

PRECISIONS = ("float32", "tf32", "bf16")
# The pseudo-label refinements a run can choose (inmap.proxy.PSEUDO_LABELERS implements them).
REFINEMENTS = ("adaptive", "sinkhorn", "none")

# The run lease on an output (inmap.lease): how long a lease lives past its last renewal (how soon
# a killed run is taken over), and how long a second run waits for the holder.
LEASE_TTL = 90.0
LEASE_WAIT = 300.0


@dataclass(frozen=True)
class ProxyConfig:
    """The method's hyper-parameters (paper defaults, but `refine`): they define the proxy."""

    tau_t: float = 0.01  # temperature of the zero-shot pseudo-labels
    tau_i: float = 0.04  # temperature of the image-to-vision-proxy softmax
    alpha: float = 0.6  # pseudo-labels more confident than this become one-hot
    gamma: float = 0.0  # Sinkhorn class marginal ∝ (pseudo-label mass)^γ; 0 = uniform
    lr: float = 10.0
    iters: int = 2000
    sinkhorn_iters: int = 20
    # A name in PSEUDO_LABELERS: "adaptive" is Sinkhorn on balanced drops and never forces a
    # uniform class marginal on skewed ones; "sinkhorn" is the paper's exact method.
    refine: str = "adaptive"

    def __post_init__(self) -> None:
        for name in ("tau_t", "tau_i", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ProxyConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "iters", "sinkhorn_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"ProxyConfig.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class FitOptions:
    """How a fit runs. None of these define the proxy: `device` and `memory_budget` do not change
    it, `tol` stops only once W can no longer move by `tol`, and `precision` changes only rounding
    ("float32" matches a float64 implementation; "tf32" (CUDA) and "bf16" are faster on GPUs)."""

    device: str | None = None  # None: CUDA when available, else CPU
    precision: str = "float32"  # "float32" | "tf32" | "bf16"
    memory_budget: int = 1 << 30  # bytes of float32 embeddings to keep rather than re-read
    tol: float = 1e-4  # stop once W can move less than this (radians) in the remaining steps

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"FitOptions.precision must be one of {PRECISIONS}")
        for name in ("memory_budget", "tol"):
            if getattr(self, name) < 0:
                raise ValueError(f"FitOptions.{name} must be >= 0, got {getattr(self, name)}")
