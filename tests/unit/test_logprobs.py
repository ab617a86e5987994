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


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prefix_shared_layout_equals_padded_layout(tiny_tokenizer, attention):
    """One [prompt][chosen][rejected] row per pair (prompt computed once) gives the same per-sequence log-probs
    as separate padded rows, with pairs of different lengths (padding inside the batch). Also with eager
    attention, which adds the mask to its scores (given the boolean mask it was off by ~0.2 nats)."""
    from preftune.data.collate import collate_pairs_prefix_shared
    from preftune.models.load import load_causal_lm
    from preftune.models.logprobs import batch_logps, completion_counts

    tiny_model = load_causal_lm("tiny", seed=0)
    tiny_model.set_attn_implementation(attention)
    assert tiny_model.config._attn_implementation == attention
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


def test_prefix_shared_mask_is_converted_once_for_all_layers(tiny_model, tiny_tokenizer):
    """Every attention layer gets the same additive mask tensor in the attention's dtype (SDPA would otherwise
    convert the boolean one again in each layer and keep each copy for the backward), and the result is
    bit-identical to the boolean mask's, forward and backward, in fp32 and under bf16 autocast."""
    from preftune.data.collate import collate_pairs_prefix_shared
    from preftune.models.logprobs import additive_mask, autocast_context, batch_logps

    batch = collate_pairs_prefix_shared(_pairs(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    assert lp._split_head(tiny_model) is not None  # its one-off probe forward runs before the hooks
    seen = []
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"]),
                                                       with_kwargs=True) for layer in tiny_model.model.layers]
    try:
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            seen.clear()
            with autocast_context(torch.device("cpu"), precision):
                batch_logps(tiny_model, batch)
            assert len(seen) == len(tiny_model.model.layers) and all(m is seen[0] for m in seen)
            assert seen[0].dtype == dtype and torch.equal(seen[0] == 0, batch["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    results = []
    for mask in (batch["attention_mask"], additive_mask(batch["attention_mask"], torch.bfloat16)):
        tiny_model.zero_grad()
        with autocast_context(torch.device("cpu"), "bf16"):
            hidden = tiny_model.model(input_ids=batch["input_ids"], attention_mask=mask,
                                      position_ids=batch["position_ids"]).last_hidden_state
        hidden.float().square().sum().backward()
        results.append((hidden.detach(), tiny_model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    tiny_model.zero_grad()
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


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


def _head_case(bias: bool):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    weights = torch.randn(23)  # an arbitrary upstream gradient per token
    return head, hidden, targets, weights


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk,temp_bytes", [(1024, None), (5, None), (1024, 4 * 16 * 7)])
def test_fused_head_forward_and_fp32_backward_equal_autograd(bias, chunk, temp_bytes, monkeypatch):
    """The custom head (fp32 forward, softmax kept for the backward) gives autograd's log-probs and, outside
    bf16 autocast, autograd's gradients for hidden states, weight and bias, with any chunking: token chunks
    (``chunk``) and, with a small temporary budget, 2-token forward chunks and 7-row vocabulary slices in the
    backward (ragged last ones)."""
    if temp_bytes:
        monkeypatch.setattr(lp, "TEMP_BYTES", temp_bytes)
        cpu = torch.device("cpu")
        assert lp._token_step(chunk, 50, cpu) == 2 and lp._vocab_step(16, 50, cpu) == 7
        meta = torch.device("meta")  # any non-CPU device: the caller's chunk, one vocabulary slice
        assert lp._token_step(chunk, 50, meta) == chunk and lp._vocab_step(16, 50, meta) == 50
    head, hidden, targets, weights = _head_case(bias)
    params = [hidden, head.weight] + ([head.bias] if bias else [])

    def grads(fn):
        for t in params:
            t.grad = None
        out = fn()
        (out * weights).sum().backward()
        return out.detach(), [t.grad.clone() for t in params]

    plain = lambda: torch.nn.functional.linear(hidden, head.weight, head.bias).log_softmax(-1).gather(  # noqa: E731
        -1, targets[:, None]).squeeze(-1)
    out_ref, g_ref = grads(plain)
    out, g = grads(lambda: lp._head_logps(head, hidden, targets, chunk))
    assert torch.allclose(out, out_ref, atol=2e-6)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_fused_head_backward_is_bf16_under_bf16_autocast_and_forward_stays_fp32():
    """Under bf16 autocast the log-probs are still fp32-exact, and the gradients carry bf16 rounding only
    (relative error ~1e-3, far above fp32's 1e-7 and far below a wrong gradient's)."""
    head, hidden, targets, weights = _head_case(False)
    out32 = lp._head_logps(head, hidden, targets, 1024)
    (out32 * weights).sum().backward()
    g32 = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = lp._head_logps(head, hidden, targets, 1024)
    assert out16.dtype == torch.float32 and torch.equal(out16, out32)
    (out16 * weights).sum().backward()
    for a, b in zip((hidden.grad, head.weight.grad), g32):
        rel = ((a - b).norm() / b.norm()).item()
        assert 1e-5 < rel < 1e-2, rel


def test_fused_head_bf16_backward_is_accurate_for_confident_tokens():
    """Near-certain targets (p_t ~ 0.98 for every token, as a trained model has many): the target entry
    g * (1 - p_t) comes from the fp32 log-prob, so the bf16 backward stays within bf16 rounding of the fp64
    gradient (0.35%); g - g * p_t computed in bf16 was 8.8% off here (33% at p_t ~ 0.996)."""
    torch.manual_seed(0)
    vocab = 64
    head = torch.nn.Linear(vocab, vocab, bias=False)
    targets = torch.randint(0, vocab, (40,))
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab) + 0.05 * torch.randn(vocab, vocab))
    hidden = (8.5 * torch.nn.functional.one_hot(targets, vocab).float() + 0.3 * torch.randn(40, vocab))
    hidden.requires_grad_()
    with torch.no_grad():
        p_t = (hidden @ head.weight.t()).softmax(-1).gather(-1, targets[:, None])
    assert p_t.min() > 0.94 and p_t.mean() > 0.98
    weights = torch.randn(40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lp._head_logps(head, hidden, targets, 1024)
    (out * weights).sum().backward()
    h64, w64 = hidden.detach().double().requires_grad_(), head.weight.detach().double().requires_grad_()
    ref = (h64 @ w64.t()).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    (ref * weights.double()).sum().backward()
    for got, want in ((hidden.grad, h64.grad), (head.weight.grad, w64.grad)):
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel < 0.015, rel


def test_fused_head_without_grad_saves_nothing():
    head, hidden, targets, _ = _head_case(False)
    with torch.no_grad():
        out = lp._head_logps(head, hidden, targets, 7)
    assert out.grad_fn is None and out.shape == (23,)
    assert lp._head_logps(head, hidden[:0], targets[:0], 7).shape == (0,)


def test_bf16_stored_reference_gives_the_same_logps_under_autocast(tiny_model, tiny_tokenizer):
    """A reference kept for bf16 autocast stores its decoder's linear weights in bf16: bit-identical log-probs
    to the fp32-stored copy under autocast (autocast casts those weights to bf16 anyway); the LM head, tied to
    the embedding, stays fp32; and a call without autocast fails loudly instead of silently changing."""
    import copy

    from preftune.models.logprobs import batch_logps
    from preftune.models.reference import FrozenReference

    batch = collate_pairs(_pairs(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    fp32 = FrozenReference(copy.deepcopy(tiny_model))
    bf16 = FrozenReference(copy.deepcopy(tiny_model), precision="bf16")
    linear = [m for m in bf16.model.get_decoder().modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    assert bf16.model.get_output_embeddings().weight.dtype == torch.float32
    assert bf16.model.get_input_embeddings().weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fp32.logps(batch).logps, bf16.logps(batch).logps
    assert torch.equal(a, b), (a, b)
    assert not torch.equal(a, batch_logps(tiny_model, batch).logps)  # autocast does change them vs fp32
    with pytest.raises(RuntimeError):
        bf16.logps(batch)


def test_fused_head_refuses_a_second_backward():
    head, hidden, targets, weights = _head_case(False)
    out = (lp._head_logps(head, hidden, targets, 1024) * weights).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.backward()


def test_batch_to_keeps_the_counts_python_reads_on_the_host(tiny_tokenizer):
    """Counts read with int() stay on the host (on a GPU reading them would wait for the queued kernels); every
    other tensor moves ("meta" stands in for a GPU here). Completion counts need no data-sized output."""
    from preftune.data.collate import batch_to, collate_pairs_prefix_shared
    from preftune.models.logprobs import completion_counts

    items = _pairs(tiny_tokenizer)
    for batch in (collate_pairs(items, tiny_tokenizer.pad_token_id),
                  collate_pairs_prefix_shared(items, tiny_tokenizer.pad_token_id)):
        moved = batch_to(batch, "meta")
        assert {k for k, v in moved.items() if v.device.type == "cpu"} == {"n_pairs", "n_positions"}
        assert all(v.device.type == "meta" for k, v in moved.items() if k not in ("n_pairs", "n_positions"))
        assert completion_counts(batch).tolist() == [len(p.chosen_ids) for p in items] + \
            [len(p.rejected_ids) for p in items]
