"""The canonical records and their validators: each raw record (a dict read from any file format) is checked
once, here, and becomes a :class:`PreferencePair` or :class:`SFTExample` carrying ``source`` (``"file:line"``), so
that any later error can point back to the exact record. The file readers are ``preftune.data.records``; records
with several ranked or scored responses are ``preftune.data.multi``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from preftune.errors import DataError

Message = dict  # {"role": str, "content": str}
Text = str | list[Message]  # a plain string, or a conversation (list of {role, content})

ROLES = ("system", "user", "assistant", "tool")
HH_ASSISTANT = "\n\nAssistant:"  # Anthropic HH dialogues: the prompt ends with the last one
FORMATS = ".jsonl, .jsonl.gz, .json, .csv, .parquet or a datasets.save_to_disk directory (DIR[::split])"
TYPE_ERROR = "expected a string or a list of {role, content} messages, got "


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``chosen`` preferred over ``rejected`` as a continuation of ``prompt``."""

    prompt: Text
    chosen: Text
    rejected: Text
    source: str  # "path/to/file.jsonl:17"


@dataclass(frozen=True)
class SFTExample:
    """One supervised example: train on ``completion`` given ``prompt``."""

    prompt: Text
    completion: Text
    source: str


class Invalid(Exception):
    """Raised by field checks, which know the field but not the file/line; turned into DataError."""

    def __init__(self, field: str, message: str, reason: str | None = None):
        super().__init__(message)
        self.field, self.message, self.reason = field, message, reason


# ---------------------------------------------------------------- field validation


def _check_messages(value: list, name: str) -> list[Message]:
    """Canonical copies ``{"role", "content"}`` (extra message keys are dropped on purpose)."""
    out = []
    for i, msg in enumerate(value, 1):
        problem = None
        if not isinstance(msg, dict):
            problem = f"expected an object with 'role' and 'content', got {type(msg).__name__}"
        elif not isinstance(msg.get("role"), str):
            problem = "missing 'role'" if msg.get("role") is None else "'role' must be a string"
        elif msg["role"] not in ROLES:
            problem = f"role '{msg['role']}' is not one of {', '.join(ROLES)}"
        elif not isinstance(msg.get("content"), str):
            problem = "missing 'content'" if msg.get("content") is None else "'content' must be a string"
        if problem:
            raise Invalid(name, f"message #{i}: {problem}", f"field '{name}': bad message ({problem})")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def check_text(value: Any, name: str, *, is_response: bool) -> Text:
    """A non-empty string (kept verbatim: leading spaces matter to tokenizers) or message list."""
    if value is None:
        raise Invalid(name, "missing field")
    if isinstance(value, str):
        if not value.strip():
            raise Invalid(name, "empty")
        return value
    if not isinstance(value, list):
        raise Invalid(name, TYPE_ERROR + type(value).__name__)
    if not value:
        raise Invalid(name, "empty")
    messages = _check_messages(value, name)
    if is_response and not messages[-1]["content"].strip():
        raise Invalid(name, "last message has empty content")
    return messages


def check_same_kind(values: dict[str, Text]) -> None:
    """Mixing a string prompt with message-list responses has no single correct template."""
    first, *rest = values
    kind = {True: "a string", False: "a list of messages"}
    for name in rest:
        if isinstance(values[name], str) != isinstance(values[first], str):
            raise Invalid(name, f"is {kind[isinstance(values[name], str)]} but '{first}' is "
                           f"{kind[isinstance(values[first], str)]}", f"field '{name}': mixed strings and message lists")


def normalised(text: Text) -> Any:
    if isinstance(text, str):
        return text.strip()
    return [(m["role"], m["content"].strip()) for m in text]


def _split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Derive the prompt from records that only have ``chosen``/``rejected``.

    Conversations: the prompt is their longest common prefix of messages. Anthropic HH strings:
    the prompt is everything up to and including the last ``"\\n\\nAssistant:"`` and both
    dialogues must share it exactly (some HH pairs diverge earlier; splitting them anyway would
    train on a response to a different conversation).
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        c, r = _check_messages(chosen, "chosen"), _check_messages(rejected, "rejected")
        k = 0
        while k < min(len(c), len(r)) and c[k] == r[k]:
            k += 1
        if k == 0:
            raise Invalid("prompt", "missing field (and 'chosen'/'rejected' share no leading messages)",
                           "missing field 'prompt'")
        return c[:k], c[k:], r[k:]
    if isinstance(chosen, str) and isinstance(rejected, str) and HH_ASSISTANT in chosen:
        cut_c = chosen.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)
        cut_r = rejected.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)
        if cut_r < len(HH_ASSISTANT) or rejected[:cut_r] != chosen[:cut_c]:
            raise Invalid("rejected", "prompt differs from chosen's (the dialogue up to the last "
                           "'\\n\\nAssistant:': the two diverge earlier, or a response itself contains it)",
                           "field 'rejected': prompt differs from chosen's")
        return chosen[:cut_c], chosen[cut_c:], rejected[cut_r:]
    raise Invalid("prompt", "missing field (and 'chosen'/'rejected' are neither conversations "
                   "nor Human/Assistant dialogues it could be derived from)", "missing field 'prompt'")


def _whole_conversations(prompt: str, chosen: list, rejected: list) -> tuple[list, list, list]:
    """UltraFeedback-binarized rows (the most common public DPO format): ``prompt`` a string, ``chosen`` and
    ``rejected`` whole conversations that begin with it. The conversations' shared leading messages are the
    prompt; the last of them must be the user turn that says ``prompt``."""
    shared, chosen, rejected = _split_implicit_prompt(chosen, rejected)
    last = shared[-1]
    if last["role"] != "user" or last["content"].strip() != prompt.strip():
        raise Invalid("prompt", "is a string, and 'chosen'/'rejected' are whole conversations whose shared "
                      "messages do not end with a user turn saying it", "field 'prompt': differs from the "
                      "conversations' shared user turn")
    return shared, chosen, rejected


def _pair_fields(raw: dict) -> tuple[Text, Text, Text]:
    for name in ("chosen", "rejected"):
        if raw.get(name) is None:
            raise Invalid(name, "missing field")
    prompt, chosen, rejected = raw.get("prompt"), raw["chosen"], raw["rejected"]
    if prompt is None:
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)
    elif isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = _whole_conversations(prompt, chosen, rejected)
    texts = {"prompt": check_text(prompt, "prompt", is_response=False),
             "chosen": check_text(chosen, "chosen", is_response=True),
             "rejected": check_text(rejected, "rejected", is_response=True)}
    check_same_kind(texts)
    if normalised(texts["chosen"]) == normalised(texts["rejected"]):
        raise Invalid("chosen", "chosen identical to rejected")
    return texts["prompt"], texts["chosen"], texts["rejected"]


def located(fn: Callable[[dict], Any], raw: Any, file: str, line: int) -> Any:
    if not isinstance(raw, dict):
        raise DataError(file, line, None, f"expected a JSON object, got {type(raw).__name__}",
                        reason="record is not an object")
    try:
        return fn(raw)
    except Invalid as bad:
        raise DataError(file, line, bad.field, bad.message, reason=bad.reason) from None


def validate_pair(raw: dict, file: str, line: int) -> PreferencePair:
    """Check one raw preference record (explicit or implicit prompt); raise :class:`DataError`."""
    prompt, chosen, rejected = located(_pair_fields, raw, file, line)
    return PreferencePair(prompt, chosen, rejected, source=f"{file}:{line}")


def _sft_fields(raw: dict) -> tuple[Text, Text]:
    if raw.get("messages") is not None:
        messages = check_text(raw["messages"], "messages", is_response=True)
        if isinstance(messages, str):
            raise Invalid("messages", TYPE_ERROR.replace("a string or ", "") + "str")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise Invalid("messages", "must end with an assistant message that follows at least one other")
        return messages[:-1], messages[-1:]
    if raw.get("completion") is not None or raw.get("chosen") is None:
        texts = {"prompt": check_text(raw.get("prompt"), "prompt", is_response=False),
                 "completion": check_text(raw.get("completion"), "completion", is_response=True)}
        check_same_kind(texts)
        return texts["prompt"], texts["completion"]
    prompt, chosen, _ = _pair_fields(raw)  # Preferred-FT: fine-tune on the chosen response
    return prompt, chosen


def validate_sft(raw: dict, file: str, line: int) -> SFTExample:
    """Check one raw SFT record: ``{prompt, completion}``, ``{messages}`` or a preference record."""
    prompt, completion = located(_sft_fields, raw, file, line)
    return SFTExample(prompt, completion, source=f"{file}:{line}")


def review_text(prompt: str, completion: str) -> str:
    """The text a scorer sees for one generation: the full review, prompt and completion joined
    as they are (the completion carries its own leading space, as a tokenizer decodes it)."""
    return prompt + completion


@dataclass(frozen=True)
class Comparison:
    """One thing to judge: is ``a`` a better continuation of ``prompt`` than ``b``? (no label)"""

    prompt: str
    a: str
    b: str
    source: str


def _comparison_fields(raw: dict) -> tuple[str, str, str]:
    out = []
    for name in ("prompt", "a", "b"):
        text = check_text(raw.get(name), name, is_response=name != "prompt")
        if not isinstance(text, str):
            raise Invalid(name, "expected a string (a judge reads plain text)")
        out.append(text)
    return out[0], out[1], out[2]


def is_comparison(raw: Any) -> bool:
    """A record with ``a`` and ``b`` (and ``prompt``) rather than ``chosen`` and ``rejected``."""
    return isinstance(raw, dict) and "a" in raw and "b" in raw and "chosen" not in raw


def validate_comparison(raw: dict, file: str, line: int) -> Comparison:
    """Check one raw ``{prompt, a, b}`` record; raise :class:`DataError` naming the field."""
    prompt, a, b = located(_comparison_fields, raw, file, line)
    return Comparison(prompt, a, b, source=f"{file}:{line}")


def plain_text(text: Text) -> str:
    """A conversation as the text a judge reads (``role: content`` lines); a string as it is."""
    return text if isinstance(text, str) else "\n".join(f"{m['role']}: {m['content']}" for m in text)
