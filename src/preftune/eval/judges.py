"""Judges: one interface, ``compare_many([(prompt, a, b), ...]) -> [P(a is better) or None, ...]`` (None: the
judge failed on that comparison, e.g. an unparsable verdict; counted and reported, never a coin flip).

- ``rm:PATH``: a Bradley-Terry reward model trained by ``preftune reward``: P = sigmoid(r(prompt, a) - r(prompt, b)),
  each response tokenised exactly as the reward model's training pairs were.
- ``http://HOST/v1`` or ``https://...``: any OpenAI-compatible ``/v1/chat/completions`` endpoint (GPT-4-class
  services, vLLM, llama.cpp's server) through the ``openai`` client (its timeouts and its retries with backoff on
  429 and 5xx). ``logprobs`` mode: one token, ``top_logprobs``, P = softmax over the A/B tokens; ``text`` mode:
  the verdict line of the paper's prompt, P in {0, 1}. The API key is read from the environment variable the
  settings name, and never logged or written.

Every comparison is judged in both orders by :func:`judge_both_orders`, through a :class:`JudgmentCache` (JSONL,
keyed by judge, template, prompt, a, b, order) so that a re-run, or one resumed after an interruption, never pays
for a judgment twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from preftune.errors import ConfigError, InputError

log = logging.getLogger(__name__)
TEMPLATES = Path(__file__).resolve().parent / "templates"
Comparison = tuple[str, str, str]  # (prompt, a, b): is a better than b?


@dataclass
class JudgeSettings:
    spec: str | None = None  # rm:PATH (a reward model) | http(s)://HOST/v1 (an OpenAI-compatible endpoint)
    model: str = "gpt-4o"  # the endpoint's model name (ignored by rm: judges)
    mode: str = "logprobs"  # logprobs (one token, P from the A/B log-probs) | text (parse the verdict line)
    template: str = "dialogue"  # dialogue | summarization (the paper's prompts) | a file with {prompt} {a} {b}
    api_key_env: str | None = None  # the environment variable holding the API key (never logged or written)
    concurrency: int = 4  # requests in flight at once
    timeout_s: float = 60.0  # per request
    max_retries: int = 4  # on connection errors, 408, 409, 429 and 5xx, with exponential backoff
    max_tokens: int = 128  # text mode: room for the comparison sentence and the verdict line
    top_logprobs: int = 20  # logprobs mode: how many alternatives the endpoint returns


def check_judge_settings(s: JudgeSettings) -> None:
    if not s.spec:
        raise ConfigError("config key 'judge.spec' is not set: rm:PATH or an endpoint URL (http://HOST:PORT/v1)")
    if s.mode not in ("logprobs", "text"):  # a config's judge section is checked by load_config already
        raise ConfigError(f"config key 'judge.mode': {s.mode!r} is not one of logprobs, text")
    if not (s.spec.startswith(("rm:", "http://", "https://"))):
        raise ConfigError(f"config key 'judge.spec': {s.spec!r} is neither rm:PATH nor an http(s):// endpoint URL")
    for name in ("concurrency", "max_tokens", "top_logprobs"):
        if getattr(s, name) < 1:
            raise ConfigError(f"config key 'judge.{name}' must be >= 1")
    if s.spec.startswith("rm:"):  # it scores each reply itself: no prompt, no verdict, no endpoint
        for name in ("mode", "template", "api_key_env", "max_tokens", "top_logprobs"):
            if getattr(s, name) != getattr(JudgeSettings(), name):
                raise ConfigError(f"config key 'judge.{name}' applies to an endpoint judge, not to a reward-model "
                                  f"judge ({s.spec}), which scores each reply itself: remove it")
    if s.api_key_env is not None and not os.environ.get(s.api_key_env):
        raise ConfigError(f"config key 'judge.api_key_env': the environment variable {s.api_key_env} is not set")


class Judge(Protocol):
    name: str  # identifies the judge in cache keys and outputs; never holds a secret
    mode: str  # logprobs (P in [0, 1]) | text (P in {0, 1})
    template_hash: str

    def compare_many(self, items: list[Comparison]) -> list[float | None]: ...


def load_template(name: str, mode: str = "text") -> str:
    """A shipped template by name (in ``logprobs`` mode its ``-verdict`` variant, which asks for the letter alone:
    the paper's prompts ask for a comparison sentence first, and one token cannot hold it), or a file; it must hold
    {prompt}, {a} and {b}."""
    shipped = TEMPLATES / f"{name}-verdict.txt" if mode == "logprobs" else TEMPLATES / f"{name}.txt"
    if not shipped.is_file():
        shipped = TEMPLATES / f"{name}.txt"
    path = shipped if shipped.is_file() else Path(name)
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in TEMPLATES.glob("*.txt") if not p.stem.endswith("-verdict")))
        raise ConfigError(f"config key 'judge.template': {name!r} is neither a shipped template ({names}) nor a file")
    text = path.read_text(encoding="utf-8")
    missing = [k for k in ("{prompt}", "{a}", "{b}") if k not in text]
    if missing:
        raise ConfigError(f"judge template {path}: missing {', '.join(missing)}")
    return text


def render(template: str, prompt: str, a: str, b: str) -> str:
    """The judge's message: plain replacement, so braces inside the texts stay as they are."""
    return template.replace("{prompt}", prompt.strip()).replace("{a}", a.strip()).replace("{b}", b.strip())


_VERDICT = re.compile(r'^\s*(?:\*\*)?(?:more helpful|preferred|verdict|answer)(?:\*\*)?\s*:\s*\W*([AB])\W*\s*$',
                      re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """"A" or "B" from the last verdict line of a text-mode answer ("More helpful: A", "Preferred: "B"", or a last
    line that is only the letter); None when there is none, or when the answer names both."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    for line in reversed(lines):
        match = _VERDICT.match(line)
        if match:
            return match.group(1).upper()
    if lines and re.fullmatch(r'\W*([AB])\W*', lines[-1]):
        return re.fullmatch(r'\W*([AB])\W*', lines[-1]).group(1)
    return None


def ab_probability(top_logprobs: list[tuple[str, float]]) -> float | None:
    """P(A) from one position's alternatives (token, log-prob): a softmax over the tokens that read "A" or "B"
    (surrounding spaces and quotes ignored; several spellings of a letter are added). None when neither occurs."""
    mass = {"A": -math.inf, "B": -math.inf}
    for token, logprob in top_logprobs:
        letter = token.strip().strip('"\'*').upper()
        if letter in mass:
            mass[letter] = logprob if mass[letter] == -math.inf else max(mass[letter], logprob) + math.log1p(
                math.exp(-abs(mass[letter] - logprob)))
    if mass["A"] == -math.inf and mass["B"] == -math.inf:
        return None
    top = max(mass.values())
    return math.exp(mass["A"] - top) / (math.exp(mass["A"] - top) + math.exp(mass["B"] - top))


class HTTPJudge:
    """An OpenAI-compatible chat endpoint as a judge (see the module docstring)."""

    def __init__(self, s: JudgeSettings):
        import openai

        self.settings, self.mode = s, s.mode
        self.template = load_template(s.template, s.mode)
        self.template_hash = hashlib.sha256(self.template.encode()).hexdigest()[:16]
        self.name = f"{s.spec.rstrip('/')}#{s.model}#{s.mode}"
        key = os.environ.get(s.api_key_env) if s.api_key_env else None
        # a local server needs no key, but the client insists on one: a placeholder that is no secret
        self.client = openai.OpenAI(base_url=s.spec, api_key=key or "no-key", timeout=s.timeout_s,
                                    max_retries=s.max_retries)
        self.errors = openai.APIError

    def compare(self, prompt: str, a: str, b: str) -> float | None:
        s = self.settings
        messages = [{"role": "user", "content": render(self.template, prompt, a, b)}]
        try:
            if self.mode == "logprobs":
                out = self.client.chat.completions.create(model=s.model, messages=messages, max_tokens=1,
                                                          temperature=0.0, logprobs=True,
                                                          top_logprobs=s.top_logprobs)
                content = (out.choices[0].logprobs.content or []) if out.choices[0].logprobs else []
                return ab_probability([(t.token, t.logprob) for t in content[0].top_logprobs]) if content else None
            out = self.client.chat.completions.create(model=s.model, messages=messages, max_tokens=s.max_tokens,
                                                      temperature=0.0)
        except self.errors as exc:  # after the client's retries: the run stops, the cache keeps what was judged
            raise InputError(f"judge {s.spec}: {type(exc).__name__}: {exc}") from None
        verdict = parse_verdict(out.choices[0].message.content or "")
        return None if verdict is None else float(verdict == "A")

    def compare_many(self, items: list[Comparison], on_result=None) -> list[float | None]:
        """Judged ``settings.concurrency`` at a time; ``on_result(i, p)`` as each one finishes."""
        results: list[float | None] = [None] * len(items)

        def one(i: int) -> None:
            results[i] = self.compare(*items[i])
            if on_result is not None:
                on_result(i, results[i])

        with ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool:
            for future in [pool.submit(one, i) for i in range(len(items))]:
                future.result()
        return results


class RewardModelJudge:
    """``rm:PATH``: P(a better) = sigmoid(r(prompt, a) - r(prompt, b)) with the raw (unnormalised) rewards. Each
    distinct (prompt, reply) is scored once per judge: the other order, and an opponent every method meets (the
    dataset's chosen reply), reuse its score (judging was ~4 forwards per comparison, now about one)."""

    mode = "logprobs"

    def __init__(self, s: JudgeSettings):
        from preftune.models.reward_model import RewardModel

        path = s.spec.removeprefix("rm:")
        self.model = RewardModel.load(path)
        self.name, self.template_hash = f"rm:{Path(path).resolve()}", "-"
        self.scores: dict[tuple[str, str], float] = {}
        self.scored = 0  # forwards run (a test reads it)

    def _score(self, pairs: list[tuple]) -> list[float]:
        keys = [(p if isinstance(p, str) else json.dumps(p), r) for p, r in pairs]  # a prompt may be messages
        new = {k: pair for k, pair in zip(keys, pairs) if k not in self.scores}
        if new:
            values = self.model.score_replies([p for p, _ in new.values()], [r for _, r in new.values()],
                                              normalized=False)
            self.scores.update(zip(new, values))
            self.scored += len(new)
        return [self.scores[k] for k in keys]

    def compare_many(self, items: list[Comparison], on_result=None) -> list[float | None]:
        a = self._score([(p, x) for p, x, _ in items])
        b = self._score([(p, y) for p, _, y in items])
        out = [1 / (1 + math.exp(rb - ra)) for ra, rb in zip(a, b)]
        for i, p in enumerate(out):
            if on_result is not None:
                on_result(i, p)
        return out


def build_judge(s: JudgeSettings) -> Judge:
    check_judge_settings(s)
    return RewardModelJudge(s) if s.spec.startswith("rm:") else HTTPJudge(s)


class JudgmentCache:
    """Judgments on disk (JSONL, one appended and flushed per finished judgment): keyed by (judge name, template
    hash, prompt, a, b), so that the order of the two responses is part of the key."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.known: dict[str, float | None] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interruption: judged again
                    continue
                self.known[row["key"]] = row["p"]

    @staticmethod
    def key(judge: Judge, item: Comparison) -> str:
        return hashlib.sha256(json.dumps([judge.name, judge.template_hash, *item]).encode()).hexdigest()

    def judge(self, judge: Judge, items: list[Comparison]) -> list[float | None]:
        """Each item's judgment: from the cache, or asked now (and written as soon as it is known)."""
        keys = [self.key(judge, item) for item in items]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self.known}.values())  # a repeat is asked once
        cached = sum(k in self.known for k in keys)
        log.info("judge %s: %d judgments cached, %d to ask", judge.name, cached, len(todo))
        if todo:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                def write(j: int, p: float | None) -> None:
                    with self.lock:
                        self.known[keys[todo[j]]] = p
                        f.write(json.dumps({"key": keys[todo[j]], "p": p}) + "\n")
                        f.flush()

                judge.compare_many([items[i] for i in todo], on_result=write)
        return [self.known[k] for k in keys]


def judge_both_orders(judge: Judge, cache: JudgmentCache, items: list[Comparison]
                      ) -> list[tuple[float | None, float | None]]:
    """(P(x better) with x in slot A, P(x better) with x in slot B) for each (prompt, x, y)."""
    swapped = [(p, y, x) for p, x, y in items]
    results = cache.judge(judge, list(items) + swapped)
    n = len(items)
    return [(results[i], None if results[n + i] is None else 1.0 - results[n + i]) for i in range(n)]


def judge_swapped(judge: Judge, cache: JudgmentCache, items: list[Comparison]
                  ) -> tuple[list[tuple[float | None, float | None]], list[float | None]]:
    """:func:`judge_both_orders` and each comparison's swap-averaged P(x better) (None: an order failed)."""
    from preftune.eval.judging import swap_average

    orders = judge_both_orders(judge, cache, items)
    return orders, [swap_average(a, b, judge.mode) for a, b in orders]


def empty_reply_probe(judge: Judge, cache: JudgmentCache, pairs: list[tuple]) -> dict:
    """Each (prompt, human-chosen reply) judged against an EMPTY reply, both orders: how often the judge prefers
    saying nothing (:func:`~preftune.eval.judging.empty_reply_preference`)."""
    from preftune.eval.judging import empty_reply_preference

    _, combined = judge_swapped(judge, cache, [(p, chosen, " ") for p, chosen in pairs])
    return empty_reply_preference(combined)
