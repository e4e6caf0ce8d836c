"""Pseudo-label refinement that does not assume a balanced image drop.

The paper's Sinkhorn step makes every class equally common among the pseudo-labels. That is right
for a balanced benchmark and wrong for a real drop, where many classes are absent and a few are
common. `refine="adaptive"` (inmap.proxy) first asks the data, with `decide`, which of three cases
it is in:

1. **Balanced.** The class counts, estimated from the zero-shot posteriors net of their noise, are
   nearly equal. Then it is the paper's Sinkhorn, unchanged.
2. **Skewed, with evidence.** The other images of the drop predict an image's class clearly better
   than a uniform prior does (a leave-one-out test). Then each image's zero-shot posterior is
   reweighted by a class prior estimated from the *other* images (empirical Bayes, Dirichlet
   smoothing). The prior strength is the most cautious one that keeps half the leave-one-out gain.
3. **Neither.** The pseudo-labels stay the zero-shot ones (InMaP without Sinkhorn), so the result
   stays close to zero-shot rather than paying for a wrong guess of the class marginal.

Shapes: n images, C classes. `P` is the zero-shot posterior softmax(X Tᵀ / τ_t), (n, C). This
module holds the statistics only; inmap.proxy acts on the decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# A drop counts as balanced when its class counts, after removing what zero-shot noise explains,
# have a squared coefficient of variation below this: a standard deviation under about 22% of the
# mean count.
# (A scale-free test: a classifier's own bias towards some classes grows with the counts, and
# must not make a large balanced set look skewed.)
BALANCED_VARIATION = 0.05
# The class prior is used only when the other images predict an image's class at least this much
# better (mean log-likelihood ratio in nats, leave-one-out) than a uniform prior does.
MIN_PRIOR_GAIN = 0.2
# Candidate Dirichlet pseudo-counts per class for the prior, from most to least trust in counts.
PRIOR_STRENGTHS = tuple(10.0 ** (e / 2) for e in range(-4, 5))  # 0.01 ... 100


@dataclass(frozen=True)
class RefineDecision:
    """What `refine="adaptive"` decided for one drop, and the statistics it decided on."""

    branch: str  # "balanced" (Sinkhorn), "prior" (empirical-Bayes prior) or "zero-shot"
    count_variation: float  # squared coefficient of variation of the class counts
    prior_gain: float  # best leave-one-out gain over a uniform prior, nats per image
    prior_strength: float | None  # Dirichlet pseudo-count per class, for branch "prior"

    def describe(self) -> str:
        strength = f", prior strength {self.prior_strength:g}" if self.prior_strength else ""
        return (
            f"{self.branch} (class-count variation {self.count_variation:.3f}, leave-one-out "
            f"gain {self.prior_gain:.3f} nats/image{strength})"
        )


def class_count_variation(posteriors: torch.Tensor) -> float:
    """Squared coefficient of variation of the true class counts, estimated from the zero-shot
    soft counts minus the variance zero-shot noise adds. 0 for equal counts; f / (1 - f) when a
    share f of the classes is absent and the others are equal; 1 / (n/C) for classes drawn at
    random."""
    n, c = posteriors.shape
    mass = posteriors.sum(0)  # (C,) soft class counts
    squares = torch.linalg.vector_norm(posteriors).square()
    noise = (n - squares) / c  # mean over classes of sum_i p_ik (1 - p_ik)
    return float((mass.var() - noise).clamp_min(0) / (n / c) ** 2)


def _others_mass(posteriors: torch.Tensor) -> torch.Tensor:
    """(n,) sum_k p_ik * (soft count of class k among the other images)."""
    mass = posteriors.sum(0)
    return posteriors @ mass - torch.linalg.vector_norm(posteriors, dim=1).square()


def leave_one_out_gain(posteriors: torch.Tensor, strength: float) -> float:
    """Mean log-likelihood ratio (nats per image) of the prior estimated from the other images,
    Dirichlet-smoothed with `strength` pseudo-counts per class, against a uniform prior.

    Since P is proportional to the class likelihoods, image i's evidence under a prior q is
    sum_k p_ik q_k, and under the uniform prior 1/C."""
    return _gain(_others_mass(posteriors), *posteriors.shape, strength)


def _gain(others_mass: torch.Tensor, n: int, c: int, strength: float) -> float:
    evidence = (strength + others_mass) / (c * strength + n - 1)
    return float(torch.log(evidence.clamp_min(1e-30) * c).mean())


def prior_posteriors(posteriors: torch.Tensor, strength: float) -> torch.Tensor:
    """Each image's posterior under the class prior estimated from the other images:
    r_ik ∝ p_ik (strength + sum_{j≠i} p_jk). (n, C), rows sum to 1."""
    refined = strength + posteriors.sum(0) - posteriors  # (n, C) leave-one-out soft counts
    refined.mul_(posteriors)  # in place: one (n, C) matrix besides the input
    return refined.div_(refined.sum(1, keepdim=True))


def decide(posteriors: torch.Tensor) -> RefineDecision:
    """Choose the branch of `refine="adaptive"` for the zero-shot posteriors of one drop."""
    n, c = posteriors.shape
    variation = class_count_variation(posteriors)
    others_mass = _others_mass(posteriors)
    gains = [_gain(others_mass, n, c, strength) for strength in PRIOR_STRENGTHS]
    best = max(gains)
    # Equal counts are impossible with fewer images than classes.
    if n >= c and variation <= BALANCED_VARIATION:
        return RefineDecision("balanced", variation, best, None)
    if best < MIN_PRIOR_GAIN:
        return RefineDecision("zero-shot", variation, best, None)
    # The weakest prior (most pseudo-counts) that keeps half the best gain: the likelihood-best
    # prior over-trusts counts of one or two images and pulls single images into larger classes.
    strength = max(s for s, g in zip(PRIOR_STRENGTHS, gains, strict=True) if g >= best / 2)
    return RefineDecision("prior", variation, best, strength)


def disagreement_warning(
    zero_shot_ids: np.ndarray | torch.Tensor,
    zero_shot_scores: np.ndarray | torch.Tensor,
    proxy_ids: np.ndarray | torch.Tensor,
    *,
    confidence: float = 0.9,
    max_share: float = 0.05,
) -> str | None:
    """A warning when the learned proxy overrules zero-shot on too many images that zero-shot is
    sure about, else None.

    zero_shot_scores are zero-shot probabilities softmax(X Tᵀ / τ_t) at the pseudo-label
    temperature τ_t = 0.01. There, zero-shot is right on about 96% of the images scoring 0.9 or
    more (CLIP ViT-B/32, ImageNet dev set). On that set the paper's InMaP (300 iterations) changes
    0.1% of those labels on the balanced set, where it helps, and 6-14% of them on the skewed
    drops of inmap.evaluate (83% on five classes), where its uniform class marginal hurts;
    refine="adaptive" changes none. `max_share` = 5% sits between.
    """
    zero_shot_ids = np.asarray(zero_shot_ids).reshape(-1)
    zero_shot_scores = np.asarray(zero_shot_scores, dtype=np.float64).reshape(-1)
    proxy_ids = np.asarray(proxy_ids).reshape(-1)
    if not len(zero_shot_ids) == len(zero_shot_scores) == len(proxy_ids):
        raise ValueError(
            f"zero_shot_ids, zero_shot_scores and proxy_ids differ in length "
            f"({len(zero_shot_ids)}, {len(zero_shot_scores)}, {len(proxy_ids)})"
        )
    confident = zero_shot_scores >= confidence
    n_confident = int(confident.sum())
    if n_confident == 0:
        return None
    changed = int((zero_shot_ids[confident] != proxy_ids[confident]).sum())
    share = changed / n_confident
    if share <= max_share:
        return None
    return (
        f"the vision proxy changed the zero-shot label of {changed} of {n_confident} images "
        f"({share:.0%}) that zero-shot scores {confidence:g} or more; above {max_share:.0%} this "
        f"usually means the pseudo-labels assumed a wrong class balance. Check the predicted class "
        f"histogram against the zero-shot one, or rerun with refine='adaptive' or refine='none'."
    )


__all__ = [
    "BALANCED_VARIATION",
    "MIN_PRIOR_GAIN",
    "PRIOR_STRENGTHS",
    "RefineDecision",
    "class_count_variation",
    "decide",
    "disagreement_warning",
    "leave_one_out_gain",
    "prior_posteriors",
]
