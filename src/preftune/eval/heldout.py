"""Held-out evaluation shared by the sentiment demo and the reward-KL frontier.

A policy is sampled on held-out prompts at temperature 1 and in fp32 (the KL estimate needs samples from
exactly the distribution whose log-probs it computes, and bf16 and fp32 log-probs differ by ~0.02 nats per
token on SmolLM2); each full text (prompt + completion, as the paper's classifier scores reviews) gets the
oracle's score; KL(policy || reference) is the mean over samples of sum_t (log pi - log pi_ref).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preftune.eval.sampling import Sample, generate, kl_estimate


def full_text(sample: Sample) -> str:
    return f"{sample.prompt}{sample.completion}"


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% interval."""
    t = torch.tensor(values, dtype=torch.float64)
    half = float(1.96 * t.std(unbiased=True) / len(values) ** 0.5) if len(values) > 1 else 0.0
    return float(t.mean()), half


@dataclass
class HeldOut:
    """What every evaluation of a policy on held-out prompts shares."""

    tokenizer: object
    reference: torch.nn.Module
    prompts: list[str]
    oracle: object
    samples_per_prompt: int
    max_new_tokens: int
    batch_size: int = 64
    seed: int = 1

    def sample(self, model: torch.nn.Module) -> list[Sample]:
        return self.sample_n(model, self.samples_per_prompt)

    def sample_n(self, model: torch.nn.Module, n: int) -> list[Sample]:
        """``n`` samples per prompt, prompt-major, temperature 1."""
        return generate(model, self.tokenizer, self.prompts, num_samples=n, temperature=1.0,
                        max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, seed=self.seed)


def evaluate_policy(policy: torch.nn.Module, held: HeldOut, *, is_reference: bool = False) -> dict:
    """{reward, reward_ci95, kl, kl_ci95, samples, scores, kl_per_sample} for ``policy`` on the held-out prompts."""
    samples = held.sample(policy)
    scores = held.oracle([full_text(s) for s in samples])
    reward, reward_ci = mean_ci(scores)
    if is_reference:
        kl = {"kl": 0.0, "kl_sem": 0.0, "per_sample": [0.0] * len(samples)}
    else:
        kl = kl_estimate(policy, held.reference, samples, held.tokenizer.pad_token_id)
    return {"reward": reward, "reward_ci95": reward_ci, "kl": kl["kl"], "kl_ci95": 1.96 * kl["kl_sem"],
            "samples": samples, "scores": scores, "kl_per_sample": kl["per_sample"]}
