"""preftune.data.tokenize and collate: prompt sharing, masking, chat templates, BOS, truncation, EOS.

Each test names, in a comment, the bug it catches. Most use the real embedded SmolLM2 tokenizer
(``load_tokenizer("tiny")``: no BOS on plain text, bos=<|im_start|> id 1, eos=<|im_end|> id 2, ChatML);
the BOS tests wrap it to behave like a Llama tokenizer that prepends BOS.
"""

from __future__ import annotations

import os

import pytest
import torch

from preftune.data.collate import collate_pairs
from preftune.data.records import DataError, PreferencePair, SFTExample
from preftune.data.tokenize import (
    TruncationStats,
    encode_prompt,
    encode_response,
    tokenize_example,
    tokenize_pair,
)
from preftune.models.logprobs import IGNORE_INDEX

EOS = 2  # <|im_end|>
LONG = dict(max_length=256, max_prompt_tokens=128)  # limits no test input below reaches


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):  # tests/conftest.py: load_tokenizer("tiny"), once per session
    t = tiny_tokenizer
    # The facts the expectations below rely on; if the embedded tokenizer changes, fail here, clearly.
    assert (t.bos_token_id, t.eos_token_id) == (1, EOS)
    assert t("Hello world")["input_ids"] == t("Hello world", add_special_tokens=False)["input_ids"]
    return t


def ids_of(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def pair(prompt, chosen, rejected, source="data/train.jsonl:7") -> PreferencePair:
    return PreferencePair(prompt, chosen, rejected, source)


class LlamaLike:
    """The real tokenizer made to behave like a Llama(-3) tokenizer: ``add_special_tokens=True``
    prepends BOS, and the chat template's text starts with the BOS string. BOS is <|endoftext|> (id 0),
    which the inner tokenizer maps to id 0 when it appears in text."""

    bos_token = "<|endoftext|>"
    bos_token_id = 0

    def __init__(self, inner):
        self.inner = inner
        self.eos_token_id = inner.eos_token_id
        self.pad_token_id = inner.pad_token_id

    def __call__(self, text, add_special_tokens=True):
        ids = list(self.inner(text, add_special_tokens=False)["input_ids"])
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False
        return self.bos_token + self.inner.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def decode(self, ids, **kwargs):
        return self.inner.decode(ids, **kwargs)


# ---------------------------------------------------------------- plain strings


def test_plain_pair_shares_prompt_and_ends_responses_with_eos(tok):
    # Catches: prompt tokenised differently per response or with the response glued on (prompt ids !=
    # tokenizer(prompt)); response ids that repeat the prompt; missing EOS; EOS appended twice.
    p = pair("The movie was", " great fun, I loved it.", " a waste of time.")
    tp = tokenize_pair(tok, p, **LONG)
    assert tp.prompt_ids == tok("The movie was")["input_ids"]
    assert tp.chosen_ids == ids_of(tok, " great fun, I loved it.") + [EOS]
    assert tp.rejected_ids == ids_of(tok, " a waste of time.") + [EOS]
    for response in (tp.chosen_ids, tp.rejected_ids):
        assert response.count(EOS) == 1
        assert response[: len(tp.prompt_ids)] != tp.prompt_ids
    assert tp.source == "data/train.jsonl:7"


def test_plain_pair_prompt_is_what_sampling_encodes(tok):
    # Catches: training and sampling (encode_prompt) disagreeing on the prompt tokens.
    p = pair("Once upon a time", " there was a cat.", " no.")
    assert tokenize_pair(tok, p, **LONG).prompt_ids == encode_prompt(tok, "Once upon a time")


def test_collate_masks_prompt_and_padding_and_stacks_chosen_then_rejected(tok):
    # Catches: prompt or padding positions left in the labels; labels shifted or off by one; rejected rows
    # interleaved instead of stacked after the chosen ones; an attention mask computed as
    # input_ids != pad_id (here pad_id == eos, so that would also hide every response's final EOS).
    pairs = [
        tokenize_pair(tok, pair("The movie was", " great.", " a long, dull and pointless mess."), **LONG),
        tokenize_pair(tok, pair("I think this film is really", " wonderful and moving.", " bad."), **LONG),
    ]
    pad = tok.pad_token_id
    assert pad == EOS
    batch = collate_pairs(pairs, pad_id=pad)
    B = len(pairs)
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    T = max(len(a) + len(b) for a, b in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2 * B, T)
    assert int(batch["n_pairs"]) == B
    for r, (prompt, response) in enumerate(rows):
        n, k = len(prompt) + len(response), len(prompt)
        assert batch["input_ids"][r, :n].tolist() == prompt + response
        assert batch["input_ids"][r, n:].tolist() == [pad] * (T - n)
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (T - n)
        assert batch["labels"][r, :k].tolist() == [IGNORE_INDEX] * k
        assert batch["labels"][r, k:n].tolist() == response
        assert batch["labels"][r, n:].tolist() == [IGNORE_INDEX] * (T - n)
    # Chosen row i and rejected row B + i carry the identical prompt tokens.
    for i, p in enumerate(pairs):
        k = len(p.prompt_ids)
        assert torch.equal(batch["input_ids"][i, :k], batch["input_ids"][B + i, :k])
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


# ---------------------------------------------------------------- conversations


def test_conversational_pair_uses_the_chat_template(tok):
    # Catches: prompt rendered without the generation prompt (or with special tokens added on top);
    # response not what the template appends (e.g. content only, no <|im_end|>); the template's trailing
    # "\n" after <|im_end|> kept as a trained token; the default system prompt rendered twice.
    prompt = [{"role": "user", "content": "Tell me a joke."}]
    chosen = [{"role": "assistant", "content": "Why did the chicken cross the road?"}]
    rejected = [{"role": "assistant", "content": "No."}]
    tp = tokenize_pair(tok, pair(prompt, chosen, rejected), **LONG)
    rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert tp.prompt_ids == ids_of(tok, rendered)
    assert tp.prompt_ids == encode_prompt(tok, prompt)
    for response, ids in ((chosen, tp.chosen_ids), (rejected, tp.rejected_ids)):
        full = tok.apply_chat_template(prompt + response, tokenize=False)
        assert full == rendered + response[0]["content"] + "<|im_end|>\n"  # what the template adds
        assert ids == ids_of(tok, response[0]["content"] + "<|im_end|>")
        assert ids[-1] == EOS and ids.count(EOS) == 1
        assert tok.decode(tp.prompt_ids + ids) == full[:-1]  # everything up to and including <|im_end|>
        assert tok.decode(ids).count("system") == 0


def test_conversational_multi_turn_prompt(tok):
    # Catches: only the last prompt message rendered, or earlier assistant turns dropped / mis-ended.
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]
    tp = tokenize_pair(tok, pair(prompt, [{"role": "assistant", "content": "Blue."}],
                                 [{"role": "assistant", "content": "I refuse."}]), **LONG)
    rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert tp.prompt_ids == ids_of(tok, rendered)
    assert tp.chosen_ids == ids_of(tok, "Blue.<|im_end|>")
    assert tp.rejected_ids == ids_of(tok, "I refuse.<|im_end|>")


def test_chat_template_that_is_not_prefix_consistent_is_an_error(tok):
    # Catches: silently slicing a rendering whose prompt part is not a prefix (the response would be
    # garbage, misaligned with the prompt tokens).
    class Inconsistent(LlamaLike):
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            text = super().apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
            return text + ("<GEN>" if add_generation_prompt else "")

    prompt = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="prefix"):
        encode_response(Inconsistent(tok), prompt, [{"role": "assistant", "content": "Yo"}])


# ---------------------------------------------------------------- BOS


def test_no_double_bos_plain_prompt(tok):
    # Catches: a prompt that literally starts with the BOS text getting a second BOS from
    # add_special_tokens=True (the collapse missing), and BOS dropped from plain prompts.
    llama = LlamaLike(tok)
    for text in ("Hello world", "<|endoftext|>Hello world"):
        ids = encode_prompt(llama, text)
        assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1, (text, ids)
        assert ids[1:] == ids_of(tok, "Hello world")


def test_no_double_bos_chat_prompt(tok):
    # Catches: add_special_tokens=True on a chat rendering whose text already starts with BOS.
    llama = LlamaLike(tok)
    prompt = [{"role": "user", "content": "Hi"}]
    ids = encode_prompt(llama, prompt)
    assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1
    assert ids[1:] == ids_of(tok, tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))


def test_chat_prompt_gets_no_special_tokens_on_top_of_the_template(tok):
    # Catches: add_special_tokens=True on the rendering; a template that does not start with BOS must not
    # have one added (the model was tuned on the template's text, exactly).
    class NoBosTemplate(LlamaLike):
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return self.inner.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    prompt = [{"role": "user", "content": "Hi"}]
    ids = encode_prompt(NoBosTemplate(tok), prompt)
    assert ids == ids_of(tok, tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
    assert 0 not in ids


def test_bos_tokenizer_responses_carry_no_bos(tok):
    # Catches: responses tokenised with add_special_tokens=True (a BOS in the middle of every sequence).
    llama = LlamaLike(tok)
    plain = tokenize_pair(llama, pair("The movie was", " great.", " bad."), **LONG)
    chat = tokenize_pair(llama, pair([{"role": "user", "content": "Hi"}],
                                     [{"role": "assistant", "content": "Hello!"}],
                                     [{"role": "assistant", "content": "Go away."}]), **LONG)
    for tp in (plain, chat):
        assert tp.prompt_ids[0] == 0 and tp.prompt_ids.count(0) == 1
        for response in (tp.chosen_ids, tp.rejected_ids):
            assert 0 not in response and response[-1] == EOS
    assert plain.chosen_ids == ids_of(tok, " great.") + [EOS]


def test_bos_tokenizer_truncated_prompt_keeps_bos_and_its_end(tok):
    # Catches: prompt truncation that drops the BOS (keeping the last N tokens blindly) or that keeps
    # N + 1 tokens (BOS added on top of the last N).
    llama = LlamaLike(tok)
    text = " ".join(f"w{i}" for i in range(40))
    body = ids_of(tok, text)
    tp = tokenize_pair(llama, pair(text, " yes.", " no."), max_length=32, max_prompt_tokens=10)
    assert tp.prompt_ids == [0] + body[-9:]


# ---------------------------------------------------------------- truncation


def test_long_prompt_keeps_its_last_tokens(tok):
    # Catches: keeping the START of an over-long prompt (the part far from the response), or an
    # off-by-one in the kept length; a truncated prompt not counted.
    text = " ".join(f"w{i}" for i in range(60))
    full = tok(text)["input_ids"]
    assert len(full) > 16
    stats = TruncationStats()
    tp = tokenize_pair(tok, pair(text, " yes.", " no."), max_length=64, max_prompt_tokens=16, stats=stats)
    assert tp.prompt_ids == full[-16:]
    assert tp.chosen_ids == ids_of(tok, " yes.") + [EOS]  # the response is untouched
    assert (stats.examples, stats.prompts_truncated, stats.responses_truncated) == (1, 1, 0)


def test_prompt_of_exactly_max_prompt_tokens_is_kept_whole(tok):
    # Catches: `<` instead of `<=` (a prompt that fits being cut, or raising with prompt_overflow=error).
    text = " ".join(f"w{i}" for i in range(8))
    full = tok(text)["input_ids"]
    stats = TruncationStats()
    tp = tokenize_pair(tok, pair(text, " a", " b"), max_length=len(full) + 8, max_prompt_tokens=len(full),
                       prompt_overflow="error", stats=stats)
    assert tp.prompt_ids == full and stats.prompts_truncated == 0


def test_long_response_is_cut_to_fit_and_does_not_claim_to_end(tok):
    # Catches: responses not cut (sequence over max_length); the cut made before EOS is appended (so the
    # cut response ends with EOS as if complete); the rejected side cut too; uncounted cuts.
    prompt, long_text = "The movie was", " " + " ".join(f"v{i}" for i in range(40))
    p_ids, long_ids = tok(prompt)["input_ids"], ids_of(tok, long_text)
    stats = TruncationStats()
    tp = tokenize_pair(tok, pair(prompt, long_text, " bad."), max_length=20, max_prompt_tokens=10, stats=stats)
    budget = 20 - len(p_ids)
    assert tp.prompt_ids == p_ids
    assert tp.chosen_ids == long_ids[:budget]
    assert EOS not in tp.chosen_ids
    assert tp.rejected_ids == ids_of(tok, " bad.") + [EOS]
    assert len(tp.prompt_ids) + len(tp.chosen_ids) == 20
    assert (stats.examples, stats.prompts_truncated, stats.responses_truncated) == (1, 0, 1)


def test_response_at_the_budget_boundary(tok):
    # Catches: off-by-one around the budget. A response whose text + EOS fits exactly keeps its EOS; one
    # whose text alone fills the budget loses the EOS (it was cut) rather than having its last real
    # token replaced by EOS.
    prompt = "The movie was"
    p_len = len(tok(prompt)["input_ids"])
    fits, cut = " great fun and lovely music", " great fun and lovely music too"
    f_ids, c_ids = ids_of(tok, fits), ids_of(tok, cut)
    assert len(c_ids) == len(f_ids) + 1
    stats = TruncationStats()
    tp = tokenize_pair(tok, pair(prompt, fits, cut), max_length=p_len + len(f_ids) + 1,
                       max_prompt_tokens=p_len, stats=stats)
    assert tp.chosen_ids == f_ids + [EOS]
    assert tp.rejected_ids == c_ids
    assert stats.responses_truncated == 1


def test_response_never_cut_to_nothing(tok):
    # Catches: a truncated prompt eating the whole length budget (empty responses carry no signal and
    # give a 0 log-prob).
    text = " ".join(f"w{i}" for i in range(50))
    tp = tokenize_pair(tok, pair(text, " yes indeed.", " no way."), max_length=10, max_prompt_tokens=9)
    assert len(tp.prompt_ids) == 9
    assert tp.chosen_ids == ids_of(tok, " yes indeed.")[:1]
    assert tp.rejected_ids == ids_of(tok, " no way.")[:1]


def test_truncation_stats_accumulate_over_pairs(tok):
    # Catches: stats reset per call, or chosen/rejected cuts counted once per pair instead of per response.
    stats = TruncationStats()
    long_prompt = " ".join(f"w{i}" for i in range(30))
    long_resp = " " + " ".join(f"v{i}" for i in range(30))
    kw = dict(max_length=24, max_prompt_tokens=8, stats=stats)
    tokenize_pair(tok, pair("Short", " a.", " b."), **kw)
    tokenize_pair(tok, pair(long_prompt, " a.", " b."), **kw)
    tokenize_pair(tok, pair("Short", long_resp, long_resp + " x"), **kw)
    tokenize_pair(tok, pair(long_prompt, long_resp, " b."), **kw)
    assert (stats.examples, stats.prompts_truncated, stats.responses_truncated) == (4, 2, 3)
    assert "4 examples" in stats.summary()


def test_prompt_overflow_error_names_file_line_and_field(tok):
    # Catches: prompt_overflow="error" ignored (silently truncating), or an error that loses the record's
    # location (file:line) or the field.
    text = " ".join(f"w{i}" for i in range(30))
    with pytest.raises(DataError) as info:
        tokenize_pair(tok, pair(text, " a.", " b.", source="data/train.jsonl:7"), max_length=64,
                      max_prompt_tokens=8, prompt_overflow="error")
    assert "data/train.jsonl:7: field 'prompt'" in str(info.value)
    assert (info.value.file, info.value.line, info.value.field) == ("data/train.jsonl", 7, "prompt")
    assert "max_prompt_tokens=8" in str(info.value)


def test_prompt_overflow_error_keeps_a_source_without_line(tok):
    # Catches: a source that is not "file:line" (e.g. an in-memory list of pairs) vanishing from the error.
    text = " ".join(f"w{i}" for i in range(30))
    with pytest.raises(DataError) as info:
        tokenize_pair(tok, pair(text, " a.", " b.", source="generated-pairs"), max_length=64,
                      max_prompt_tokens=8, prompt_overflow="error")
    assert str(info.value).startswith("generated-pairs: field 'prompt'")


# ---------------------------------------------------------------- EOS handling


def test_append_eos_false_keeps_string_response_as_tokenised(tok):
    # Catches: append_eos=False ignored (an EOS appended to a sampled completion that was cut by a length
    # limit, teaching the model to stop where it did not).
    tp = tokenize_pair(tok, pair("The movie was", " great fun", " a waste"), **LONG, append_eos=False)
    assert tp.chosen_ids == ids_of(tok, " great fun")
    assert tp.rejected_ids == ids_of(tok, " a waste")
    assert EOS not in tp.chosen_ids + tp.rejected_ids


@pytest.mark.parametrize("append_eos", [True, False])
def test_response_text_ending_with_eos_string_ends_with_one_eos(tok, append_eos):
    # Catches: a literal "<|im_end|>" not tokenised as the EOS id, or a second EOS appended after it.
    tp = tokenize_pair(tok, pair("The movie was", " great.<|im_end|>", " bad."), **LONG, append_eos=append_eos)
    assert tp.chosen_ids == ids_of(tok, " great.") + [EOS]
    assert tp.chosen_ids.count(EOS) == 1


def test_append_eos_false_chat_response_still_ends_at_template_eos(tok):
    # Catches: the template's <|im_end|> stripped, or the trailing "\n" kept, when append_eos=False.
    prompt = [{"role": "user", "content": "Hi"}]
    ids = encode_response(tok, prompt, [{"role": "assistant", "content": "Hello!"}], append_eos=False)
    assert ids == ids_of(tok, "Hello!<|im_end|>")


# ---------------------------------------------------------------- SFT examples


def test_sft_example_plain_and_chat(tok):
    # Catches: SFT tokenisation drifting from the pair rules (different prompt ids, missing EOS,
    # chat completion not cut at <|im_end|>).
    ex = tokenize_example(tok, SFTExample("The movie was", " great.", "sft.jsonl:3"), **LONG)
    assert ex.prompt_ids == tok("The movie was")["input_ids"]
    assert ex.completion_ids == ids_of(tok, " great.") + [EOS]
    assert ex.source == "sft.jsonl:3"
    prompt = [{"role": "user", "content": "Hi"}]
    ex = tokenize_example(tok, SFTExample(prompt, [{"role": "assistant", "content": "Hello!"}], "sft.jsonl:4"),
                          **LONG)
    assert ex.prompt_ids == ids_of(tok, tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
    assert ex.completion_ids == ids_of(tok, "Hello!<|im_end|>")
    ex = tokenize_example(tok, SFTExample("The movie was", " great fun", "sft.jsonl:5"), **LONG, append_eos=False)
    assert ex.completion_ids == ids_of(tok, " great fun")


def test_sft_example_truncation_and_overflow_error(tok):
    # Catches: SFT ignoring max_prompt_tokens / max_length / prompt_overflow, or re-appending EOS after a cut.
    long_prompt = " ".join(f"w{i}" for i in range(40))
    long_resp = " " + " ".join(f"v{i}" for i in range(40))
    stats = TruncationStats()
    ex = tokenize_example(tok, SFTExample(long_prompt, long_resp, "sft.jsonl:9"), max_length=20,
                          max_prompt_tokens=12, stats=stats)
    assert ex.prompt_ids == tok(long_prompt)["input_ids"][-12:]
    assert ex.completion_ids == ids_of(tok, long_resp)[:8]
    assert EOS not in ex.completion_ids
    assert (stats.examples, stats.prompts_truncated, stats.responses_truncated) == (1, 1, 1)
    ex = tokenize_example(tok, SFTExample(long_prompt, " ok", "sft.jsonl:9"), max_length=10, max_prompt_tokens=9)
    assert ex.completion_ids == ids_of(tok, " ok")[:1]
    with pytest.raises(DataError, match=r"sft\.jsonl:9: field 'prompt'"):
        tokenize_example(tok, SFTExample(long_prompt, " ok", "sft.jsonl:9"), max_length=64,
                         max_prompt_tokens=12, prompt_overflow="error")


def test_budget_guard_rejects_prompt_limit_at_or_over_max_length(tok):
    # Catches: a negative response budget silently keeping part of a response past max_length.
    with pytest.raises(ValueError, match="must be below max_length"):
        tokenize_pair(tok, pair("The movie was", " a.", " b."), max_length=8, max_prompt_tokens=8)


def test_tokenizer_dir_override_for_tiny(tmp_path, monkeypatch, tiny_tokenizer):
    """PREFTUNE_TOKENIZER_DIR (bench/gpu/: a machine without the embedded model's package) gives `tiny` the same
    tokenizer from its saved files."""
    from preftune.models.load import load_tokenizer

    tiny_tokenizer.save_pretrained(tmp_path)
    monkeypatch.setenv("PREFTUNE_TOKENIZER_DIR", str(tmp_path))
    other = load_tokenizer("tiny")
    text = "A review: the movie was great!"
    assert other(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert (other.pad_token_id, other.eos_token_id, len(other)) == (tiny_tokenizer.pad_token_id,
                                                                     tiny_tokenizer.eos_token_id, len(tiny_tokenizer))
    assert other.name_or_path == str(tmp_path)


def test_gguf_conversions_are_keyed_on_content_and_pruned(tmp_path, monkeypatch):
    """The same GGUF in two virtual environments maps to one cached conversion (content-keyed); a finished
    conversion removes earlier ones of the same file name, and nothing else."""
    from preftune.models import load

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    a, b, c = tmp_path / "a" / "M.gguf", tmp_path / "b" / "M.gguf", tmp_path / "c" / "M.gguf"
    for path, data in ((a, b"same"), (b, b"same"), (c, b"other")):
        path.parent.mkdir()
        path.write_bytes(data)
    assert load._gguf_cache_dir(a) == load._gguf_cache_dir(b) != load._gguf_cache_dir(c)
    models = tmp_path / "cache" / "models"
    for name in ("M-0123456789ab", "M-oldpathkey00", "Other-0123456789ab"):
        (models / name).mkdir(parents=True)
        (models / name / "config.json").write_text("{}")
    (models / ".convert-tmp").mkdir()
    target = load._gguf_cache_dir(a)
    target.mkdir()
    (target / "config.json").write_text("{}")
    load._prune_other_conversions(target)
    assert sorted(p.name for p in models.iterdir()) == sorted([".convert-tmp", "Other-0123456789ab", target.name])


def test_file_digest_is_remembered_on_disk_and_never_stale(tmp_path, monkeypatch):
    """The digest survives the process (an on-disk memo read instead of re-hashing), a rewritten file is
    re-hashed even when its size and mtime are set back, and a damaged memo is ignored."""
    import hashlib

    from preftune.models import load

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "M.gguf"
    path.write_bytes(b"first")
    assert load.file_digest(path) == hashlib.sha256(b"first").hexdigest()
    memos = list((tmp_path / "cache" / "digests").iterdir())
    assert len(memos) == 1

    monkeypatch.setattr(load, "_DIGESTS", {})  # a new process
    hashed = []
    original = load._hash_and_remember
    monkeypatch.setattr(load, "_hash_and_remember", lambda p, m: hashed.append(p) or original(p, m))
    assert load.file_digest(path) == hashlib.sha256(b"first").hexdigest() and hashed == []

    stat = path.stat()
    path.write_bytes(b"other")  # same size; mtime set back: only the ctime tells
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    monkeypatch.setattr(load, "_DIGESTS", {})
    assert load.file_digest(path) == hashlib.sha256(b"other").hexdigest() and hashed == [path]

    for memo in (tmp_path / "cache" / "digests").iterdir():
        memo.write_text("not a digest")
    monkeypatch.setattr(load, "_DIGESTS", {})
    assert load.file_digest(path) == hashlib.sha256(b"other").hexdigest() and len(hashed) == 2


def test_a_prompt_of_no_tokens_is_refused(tok, monkeypatch):
    """Nothing would predict the first response token: the padded layout dropped it and the shared layouts read
    it from the row's last position (chosen log-probs up to 5 nats apart between layouts)."""
    from preftune.config import ConfigError, load_config
    from preftune.data import tokenize

    with pytest.raises(ConfigError, match="data.max_prompt_tokens.*>= 1"):
        load_config(None, ["data.max_prompt_tokens=0"])
    with pytest.raises(ValueError, match="max_prompt_tokens.*>= 1"):
        tokenize_pair(tok, pair("Hello there", " yes", " no"), max_length=16, max_prompt_tokens=0)
    monkeypatch.setattr(tokenize, "encode_prompt", lambda tokenizer, prompt: [])  # a prompt that encodes to nothing
    with pytest.raises(DataError, match="prefs.jsonl.*7.*prompt.*empty after tokenisation"):
        tokenize_pair(tok, PreferencePair("nothing", " yes", " no", "prefs.jsonl:7"), max_length=16,
                      max_prompt_tokens=8)


def test_a_multi_turn_response_keeps_every_turn(tok):
    """A conversation response holds one EOS per turn (ChatML's <|im_end|>): the response runs to its last EOS.
    Cutting at the first one dropped the later turns silently, and this explicit pair (same first assistant
    turn) became chosen == rejected: zero gradient, counted as a wrong answer."""
    from preftune.data.records import validate_pair

    def turn(role, content):
        return {"role": role, "content": content}

    record = {"prompt": [turn("user", "Plan a trip")],
              "chosen": [turn("assistant", "Sure."), turn("user", "Where?"), turn("assistant", "Paris, by train.")],
              "rejected": [turn("assistant", "Sure."), turn("user", "Where?"), turn("assistant", "Nowhere.")]}
    stats = TruncationStats()
    tp = tokenize_pair(tok, validate_pair(record, "f.jsonl", 3), max_length=256, max_prompt_tokens=128, stats=stats)
    assert tp.chosen_ids != tp.rejected_ids and stats.responses_truncated == 0
    chosen = tok.decode(tp.chosen_ids)
    assert chosen.startswith("Sure.") and chosen.endswith("Paris, by train.<|im_end|>")
    assert tp.chosen_ids.count(tok.eos_token_id) == 3 and tp.chosen_ids[-1] == tok.eos_token_id  # one per turn
