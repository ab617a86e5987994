"""The Bradley-Terry reward model: last-token indexing, the loss by hand, save/load, scoring and the rm: scorer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from preftune.models.reward_model import (CONFIG_FILE, HEAD_FILE, RewardModel, build_reward_model, last_token_index,
                                          reward_statistics)
from preftune.train.objectives import bradley_terry_loss, reward_forward


@pytest.fixture(scope="module")
def rm():
    """The tiny reward model with a random (seeded) head, so scores are not all zero."""
    model = build_reward_model("tiny", seed=0)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def _direct_score(model: RewardModel, ids: list[int]) -> float:
    """Independent of the mask logic: unpadded sequence, hidden state of its final position, dot the head."""
    with torch.no_grad():
        h = model.backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return float(h.float() @ model.head.weight[0].float())


def test_last_token_index_by_hand():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 1, 1, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 0, 3]


def test_right_padded_batch_scores_equal_unpadded_forwards(rm, tiny_tokenizer):
    eos = pad = tiny_tokenizer.eos_token_id
    assert pad == eos  # the case that defeats "first pad token" searches
    seqs = [[17, 450, 93, eos],                        # ends with EOS == pad, then padding
            [5, 6, eos, 8, 9, 10, 11, eos],            # an EOS in the middle as well
            [300, 301, 302],                           # no EOS at all
            [42]]
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), pad)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        batched = rm(ids, mask)
    assert batched.shape == (4,) and batched.dtype == torch.float32
    expected = torch.tensor([_direct_score(rm, s) for s in seqs])
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)
    # reading the padded row's final position instead would give another number (the test can fail)
    with torch.no_grad():
        wrong = rm.backbone(input_ids=ids, attention_mask=mask).last_hidden_state[0, -1] @ rm.head.weight[0]
    assert abs(float(wrong) - float(expected[0])) > 1e-3


def test_bradley_terry_loss_by_hand():
    chosen = torch.tensor([2.5, 0.0, -1.5, 300.0, -300.0])
    rejected = torch.tensor([1.0, 0.0, 0.0, 100.0, -100.0])
    losses = bradley_terry_loss(chosen, rejected)
    # margins 1.5, 0, -1.5, 200, -200: log(1 + e^-m)
    expected = [0.20141327798275246, math.log(2), 1.7014132779827524, 0.0, 200.0]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert torch.isfinite(losses).all()


class _FixedRewards(torch.nn.Module):
    def __init__(self, rewards):
        super().__init__()
        self.rewards = torch.tensor(rewards)

    def forward(self, input_ids, attention_mask):
        return self.rewards


def test_reward_forward_metrics_by_hand():
    # 3 pairs: chosen rewards [2, 0, 1], rejected [0.5, 1, 1]: margins 1.5, -1, 0 (a tie counts as wrong)
    batch = {"input_ids": torch.zeros(6, 3, dtype=torch.long), "attention_mask": torch.ones(6, 3, dtype=torch.long)}
    losses, stats = reward_forward(_FixedRewards([2.0, 0.0, 1.0, 0.5, 1.0, 1.0]), batch)
    assert losses.tolist() == pytest.approx([0.20141327798275246, 1.3132616875182228, math.log(2)])
    mean = {k: float(s / c) for k, (s, c) in stats.items()}
    assert mean["loss"] == pytest.approx((0.20141327798275246 + 1.3132616875182228 + math.log(2)) / 3)
    assert mean["accuracy"] == pytest.approx(1 / 3)
    assert mean["rewards/chosen"] == pytest.approx(1.0)
    assert mean["rewards/rejected"] == pytest.approx(2.5 / 3)
    assert mean["rewards/margins"] == pytest.approx(0.5 / 3)
    assert all(float(c) == 3.0 for _, c in stats.values())


def test_zero_head_gives_log2_on_a_real_batch(tiny_tokenizer):
    from preftune.data.collate import collate_pairs
    from preftune.data.records import PreferencePair
    from preftune.data.tokenize import tokenize_pair

    model = build_reward_model("tiny", seed=0, head_init="zeros")
    assert torch.count_nonzero(model.head.weight) == 0 and model.head.bias is None
    pairs = [tokenize_pair(tiny_tokenizer, PreferencePair("The film", " is great.", " is bad, really.", "x:1"),
                           max_length=32, max_prompt_tokens=16)] * 2
    losses, stats = reward_forward(model, collate_pairs(pairs, tiny_tokenizer.pad_token_id))
    assert float(stats["rewards/margins"][0]) == 0.0 and float(stats["rewards/chosen"][0]) == 0.0
    assert losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)  # log 2 in fp32
    assert float(stats["accuracy"][0]) == 0.0  # ties are not correct


def test_normal_head_init_is_seeded_with_std_one_over_sqrt_h_plus_1():
    from preftune.models.load import load_causal_lm

    backbone = load_causal_lm("tiny").get_decoder()
    a = RewardModel(backbone, 64, seed=3).head.weight
    expected = torch.randn((1, 64), generator=torch.Generator().manual_seed(3)) / math.sqrt(65)
    assert a.dtype == torch.float32 and torch.equal(a, expected)
    assert not torch.equal(RewardModel(backbone, 64, seed=4).head.weight, a)
    with pytest.raises(ValueError, match="head_init"):
        RewardModel(backbone, 64, head_init="ones")


def test_save_load_round_trip(rm, tiny_tokenizer, tmp_path):
    rm.info.update(base_model="tiny", seed=0, append_eos=True)
    rm.normalization = {"mean": 0.25, "std": 2.0, "n": 10}
    path = rm.save(tmp_path / "rm", tiny_tokenizer)
    for name in ("config.json", "model.safetensors", "tokenizer.json", HEAD_FILE, CONFIG_FILE):
        assert (path / name).is_file(), name
    saved = json.loads((path / CONFIG_FILE).read_text())
    assert saved["hidden_size"] == 64 and saved["base_model"] == "tiny" and saved["head_init"] == "normal"
    assert saved["normalization"] == {"mean": 0.25, "std": 2.0, "n": 10}
    rm.save(tmp_path / "rm", tiny_tokenizer)  # overwriting is atomic and leaves no temporary directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]

    loaded = RewardModel.load(path)
    ids = torch.tensor([[17, 450, 93, 2, 2], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), rm(ids, mask))
    assert loaded.normalization == rm.normalization and loaded.info["append_eos"] is True
    assert loaded.tokenizer is not None and loaded.tokenizer.eos_token_id == tiny_tokenizer.eos_token_id
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} >= {"head.weight"}


def test_score_ids_and_normalisation(rm):
    rm.normalization = {"mean": 0.5, "std": 2.0, "n": 4}
    prompts, completions = [[17, 450], [5, 6, 7]], [[93, 2], [2]]
    raw = rm.score_ids(prompts, completions, normalized=False)
    expected = torch.tensor([_direct_score(rm, [17, 450, 93, 2]), _direct_score(rm, [5, 6, 7, 2])])
    torch.testing.assert_close(raw, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm.score_ids(prompts, completions), (expected - 0.5) / 2.0, atol=1e-5, rtol=1e-5)
    assert rm.score_ids(prompts, completions, batch_size=1, normalized=False).tolist() == pytest.approx(
        raw.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        rm.score_ids(prompts, completions[:1])


def test_reward_statistics_by_hand():
    stats = reward_statistics(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert stats == {"mean": 2.5, "std": pytest.approx(math.sqrt(1.25)), "n": 4}  # population std


def test_rm_scorer_on_a_saved_model(rm, tiny_tokenizer, tmp_path):
    from preftune.eval.scorers import Scorer, get_scorer, score_file

    rm.info.update(base_model="tiny", seed=0, append_eos=True)
    rm.normalization = {"mean": 1.0, "std": 4.0, "n": 2}
    path = rm.save(tmp_path / "rm", tiny_tokenizer)
    scorer = get_scorer(f"rm:{path}")
    assert scorer.name == "rm" and isinstance(scorer, Scorer)
    texts = ["The movie was wonderful.", "Dull."]
    eos = tiny_tokenizer.eos_token_id
    # the full text as a plain string (SmolLM2's tokenizer adds no BOS), EOS appended as in training
    raw = [_direct_score(rm, tiny_tokenizer(t)["input_ids"] + [eos]) for t in texts]
    assert scorer(texts) == pytest.approx([(r - 1.0) / 4.0 for r in raw], abs=1e-5)
    with pytest.raises(TypeError):
        scorer("one string")

    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"prompt": "The movie was", "completion": c}) + "\n"
                               for c in (" wonderful.", " dull.")))
    mean = score_file(samples, tmp_path / "scored.jsonl", f"rm:{path}")
    rows = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [r["score_rm"] for r in rows] == pytest.approx(scorer(["The movie was wonderful.", "The movie was dull."]))
    assert mean == pytest.approx(sum(r["score_rm"] for r in rows) / 2)


def test_score_replies_tokenises_as_training_did(rm, tiny_tokenizer, tmp_path):
    """Best-of-N and the rm: judge score (prompt, reply) as the reward model's training saw pairs: a long prompt
    keeps its last max_prompt_tokens, the reply is cut to what max_length leaves, EOS appended."""
    rm.info.update(base_model="tiny", seed=0, append_eos=True, max_length=12, max_prompt_tokens=6)
    rm.normalization = None
    loaded = RewardModel.load(rm.save(tmp_path / "rm", tiny_tokenizer))
    prompt, reply = "one two three four five six seven eight nine ten", " a reply that runs on and on and on"
    eos = tiny_tokenizer.eos_token_id
    p_ids = tiny_tokenizer(prompt)["input_ids"]
    r_ids = tiny_tokenizer(prompt + reply)["input_ids"][len(p_ids):] + [eos]
    assert len(p_ids) > 6 and len(r_ids) > 6  # both limits bite
    expected = _direct_score(rm, p_ids[-6:] + r_ids[:6])
    assert loaded.score_replies([prompt], [reply], normalized=False) == pytest.approx([expected], abs=1e-5)
    assert loaded.score_texts([prompt + reply], normalized=False)[0] != pytest.approx(expected, abs=1e-3)


def test_rm_scorer_without_eos_when_trained_without(rm, tiny_tokenizer, tmp_path):
    from preftune.eval.scorers import get_scorer

    rm.info.update(base_model="tiny", seed=0, append_eos=False)
    rm.normalization = None
    path = rm.save(tmp_path / "rm", tiny_tokenizer)
    text = "The movie was wonderful."
    assert get_scorer(f"rm:{path}")([text]) == pytest.approx(
        [_direct_score(rm, tiny_tokenizer(text)["input_ids"])], abs=1e-5)


def test_rm_scorer_scores_ppo_samples_on_their_own_tokens(rm, tiny_tokenizer, tmp_path):
    """PPO's samples are scored on the tokens it sampled: a completion cut by the length limit stays without EOS
    and a token split that decoding + re-encoding would merge is kept (the text path changed nearly every
    sample's tokens). A reward model with another vocabulary reads the texts."""
    from preftune.eval.sampling import Sample
    from preftune.eval.scorers import get_scorer

    rm.info.update(base_model="tiny", seed=0, append_eos=True)
    rm.normalization = None
    scorer = get_scorer(f"rm:{rm.save(tmp_path / 'rm', tiny_tokenizer)}")
    prompt = tiny_tokenizer("The movie was")["input_ids"]
    split = [tiny_tokenizer.convert_tokens_to_ids(t) for t in ("Ġwon", "der", "ful")]  # BPE would say "Ġwonderful"
    eos = tiny_tokenizer.eos_token_id
    samples = [Sample("The movie was", " wonderful", prompt, split),  # cut: no EOS
               Sample("The movie was", " dull.", prompt, tiny_tokenizer(" dull.")["input_ids"] + [eos])]
    assert tiny_tokenizer(" wonderful")["input_ids"] != split
    got = scorer.score_samples(samples, tiny_tokenizer)
    assert got == pytest.approx([_direct_score(rm, prompt + split), _direct_score(rm, samples[1].prompt_ids
                                                                                   + samples[1].completion_ids)],
                                abs=1e-5)
    assert got[0] != pytest.approx(scorer(["The movie was wonderful"])[0], abs=1e-4)  # the text path differs

    class OtherVocabulary:
        def get_vocab(self):
            return {"a": 0}

    assert scorer.score_samples(samples, OtherVocabulary()) == pytest.approx(
        scorer(["The movie was wonderful", "The movie was dull."]))


def test_rm_scorer_bad_paths(tmp_path):
    from preftune.eval.scorers import get_scorer
    from preftune.models.load import ModelSpecError

    with pytest.raises(ValueError, match="rm:PATH"):
        get_scorer("rm:")
    with pytest.raises(FileNotFoundError, match="reward model not found"):
        get_scorer(f"rm:{tmp_path / 'nope'}")
    with pytest.raises(ModelSpecError, match="not a reward model directory"):
        get_scorer(f"rm:{tmp_path}")
