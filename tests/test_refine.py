"""refine="adaptive": Sinkhorn on balanced drops, a class prior on skewed ones, and the warning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inmap.evaluate import make_drop
from inmap.proxy import PSEUDO_LABELERS, ProxyConfig, fit_vision_proxy
from inmap.refine import (
    class_count_variation,
    decide,
    disagreement_warning,
    leave_one_out_gain,
    prior_posteriors,
)

CONFIG = ProxyConfig()


@pytest.fixture(scope="module")
def dev(dev_set):
    features = torch.from_numpy(dev_set["image_features"].astype(np.float32))
    text = torch.nn.functional.normalize(
        torch.from_numpy(dev_set["text_proxy"].astype(np.float32)), dim=1
    )
    return features, text, dev_set["labels"]


def pseudo_labels(logits: torch.Tensor, refine: str) -> torch.Tensor:
    return PSEUDO_LABELERS[refine](logits, CONFIG)


def top1(labels_or_scores, truth) -> float:
    ids = labels_or_scores.argmax(1) if labels_or_scores.ndim == 2 else labels_or_scores
    return 100.0 * float((np.asarray(ids) == truth).mean())


def test_adaptive_is_registered_as_a_refinement():
    assert "adaptive" in PSEUDO_LABELERS
    assert "sinkhorn" in PSEUDO_LABELERS  # the paper's method stays available


def test_count_variation_is_zero_for_equal_counts_and_large_for_one_class():
    equal = torch.eye(10).repeat(3, 1)  # 30 images, 3 per class, certain
    one_class = torch.zeros(30, 10)
    one_class[:, 4] = 1
    assert class_count_variation(equal) == pytest.approx(0.0, abs=1e-6)
    assert class_count_variation(one_class) > 5
    half_absent = torch.eye(10)[:5].repeat(6, 1)  # 5 of 10 classes, 6 images each: f / (1 - f) = 1
    assert class_count_variation(half_absent) == pytest.approx(1.0, rel=0.15)


def test_prior_of_a_lone_image_is_uniform():
    posteriors = torch.softmax(torch.randn(1, 7), dim=1)
    torch.testing.assert_close(prior_posteriors(posteriors, 0.1), posteriors)


def test_images_of_distinct_classes_give_no_evidence_for_a_prior():
    posteriors = torch.eye(50)[:20] * 0.9 + 0.1 / 50  # 20 images, 20 different classes
    assert all(leave_one_out_gain(posteriors, s) < 0 for s in (0.01, 1.0, 100.0))
    decision = decide(posteriors)
    assert decision.branch == "zero-shot"
    logits = torch.log(posteriors) * CONFIG.tau_t
    torch.testing.assert_close(pseudo_labels(logits, "adaptive"), posteriors)


def effective_classes(pseudo: torch.Tensor) -> float:
    """exp(entropy) of the pseudo-labels' class marginal: how many classes they spread over."""
    marginal = pseudo.sum(0) / pseudo.sum()
    return float(torch.exp(-(marginal * torch.log(marginal.clamp_min(1e-30))).sum()))


def test_single_class_drop_is_not_spread_over_absent_classes(dev):
    features, text, labels = dev
    on_class = {"zero-shot": 0.0, "adaptive": 0.0}
    for class_id in range(0, 500, 50):  # ten classes across the label set
        logits = features[labels == class_id] @ text.T
        zero_shot = torch.softmax(logits / CONFIG.tau_t, dim=1)
        adaptive = pseudo_labels(logits, "adaptive")
        torch.testing.assert_close(adaptive.sum(1), torch.ones(len(logits)))
        assert effective_classes(adaptive) <= effective_classes(zero_shot)
        assert set(adaptive.argmax(1).tolist()) <= set(zero_shot.argmax(1).tolist())
        # Sinkhorn's uniform marginal spreads the same four images over hundreds of classes.
        assert effective_classes(pseudo_labels(logits, "sinkhorn")) > 100
        on_class["zero-shot"] += float(zero_shot[:, class_id].sum())
        on_class["adaptive"] += float(adaptive[:, class_id].sum())
    assert on_class["adaptive"] > on_class["zero-shot"]


def test_single_class_drop_learned_proxy_predicts_no_new_classes(dev):
    features, text, labels = dev
    for class_id in (0, 250, 499):
        x = features[labels == class_id]
        fit = fit_vision_proxy(x, text, ProxyConfig(refine="adaptive", iters=300))
        predicted = (x @ fit.vision_proxy.T).argmax(1)
        zero_shot = (x @ text.T).argmax(1)
        assert set(predicted.tolist()) <= set(zero_shot.tolist()) | {class_id}
        assert top1(predicted.numpy(), class_id) >= top1(zero_shot.numpy(), class_id)
        # The artifact's class marginal is the refinement's: its mass stays on present classes.
        assert fit.class_marginal[class_id] >= 0.5


def test_balanced_set_keeps_most_of_inmaps_gain(dev):
    features, text, labels = dev
    logits = features @ text.T
    assert decide(torch.softmax(logits / CONFIG.tau_t, dim=1)).branch == "balanced"
    zero_shot = top1(logits, labels)
    sinkhorn = top1(pseudo_labels(logits, "sinkhorn"), labels)
    adaptive = top1(pseudo_labels(logits, "adaptive"), labels)
    assert sinkhorn > zero_shot + 2  # the paper's gain on this set is about 3.6 points
    assert adaptive >= sinkhorn - 0.3
    fit = fit_vision_proxy(features, text, ProxyConfig(refine="adaptive", iters=100))
    assert top1(features @ fit.vision_proxy.T, labels) >= zero_shot + 2


def test_issue_example_skewed_drop_is_not_worse_than_zero_shot(dev):
    features, text, labels = dev
    drop = make_drop(labels, "absent", seed=1000)  # 60% of classes present, 1-4 images each
    x, truth = features[drop], labels[drop]
    logits = x @ text.T
    zero_shot = top1(logits, truth)
    assert top1(pseudo_labels(logits, "sinkhorn"), truth) < zero_shot - 5  # the failure to avoid
    assert top1(pseudo_labels(logits, "adaptive"), truth) >= zero_shot - 0.5
    fit = fit_vision_proxy(x, text, ProxyConfig(refine="adaptive", iters=100))
    assert top1(x @ fit.vision_proxy.T, truth) >= zero_shot - 0.5


def test_handful_of_classes_gains_over_zero_shot(dev):
    features, text, labels = dev
    zero_shot, adaptive = [], []
    for seed in range(1000, 1005):
        drop = make_drop(labels, "handful", seed)
        logits = features[drop] @ text.T
        zero_shot.append(top1(logits, labels[drop]))
        adaptive.append(top1(pseudo_labels(logits, "adaptive"), labels[drop]))
    assert np.mean(adaptive) >= np.mean(zero_shot) + 1
    assert min(np.subtract(adaptive, zero_shot)) >= 0


def test_warning_when_proxy_overrules_confident_zero_shot():
    zero_shot_ids = np.arange(100) % 10
    scores = np.full(100, 0.95)
    proxy_ids = zero_shot_ids.copy()
    proxy_ids[:20] = (proxy_ids[:20] + 1) % 10
    message = disagreement_warning(zero_shot_ids, scores, proxy_ids)
    assert message is not None and "20 of 100" in message
    assert disagreement_warning(zero_shot_ids, scores, zero_shot_ids) is None


def test_no_warning_when_only_unsure_images_change():
    zero_shot_ids = np.arange(100) % 10
    scores = np.where(np.arange(100) < 50, 0.3, 0.99)
    proxy_ids = zero_shot_ids.copy()
    proxy_ids[:50] = (proxy_ids[:50] + 1) % 10  # only the unsure half changes
    assert disagreement_warning(zero_shot_ids, scores, proxy_ids) is None
    assert disagreement_warning(zero_shot_ids, scores, proxy_ids, confidence=0.2) is not None


def test_warning_rejects_arrays_of_different_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        disagreement_warning(np.zeros(3), np.zeros(3), np.zeros(4))


def test_warning_flags_sinkhorn_on_a_handful_of_classes_but_not_adaptive(dev):
    features, text, labels = dev
    drop = make_drop(labels, "handful", seed=1000)
    logits = features[drop] @ text.T
    zero_shot = torch.softmax(logits / CONFIG.tau_t, dim=1)
    ids, scores = zero_shot.argmax(1).numpy(), zero_shot.max(1).values.numpy()
    sinkhorn = pseudo_labels(logits, "sinkhorn").argmax(1).numpy()
    adaptive = pseudo_labels(logits, "adaptive").argmax(1).numpy()
    assert disagreement_warning(ids, scores, sinkhorn) is not None
    assert disagreement_warning(ids, scores, adaptive) is None
