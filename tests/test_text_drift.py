"""Drift on text: real BBC News articles embedded by the real all-MiniLM-L6-v2 encoder (32 tokens).

The reference is the train split of `tests/test_text.py`'s BBC subset (47 articles), embedded by the
features stage. Held-out articles in the train split's topic mix are not flagged; one topic alone,
the same articles with their words shuffled, and texts from another source (the docstrings of Python
modules) are. Texts are read through the features cache under the stage's own key.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from components.core.result import StageResult
from components.data.manifest import Dataset
from components.features.config import SelectConfig
from components.features.extract import run as features
from components.features.select import run as select
from components.monitoring.config import DriftConfig
from components.monitoring.drift import HISTORY_FILE, DriftInputError, Reference, read_history, run, split_reference
from tests.test_drift import run_cli
from tests.test_text import ENCODER, TEXT_FEATURES, bbc  # noqa: F401 - the BBC subset fixture

# Python modules whose docstrings are prose of another source: software documentation, not news.
DOCUMENTED_MODULES = ("argparse", "base64", "bisect", "collections", "csv", "datetime", "decimal", "fractions",
                      "functools", "gzip", "hashlib", "heapq", "inspect", "itertools", "json", "logging", "os",
                      "pickle", "random", "re", "shutil", "sqlite3", "statistics", "string", "subprocess", "tarfile",
                      "tempfile", "textwrap", "uuid", "zipfile")


@dataclass(frozen=True)
class Articles:
    dataset: Dataset
    features_dir: Path
    cache_dir: Path
    train: Reference
    in_mix: list[str]  # 30 held-out articles in the train split's topic mix
    politics: list[str]  # every held-out politics article
    root: Path


def read(dataset: Dataset, frame: pd.DataFrame) -> list[str]:
    return [dataset.image_path(p).read_text(encoding="utf-8") for p in frame["path"]]


@pytest.fixture(scope="module")
def articles(bbc: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Articles:  # noqa: F811
    root = tmp_path_factory.mktemp("text_drift")
    features(TEXT_FEATURES, (ENCODER,), bbc, root / "cache", root / "features")
    train = split_reference(bbc, root / "features", ENCODER, "pooled")
    held_out = bbc.manifest[bbc.manifest["split"] != "train"].sort_values("sha256")
    # The subset's splits differ in topic mix (politics: 4 of 47 train articles, 15 of 53 held out), so held-out
    # articles as they come are a mild label shift. In-distribution: the train split's mix, other articles.
    shares = bbc.split("train")["label"].value_counts(normalize=True)
    in_mix = pd.concat([held_out[held_out["label"] == label].head(round(share * 30)) for label, share in shares.items()])
    assert len(in_mix) == 30 and not set(in_mix["sha256"]) & set(train.sha256)
    politics = held_out[held_out["label"] == "politics"]
    assert len(politics) >= 12
    return Articles(bbc, root / "features", root / "cache", train, read(bbc, in_mix), read(bbc, politics), root)


def write_csv(path: Path, texts: list[str] | None, **columns: list[str]) -> Path:
    pd.DataFrame({**({"text": texts} if texts is not None else {}), **columns}).to_csv(path, index=False)
    return path


def write_folder(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True)
    for i, text in enumerate(texts):
        (folder / f"article_{i:03d}.txt").write_text(text, encoding="utf-8")
    return folder


def check(articles: Articles, new: Path, out: Path, cache_dir: Path | None = None, **cfg) -> StageResult:
    return run(DriftConfig(backbone=ENCODER, **cfg), articles.train, new, out, features_cfg=TEXT_FEATURES,
               cache_dir=cache_dir or articles.cache_dir)


def shuffled_words(texts: list[str], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(text.split(), len(text.split()))) for text in texts]


def module_docstrings() -> list[str]:
    return [inspect.getdoc(importlib.import_module(name)) or "" for name in DOCUMENTED_MODULES]


def test_held_out_articles_in_the_training_mix_are_not_flagged(articles: Articles, tmp_path: Path) -> None:
    result = check(articles, write_csv(tmp_path / "news.csv", articles.in_mix), tmp_path / "drift")
    assert not result.info["flagged"]
    assert result.metrics["p_value"] > 0.05 and result.metrics["auc_p_value"] > 0.05
    assert result.metrics["n_new"] == 30 and result.metrics["n_reference"] == len(articles.train.embeddings)
    assert result.info["modality"] == "text" and result.info["texts"] == str(tmp_path / "news.csv")


@pytest.mark.parametrize("shift", [pytest.param(lambda a: a.politics, id="politics-only"),
                                   pytest.param(lambda a: shuffled_words(a.in_mix), id="words-shuffled")])
def test_shifted_texts_are_flagged(articles: Articles, tmp_path: Path, shift) -> None:
    result = check(articles, write_csv(tmp_path / "news.csv", shift(articles)), tmp_path / "drift")
    assert result.info["flagged"]
    assert min(result.metrics["p_value"], result.metrics["auc_p_value"]) < 0.005
    assert result.metrics["auc"] > 0.8


def test_texts_of_another_source_get_the_smallest_p_values(articles: Articles, tmp_path: Path) -> None:
    docs = write_folder(tmp_path / "docs", module_docstrings())
    result = check(articles, docs, tmp_path / "drift", permutations=299, auc_permutations=299)
    assert result.info["flagged"]
    assert result.metrics["p_value"] == pytest.approx(1 / 300)  # no permutation comes close
    assert result.metrics["auc_p_value"] == pytest.approx(1 / 300)
    assert result.metrics["auc"] > 0.95


def test_texts_come_from_the_features_stage_cache(articles: Articles, tmp_path: Path) -> None:
    # Train articles, as a CSV: the features stage embedded them (same sha256, same key), nothing to compute.
    train = read(articles.dataset, articles.dataset.split("train"))
    seen = check(articles, write_csv(tmp_path / "train.csv", train[:20] + articles.in_mix), tmp_path / "seen")
    assert seen.metrics["n_computed"] == 0 and seen.metrics["n_new"] == 50
    # New texts are computed once; the same texts again, as a CSV or as a folder of .txt files, compute nothing.
    shuffled = shuffled_words(articles.in_mix, seed=1)
    first = check(articles, write_csv(tmp_path / "new.csv", shuffled), tmp_path / "drift")
    again = check(articles, write_csv(tmp_path / "again.csv", shuffled, label=["?"] * 30), tmp_path / "drift")
    folder = check(articles, write_folder(tmp_path / "new", shuffled), tmp_path / "drift")
    assert first.metrics["n_computed"] == 30
    assert again.metrics["n_computed"] == 0 and folder.metrics["n_computed"] == 0
    assert again.metrics["p_value"] == first.metrics["p_value"] == folder.metrics["p_value"]
    assert again.info["new_sha256"] == first.info["new_sha256"] == folder.info["new_sha256"]
    history = read_history(tmp_path / "drift" / HISTORY_FILE)
    assert [h["n_computed"] for h in history] == [30, 0, 0] and {h["modality"] for h in history} == {"text"}


def test_new_texts_are_capped_by_a_seeded_subsample(articles: Articles, tmp_path: Path) -> None:
    news = write_csv(tmp_path / "news.csv", articles.in_mix)
    capped = check(articles, news, tmp_path / "drift", max_new_texts=12)
    same = check(articles, news, tmp_path / "drift", max_new_texts=12)
    other = check(articles, news, tmp_path / "drift", max_new_texts=12, seed=1)
    assert (capped.info["n_found"], capped.info["n_new"]) == (30, 12)
    assert capped.info["new_sha256"] == same.info["new_sha256"] != other.info["new_sha256"]
    assert read_history(tmp_path / "drift" / HISTORY_FILE)[0]["max_new_texts"] == 12


def png_folder(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("L", (32, 32), i * 20).save(folder / f"cell_{i}.png")
    return folder


def refusals(articles: Articles, tmp: Path) -> list[tuple[Path, str]]:
    """(new data, what the one-line refusal says) for every kind of unusable text batch."""
    latin1 = tmp / "latin1.csv"
    latin1.write_bytes("text\nan article\na £5 note\n".encode("latin-1"))
    folder = write_folder(tmp / "mixed", articles.in_mix[:12])
    (folder / "article_005.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp / "header_only.csv").write_text("text,label\n")
    (tmp / "empty").mkdir()
    return [
        (write_csv(tmp / "no_text.csv", None, body=articles.in_mix), r"no_text.csv: no `text` column \(it has \['body'\]\)"),
        (write_csv(tmp / "blank.csv", [*articles.in_mix[:10], "", "  \n\t", articles.in_mix[10]]),
         r"blank.csv: 2 of 13 texts are empty or whitespace only: row 11, row 12; remove them"),
        (latin1, r"latin1.csv: not UTF-8 text \(byte 0xa3 on line 3\)"),
        (folder, r"mixed: article_005.txt: not UTF-8 text \(byte 0xe9 on line 1\)"),
        (png_folder(tmp / "cells", 12), (r"cells: holds images \(cell_0.png, cell_1.png, cell_10.png and 9 more\), "
                                         r"but drift.backbone 'all_minilm_l6_v2' is a text encoder")),
        (tmp / "header_only.csv", "header_only.csv: holds no texts"),
        (tmp / "empty", "empty: holds no texts"),
        (write_csv(tmp / "few.csv", articles.in_mix[:4]), "4 new text\\(s\\); drift.min_new_texts is 10"),
    ]


def test_unusable_texts_are_refused_in_one_line_before_any_work(articles: Articles, tmp_path: Path) -> None:
    for new, message in refusals(articles, tmp_path):
        with pytest.raises(DriftInputError, match=message) as error:
            check(articles, new, tmp_path / "out", cache_dir=tmp_path / "cache")
        assert "\n" not in str(error.value)
    assert not (tmp_path / "cache").exists()  # nothing was embedded
    assert not (tmp_path / "out" / HISTORY_FILE).exists()  # nothing recorded for a refused check


def test_texts_given_to_an_image_model_and_the_reverse_are_refused(articles: Articles, tmp_path: Path) -> None:
    image_model = DriftConfig(backbone="efficientnet_lite0")
    nothing = Reference(np.array(["0" * 64] * 20), np.zeros((20, 1280), np.float32))
    news = write_csv(tmp_path / "news.csv", articles.in_mix)
    for new, what in [(news, "news.csv: a file of texts"), (write_folder(tmp_path / "news", articles.in_mix),
                                                             r"news: holds texts \(article_000.txt")]:
        with pytest.raises(DriftInputError, match=f"{what}.*but drift.backbone 'efficientnet_lite0' is an image "
                                                  f"backbone; pass a folder of new images"):
            run(image_model, nothing, new, tmp_path / "out", cache_dir=tmp_path / "cache")
    # The reference of a text dataset is not an image backbone's (the validated dataset says which modality).
    with pytest.raises(DriftInputError, match="drift.backbone='efficientnet_lite0' embeds images, but the validated "
                                              "dataset holds texts"):
        split_reference(articles.dataset, articles.features_dir, "efficientnet_lite0", "pooled")
    assert not (tmp_path / "cache").exists()


def text_params(articles: Articles, tmp_path: Path, **drift: object) -> Path:
    """What params.text.yaml says, at the tests' 32 tokens, pointing at the fixture's folders (select: this test's)."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "paths": {"dataset": str(articles.dataset.root), "validate": str(articles.dataset.root.parent / "validate"),
                  "features": str(articles.features_dir), "feature_cache": str(articles.cache_dir),
                  "select": str(tmp_path / "select"), "drift": str(tmp_path / "drift")},
        "features": {"taps": ["pooled"], "max_length": TEXT_FEATURES.max_length, "parity_images": 4},
        "select": {"candidates": [ENCODER], "tap": "pooled"},
        "drift": drift,
        "register": {"model_name": "bbc-watched"},
    }))
    return params


def test_cli_refuses_bad_texts_in_one_line_before_prefect(articles: Articles, tmp_path: Path) -> None:
    params = text_params(articles, tmp_path, backbone=ENCODER)
    cases = [(write_csv(tmp_path / "no_text.csv", None, body=articles.in_mix), "no_text.csv: no `text` column"),
             (png_folder(tmp_path / "cells", 12), "cells: holds images (cell_0.png"),
             (write_csv(tmp_path / "blank.csv", [*articles.in_mix[:10], " "]), "blank.csv: 1 of 11 texts are empty")]
    for new, message in cases:
        done = run_cli(["drift", str(new), "--params", str(params)], tmp_path)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("tlops: error: "), done.stderr
        assert message in done.stderr
        assert done.stdout == "prefect not imported\n"
    # drift.backbone auto, before the select stage has run: one line saying so.
    done = run_cli(["drift", str(tmp_path / "no_text.csv"), "--params", str(text_params(articles, tmp_path))], tmp_path)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "drift.backbone is 'auto', but" in done.stderr and "holds no select stage result" in done.stderr


@pytest.mark.slow
def test_tlops_drift_on_texts_flags_one_topic_logs_and_says_where_the_event_went(articles: Articles,
                                                                                  tmp_path: Path) -> None:
    """The command as a user runs it: drift.backbone auto (the select stage's encoder), a CSV, then a folder."""
    select(SelectConfig(candidates=(ENCODER,), tap="pooled"), articles.dataset, articles.features_dir,
           tmp_path / "select")
    params = text_params(articles, tmp_path)
    calm = run_cli(["drift", str(write_csv(tmp_path / "news.csv", articles.in_mix)), "--params", str(params)],
                   tmp_path)
    assert calm.returncode == 0, calm.stderr[-3000:]
    assert "on 30 texts -> no drift" in calm.stdout
    shifted = run_cli(["drift", str(write_folder(tmp_path / "politics", articles.politics)), "--params", str(params)],
                      tmp_path)
    assert shifted.returncode == 0, shifted.stderr[-3000:]
    assert f"on {len(articles.politics)} texts -> FLAGGED" in shifted.stdout
    assert "went to a temporary Prefect server that stopped with this command" in shifted.stdout
    history = read_history(tmp_path / "drift" / HISTORY_FILE)
    assert [(h["backbone"], h["flagged"], h["n_computed"]) for h in history] == [(ENCODER, False, 0),
                                                                                  (ENCODER, True, 0)]
    assert (tmp_path / "drift" / "drift_over_time.png").read_bytes()[:4] == b"\x89PNG"

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [monitor] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   "attributes.run_name = 'drift-bbc-watched'")
    assert monitor.data.tags["tlops.drift.texts"] == str(tmp_path / "politics")
    assert [m.value for m in client.get_metric_history(monitor.info.run_id, "drift_flagged")] == [0.0, 1.0]
    json.dumps(history)  # plain JSON
