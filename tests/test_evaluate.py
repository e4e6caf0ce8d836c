"""The skewed-drop harness: drops, the table, labelled-set loading and `inmap eval`."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from inmap.cli import main
from inmap.config import ProxyConfig
from inmap.evaluate import SCENARIOS, format_table, make_drop, run_eval
from inmap.labeled import (
    Embedder,
    EvalInputError,
    LabeledSet,
    class_ids,
    label_from_path,
    load_labeled_set,
)

LABELS = np.repeat(np.arange(100), 4)  # 100 classes x 4 images, like the dev set


def counts(drop: np.ndarray) -> np.ndarray:
    """Images per class in the drop, largest first, absent classes left out."""
    sizes = np.bincount(LABELS[drop])
    return np.sort(sizes[sizes > 0])[::-1]


def test_balanced_drop_has_equal_class_counts():
    drop = make_drop(LABELS, "balanced", seed=0)
    assert set(counts(drop)) == {4} and len(counts(drop)) == 100


def test_long_tail_drop_has_a_head_and_missing_tail():
    sizes = counts(make_drop(LABELS, "long_tail", seed=0))
    assert sizes[0] == 4 and sizes[-1] == 1
    assert 30 < len(sizes) < 80  # the tail classes expect under one image, most are missing


def test_absent_drop_leaves_out_forty_percent_of_classes():
    sizes = counts(make_drop(LABELS, "absent", seed=0))
    assert len(sizes) == 60 and sizes.min() >= 1 and sizes.max() <= 4


def test_dominant_drop_is_half_one_class():
    sizes = counts(make_drop(LABELS, "dominant", seed=0))
    assert sizes[0] == 4 and sizes.sum() == 8 and set(sizes[1:]) == {1}


def test_handful_drop_has_five_classes():
    sizes = counts(make_drop(LABELS, "handful", seed=0))
    assert list(sizes) == [4] * 5


def test_small_drop_has_fewer_images_than_classes():
    drop = make_drop(LABELS, "small", seed=0)
    assert len(drop) == 20 < 100
    assert len(np.unique(drop)) == len(drop)


def test_drops_depend_on_the_seed_only():
    for scenario in SCENARIOS:
        np.testing.assert_array_equal(
            make_drop(LABELS, scenario, 3), make_drop(LABELS, scenario, 3)
        )
    assert not np.array_equal(make_drop(LABELS, "absent", 3), make_drop(LABELS, "absent", 4))


def test_unknown_scenario_names_the_choices():
    with pytest.raises(ValueError, match="long_tail"):
        make_drop(LABELS, "zipf", 0)


@pytest.fixture(scope="module")
def small_set(dev_set) -> LabeledSet:
    """The first 50 classes of the real dev set (200 images)."""
    keep = dev_set["labels"] < 50
    return LabeledSet(
        dev_set["image_features"][keep].astype(np.float32),
        dev_set["labels"][keep],
        dev_set["text_proxy"][:50].astype(np.float32),
        list(dev_set["classnames"][:50]),
    )


def test_run_eval_scores_every_method_on_every_drop(small_set):
    table = run_eval(
        small_set,
        scenarios=["balanced", "handful"],
        seeds=[0, 1],
        methods=["sinkhorn", "adaptive"],
        config=ProxyConfig(iters=20),
    )
    assert table.methods == ("zero-shot", "sinkhorn", "adaptive")
    assert [(r.scenario, r.seed) for r in table.results] == [
        ("balanced", 0),
        ("balanced", 1),
        ("handful", 0),
        ("handful", 1),
    ]
    handful = table.results[2]
    truth = small_set.labels[make_drop(small_set.labels, "handful", 0)]
    zero_shot = (
        small_set.features[make_drop(small_set.labels, "handful", 0)] @ small_set.text_proxy.T
    ).argmax(1)
    assert handful.top1["zero-shot"] == pytest.approx(100 * (zero_shot == truth).mean())
    assert handful.n_images == 20 and handful.n_classes == 5
    assert all(0 <= v <= 100 for r in table.results for v in r.top1.values())
    text = format_table(table)
    assert text.count("\n") == 3  # header, rule, two scenarios
    assert "| balanced | 2 | 200 | 50 |" in text
    assert "adaptive − zero-shot, worst seed" in text


def test_labels_come_from_wnid_file_names_or_folders():
    assert label_from_path("/data/n01491361_tiger_shark.JPEG") == "tiger shark"
    assert label_from_path("s3://bucket/drops/golden_retriever/IMG_0001.jpg") == "golden retriever"
    assert label_from_path("memory://x/cat/n01491361.JPEG") == "cat"  # a bare wnid is no label


def test_unknown_label_names_are_reported():
    assert list(class_ids(["Tiger_shark", "tench"], ["tench", "tiger shark"])) == [1, 0]
    with pytest.raises(EvalInputError, match="'zebra'"):
        class_ids(["zebra"], ["tench", "tiger shark"])


def test_npz_and_parquet_load_the_same_set(tmp_path, small_set):
    npz = tmp_path / "set.npz"
    np.savez(
        npz,
        image_features=small_set.features,
        labels=small_set.labels,
        text_proxy=small_set.text_proxy,
        classnames=np.array(small_set.classnames),
    )
    loaded = load_labeled_set(str(npz))
    np.testing.assert_array_equal(loaded.labels, small_set.labels)
    assert loaded.classnames == small_set.classnames

    names = [small_set.classnames[i] for i in small_set.labels]
    table = pa.table(
        {
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(small_set.features.astype(np.float16).reshape(-1)), 512
            ),
            "label": names,
        }
    )
    pq.write_table(table, tmp_path / "labelled.parquet")
    np.save(tmp_path / "text.npy", small_set.text_proxy)
    from_parquet = load_labeled_set(
        str(tmp_path / "labelled.parquet"),
        classes=small_set.classnames,
        text_proxy=str(tmp_path / "text.npy"),
    )
    np.testing.assert_array_equal(from_parquet.labels, small_set.labels)
    np.testing.assert_allclose(from_parquet.features, small_set.features, atol=1e-3)
    with pytest.raises(EvalInputError, match="not among"):
        load_labeled_set(str(tmp_path / "labelled.parquet"), classes=["tench"])
    with pytest.raises(EvalInputError, match=r"\(51 classes\)"):
        load_labeled_set(
            str(tmp_path / "labelled.parquet"),
            classes=[*small_set.classnames, "one too many"],
            text_proxy=str(tmp_path / "text.npy"),
        )


def test_eval_command_prints_the_table(tmp_path, small_set, capsys):
    npz = tmp_path / "set.npz"
    np.savez(
        npz,
        image_features=small_set.features,
        labels=small_set.labels,
        text_proxy=small_set.text_proxy,
        classnames=np.array(small_set.classnames),
    )
    code = main(["eval", str(npz), "--scenarios", "handful,small", "--seeds", "2", "--iters", "10"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| handful | 2 |" in out and "| small | 2 |" in out
    assert "zero-shot" in out and "sinkhorn" in out and "adaptive" in out


def test_eval_help_lists_the_scenarios(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in SCENARIOS)


def test_eval_command_rejects_unknown_methods_in_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "x.npz"), "--methods", "magic"]) == 2
    err = capsys.readouterr().err
    assert "inmap: error: unknown scenario or method magic" in err and "Traceback" not in err


@pytest.mark.filterwarnings("ignore:inmap-tiny has RANDOM weights")
def test_image_folder_is_embedded_and_labelled_from_file_names(image_folder, caplog):
    from inmap.model import TINY_MODEL

    with caplog.at_level(logging.WARNING, logger="inmap.labeled"):
        labeled = load_labeled_set(
            str(image_folder), embedder=Embedder(model=TINY_MODEL, pretrained=None)
        )
    # 12 real JPEGs of 12 classes (nXXXXXXXX_<class>.JPEG); the 3 broken files are reported.
    assert len(labeled.labels) == 12 and len(labeled.classnames) == 12
    assert labeled.text_proxy.shape == (12, 64)
    assert "3 image(s) could not be read or decoded" in caplog.text
    names = [labeled.classnames[i] for i in labeled.labels]
    assert all("_" not in name for name in names)
