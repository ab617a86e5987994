"""Real-model checks (SmolLM2-135M). Not in `make test`; run with `make test-slow` (about 4 minutes)."""

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def test_embedded_model_loads_and_ref_equals_policy_logps():
    from preftune.data.collate import collate_pairs
    from preftune.data.records import PreferencePair
    from preftune.data.tokenize import tokenize_pair
    from preftune.losses import get_loss
    from preftune.models.load import load_causal_lm, load_reference, load_tokenizer
    from preftune.models.logprobs import sequence_logps

    tok = load_tokenizer("smollm2-135m")
    policy, ref = load_causal_lm("smollm2-135m"), load_reference("smollm2-135m")
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    item = tokenize_pair(tok, PreferencePair("The movie was", " great.", " awful.", "x:1"), max_length=32,
                         max_prompt_tokens=16)
    batch = collate_pairs([item], tok.pad_token_id)
    pol = sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["labels"]).logps
    with torch.no_grad():
        r = sequence_logps(ref, batch["input_ids"], batch["attention_mask"], batch["labels"]).logps
    out = get_loss("sigmoid", beta=0.1)(pol[:1], pol[1:], r[:1], r[1:])
    assert out.losses.item() == pytest.approx(0.693147, abs=1e-5)
    assert -30 < pol[0].item() < 0  # a real language model, not random weights


def test_quick_demo_improves_oracle_reward(tmp_path):
    from preftune.recipes.demo import build_config, run as run_demo

    summary = run_demo(build_config(None, ["train.progress=false"], quick=True), out=str(tmp_path / "demo"))
    assert summary["policy_reward"] > summary["reference_reward"]
    assert 0 < summary["kl"] < 20
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["pairs"] == summary["pairs"]


def test_the_embedded_model_exported_to_gguf_runs_in_llama_cpp(tmp_path, capsys):
    """SmolLM2 back to llama.cpp: the same tokens as the tokenizer preftune trains with, next-token log-probs
    within f16's rounding of the HF model's."""
    from preftune.cli import main
    from preftune.models.gguf_export import llama_cpp_and_hf_logps
    from preftune.models.load import load_causal_lm, load_tokenizer

    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "smollm2-f16.gguf"
    assert main(["export", "smollm2-135m", "--gguf", str(out), "--type", "f16"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == {"F16": 211, "F32": 61}
    tokenizer, model = load_tokenizer("smollm2-135m"), load_causal_lm("smollm2-135m").eval()
    llama = llama_cpp.Llama(model_path=str(out), logits_all=True, n_ctx=512, verbose=False, n_threads=2)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30? Answer briefly."}],
                                         tokenize=False, add_generation_prompt=True)
    worst = 0.0
    for text in ("The movie was", "Paris is the capital of", chat):
        got, want = llama_cpp_and_hf_logps(llama, model, tokenizer, text)
        top = want.topk(20, dim=-1).indices  # the tokens that matter; the far tail is noise at f16
        worst = max(worst, (got.gather(1, top) - want.gather(1, top)).abs().max().item())
        assert got[-1].argmax() == want[-1].argmax()
    llama.close()
    assert worst < 0.15, worst
