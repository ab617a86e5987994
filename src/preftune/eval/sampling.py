"""Batched sampling with a KV cache, and sequence-level KL estimates from the policy's own samples.

Prompts are encoded exactly as training encodes them (``encode_prompt``), left-padded for generation.
Each sample keeps its generated token ids, so log-probs for KL are computed on the very tokens that were
sampled (re-tokenising decoded text can give different tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preftune.data.tokenize import encode_prompt
from preftune.models.logprobs import IGNORE_INDEX, sequence_logps


@dataclass
class Sample:
    prompt: object  # str or list of messages
    completion: str
    prompt_ids: list[int]
    completion_ids: list[int]  # generated tokens, up to and including EOS when it was generated


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, length - len(r):] = 1
    return ids, mask


class RowSeededSampler:
    """Sampling in which each row draws from its own seeded generator (``row_seeds``, one per row of the batch), by
    the Gumbel-max trick: argmax(logits / T + Gumbel noise) is a draw from softmax(logits / T), after top-p
    filtering when asked. A row's sample then does not depend on the rows beside it, the batch size or the process
    it was generated in (data-parallel PPO splits its prompts across processes and must sample what one process
    would), as far as its logits do not: exact in fp32 on a CPU; under bf16 or GPU kernels a row's logits move
    slightly with its batch's padding, and a near-tie can then draw another token. Used as a logits processor
    under greedy decoding."""

    def __init__(self, row_seeds: list[int], temperature: float, top_p: float = 1.0):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in row_seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative - ordered.softmax(-1) >= self.top_p  # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        uniform = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1 - 1e-7)))
        return logits + gumbel.to(logits.device)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, *, num_samples: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, max_new_tokens: int = 32, batch_size: int = 32, seed: int = 0,
             device: torch.device | None = None, row_seeds: list[int] | None = None) -> list[Sample]:
    """``num_samples`` completions for each prompt (prompt-major order). Temperature 0 is greedy.
    Seeded per batch, so results do not depend on what ran before; with ``row_seeds`` (one per completion) each
    completion is drawn from its own generator (:class:`RowSeededSampler`), independent of the batching.

    Samples come from the model's own distribution (the KL estimates and PPO rely on it): a model directory's
    ``generation_config.json`` is set aside for the call, since transformers fills every setting a call leaves
    unset from it (Qwen2.5-Instruct's ``repetition_penalty`` 1.05 made a token of p = 0.32 come out 9% of the
    time, and temperature 0 not the argmax)."""
    from transformers import GenerationConfig

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    # every module holding one (a PEFT wrapper copies its config into the base model while generating)
    shipped = {m: m.generation_config for m in [model, *model.modules()] if hasattr(m, "generation_config")}
    for m in shipped:
        m.generation_config = GenerationConfig()
    try:
        return _generate(model, tokenizer, prompts, num_samples=num_samples, temperature=temperature, top_p=top_p,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, device=device,
                         row_seeds=row_seeds)
    finally:
        for m, config in shipped.items():
            m.generation_config = config
        model.train(was_training)


def _generate(model, tokenizer, prompts: list, *, num_samples: int, temperature: float, top_p: float,
              max_new_tokens: int, batch_size: int, seed: int, device: torch.device,
              row_seeds: list[int] | None = None) -> list[Sample]:
    from transformers import LogitsProcessorList

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    jobs = [(p, encode_prompt(tokenizer, p)) for p in prompts for _ in range(num_samples)]
    if row_seeds is not None and len(row_seeds) != len(jobs):
        raise ValueError(f"{len(row_seeds)} row seeds for {len(jobs)} completions")
    out: list[Sample] = []
    for b, start in enumerate(range(0, len(jobs), batch_size)):
        chunk = jobs[start:start + batch_size]
        ids, mask = _left_pad([j[1] for j in chunk], pad)
        torch.manual_seed(seed * 100_003 + b)
        kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=pad,
                      eos_token_id=eos, use_cache=True)
        if temperature > 0 and row_seeds is not None:  # greedy over Gumbel-perturbed logits: a draw per row
            sampler = RowSeededSampler(row_seeds[start:start + batch_size], temperature, top_p)
            kwargs.update(do_sample=False, logits_processor=LogitsProcessorList([sampler]))
        elif temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        new = generated[:, ids.shape[1]:].tolist()
        for (prompt, prompt_ids), tokens in zip(chunk, new):
            if eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            out.append(Sample(prompt, text, prompt_ids, tokens))
    return out


@torch.no_grad()
def sample_logps(model, samples: list[Sample], pad_id: int, *, batch_size: int = 32) -> torch.Tensor:
    """(N,) summed log-probs of each sample's completion tokens under ``model`` (fp32)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        length = max(len(s.prompt_ids) + len(s.completion_ids) for s in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, s in enumerate(chunk):
            seq = s.prompt_ids + s.completion_ids
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            if s.completion_ids:
                labels[i, len(s.prompt_ids): len(seq)] = torch.tensor(s.completion_ids)
        out.append(sequence_logps(model, ids.to(device), mask.to(device), labels.to(device)).logps.cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def kl_estimate(policy, reference, samples: list[Sample], pad_id: int, *, batch_size: int = 32) -> dict:
    """Sequence-level KL(π ‖ π_ref) from samples of π: mean over samples of Σ_t (log π − log π_ref).

    Unbiased when the samples were drawn from π at temperature 1 without top-p truncation. Returns the
    mean, its standard error, and the per-sample values.
    """
    diff = sample_logps(policy, samples, pad_id, batch_size=batch_size) - sample_logps(
        reference, samples, pad_id, batch_size=batch_size)
    n = max(1, diff.numel())
    sem = float(diff.std(unbiased=True) / n ** 0.5) if diff.numel() > 1 else 0.0
    return {"kl": float(diff.mean()) if diff.numel() else 0.0, "kl_sem": sem, "per_sample": diff.tolist()}
