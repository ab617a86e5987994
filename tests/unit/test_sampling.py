"""Row-seeded sampling (the Gumbel-max trick): the right distribution, top-p, and independence from batching."""

from __future__ import annotations

import pytest
import torch

from preftune.eval.sampling import RowSeededSampler, generate


def _draws(logits: torch.Tensor, temperature: float, top_p: float = 1.0, n: int = 20000) -> torch.Tensor:
    sampler = RowSeededSampler(list(range(n)), temperature, top_p)
    return sampler(None, logits.expand(n, -1)).argmax(-1)


def test_gumbel_max_draws_follow_the_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temperature in (1.0, 0.5):
        counts = torch.bincount(_draws(logits, temperature), minlength=4).float() / 20000
        expected = (logits[0] / temperature).softmax(-1)
        # 20000 draws: a standard error below 0.0036 for every probability
        assert counts.tolist() == pytest.approx(expected.tolist(), abs=0.015)


def test_top_p_keeps_the_smallest_nucleus_and_renormalises():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    counts = torch.bincount(_draws(logits, 1.0, top_p=0.7), minlength=4).float() / 20000
    # 0.5 < 0.7 <= 0.5 + 0.3: the first two tokens, renormalised to 0.625 / 0.375
    assert counts[2:].sum() == 0 and counts[:2].tolist() == pytest.approx([0.625, 0.375], abs=0.015)
    # a tie: the first token alone reaches top_p = 0.5, so it alone is kept (as transformers' TopPLogitsWarper)
    assert _draws(torch.log(torch.tensor([[0.3, 0.5, 0.15, 0.05]])), 1.0, top_p=0.5, n=200).unique().tolist() == [1]


def test_a_rows_sample_does_not_depend_on_its_batch(tiny_model, tiny_tokenizer):
    prompts = ["The movie was", "I think", "A long and winding opening line of a review", "Bad"]
    seeds = [11, 22, 33, 44]
    together = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=4, row_seeds=seeds)
    alone = [generate(tiny_model, tiny_tokenizer, [p], max_new_tokens=8, batch_size=1, row_seeds=[s])[0]
             for p, s in zip(prompts, seeds)]
    shuffled = generate(tiny_model, tiny_tokenizer, prompts[::-1], max_new_tokens=8, batch_size=2,
                        row_seeds=seeds[::-1])[::-1]
    assert [s.completion_ids for s in together] == [s.completion_ids for s in alone] == [
        s.completion_ids for s in shuffled]
    other = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=4, row_seeds=[5, 6, 7, 8])
    assert [s.completion_ids for s in other] != [s.completion_ids for s in together]  # the seeds do matter
    with pytest.raises(ValueError, match="3 row seeds for 4 completions"):
        generate(tiny_model, tiny_tokenizer, prompts, row_seeds=seeds[:3])
