"""The ONLY place that turns hidden states + labels into per-token and per-sequence log-probs.

Shift, mask and reduction happen here, in fp32. Only completion positions (labels != IGNORE_INDEX) go
through the LM head, in chunks, so the full-vocabulary logits of prompt and padding positions are never
materialised (for SmolLM2 a (B, T, 49152) fp32 tensor is the largest thing a naive step allocates).
"""

from __future__ import annotations

import contextlib
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


def _split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder body, lm_head) when the model exposes them and its logits are a plain linear map of the
    last hidden state; None otherwise (then the full forward is used)."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale", "output_multiplier")):
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or not isinstance(head, nn.Linear) or decoder is model:
        return None
    return decoder, head


def _head_logps(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """(N,) log p(target) for (N, H) hidden states, chunked, in fp32 with autocast off."""
    weight = head.weight.float()
    bias = head.bias.float() if head.bias is not None else None
    out = []
    autocast_off = torch.autocast(device_type=hidden.device.type, enabled=False)
    with autocast_off:
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens].float()
            logits = nn.functional.linear(h, weight, bias)
            t = targets[start:start + chunk_tokens]
            out.append(logits.log_softmax(-1).gather(-1, t.unsqueeze(-1)).squeeze(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the completion tokens.

    Args: ``input_ids``, ``attention_mask``, ``labels``: (B, T); labels hold IGNORE_INDEX at prompt and
    padding positions. Returns ``(tok_logps (N,), row (N,))``: fp32 log p(labels[b, t] | tokens < t) for
    each of the N completion positions, and the row b each belongs to.
    """
    assert input_ids.shape == labels.shape == attention_mask.shape, (input_ids.shape, labels.shape)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows = mask.nonzero()[:, 0]
    split = _split_head(model)
    kwargs = {"attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if split is not None:
        decoder, head = split
        hidden = decoder(input_ids=input_ids, **kwargs).last_hidden_state[:, :-1]
        return _head_logps(head, hidden[mask], targets[mask], chunk_tokens), rows
    logits = model(input_ids=input_ids, **kwargs).logits[:, :-1]
    selected = logits[mask].float()
    return selected.log_softmax(-1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1), rows


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
    batch = input_ids.shape[0]
    logps = torch.zeros(batch, dtype=torch.float32, device=input_ids.device).index_add(0, rows, tok)
    n_tokens = torch.bincount(rows, minlength=batch).to(torch.float32)
    return SequenceLogps(logps=logps, n_tokens=n_tokens)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast for the transformer body when asked; a no-op otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
