"""`preftune export --gguf`: the file loads back in transformers (weights as the type rounds them) and in
llama.cpp itself (llama-cpp-python: the same tokens, the same next-token log-probs)."""

import json

import numpy as np
import pytest
import torch

from preftune.cli import main
from preftune.models.gguf_export import llama_cpp_and_hf_logps

TEXTS = ["The quick brown fox 12345 jumps over the lazy dog.", "Café – naïve, ünïcödé 😀\n\n  spaces\tand tabs?"]
COUNTS = {"f32": {"F32": 20}, "f16": {"F16": 15, "F32": 5}, "q8_0": {"Q8_0": 15, "F32": 5}}
TOLERANCE = {"f32": 0.05, "f16": 0.05, "q8_0": 0.3}  # nats: llama.cpp keeps its KV cache in f16, and q8_0
# matmuls round the activations to 8-bit blocks too (measured 0.02, 0.02, 0.21; a wrong head layout: 7.9)


@pytest.fixture(scope="module")
def sharp_tiny(tmp_path_factory):
    """tiny with its matrices 8x larger: attention far from uniform, so a head-layout mistake moves llama.cpp's
    log-probs by nats (measured: 7.9 with the q/k permutation left out, 0.01 with it)."""
    from preftune.models.load import build_tiny, load_tokenizer
    from preftune.models.save import save_model

    tokenizer, model = load_tokenizer("tiny"), build_tiny(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(8)
    directory = tmp_path_factory.mktemp("sharp") / "policy"
    save_model(model, tokenizer, directory)
    return directory, model, tokenizer


def _rounded(value: torch.Tensor, kind: str) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants

    if kind == "f32" or value.ndim == 1:
        return value
    if kind == "f16":
        return value.half().float()
    q8 = GGMLQuantizationType.Q8_0
    return torch.from_numpy(quants.dequantize(quants.quantize(value.numpy(), q8), q8).copy())


def _llama(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, verbose=False, n_threads=2)


@pytest.mark.parametrize("kind", ["f32", "q8_0"])  # f16: the API test below, and SmolLM2 in make test-slow
def test_the_export_loads_back_in_transformers_and_in_llama_cpp(tmp_path, sharp_tiny, kind, capsys):
    from transformers import AutoModelForCausalLM

    directory, model, tokenizer = sharp_tiny
    out = tmp_path / "policy.gguf"
    assert main(["export", str(directory), "--gguf", str(out), "--type", kind]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensors"] == COUNTS[kind] and summary["tokenizer_pre"] == "gpt-2" and summary["chat_template"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    theirs = back.state_dict()
    for name, value in model.state_dict().items():  # q/k permuted and back, as the type rounds them
        assert torch.equal(theirs[name], _rounded(value, kind)), name
    llama = _llama(out)
    assert llama.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    assert llama.metadata["tokenizer.ggml.add_bos_token"] == "false"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Name 3 colours."}], tokenize=False,
                                         add_generation_prompt=True)
    for text in [*TEXTS, chat]:
        got, want = llama_cpp_and_hf_logps(llama, back, tokenizer, text)
        assert (got - want).abs().max().item() < TOLERANCE[kind]
    llama.close()


def test_a_trained_adapter_exports_as_its_merged_policy(tmp_path, pairs_file, capsys):
    from gguf import GGUFReader

    run = tmp_path / "run"
    assert main(["dpo", "model=tiny", "train.max_steps=2", "train.batch_size=2", "train.progress=false",
                 "run.plot=false", "train.precision=fp32", "lora.enabled=true", f"data.train={pairs_file}",
                 f"run.dir={run}"]) == 0
    for name in ("policy", "policy-merged"):
        assert main(["export", str(run / name), "--gguf", str(tmp_path / f"{name}.gguf"), "--type", "f32"]) == 0
    adapter, merged = (GGUFReader(str(tmp_path / f"{name}.gguf")) for name in ("policy", "policy-merged"))
    assert [t.name for t in adapter.tensors] == [t.name for t in merged.tensors]
    for a, b in zip(adapter.tensors, merged.tensors):
        np.testing.assert_allclose(a.data, b.data, rtol=0, atol=1e-6, err_msg=a.name)


def test_export_refuses_what_it_cannot_write(tmp_path, pairs_file, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from preftune.models.load import load_tokenizer
    from preftune.models.save import save_model

    assert main(["reward", "model=tiny", "train.max_steps=1", "train.batch_size=2", "train.progress=false",
                 "run.plot=false", f"data.train={pairs_file}", f"run.dir={tmp_path / 'rm'}"]) == 0
    tokenizer = load_tokenizer("tiny")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    save_model(gpt2, tokenizer, tmp_path / "gpt2")
    cases = [
        ([str(tmp_path / "rm" / "reward_model")], 2, "is a reward model"),
        ([str(tmp_path / "gpt2")], 2, "the Llama family (model_type 'llama', e.g. SmolLM2); this model is 'gpt2'"),
        ([str(tmp_path / "missing")], 2, "model not found"),
    ]
    for argv, code, message in cases:
        assert main(["export", *argv, "--gguf", str(tmp_path / "out.gguf")]) == code
        assert message in capsys.readouterr().err
    assert main(["export", "tiny", "--gguf", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["export", "tiny", "--gguf", "/proc/preftune.gguf"]) == 74
    assert "cannot write GGUF file /proc/preftune.gguf" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_the_python_api_exports_an_in_memory_model_as_the_cli_does_its_directory(tmp_path, sharp_tiny, capsys):
    from gguf import GGUFReader

    import preftune
    from preftune.errors import ConfigError

    directory, model, tokenizer = sharp_tiny
    summary = preftune.export(model, tmp_path / "memory.gguf", tokenizer=tokenizer, type="f16")
    assert summary["tensors"] == COUNTS["f16"]
    assert main(["export", str(directory), "--gguf", str(tmp_path / "cli.gguf"), "--type", "f16"]) == 0
    memory, cli = (GGUFReader(str(tmp_path / f"{name}.gguf")) for name in ("memory", "cli"))
    assert [(t.name, t.tensor_type) for t in memory.tensors] == [(t.name, t.tensor_type) for t in cli.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(memory.tensors, cli.tensors))
    embedding = next(t for t in memory.tensors if t.name == "token_embd.weight")
    assert np.array_equal(embedding.data, model.model.embed_tokens.weight.detach().half().numpy())
    with pytest.raises(ConfigError, match="pass its tokenizer= too"):
        preftune.export(model, tmp_path / "x.gguf")
