"""The one log-prob function: completion tokens only, fp32, and the batched layouts agree with separate forwards."""

import pytest
import torch

from preftune.data.collate import collate_pairs
from preftune.data.records import PreferencePair
from preftune.data.tokenize import tokenize_pair
from preftune.models import logprobs as lp
from preftune.models.logprobs import IGNORE_INDEX, sequence_logps


def _pairs(tok):
    raw = [("The movie was", " wonderful and moving.", " dull."),
           ("A much longer opening line for this review", " is fine.", " is not good at all, sadly."),
           ("Short", " yes", " no no no no")]
    return [tokenize_pair(tok, PreferencePair(p, c, r, f"x:{i}"), max_length=64, max_prompt_tokens=32)
            for i, (p, c, r) in enumerate(raw, 1)]


def _manual(model, prompt, response):
    """Reference computation: full logits, log_softmax over the vocabulary, sum at response positions."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].double()
    logp = logits.log_softmax(-1)
    return sum(logp[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(response))


def test_matches_manual_full_logits(tiny_model, tiny_tokenizer):
    items = _pairs(tiny_tokenizer)
    batch = collate_pairs(items, tiny_tokenizer.pad_token_id)
    out = sequence_logps(tiny_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    expected = [_manual(tiny_model, p.prompt_ids, p.chosen_ids) for p in items] + \
               [_manual(tiny_model, p.prompt_ids, p.rejected_ids) for p in items]
    assert out.logps.dtype == torch.float32
    assert out.logps.tolist() == pytest.approx(expected, abs=2e-4)
    assert out.n_tokens.tolist() == [len(p.chosen_ids) for p in items] + [len(p.rejected_ids) for p in items]


def test_concatenated_forward_equals_separate_forwards(tiny_model, tiny_tokenizer):
    items = _pairs(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    batch = collate_pairs(items, pad)
    stacked = sequence_logps(tiny_model, batch["input_ids"], batch["attention_mask"], batch["labels"]).logps
    separate = []
    for attr in ("chosen_ids", "rejected_ids"):
        for p in items:
            ids = torch.tensor([p.prompt_ids + getattr(p, attr)])
            labels = ids.clone()
            labels[0, : len(p.prompt_ids)] = IGNORE_INDEX
            separate.append(sequence_logps(tiny_model, ids, torch.ones_like(ids), labels).logps.item())
    assert stacked.tolist() == pytest.approx(separate, abs=1e-4)


def test_prompt_tokens_never_count(tiny_model, tiny_tokenizer):
    p = _pairs(tiny_tokenizer)[1]
    ids = torch.tensor([p.prompt_ids + p.chosen_ids])
    labels = ids.clone()
    labels[0, : len(p.prompt_ids)] = IGNORE_INDEX
    masked = sequence_logps(tiny_model, ids, torch.ones_like(ids), labels)
    unmasked = sequence_logps(tiny_model, ids, torch.ones_like(ids), ids.clone())
    assert masked.n_tokens.item() == len(p.chosen_ids)
    assert unmasked.n_tokens.item() == ids.shape[1] - 1
    assert masked.logps.item() > unmasked.logps.item()  # fewer (negative) terms


def test_chunking_and_full_logits_path_agree(tiny_model, tiny_tokenizer, monkeypatch):
    batch = collate_pairs(_pairs(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    args = (tiny_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    default = sequence_logps(*args).logps
    chunked = sequence_logps(*args, chunk_tokens=3).logps
    monkeypatch.setattr(lp, "_split_head", lambda model: None)
    full = sequence_logps(*args).logps
    assert torch.allclose(default, chunked, atol=1e-5)
    assert torch.allclose(default, full, atol=1e-4)


def test_gradients_flow_only_through_completion_logits(tiny_model, tiny_tokenizer):
    batch = collate_pairs(_pairs(tiny_tokenizer)[:1], tiny_tokenizer.pad_token_id)
    out = sequence_logps(tiny_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    out.logps.sum().backward()
    assert tiny_model.model.embed_tokens.weight.grad is not None
    assert torch.isfinite(tiny_model.model.embed_tokens.weight.grad).all()


def test_prefix_shared_layout_equals_padded_layout(tiny_model, tiny_tokenizer):
    """One [prompt][chosen][rejected] row per pair (prompt computed once) gives the same per-sequence log-probs
    as separate padded rows, with pairs of different lengths (padding inside the batch)."""
    from preftune.data.collate import collate_pairs_prefix_shared
    from preftune.models.logprobs import batch_logps, completion_counts

    items = _pairs(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    padded = collate_pairs(items, pad)
    shared = collate_pairs_prefix_shared(items, pad)
    a, b = batch_logps(tiny_model, padded), batch_logps(tiny_model, shared)
    assert torch.allclose(a.logps, b.logps, atol=1e-4), (a.logps, b.logps)
    assert torch.equal(a.n_tokens, b.n_tokens)
    assert torch.equal(completion_counts(shared), a.n_tokens)
    # tokens/s accounting is layout-independent (the prompt counts once per sequence), while the row is shorter
    assert int(shared["n_positions"]) == int(padded["n_positions"])
    assert shared["input_ids"].numel() < padded["input_ids"].numel()


def test_prefix_shared_mask_hides_chosen_from_rejected(tiny_tokenizer):
    from preftune.data.collate import collate_pairs_prefix_shared

    item = _pairs(tiny_tokenizer)[0]
    batch = collate_pairs_prefix_shared([item], tiny_tokenizer.pad_token_id)
    mask = batch["attention_mask"][0, 0]
    lp, lc, lr = len(item.prompt_ids), len(item.chosen_ids), len(item.rejected_ids)
    assert not mask[lp + lc:, lp: lp + lc].any()  # rejected never sees chosen
    assert mask[lp + lc:, :lp].all()  # but sees the whole prompt
    assert batch["position_ids"][0, lp + lc].item() == lp  # positions restart after the prompt
    assert not mask.triu(1).any()  # causal


def test_packed_layout_equals_padded_layout(tiny_model, tiny_tokenizer):
    """Several [prompt][chosen][rejected] triples per row (block-diagonal mask, positions restarting per triple)
    give the same per-sequence log-probs as separate padded rows, in the original pair order."""
    from preftune.data.collate import collate_pairs_packed
    from preftune.models.logprobs import batch_logps, completion_counts

    items = _pairs(tiny_tokenizer) * 2
    pad = tiny_tokenizer.pad_token_id
    padded = collate_pairs(items, pad)
    longest = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in items)
    packed = collate_pairs_packed(items, pad, row_length=2 * longest)
    assert packed["input_ids"].shape[0] < len(items) and packed["input_ids"].shape[1] <= 2 * longest
    a, b = batch_logps(tiny_model, padded), batch_logps(tiny_model, packed)
    assert torch.allclose(a.logps, b.logps, atol=1e-4), (a.logps, b.logps)
    assert torch.equal(completion_counts(packed), a.n_tokens)
    assert int(packed["n_positions"]) == int(padded["n_positions"])


def test_packed_mask_is_block_diagonal(tiny_tokenizer):
    from preftune.data.collate import collate_pairs_packed

    a, b = _pairs(tiny_tokenizer)[:2]
    batch = collate_pairs_packed([a, b], tiny_tokenizer.pad_token_id, row_length=10_000)
    assert batch["input_ids"].shape[0] == 1
    mask, pos = batch["attention_mask"][0, 0], batch["position_ids"][0]
    la = len(a.prompt_ids) + len(a.chosen_ids) + len(a.rejected_ids)
    assert not mask[la:, :la].any()  # the second triple never sees the first
    assert pos[la].item() == 0  # and its positions restart
    lp = len(b.prompt_ids)
    assert torch.equal(mask[la:la + lp, la:la + lp], torch.ones(lp, lp, dtype=torch.bool).tril())  # causal prompt


def test_pack_rows_first_fit_decreasing():
    from preftune.data.collate import pack_rows

    assert pack_rows([5, 3, 4, 2, 6], capacity=8) == [[0, 1], [2], [3, 4]]  # 6+2, 5+3, 4
    assert pack_rows([9, 1], capacity=8) == [[0], [1]]  # too long for any row: a row of its own
    assert sorted(i for row in pack_rows([3] * 7, capacity=7) for i in row) == list(range(7))
