"""Architecture-specific correctness: small random models of other families than the default Llama shape.

Each case here was a silent bug found by a sweep over transformers architectures (tiny random configs, log-probs
against a per-sequence fp64 reference): the fix is pinned so it cannot come back."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from preftune.models.load import disable_dropout

V = 128
SMALL = dict(vocab_size=V, hidden_size=32, num_attention_heads=4)


def _config(name: str):
    return {
        # OPT, XGLM, BioGPT copy their dropout into a float attribute of each layer when built
        "opt": lambda: T.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                   word_embed_proj_dim=32, dropout=0.1, attention_dropout=0.1),
        "biogpt": lambda: T.BioGptConfig(**SMALL, intermediate_size=64, num_hidden_layers=2, hidden_dropout_prob=0.1,
                                         attention_probs_dropout_prob=0.1),
        "xglm": lambda: T.XGLMConfig(vocab_size=V, d_model=32, ffn_dim=64, num_layers=2, attention_heads=4, dropout=0.1,
                                     attention_dropout=0.1, activation_dropout=0.1),
        # Llama-family attention keeps config.attention_dropout as an attribute and applies it in train mode
        "llama": lambda: T.LlamaConfig(**SMALL, intermediate_size=64, num_hidden_layers=2, attention_dropout=0.1),
        "gpt_bigcode": lambda: T.GPTBigCodeConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.1,
                                                  resid_pdrop=0.1, embd_pdrop=0.1),
    }[name]()


@pytest.mark.parametrize("name", ["opt", "biogpt", "xglm", "llama", "gpt_bigcode"])
def test_dropout_is_off_in_train_mode(name):
    """The policy trains in train mode: its log-probs must be those of eval mode (and equal the reference's at
    step 0). Before the fix OPT's train-mode logits were up to 0.12 off, BioGPT's 0.25 (DPO loss at init off
    log 2 by up to 0.03, 0.14 under LoRA)."""
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(_config(name))
    disable_dropout(model)
    ids = torch.randint(3, V, (2, 12))
    with torch.no_grad():
        model.eval()
        expected = model(input_ids=ids).logits
        model.train()
        got = model(input_ids=ids).logits
    assert torch.equal(got, expected)


def test_bf16_reference_is_bit_identical_for_a_bias_added_outside_linear():
    """Falcon's FalconLinear adds its bias after the matmul (outside F.linear): with the bias stored in bf16 the
    frozen reference's log-probs were 2.5e-3 nats off the policy's at step 0 under bf16 autocast."""
    from preftune.data.collate import collate_pairs
    from preftune.data.tokenize import TokenizedPair
    from preftune.models.logprobs import autocast_context, batch_logps
    from preftune.models.reference import FrozenReference

    torch.manual_seed(0)
    config = T.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bias=True,
                            new_decoder_architecture=False)
    policy = T.AutoModelForCausalLM.from_config(config).eval()
    reference = T.AutoModelForCausalLM.from_config(config)
    reference.load_state_dict(policy.state_dict())
    frozen = FrozenReference(reference, "bf16")
    batch = collate_pairs([TokenizedPair(list(range(3, 11)), list(range(20, 27)), list(range(40, 45)), "x")], 0)
    with torch.no_grad(), autocast_context(torch.device("cpu"), "bf16"):
        expected = batch_logps(policy, batch).logps
        got = frozen.logps(batch).logps
    assert torch.equal(got, expected)
    assert any(p.dtype == torch.bfloat16 for p in reference.parameters())  # the weights were converted


def _manual_logps(model, prompt: list[int], response: list[int]) -> float:
    """Reference: one unpadded sequence, the model's own logits, fp64 log-softmax, summed over the response."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
    logp = logits.log_softmax(-1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(response))


@pytest.mark.parametrize("name", ["granite", "cohere", "gemma2", "llama"])
def test_log_probs_of_models_that_post_process_their_logits(name):
    """Only completion positions go through the LM head when the logits are a plain linear map of the last
    hidden state; a first-call probe sends other models through their full forward. Granite's logits_scaling
    was missed by the list of config names this replaced (0.6-4 nats off)."""
    from preftune.data.collate import collate_pairs
    from preftune.data.tokenize import TokenizedPair
    from preftune.models.logprobs import _split_head, batch_logps

    common = dict(**SMALL, intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2)
    config = {"granite": lambda: T.GraniteConfig(**common, logits_scaling=4.0),
              "cohere": lambda: T.CohereConfig(**common, logit_scale=0.25),
              "gemma2": lambda: T.Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0),
              "llama": lambda: T.LlamaConfig(**common)}[name]()
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)  # logits large enough for scaling or capping to matter
    pairs = [TokenizedPair(list(range(3, 9)), list(range(20, 25)), list(range(40, 47)), "x"),
             TokenizedPair(list(range(60, 63)), list(range(70, 78)), list(range(90, 93)), "y")]
    with torch.no_grad():
        got = batch_logps(model, collate_pairs(pairs, 0)).logps
    expected = [_manual_logps(model, p.prompt_ids, p.chosen_ids) for p in pairs] + \
               [_manual_logps(model, p.prompt_ids, p.rejected_ids) for p in pairs]
    assert got.tolist() == pytest.approx(expected, abs=2e-4)
    assert (_split_head(model) is not None) == (name == "llama")  # the fast path where it is exact


def _pairs_over(n_pairs: int, seed: int = 0):
    from preftune.data.tokenize import TokenizedPair

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, V, (n,), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(ids(8), ids(6), ids(7), f"x:{i}") for i in range(n_pairs)]


@pytest.mark.parametrize("name, problem", [
    ("llama", None),
    ("mpt", "differ from the padded layout"),  # ALiBi biases by place in the row: rejected off by 0.26 nats
    ("lfm2", "conv layers do not follow an attention mask"),  # its conv layers see chosen from rejected
])
def test_shared_layouts_only_for_models_that_honour_the_mask(name, problem):
    """prefix_shared / packed rely on every layer following the given mask and position ids. Where a layer does
    not, ``auto`` falls back to padded and an explicit shared layout is a config error."""
    from preftune.config import ConfigError, load_config
    from preftune.data.collate import collate_pairs, collate_pairs_prefix_shared
    from preftune.models.logprobs import batch_logps
    from preftune.train.layout import resolve_layout, shared_layout_problem

    common = dict(**SMALL, intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2)
    config = {"llama": lambda: T.LlamaConfig(**common),
              "mpt": lambda: T.MptConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=256),
              "lfm2": lambda: T.Lfm2Config(**common, layer_types=["conv", "full_attention"],
                                           initializer_range=0.3)}[name]()
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    found = shared_layout_problem(model)
    assert (found is None) if problem is None else (problem in found), found
    pairs = _pairs_over(3)
    with torch.no_grad():
        gap = (batch_logps(model, collate_pairs(pairs, 0)).logps
               - batch_logps(model, collate_pairs_prefix_shared(pairs, 0)).logps).abs().max().item()
    assert (gap < 1e-4) == (problem is None), gap  # the probe's verdict is the layouts' real behaviour
    auto, explicit = load_config(None, []), load_config(None, ["train.layout=prefix_shared"])
    if problem is None:
        assert resolve_layout(auto, pairs, model=model) == resolve_layout(explicit, pairs, model=model) == \
            "prefix_shared"
    else:
        assert resolve_layout(auto, pairs, model=model) == "padded"
        with pytest.raises(ConfigError, match="train.layout.*would change this model's log-probs"):
            resolve_layout(explicit, pairs, model=model)


def test_attention_windows_under_other_config_names():
    """GPT-Neo's window_size and Llama 4's attention_chunk_size are windows too (a shared layout past them was
    0.04-2.4 nats off); a window the layers do not use does not count."""
    from types import SimpleNamespace

    from preftune.train.layout import sliding_window

    assert sliding_window(T.GPTNeoConfig(window_size=256)) == 256
    assert sliding_window(T.Llama4TextConfig(attention_chunk_size=8)) == 8
    assert sliding_window(T.Gemma3TextConfig(sliding_window=512)) == 512
    assert sliding_window(T.Qwen2Config()) is None and sliding_window(T.LlamaConfig()) is None
    assert sliding_window(SimpleNamespace(sliding_window=64, use_sliding_window=False)) is None


def test_generation_ignores_the_models_shipped_sampling_settings(tiny_tokenizer):
    """Samples must come from the model's distribution: settings a model directory ships in
    generation_config.json (Qwen2.5-Instruct: repetition_penalty 1.05) used to fill everything a call left
    unset. Greedy here must be the argmax at every step, and the shipped config is back afterwards."""
    from preftune.data.tokenize import encode_prompt
    from preftune.eval.sampling import generate
    from preftune.models.load import load_causal_lm

    model = load_causal_lm("tiny", seed=0)
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    prompt = "The movie was great, great, great"
    got = generate(model, tiny_tokenizer, [prompt], temperature=0, max_new_tokens=8)[0].completion_ids
    ids = encode_prompt(tiny_tokenizer, prompt)
    expected = []
    with torch.no_grad():
        for _ in range(len(got)):
            token = int(model(input_ids=torch.tensor([ids + expected])).logits[0, -1].argmax())
            expected.append(token)
            if token == tiny_tokenizer.eos_token_id:
                break
    assert got == expected and len(set(expected)) < len(expected)  # a repeat the shipped settings would forbid
    assert model.generation_config.repetition_penalty == 5.0


def test_probes_run_in_eval_mode_without_compiled_code(monkeypatch):
    """A LoRA adapter with dropout in train mode (a resumed run: B != 0) drew different dropout masks in the
    probe's two forwards, which then called a plain head not plain (full logits for the whole run) and the shared
    layouts unexact. The probes run in eval mode, restore the mode, and work without torch.compiler.set_stance
    (torch < 2.6)."""
    from preftune.config import LoRAConfig
    from preftune.models import logprobs
    from preftune.models.load import load_causal_lm
    from preftune.models.lora import apply_lora
    from preftune.train.layout import shared_layout_problem

    policy = apply_lora(load_causal_lm("tiny", seed=0), LoRAConfig(enabled=True, r=4, dropout=0.5), seed=0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    policy.train()
    assert logprobs._split_head(policy) is not None and policy.training
    assert shared_layout_problem(policy) is None and policy.training
    monkeypatch.delattr(torch.compiler, "set_stance")
    other = load_causal_lm("tiny", seed=1)
    assert logprobs._split_head(other) is not None


def test_window_names_are_read_with_their_own_values():
    from types import SimpleNamespace

    from preftune.train.layout import sliding_window

    config = SimpleNamespace(sliding_window=None, attention_chunk_size=8192, use_sliding_window=False)
    assert sliding_window(config) == 8192


def test_only_a_bin_only_checkpoint_gets_the_conversion_message(tmp_path):
    """A broken safetensors link (or a missing shard) is its own error, not 'convert your .bin'."""
    from preftune.models.load import ModelSpecError, load_causal_lm

    load_causal_lm("tiny", seed=0).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors").symlink_to(tmp_path / "missing.safetensors")
    with pytest.raises(OSError) as err:
        load_causal_lm(str(tmp_path))
    assert not isinstance(err.value, ModelSpecError)


def test_generation_leaves_a_peft_base_models_config_alone(tiny_tokenizer):
    from preftune.config import LoRAConfig
    from preftune.eval.sampling import generate
    from preftune.models.load import load_causal_lm
    from preftune.models.lora import apply_lora

    policy = apply_lora(load_causal_lm("tiny", seed=0), LoRAConfig(enabled=True, r=4), seed=0)
    base = policy.get_base_model()
    before = base.generation_config.to_dict()
    generate(policy, tiny_tokenizer, ["The movie was"], temperature=0, max_new_tokens=3)
    assert base.generation_config.to_dict() == before and policy.generation_config.to_dict() == before
