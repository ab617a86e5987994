"""PPO's model and per-iteration pieces: the policy with its value head, the rollout (sample, score, old
log-probs, reference log-probs, values), advantages, and the clipped minibatch update. The loop that drives them
is ``preftune.recipes.ppo`` (its module docstring describes the recipe); the pure maths is ``ppo_math``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from preftune.models.logprobs import IGNORE_INDEX, autocast_context, token_logps, uses_split_head
from preftune.rl.ppo_math import (clipped_policy_loss, clipped_value_loss, gae, kl_shaped_rewards, masked_sum, to_grid,
                                  token_entropy, whiten)
from preftune import faults
from preftune.rl.settings import PPOSettings
from preftune.train.loop import Skips, clipped_step

EvalHook = Callable[[nn.Module, int], "dict[str, float] | None"]


class PolicyWithValue(nn.Module):
    """The policy LM plus a fp32 value head on its decoder's last hidden states (see the module docstring).
    One module so that checkpoints and the optimizer hold both."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.get_output_embeddings().in_features, 1, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        uses_split_head(policy)  # the head probe's own forwards come now, not inside forward()'s decoder hook

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                n_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L) padded prompt + completion rows -> ``(logprobs (B, T), values (B, T), hidden (N, H))`` over the
        T = ``n_cols`` completion positions (``hidden``: the N completion tokens' predicting states). One
        forward: the log-probs come from ``token_logps`` and a hook on the decoder keeps its hidden states."""
        captured: list[torch.Tensor] = []
        handle = self.policy.get_decoder().register_forward_hook(lambda m, a, out: captured.append(out[0]))
        try:
            tok, rows = token_logps(self.policy, input_ids, attention_mask, labels)
        finally:
            handle.remove()
        assert len(captured) == 1, "the decoder's hidden states were not seen once during the forward"
        rows_, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        hidden = captured[0][rows_, cols]  # (N, H): state t predicts token t + 1
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            values = self.value_head(hidden.float()).squeeze(-1)  # (N,) fp32
        shape = (input_ids.shape[0], n_cols)
        return to_grid(tok, rows, shape), to_grid(values, rows, shape), hidden


def build_batch(samples: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (B, L) of prompt + completion, labels only on the
    completion; ``mask`` (B, T) over completion positions (T = the longest completion)."""
    length = max(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    n_cols = max(len(s.completion_ids) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    attention, mask = torch.zeros_like(ids), torch.zeros((len(samples), n_cols))
    for i, s in enumerate(samples):
        seq, p = s.prompt_ids + s.completion_ids, len(s.prompt_ids)
        ids[i, :len(seq)], attention[i, :len(seq)] = torch.tensor(seq), 1
        labels[i, p:len(seq)] = torch.tensor(s.completion_ids)
        mask[i, :len(s.completion_ids)] = 1.0
    return {"input_ids": ids, "attention_mask": attention, "labels": labels, "mask": mask}


@dataclass
class Rollout:
    batch: dict[str, torch.Tensor]  # build_batch's tensors, on the device
    scores: torch.Tensor  # (B,)
    logprobs: torch.Tensor  # (B, T) policy, at sampling time
    ref_logprobs: torch.Tensor  # (B, T)
    values: torch.Tensor  # (B, T)
    entropy: torch.Tensor  # scalar: mean over completion tokens
    texts: list[str]
    advantages: torch.Tensor | None = None  # (B, T), whitened
    returns: torch.Tensor | None = None  # (B, T)


def _sample_and_score(model: PolicyWithValue, tokenizer, scorer, prompts: list[str], s: PPOSettings, seed: int,
                      device: torch.device, precision: str, procs=None) -> tuple[list, list[float]]:
    """One completion per prompt and its score. Each completion is drawn from its own seeded generator (row
    seeds), so several processes can each sample and score every N-th prompt and gather exactly the samples one
    process would have drawn, back in the prompts' order."""
    from preftune.data.schema import review_text
    from preftune.eval.sampling import generate

    world, rank = (procs.world, procs.rank) if procs is not None else (1, 0)
    mine = list(range(rank, len(prompts), world))
    with autocast_context(device, precision):
        samples = generate(model.policy, tokenizer, [prompts[i] for i in mine], temperature=s.temperature,
                           max_new_tokens=s.max_new_tokens, batch_size=s.generation_batch_size, seed=seed,
                           device=device, row_seeds=[seed * 100_003 + i for i in mine])
    score_samples = getattr(scorer, "score_samples", None)  # a reward model scores the sampled tokens themselves
    values = (score_samples(samples, tokenizer) if score_samples is not None
              else scorer([review_text(x.prompt, x.completion) for x in samples]))
    scored = [(x, float(v)) for x, v in zip(samples, values)]
    if world == 1:
        return [x for x, _ in scored], [v for _, v in scored]
    shares = procs.gather_objects(scored)  # process r holds prompts r, r + world, ...
    ordered = [shares[i % world][i // world] for i in range(len(prompts))]
    return [x for x, _ in ordered], [v for _, v in ordered]


@torch.no_grad()
def rollout(model: PolicyWithValue, reference: nn.Module, tokenizer, scorer, prompts: list[str], s: PPOSettings,
            seed: int, device: torch.device, precision: str, procs=None) -> Rollout:
    """Sample, score, and compute old log-probs, reference log-probs, values and entropy (no gradients). Several
    processes (``procs``) share the sampling and scoring; each then holds the whole rollout."""
    from preftune.data.schema import review_text

    samples, values = _sample_and_score(model, tokenizer, scorer, prompts, s, seed, device, precision, procs)
    texts = [review_text(x.prompt, x.completion) for x in samples]
    scores = torch.tensor(values, dtype=torch.float32, device=device)
    batch = {k: v.to(device) for k, v in build_batch(samples, tokenizer.pad_token_id).items()}
    n_cols, head = batch["mask"].shape[1], model.policy.get_output_embeddings()
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "values": [], "ref": [], "entropy": []}
    for start in range(0, len(samples), s.generation_batch_size):
        rows = slice(start, start + s.generation_batch_size)
        ids, attention, labels = batch["input_ids"][rows], batch["attention_mask"][rows], batch["labels"][rows]
        with autocast_context(device, precision):
            logprobs, values, hidden = model(ids, attention, labels, n_cols)
            ref_tok, ref_rows = token_logps(reference, ids, attention, labels)
        with torch.autocast(device_type=device.type, enabled=False):  # entropy in fp32, 256 tokens at a time
            parts["entropy"] += [token_entropy(nn.functional.linear(h.float(), head.weight.float(), head.bias))
                                 for h in hidden.split(256)]
        parts["logprobs"].append(logprobs)
        parts["values"].append(values)
        parts["ref"].append(to_grid(ref_tok, ref_rows, (ids.shape[0], n_cols)))
    return Rollout(batch=batch, scores=scores, logprobs=torch.cat(parts["logprobs"]), values=torch.cat(parts["values"]),
                   ref_logprobs=torch.cat(parts["ref"]), entropy=torch.cat(parts["entropy"]).mean(), texts=texts)


def compute_advantages(r: Rollout, kl_coef: float, s: PPOSettings) -> torch.Tensor:
    """Fill ``r.advantages`` (whitened) and ``r.returns``; returns the per-token rewards (B, T)."""
    mask = r.batch["mask"]
    rewards = kl_shaped_rewards(r.scores, r.logprobs, r.ref_logprobs, mask, kl_coef)
    if s.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, r.returns = gae(rewards, r.values, mask, s.gamma, s.lam)
    r.advantages = whiten(advantages, mask)
    return rewards


def ppo_update(model: PolicyWithValue, optimizer, scheduler, r: Rollout, s: PPOSettings, train,
               generator: torch.Generator, device: torch.device, precision: str, procs=None,
               skips: Skips | None = None, iteration: int = 0) -> dict[str, torch.Tensor]:
    """``ppo_epochs`` passes of shuffled minibatch steps over the rollout. Returns per-step means as tensors (over
    the steps taken: a step whose loss or gradient is not finite makes no update and is recorded in ``skips``,
    which stops the run past ``train.max_skipped_steps`` in a row). ``train``: the run's ``train`` section.

    Several processes (``procs``, ``model`` DDP-wrapped): every process holds the whole rollout and draws the same
    minibatches; each takes every N-th row of a minibatch, and its token-mean losses are weighted by its share of
    the minibatch's tokens (x N, as DDP averages the gradients), so the update is one process's."""
    world, rank = (procs.world, procs.rank) if procs is not None else (1, 0)
    b, mask = r.batch, r.batch["mask"]
    params = [p for p in model.parameters() if p.requires_grad]
    sums: dict[str, torch.Tensor] = {}
    steps = step = 0  # taken, all
    for _ in range(s.ppo_epochs):
        for idx in torch.randperm(mask.shape[0], generator=generator).split(s.minibatch_size):
            share = idx[rank::world].to(device)
            with autocast_context(device, precision):
                logprobs, values, _ = model(b["input_ids"][share], b["attention_mask"][share], b["labels"][share],
                                            mask.shape[1])
            policy_loss, clip_fraction, approx_kl = clipped_policy_loss(
                logprobs, r.logprobs[share], r.advantages[share], mask[share], s.clip_range)
            value_loss, value_clip_fraction = clipped_value_loss(
                values, r.values[share], r.returns[share], mask[share], s.clip_range_value)
            weight = mask[share].sum() / mask[idx.to(device)].sum().clamp(min=1)  # this share of the tokens
            loss = policy_loss + s.vf_coef * value_loss
            if faults.active("nan_loss"):  # tests: a real NaN through the backward
                loss = loss * float("nan")
            optimizer.zero_grad(set_to_none=True)
            (loss * (weight * world)).backward()
            taken, grad_norm = clipped_step(params, optimizer, scheduler, train.max_grad_norm)
            if skips is not None:
                skips.record(taken, f"iteration {iteration}, minibatch step {step + 1}", train)
            step += 1
            if not taken:
                continue
            shared = {"policy_loss": policy_loss, "value_loss": value_loss, "clip_fraction": clip_fraction,
                      "value_clip_fraction": value_clip_fraction, "approx_kl": approx_kl}
            for name, value in {**{k: v * weight for k, v in shared.items()}, "grad_norm": grad_norm}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            steps += 1
    if world > 1 and sums:  # the token-weighted shares add up to each minibatch's mean (grad_norm is already global)
        names = [n for n in sums if n != "grad_norm"]
        total = procs.sum(torch.stack([sums[n] for n in names]))
        sums.update({n: total[i] for i, n in enumerate(names)})
    return {name: total / steps for name, total in sums.items()}  # none taken: no update metrics


def run_iteration(model, reference, tokenizer, scorer, prompts, cfg, kl_ctl, optimizer, scheduler,
                  iteration: int, device: torch.device, precision: str, procs=None,
                  skips: Skips | None = None) -> dict[str, float]:
    """One rollout -> advantages -> update round; returns its metrics (the one sync point of the iteration).
    Several processes: ``model`` is DDP-wrapped, and the metrics are the same on every process."""
    s, seed = cfg.ppo, cfg.train.seed * 1_000_003 + 2 * iteration  # per-iteration seeds: resume is exact
    start = time.perf_counter()
    inner = getattr(model, "module", model)  # sampling and the no-grad passes need no DDP
    r = rollout(inner, reference, tokenizer, scorer, prompts, s, seed, device, precision, procs)
    kl_coef = kl_ctl.value
    compute_advantages(r, kl_coef, s)
    mask = r.batch["mask"]
    seq_kl = masked_sum(r.logprobs - r.ref_logprobs, mask, dim=1)  # (B,) sum over tokens of log pi - log pi_ref
    rollout_s = time.perf_counter() - start
    lr = scheduler.get_last_lr()[0]
    generator = torch.Generator().manual_seed(seed + 1)
    update = ppo_update(model, optimizer, scheduler, r, s, cfg.train, generator, device, precision, procs, skips,
                        iteration)
    elapsed = time.perf_counter() - start
    kl = seq_kl.mean().item()
    kl_ctl.update(kl, n_steps=mask.shape[0])
    out = {"reward": r.scores.mean(), "reward_std": r.scores.std() if r.scores.numel() > 1 else r.scores.new_zeros(()),
           "non_score_reward": -kl_coef * seq_kl.mean(), "entropy": r.entropy, "completion_tokens": mask.sum(1).mean(),
           **update}
    metrics = {name: float(v) for name, v in out.items()}
    metrics.update(kl=kl, kl_coef=kl_coef, lr=lr, tokens_per_s=float(mask.sum()) / elapsed,
                   **{"time/rollout_s": rollout_s, "time/update_s": elapsed - rollout_s})
    if skips is not None:
        metrics["skipped_steps"] = skips.total
    return metrics


def run_eval_hook(hook: EvalHook, policy: nn.Module, iteration: int, metrics) -> dict[str, float]:
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        result = hook(policy, iteration) or {}
    policy.train(was_training)
    logged = {f"eval/{k}": float(v) for k, v in result.items()}
    if logged:
        metrics.write({"step": iteration, **logged})
    return logged
