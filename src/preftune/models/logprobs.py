"""The ONLY place that turns hidden states + labels into per-token and per-sequence log-probs.

Two batch layouts share it: padded rows (labels with IGNORE_INDEX; state t predicts token t + 1) and
prefix-shared rows ``[prompt][chosen][rejected]`` (explicit (row, source position, target) triples).

Shift, mask and reduction happen here, in fp32. Only completion positions (labels != IGNORE_INDEX) go
through the LM head, in chunks, so the full-vocabulary logits of prompt and padding positions are never
materialised (for SmolLM2 a (B, T, 49152) fp32 tensor is the largest thing a naive step allocates).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch import nn

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024


@dataclass
class SequenceLogps:
    """Per-sequence results. ``logps``: (B,) sum over completion tokens; ``n_tokens``: (B,) their count."""

    logps: torch.Tensor
    n_tokens: torch.Tensor

    def mean(self) -> torch.Tensor:
        """(B,) length-averaged log-probs (sequences with no completion token give 0)."""
        return self.logps / self.n_tokens.clamp(min=1)


_SPLIT_CHECKED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder body, lm_head) when the model exposes them and its logits are a plain linear map of the
    last hidden state; None otherwise (then the full forward is used).

    Models that post-process their logits (Gemma 2's soft-capping, Cohere's ``logit_scale``, Granite's
    ``logits_scaling``, RecurrentGemma's ``logits_soft_cap``, ...) must not take the split path. Rather than
    trust a list of config names, the first call for each model compares ``lm_head(decoder(x))`` with the
    model's own logits on three tokens, and remembers the answer."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or not isinstance(head, nn.Linear) or decoder is model:
        return None
    if model not in _SPLIT_CHECKED:
        _SPLIT_CHECKED[model] = _head_is_plain(model, decoder, head)
    return (decoder, head) if _SPLIT_CHECKED[model] else None


def uses_split_head(model: nn.Module) -> bool:
    """Whether log-probs of ``model`` take the decoder + chunked-head path; runs the one-off probe now if it has
    not run (callers that hook the decoder call this first, so the probe's forwards do not reach their hooks)."""
    return _split_head(model) is not None


@contextlib.contextmanager
def eager_eval(model: nn.Module):
    """For probes: eval mode (no dropout, e.g. LoRA's, drawing different masks in two forwards) and no compiled
    code (a compiled decoder is not compiled for the probe's shapes); the model's mode is restored after."""
    was_training = model.training
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    model.eval()
    try:
        with set_stance("force_eager") if set_stance is not None else contextlib.nullcontext():
            yield
    finally:
        model.train(was_training)


@torch.no_grad()
def _head_is_plain(model: nn.Module, decoder: nn.Module, head: nn.Linear) -> bool:
    """Whether the model's logits are exactly ``head(decoder(x).last_hidden_state)`` (same precision, eager:
    a compiled decoder is not compiled for the probe's shape)."""
    ids = torch.arange(3, device=head.weight.device)[None] % head.weight.shape[0]
    try:
        with eager_eval(model):
            full = model(input_ids=ids, use_cache=False).logits
            split = head(decoder(input_ids=ids, use_cache=False).last_hidden_state)
    except Exception:  # noqa: BLE001 - a model the probe cannot drive takes the full forward, which is always right
        return False
    return full.shape == split.shape and torch.allclose(full.float(), split.float(), rtol=1e-5, atol=1e-5)


def _head_grad_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the LM head's backward matmuls: bf16 under bf16 autocast (the body's backward is bf16
    there too), fp32 otherwise. The forward, i.e. every log-prob, is fp32 either way."""
    if torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


TEMP_BYTES = 24 << 20  # per vocabulary-sized temporary: below glibc's 32 MiB mmap ceiling, so it is reused


def _token_step(chunk_tokens: int, vocab: int, device: torch.device) -> int:
    """Tokens per forward chunk: at most ``chunk_tokens`` and, on a CPU, at most TEMP_BYTES of fp32 logits. There
    a fresh allocation above glibc's mmap threshold is new zero-filled pages on every call (measured here: 28 ms
    for 113 MB against 2.8 ms to refill one); below it, the freed block is reused. A GPU's caching allocator
    reuses memory anyway, and larger matmuls are what it wants."""
    if device.type != "cpu":
        return chunk_tokens
    return max(1, min(chunk_tokens, TEMP_BYTES // (4 * vocab)))


def _vocab_step(hidden_size: int, vocab: int, device: torch.device) -> int:
    """Vocabulary rows per backward slice: on a CPU the slice's (V_s, H) outputs and casts stay under
    TEMP_BYTES; elsewhere one slice."""
    if device.type != "cpu":
        return vocab
    return max(1, min(vocab, TEMP_BYTES // (4 * max(hidden_size, 1))))


def _forward_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                   step: int, probs: torch.Tensor | None) -> torch.Tensor:
    """(N,) fp32 log p(target), ``step`` tokens at a time; when ``probs`` (N, V) is given, the softmax is written
    into it (in its dtype) for the backward."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], step):
        end = min(hidden.shape[0], start + step)
        logits = nn.functional.linear(hidden[start:end].float(), weight, bias)
        lse = torch.logsumexp(logits, -1)
        out[start:end] = logits.gather(-1, targets[start:end].unsqueeze(-1)).squeeze(-1) - lse
        if probs is not None:
            probs[start:end] = logits.sub_(lse.unsqueeze(-1)).exp_()
    return out


class _HeadLogps(torch.autograd.Function):
    """log p(target) through the LM head. The forward is fp32, chunked over tokens; it keeps only the softmax p,
    in ``grad_dtype``. The backward: d logits = g * (onehot - p) in place over p, then d hidden = d logits @ W and
    d W = d logits^T @ hidden in ``grad_dtype`` matmuls over vocabulary slices (small outputs, reused memory:
    measured 3x faster for d W than one vocabulary-wide matmul and its fresh 113 MB result on this CPU)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, step, grad_dtype):
        probs = torch.empty(hidden.shape[0], weight.shape[0], dtype=grad_dtype, device=hidden.device)
        out = _forward_logps(hidden, weight, bias, targets, step, probs)
        ctx.grad_dtype = grad_dtype
        ctx.save_for_backward(hidden, weight, targets, probs, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if getattr(ctx, "used", False):
            raise RuntimeError("the fused LM head's saved softmax is consumed by its backward: backward through "
                               "it twice (retain_graph=True) is not supported")
        ctx.used = True
        hidden, weight, targets, d_logits, logp = ctx.saved_tensors
        dtype = ctx.grad_dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        # g * (onehot - p) over the saved p; the target entry g * (1 - p_t) from the fp32 log p_t: computed as
        # g - g * p_t in bf16 it would be mostly rounding for confident tokens (p_t > 0.99: bf16's step near 1
        # is 0.004), 6-13% gradient error on such a batch
        target_grad = (-grad_out * torch.expm1(logp)).to(dtype).unsqueeze(-1)
        d_logits.mul_(-grad_out.to(dtype).unsqueeze(-1)).scatter_(-1, targets.unsqueeze(-1), target_grad)
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        h = hidden.to(dtype) if need_w else None
        vocab = weight.shape[0]
        step = _vocab_step(hidden.shape[1], vocab, hidden.device)
        for start in range(0, vocab, step):
            d = d_logits[:, start:start + step]
            if need_h:
                grad_h.add_(d @ weight[start:start + step].to(dtype))
            if need_w:
                grad_w[start:start + step] = d.t() @ h
        grad_b = d_logits.sum(0, dtype=torch.float32) if need_b else None
        return (grad_h.to(hidden.dtype) if need_h else None), grad_w, grad_b, None, None, None


def _head_logps(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """(N,) fp32 log p(target) for (N, H) hidden states, chunked: fp32 forward with autocast off; the backward
    follows ``_head_grad_dtype``."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    grad_dtype = _head_grad_dtype(hidden.device)
    bias = head.bias.float() if head.bias is not None else None
    weight = head.weight.float()
    step = _token_step(chunk_tokens, weight.shape[0], hidden.device)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _HeadLogps.apply(hidden, weight, bias, targets, step, grad_dtype)
        return _forward_logps(hidden, weight, bias, targets, step, None)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean (B, 1, T, T) mask (True = may attend) as the additive one attention adds to its scores: 0 where
    allowed, -inf elsewhere, exactly what SDPA makes of a boolean mask. Made once per forward in the attention's
    dtype, every layer then uses this one tensor: given the boolean one, SDPA converts it again in each layer and
    its backward keeps every copy (28 x 205 MB at 8 rows of 3.5k tokens on a 28-layer model). Eager attention
    adds the mask to its scores, so it needs this form too."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _attention_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype of the attention scores: the autocast dtype when autocast is on, else the weights' float dtype."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def gathered_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    rows: torch.Tensor,
    src: torch.Tensor,
    targets: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """(N,) fp32 log p(targets[n] | the hidden state at (rows[n], src[n])).

    The general form behind both layouts: in the padded layout the state at position t predicts the token at
    t + 1; in the prefix-shared layout the last prompt position predicts the first token of BOTH responses.
    ``attention_mask`` is (B, T) or a (B, 1, T, T) boolean mask (True = may attend).
    """
    assert rows.shape == src.shape == targets.shape and rows.dim() == 1
    if attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
        attention_mask = additive_mask(attention_mask, _attention_dtype(model, input_ids.device))
    kwargs = {"attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    split = _split_head(model)
    if split is not None:
        decoder, head = split
        hidden = decoder(input_ids=input_ids, **kwargs).last_hidden_state
        return _head_logps(head, hidden[rows, src], targets, chunk_tokens)
    logits = model(input_ids=input_ids, **kwargs).logits
    return logits[rows, src].float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the completion tokens of a padded batch.

    Args: ``input_ids``, ``attention_mask``, ``labels``: (B, T); labels hold IGNORE_INDEX at prompt and
    padding positions. Returns ``(tok_logps (N,), row (N,))``: fp32 log p(labels[b, t] | tokens < t) for
    each of the N completion positions, and the row b each belongs to.
    """
    assert input_ids.shape == labels.shape == attention_mask.shape, (input_ids.shape, labels.shape)
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    tok = gathered_logps(model, input_ids, attention_mask, rows=rows, src=cols, targets=labels[rows, cols + 1],
                         position_ids=position_ids, chunk_tokens=chunk_tokens)
    return tok, rows


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> SequenceLogps:
    """Per-sequence summed completion log-probs (B,) and completion token counts (B,), fp32."""
    tok, rows = token_logps(model, input_ids, attention_mask, labels,
                            position_ids=position_ids, chunk_tokens=chunk_tokens)
    return _segment_sums(tok, rows, input_ids.shape[0])


def _segment_sums(tok: torch.Tensor, segments: torch.Tensor, n: int) -> SequenceLogps:
    logps = torch.zeros(n, dtype=torch.float32, device=tok.device).index_add(0, segments, tok)
    n_tokens = _counts(segments, n)
    return SequenceLogps(logps=logps, n_tokens=n_tokens)


def _counts(segments: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) fp32 occurrences of each segment id (exact below 2**24). ``torch.bincount`` would size its output
    from the data, a host sync on a GPU."""
    return torch.zeros(n, dtype=torch.float32, device=segments.device).index_add_(
        0, segments, torch.ones(segments.shape, dtype=torch.float32, device=segments.device))


def batch_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> SequenceLogps:
    """Per-sequence log-probs of a collated batch in either layout: padded rows (``labels``) or prefix-shared
    rows (``gather_*`` index tensors from ``collate_pairs_prefix_shared``). For pair batches the result has 2B
    entries, chosen first."""
    if "gather_src" not in batch:
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    tok = gathered_logps(model, batch["input_ids"], batch["attention_mask"], rows=batch["gather_rows"],
                         src=batch["gather_src"], targets=batch["gather_targets"], position_ids=batch["position_ids"])
    return _segment_sums(tok, batch["gather_segments"], 2 * int(batch["n_pairs"]))


class LogpsModule(nn.Module):
    """A model's ``batch_logps`` as one module, so that DistributedDataParallel wraps the whole forward (the
    decoder body and the chunked LM head are called separately inside ``batch_logps``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = batch_logps(self.model, batch)
        return out.logps, out.n_tokens


def module_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> SequenceLogps:
    """``batch_logps`` of a model, or of the DDP-wrapped, FSDP2-sharded or DeepSpeed-wrapped ``LogpsModule`` a
    multi-process step calls."""
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, LogpsModule)) or isinstance(
            getattr(model, "module", None), LogpsModule):  # a DeepSpeed engine around one
        return SequenceLogps(*model(batch))
    return batch_logps(model, batch)


def completion_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B,) number of completion tokens per sequence, for either layout (no forward pass)."""
    if "gather_segments" in batch:
        return _counts(batch["gather_segments"], 2 * int(batch["n_pairs"]))
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).to(torch.float32)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast for the transformer body when asked; a no-op otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
