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
    batch["n_positions"] = batch["attention_mask"].sum()
    return _with_ref_logps(batch, pairs)


def _with_ref_logps(batch: dict[str, torch.Tensor], pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
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


def collate_pairs_prefix_shared(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per pair: ``[prompt][chosen][rejected]``, so the prompt is computed once per pair.

    A (B, 1, T, T) boolean mask lets chosen tokens see the prompt and earlier chosen tokens, and rejected
    tokens see the prompt and earlier rejected tokens (never chosen); position ids restart at the end of the
    prompt for the rejected response, so each response sees exactly what it would see in its own sequence.
    The log-prob gather is explicit: the last prompt position predicts the first token of both responses.
    Padding positions attend only to themselves (an all-False row would give NaN in softmax).
    Returns input_ids, attention_mask, position_ids (B, T); gather_rows, gather_src, gather_targets,
    gather_segments (N,) with segment i < B for pair i's chosen and B + i for its rejected; n_pairs.
    """
    n = len(pairs)
    length = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    segment = torch.full((n, length), -1, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, -1 padding
    rows, src, targets, segments = [], [], [], []
    for i, p in enumerate(pairs):
        lp, lc, lr = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        input_ids[i, : lp + lc + lr] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids, dtype=torch.long)
        position_ids[i, : lp + lc] = torch.arange(lp + lc)
        position_ids[i, lp + lc: lp + lc + lr] = torch.arange(lp, lp + lr)
        position_ids[i, lp + lc + lr:] = torch.arange(lp + lr, lp + lr + length - (lp + lc + lr))
        segment[i, :lp], segment[i, lp: lp + lc], segment[i, lp + lc: lp + lc + lr] = 0, 1, 2
        # chosen[k] is predicted by position lp-1+k; rejected[0] by lp-1, rejected[k>0] by lp+lc-1+k
        rows += [i] * (lc + lr)
        src += [lp - 1 + k for k in range(lc)] + [lp - 1 if k == 0 else lp + lc - 1 + k for k in range(lr)]
        targets += p.chosen_ids + p.rejected_ids
        segments += [i] * lc + [n + i] * lr
    q, k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    visible = (k == 0) | ((q == k) & (q > 0))
    mask = (visible & causal & (q >= 0)) | (torch.eye(length, dtype=torch.bool) & (q < 0))
    return _with_ref_logps({
        "input_ids": input_ids, "attention_mask": mask[:, None], "position_ids": position_ids,
        "gather_rows": torch.tensor(rows), "gather_src": torch.tensor(src), "gather_targets": torch.tensor(targets),
        "gather_segments": torch.tensor(segments), "n_pairs": torch.tensor(n),
        # tokens of the chosen and rejected sequences, the prompt counted in each (as in the padded layout), so
        # tokens/s compares across layouts and with other trainers
        "n_positions": torch.tensor(sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                                        for p in pairs)),
    }, pairs)


def pair_collator(layout: str):
    """The collate function of a layout: ``padded`` (chosen and rejected as separate padded rows) or
    ``prefix_shared`` (one row per pair, prompt computed once)."""
    return {"padded": collate_pairs, "prefix_shared": collate_pairs_prefix_shared}[layout]
