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
