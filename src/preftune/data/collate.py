"""Padded batches. Chosen and rejected are stacked into one (2B, T) batch so each model runs one forward.

Row i < B is the chosen response of pair i, row B + i its rejected response; both carry the same prompt
tokens, masked out of the labels with IGNORE_INDEX (as is padding).
"""

from __future__ import annotations

import torch

from preftune.data.tokenize import TokenizedExample, TokenizedPair
from preftune.models.logprobs import IGNORE_INDEX


def _pad_rows(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (prompt, response) rows into input_ids, attention_mask and labels, each (N, T)."""
    length = max(len(p) + len(r) for p, r in sequences)
    n = len(sequences)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, response) in enumerate(sequences):
        ids = prompt + response
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        labels[i, len(prompt): len(ids)] = torch.tensor(response, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """(2B, T) tensors: chosen rows first, then rejected rows; plus ``n_pairs`` (scalar) and, when every pair
    carries precomputed reference log-probs, ``ref_logps`` (2B,) in the same row order."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    batch = _pad_rows(rows, pad_id)
    batch["n_pairs"] = torch.tensor(len(pairs))
    if pairs and all(p.ref_logps is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs],
                                          dtype=torch.float32)
    return batch


def collate_examples(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """(B, T) tensors for supervised fine-tuning on completions."""
    return _pad_rows([(e.prompt_ids, e.completion_ids) for e in examples], pad_id)


def split_pair_batch(batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Row `index` of a pair batch as a 1-row batch (tests: separate forwards)."""
    return {k: v[index: index + 1] for k, v in batch.items() if v.dim() == 2}
