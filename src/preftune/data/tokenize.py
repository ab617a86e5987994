"""Tokenisation of prompts and responses: one set of rules for training, evaluation and sampling.

- The prompt is tokenised ONCE per pair; chosen and rejected are appended to the identical prompt tokens.
- Plain strings: the tokenizer's special tokens are added to the prompt (BOS where the model uses one),
  never to the response; a doubled BOS is collapsed. Conversations: the chat template renders the prompt
  with the generation prompt, and the response is the template's rendering of prompt + response minus
  the rendered prompt (checked to be a prefix; no special tokens added on top of the template's).
- Every response ends with the EOS token unless truncation cut it (a cut response must not claim to end).
- Truncation is explicit: prompts over ``max_prompt_tokens`` keep their end (or are an error), responses
  are cut to fit ``max_length``; a response is never cut to nothing because the prompt budget leaves room.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from preftune.data.schema import PreferencePair, SFTExample
from preftune.errors import DataError

Text = str | list


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str
    ref_logps: tuple[float, float] | None = None  # (chosen, rejected) cached reference log-probs, if precomputed


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    source: str


@dataclass
class TruncationStats:
    prompts_truncated: int = 0
    responses_truncated: int = 0
    examples: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.examples} examples: {self.prompts_truncated} prompts kept their last tokens, "
                f"{self.responses_truncated} responses cut to fit max_length")


def _render_prompt(tokenizer, prompt: Text) -> str | None:
    if isinstance(prompt, str):
        return None
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: Text) -> list[int]:
    """Token ids of a prompt, exactly as training sees them (also used for sampling)."""
    rendered = _render_prompt(tokenizer, prompt)
    if rendered is None:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return list(ids)


def encode_response(tokenizer, prompt: Text, response: Text, *, append_eos: bool = True) -> list[int]:
    """Token ids of a response that follows `prompt`, ending with EOS (unless ``append_eos`` is False:
    then a string response ends as written, e.g. a sampled completion cut by a length limit)."""
    eos = tokenizer.eos_token_id
    if isinstance(response, str):
        ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    else:
        prompt_text = _render_prompt(tokenizer, prompt)
        full = tokenizer.apply_chat_template(list(prompt) + list(response), tokenize=False)
        if prompt_text is None or not full.startswith(prompt_text):
            raise ValueError("chat template is not prefix-consistent: the rendered prompt is not a prefix "
                             "of the rendered prompt + response")
        ids = list(tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"])
        # ChatML-style templates end a turn with "<|im_end|>\n": the response ends at its LAST EOS, drop what
        # follows (a multi-turn response holds one EOS per turn: cutting at the first dropped the later turns)
        if eos is not None and eos in ids:
            ids = ids[: len(ids) - ids[::-1].index(eos)]
    if append_eos and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def _prompt_error(source: str, message: str) -> DataError:
    file, _, line = source.rpartition(":")
    if not line.isdigit():
        file, line = source, ""
    return DataError(file, int(line) if line else None, "prompt", message)


def _fit_prompt(ids: list[int], limit: int, tokenizer, overflow: str, source: str,
                stats: TruncationStats) -> list[int]:
    if not ids:  # nothing would predict the first response token (the layouts would disagree on it)
        raise _prompt_error(source, "prompt is empty after tokenisation")
    if len(ids) <= limit:
        return ids
    if overflow == "error":
        raise _prompt_error(source, f"prompt has {len(ids)} tokens, over data.max_prompt_tokens={limit}")
    stats.prompts_truncated += 1
    bos = tokenizer.bos_token_id
    if bos is not None and ids[0] == bos and _adds_bos(tokenizer):
        return [bos] + ids[len(ids) - limit + 1:]
    return ids[len(ids) - limit:]


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself starts sequences with BOS (Llama does; SmolLM2, whose "BOS" is ChatML's
    <|im_start|>, does not: keeping that token in front of a cut prompt would open a turn with no role).
    Probed once per tokenizer object (remembered on it)."""
    cached = getattr(tokenizer, "_preftune_adds_bos", None)
    if cached is None:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        cached = bool(ids) and ids[0] == tokenizer.bos_token_id
        try:
            tokenizer._preftune_adds_bos = cached
        except AttributeError:  # a tokenizer that refuses new attributes is simply probed every time
            pass
    return cached


def _check_budget(max_length: int, max_prompt_tokens: int) -> None:
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens ({max_prompt_tokens}) must be >= 1: the last prompt token predicts the "
                         "first response token")
    if max_prompt_tokens >= max_length:
        raise ValueError(f"max_prompt_tokens ({max_prompt_tokens}) must be below max_length ({max_length}): "
                         "responses need at least one token")


def _fit_response(ids: list[int], budget: int, stats: TruncationStats) -> list[int]:
    if len(ids) <= budget:
        return ids
    stats.responses_truncated += 1
    return ids[:budget]


def tokenize_pair(tokenizer, pair: PreferencePair, *, max_length: int, max_prompt_tokens: int,
                  prompt_overflow: str = "truncate", append_eos: bool = True,
                  stats: TruncationStats | None = None) -> TokenizedPair:
    _check_budget(max_length, max_prompt_tokens)
    stats = stats if stats is not None else TruncationStats()
    stats.examples += 1
    prompt_ids = _fit_prompt(encode_prompt(tokenizer, pair.prompt), max_prompt_tokens, tokenizer,
                             prompt_overflow, pair.source, stats)
    budget = max_length - len(prompt_ids)
    chosen = _fit_response(encode_response(tokenizer, pair.prompt, pair.chosen, append_eos=append_eos), budget, stats)
    rejected = _fit_response(encode_response(tokenizer, pair.prompt, pair.rejected, append_eos=append_eos),
                             budget, stats)
    return TokenizedPair(prompt_ids, chosen, rejected, pair.source)


def tokenize_example(tokenizer, example: SFTExample, *, max_length: int, max_prompt_tokens: int,
                     prompt_overflow: str = "truncate", append_eos: bool = True,
                     stats: TruncationStats | None = None) -> TokenizedExample:
    _check_budget(max_length, max_prompt_tokens)
    stats = stats if stats is not None else TruncationStats()
    stats.examples += 1
    prompt_ids = _fit_prompt(encode_prompt(tokenizer, example.prompt), max_prompt_tokens, tokenizer,
                             prompt_overflow, example.source, stats)
    completion = _fit_response(encode_response(tokenizer, example.prompt, example.completion, append_eos=append_eos),
                               max_length - len(prompt_ids), stats)
    return TokenizedExample(prompt_ids, completion, example.source)
