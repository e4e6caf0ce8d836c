"""Open-set drops: unknown scores, the label-free threshold, the vocabulary, the open-set figures
of `inmap eval`, and the predictions table's unknown columns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from inmap.evaluate import auroc, flag_figures, make_open_set_drop
from inmap.openset import (
    shipped_vocabulary,
    unknown_scores,
    unknown_threshold,
    vocabulary_words,
)


def clustered(seed: int = 0, classes: int = 40, per_class: int = 6, d: int = 64, noise=0.6):
    """Class directions (classes, d) and images around them (classes * per_class, d), unit rows."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, d, generator=gen), dim=1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = centres[labels] + noise * torch.randn(len(labels), d, generator=gen) / d**0.5
    return centres, F.normalize(images, dim=1), labels.numpy()


def test_images_of_unlisted_classes_score_higher_than_listed_ones():
    centres, images, labels = clustered()
    listed = centres[:20]  # classes 20..39 are in the drop but not on the list
    scores = unknown_scores(images, listed, None)
    assert scores.shape == (len(images),) and scores.dtype == torch.float32
    assert bool(((scores >= 0) & (scores <= 1)).all())
    assert auroc(labels >= 20, scores.numpy()) > 90


def test_without_a_vocabulary_the_score_is_one_minus_max_softmax_at_tau():
    centres, images, _ = clustered()
    expected = 1 - torch.softmax(images @ centres[:20].T / 0.05, dim=1).max(1).values
    torch.testing.assert_close(unknown_scores(images, centres[:20], None, tau=0.05), expected)


def test_a_vocabulary_word_near_an_unlisted_class_raises_its_images_scores():
    centres, images, labels = clustered(noise=1.5)
    listed, vocabulary = centres[:20], centres[20:30]  # words close to classes 20..29
    plain = unknown_scores(images, listed, None)
    with_words = unknown_scores(images, listed, None, vocabulary)
    near_words = (labels >= 20) & (labels < 30)
    assert bool((with_words[near_words] > plain[near_words]).all())
    # A listed image's own class is still far closer than any word: its score barely moves.
    assert float((with_words[labels < 20] - plain[labels < 20]).abs().mean()) < 0.05
    assert auroc(labels >= 20, with_words.numpy()) > auroc(labels >= 20, plain.numpy())


def test_the_proxy_blend_needs_the_proxy_and_uses_it():
    centres, images, _ = clustered()
    with pytest.raises(ValueError, match="needs the vision proxy"):
        unknown_scores(images, centres[:20], None, proxy_weight=0.5)
    blended = unknown_scores(images, centres[:20], centres[:20], proxy_weight=0.5)
    assert bool((blended >= unknown_scores(images, centres[:20], None) - 1e-6).all())


def test_inputs_of_another_model_are_refused():
    centres, images, _ = clustered()
    with pytest.raises(ValueError, match="same model"):
        unknown_scores(images[:, :32], centres, None)
    with pytest.raises(ValueError, match="vocabulary has 32 dimensions"):
        unknown_scores(images, centres, None, centres[:, :32])


def test_threshold_separates_two_groups_of_scores_without_labels():
    rng = np.random.default_rng(0)
    known = 1 / (1 + np.exp(rng.normal(4, 1, 300)))  # listed probability ~0.98
    unknown = 1 / (1 + np.exp(rng.normal(-1, 1, 100)))  # listed probability ~0.27
    scores = np.concatenate([known, unknown])
    threshold = unknown_threshold(scores)
    figures = flag_figures(np.arange(400) >= 300, scores > threshold)
    assert figures.precision > 90 and figures.recall > 90


def test_threshold_flags_nothing_when_the_drop_is_too_small_or_all_alike():
    assert unknown_threshold([0.9, 0.1, 0.5]) == 1.0
    assert unknown_threshold(np.full(100, 0.2)) == 1.0


def test_vocabulary_loses_words_that_name_a_listed_class():
    words = ["shark", "dogs", "tree", "goldfish", "car", "person"]
    kept = vocabulary_words(["great white shark", "dog", "Goldfish, Carassius auratus"], words)
    assert kept == ["tree", "car", "person"]


def test_shipped_vocabulary_is_a_few_hundred_distinct_words():
    words = shipped_vocabulary()
    assert 300 <= len(words) <= 3000
    assert len(set(words)) == len(words) and all(w == w.strip() and w for w in words)


def test_auroc_counts_ties_as_half():
    assert auroc(np.array([1, 0]), np.array([0.9, 0.1])) == 100
    assert auroc(np.array([1, 0]), np.array([0.1, 0.9])) == 0
    assert auroc(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.7, 0.1])) == 87.5


def test_open_set_drop_splits_classes_three_ways():
    labels = np.repeat(np.arange(100), 4)
    drop = make_open_set_drop(labels, seed=3, unlisted_share=0.25, vocabulary_size=40)
    in_drop = np.unique(labels[drop.indices])
    unlisted = np.unique(labels[drop.indices][drop.unlisted])
    assert len(drop.vocabulary_classes) == 40 and len(in_drop) == 60 and len(unlisted) == 15
    assert not set(drop.vocabulary_classes) & set(in_drop)
    assert set(drop.listed_classes) == set(in_drop) - set(unlisted)
    again = make_open_set_drop(labels, seed=3, unlisted_share=0.25, vocabulary_size=40)
    assert np.array_equal(again.indices, drop.indices)


# --- real CLIP features (../shared/data) -------------------------------------------------------


def test_vocabulary_score_beats_zero_shot_max_softmax_on_real_drops(dev_set):
    """Report seeds (tuning used 0-3): held-out class names as the vocabulary lift AUROC of
    unlisted vs listed images clearly above MCM (zero-shot max softmax at τ 0.01)."""
    X = F.normalize(torch.from_numpy(dev_set["image_features"].astype(np.float32)), dim=1)
    T = F.normalize(torch.from_numpy(dev_set["text_proxy"].astype(np.float32)), dim=1)
    gains = []
    for seed in (100, 101):
        for share in (0.25, 0.5):
            drop = make_open_set_drop(dev_set["labels"], seed, share, vocabulary_size=250)
            x, listed = X[drop.indices], T[drop.listed_classes]
            mcm = -torch.softmax(x @ listed.T / 0.01, dim=1).max(1).values
            ours = unknown_scores(x, listed, None, T[drop.vocabulary_classes])
            gains.append(auroc(drop.unlisted, ours.numpy()) - auroc(drop.unlisted, mcm.numpy()))
    assert np.mean(gains) > 2.0 and min(gains) > 0


# --- the pipeline -----------------------------------------------------------------------------


@pytest.fixture
def embedded_output(image_folder, tmp_path):
    """An output with the 12 good images of image_folder embedded by the tiny model."""
    import warnings

    from inmap import embedding, failures
    from inmap.encoder import RandomWeightsWarning
    from inmap.job import Job
    from inmap.listing import list_images
    from inmap.model import TINY_MODEL, resolve_model
    from inmap.options import RunOptions

    warnings.simplefilter("ignore", RandomWeightsWarning)
    job = Job(source=str(image_folder), output=str(tmp_path / "out"),
              model=resolve_model(TINY_MODEL, None, "cpu"), classes=("fish", "bird", "dog"),
              run_id="run-1", settings=RunOptions(shard_size=6))  # fmt: skip
    listing = list_images(str(image_folder)).images
    index = embedding.embedding_index(job)
    plan = embedding.plan_embedding(listing, index, failures.known_failures(job), job)
    for shard in plan.shards:
        embedding.embed_shard(shard, job)
    return job, listing


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_predictions_carry_unknown_scores_and_flags_only_when_asked(embedded_output, mode):
    from inmap import embedding, learning, prediction, report

    job, listing = embedded_output
    job = job.with_settings(unknown=mode)
    index = embedding.embedding_index(job)
    choice = learning.vision_proxy(listing, index, 12, job)
    # The vocabulary is embedded once, without the listed classes, and cached.
    words = vocabulary_words(job.classes)
    assert "dog" not in words and choice.proxy.vocabulary.shape[0] == len(words)
    assert (choice.proxy.unknown_threshold is None) == (mode == "off")
    todo = prediction.plan_predictions(listing, index, prediction.done_predictions(job))
    parts = [prediction.predict_shard(plan, choice.proxy, job) for plan in todo]
    scores = np.concatenate([p["unknown_score"].to_numpy() for p in parts])
    assert len(scores) == 12 and ((scores >= 0) & (scores <= 1)).all()
    flags = [p["is_unknown"] for p in parts]
    if mode == "off":
        assert all(f.null_count == len(f) for f in flags)
        assert report.unknown_count(parts) is None
    else:
        assert all(f.null_count == 0 for f in flags)
        expected = sum(
            int((p["unknown_score"].to_numpy() > choice.proxy.unknown_threshold).sum())
            for p in parts
        )
        assert report.unknown_count(parts) == expected
    assert prediction.commit_predictions(parts, job) == 12


def test_open_set_eval_reports_auroc_flags_and_listed_top1_per_drop():
    from inmap.config import ProxyConfig
    from inmap.evaluate import LabeledSet, format_open_set_table, run_open_set_eval

    centres, images, labels = clustered(classes=60, per_class=5)
    labeled = LabeledSet(images.numpy(), labels, centres.numpy(), [f"c{i}" for i in range(60)])
    results = run_open_set_eval(labeled, seeds=[7], shares=[0.5], config=ProxyConfig(iters=20))
    (result,) = results
    assert result.vocabulary_size == 30 and result.n_images == 150 and result.n_unlisted == 75
    assert result.auroc["ours"] > 90 and result.listed_top1["zero-shot"] > 90
    assert 0 < result.flags["ours"].recall <= 100
    table = format_open_set_table(results)
    assert "AUROC ours" in table and "| 50% | 7 | 150 | 30 |" in table


def test_a_vocabulary_too_large_for_the_labelled_set_is_an_input_error():
    from inmap.evaluate import EvalInputError

    with pytest.raises(EvalInputError, match="hold out 0 to 8"):
        make_open_set_drop(np.repeat(np.arange(10), 2), 0, 0.5, vocabulary_size=9)


def test_run_summary_counts_unknowns_only_when_they_were_judged():
    from datetime import datetime, timezone

    from inmap.report import RunSummary

    summary = RunSummary(run_id="r", source="s", output="o", labelset="l", model="m",
                         pretrained=None, weights_id="w", started_at=datetime.now(timezone.utc),
                         predicted=10)  # fmt: skip
    assert "unknown" not in summary.line() and "none of the classes" not in summary.markdown()
    summary.unknowns = 3
    assert "10 predicted (3 unknown)" in summary.line()
    assert "3 of 10 predicted images (30.0%) look like none of the classes" in summary.markdown()
    assert summary.row()["unknowns"].to_pylist() == [3]


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_with_unknown_auto_flags_images_and_labels_can_list_them(
    image_folder, tmp_path, capsys
):
    from flows.inmap_flow import inmap_flow
    from inmap.cli import main
    from tests.conftest import read_delta

    output = tmp_path / "out"
    [summary] = inmap_flow(source=str(image_folder), classes=["fish", "bird", "dog"],
                           output=str(output), model="inmap-tiny", pretrained=None,
                           device="cpu", iters=50, unknown="auto")  # fmt: skip
    predictions = read_delta(output / "predictions")
    assert predictions["is_unknown"].null_count() == 0
    assert summary.unknowns == int(predictions["is_unknown"].sum())
    assert main(["labels", str(output), "--unknown-only", "--format", "json"]) == 0
    import json

    flagged = json.loads(capsys.readouterr().out)
    assert len(flagged) == summary.unknowns and all(row["is_unknown"] for row in flagged)
