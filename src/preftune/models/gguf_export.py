"""Writing a causal LM as a GGUF file llama.cpp (Ollama, LM Studio) runs: the Llama family, in f32, f16 or q8_0,
with the tokenizer (vocabulary, merges, special tokens, the pre-tokenizer's name) and the chat template inside.

The file is written with llama.cpp's own ``gguf`` package. What a converter must get right, and this one does:
- HF's Llama rotates the two halves of each head (``rotate_half``), llama.cpp's ``llama`` architecture rotates
  interleaved pairs, so the query and key projections are permuted per head (per key-value head for the keys),
  as llama.cpp's converter does;
- a tied output embedding is written once (llama.cpp reads ``token_embd`` for the output when ``output`` is absent);
- the pre-tokenizer is named from the tokenizer the model was trained with (its ``tokenizer.json``), so llama.cpp
  cuts text into the same tokens; one preftune cannot name is refused (``tokenizer_pre`` overrides).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from preftune.errors import ModelSpecError

TYPES = ("f32", "f16", "q8_0")
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def permute_heads(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotary layout (the two halves of each head) -> llama.cpp's (interleaved pairs), per head: rows
    [h, 2, d/2] become [h, d/2, 2]. transformers' GGUF reader applies the inverse."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _byte_level(spec: dict | None) -> bool:
    return (isinstance(spec, dict) and spec.get("type") == "ByteLevel" and spec.get("use_regex", True)
            and not spec.get("add_prefix_space", False))


def tokenizer_pre_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer a ``tokenizer.json`` describes: ``gpt-2`` (byte-level, GPT-2's
    regex) or ``smollm`` (digits split one by one, then GPT-2's regex). Anything else is refused by name."""
    pre = tokenizer_json.get("pre_tokenizer")
    if _byte_level(pre):
        return "gpt-2"
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and _byte_level(parts[1])):
            return "smollm"
    summary = json.dumps(pre)[:200]
    raise ModelSpecError(f"the tokenizer's pre-tokenizer is not one preftune can name for llama.cpp ({summary}); "
                         "if you know llama.cpp's name for it, pass --tokenizer-pre NAME")


def _vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str], str]:
    """Tokens (by id, padded to the model's vocabulary), their GGUF types, the BPE merges, the pre-tokenizer."""
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelSpecError("GGUF export needs a fast (tokenizers) tokenizer; this one is "
                             f"{type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ModelSpecError("GGUF export writes byte-level BPE tokenizers (GPT-2 style, as SmolLM2's); this "
                             f"tokenizer is {model.get('type')} with a {(spec.get('decoder') or {}).get('type')} "
                             "decoder")
    by_id = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    if max(by_id) >= vocab_size:
        raise ModelSpecError(f"the tokenizer has token id {max(by_id)}, past the model's {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            extra = added.get(i)
            types.append(TokenType.NORMAL if extra is None else
                         TokenType.CONTROL if extra.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, [int(t) for t in types], merges, spec


def _special_tokens(writer, tokenizer) -> None:
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(token_id, int):
            add(token_id)
    probe = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
                             and plain[:1] != probe[:1])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
                             and plain[-1:] != probe[-1:])
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def _check_architecture(config) -> dict:
    """The hyperparameters llama.cpp's ``llama`` architecture reads, or a refusal naming what does not fit."""
    if getattr(config, "model_type", None) != "llama":
        raise ModelSpecError(f"GGUF export writes the Llama family (model_type 'llama', e.g. SmolLM2); this model "
                             f"is {getattr(config, 'model_type', None)!r}")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type") or (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ModelSpecError(f"GGUF export writes plain RoPE; this model scales it ({rope_type!r})")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ModelSpecError("GGUF export writes Llama without projection biases; this model has them")
    heads = config.num_attention_heads
    return {"heads": heads, "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "rope_theta": float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))}


def _write_hyperparameters(writer, config, shape: dict, name: str) -> None:
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(shape["heads"])
    writer.add_head_count_kv(shape["kv_heads"])
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(shape["rope_theta"])
    writer.add_rope_dimension_count(shape["head_dim"])
    if shape["head_dim"] != config.hidden_size // shape["heads"]:
        writer.add_key_length(shape["head_dim"])
        writer.add_value_length(shape["head_dim"])


def gguf_tensors(model: torch.nn.Module, shape: dict, *, meta: bool = False):
    """(GGUF name, fp32 tensor in llama.cpp's layout) for every weight; an output head tied to the embedding is
    left out. A weight the ``llama`` architecture has no place for is refused. ``meta``: the tensors on the meta
    device (their shapes, nothing copied off the model's device)."""
    state = model.state_dict()  # each tensor goes to the CPU in fp32 only when its turn comes
    if any(k.startswith("base_model.model.") for k in state):
        raise ModelSpecError("GGUF export writes a whole model: merge the LoRA adapter first (merge_and_unload(), "
                             "or export the run's policy-merged/ or adapter directory)")
    tied = "lm_head.weight" in state and torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    for key, value in state.items():
        if key == "lm_head.weight" and tied:
            continue
        value = value.detach().to("meta" if meta else "cpu", torch.float32)
        if key in _TOP:
            yield _TOP[key], value
            continue
        parts = key.split(".")
        if len(parts) < 4 or parts[:2] != ["model", "layers"] or ".".join(parts[3:]) not in _LAYER:
            raise ModelSpecError(f"GGUF export has no llama.cpp tensor for {key!r}")
        tensor = value
        if parts[3:] == ["self_attn", "q_proj", "weight"]:
            tensor = permute_heads(tensor, shape["heads"])
        elif parts[3:] == ["self_attn", "k_proj", "weight"]:
            tensor = permute_heads(tensor, shape["kv_heads"])
        yield f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:])]}", tensor


def _ggml_type(shape: tuple[int, ...], kind: str):
    """A tensor's GGML type: norms (1-D) stay f32; q8_0 needs rows that are whole 32-blocks, and a matrix whose
    rows are not is written in f16, as llama.cpp's converter does."""
    from gguf import GGMLQuantizationType as Q

    if kind == "f32" or len(shape) == 1:
        return Q.F32
    if kind == "q8_0" and shape[-1] % 32 == 0:
        return Q.Q8_0
    return Q.F16


def _declare(writer, name: str, shape: tuple[int, ...], ggml_type) -> None:
    """The tensor's entry in the header, from its shape alone (the data is encoded and written later, one tensor at
    a time, so an export holds one encoded tensor in memory, not the whole model again)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if ggml_type == Q.Q8_0:
        stored = quants.quant_shape_to_byte_shape(shape, ggml_type)
        writer.add_tensor_info(name, stored, np.dtype(np.uint8), int(np.prod(stored)), raw_dtype=ggml_type)
    else:
        dtype = np.dtype(np.float32 if ggml_type == Q.F32 else np.float16)
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw_dtype=ggml_type)


def _encode(tensor: torch.Tensor, ggml_type) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    array = tensor.contiguous().numpy()
    if ggml_type == Q.F32:
        return array.astype(np.float32, copy=False)
    if ggml_type == Q.Q8_0:
        return quants.quantize(array.astype(np.float32, copy=False), ggml_type)
    return array.astype(np.float16)


def export_gguf(model: torch.nn.Module, tokenizer, out: Path, *, kind: str = "f16", name: str = "model",
                tokenizer_pre: str | None = None) -> dict:
    """Write ``model`` + ``tokenizer`` to ``out`` (atomically: a temporary file, then a rename). Returns a
    summary: the path, its size, the tensor count per GGML type, the pre-tokenizer and whether a chat template
    went in."""
    import gguf

    from preftune.train.rundir import writing

    if kind not in TYPES:
        raise ModelSpecError(f"GGUF type {kind!r}: one of {', '.join(TYPES)}")
    config = model.config
    shape = _check_architecture(config)
    tokens, types, merges, spec = _vocabulary(tokenizer, config.vocab_size)
    pre = tokenizer_pre or tokenizer_pre_name(spec)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    tmp = out.with_name(f".{out.name}.tmp")
    with writing(out, "GGUF file"):
        out.parent.mkdir(parents=True, exist_ok=True)
        writer = None
        try:
            writer = gguf.GGUFWriter(str(tmp), "llama")
            _write_hyperparameters(writer, config, shape, name)
            writer.add_file_type(int(file_type))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre)
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            writer.add_token_merges(merges)
            _special_tokens(writer, tokenizer)
            ggml_types = {}
            for tensor_name, tensor in gguf_tensors(model, shape, meta=True):
                ggml_types[tensor_name] = _ggml_type(tuple(tensor.shape), kind)
                _declare(writer, tensor_name, tuple(tensor.shape), ggml_types[tensor_name])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for tensor_name, tensor in gguf_tensors(model, shape):  # the same order, encoded one at a time
                writer.write_tensor_data(_encode(tensor, ggml_types[tensor_name]))
            writer.close()
            writer = None
            os.replace(tmp, out)
        finally:
            if writer is not None:
                writer.close()
            tmp.unlink(missing_ok=True)
    return {"gguf": str(out), "type": kind, "bytes": out.stat().st_size,
            "tensors": dict(Counter(t.name for t in ggml_types.values())), "tokenizer_pre": pre,
            "chat_template": bool(getattr(tokenizer, "chat_template", None))}


def llama_cpp_and_hf_logps(llama, model: torch.nn.Module, tokenizer, text: str):
    """Next-token log-probs of ``text`` from llama.cpp (a ``llama_cpp.Llama`` built with ``logits_all=True`` on an
    export) and from the transformers ``model``, after checking that llama.cpp cuts ``text`` into the tokenizer's
    very token ids (ValueError otherwise). For checking an export (tests, ``bench/gguf_fidelity.py``)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    theirs = llama.tokenize(text.encode(), add_bos=False, special=True)
    if theirs != ids:
        raise ValueError(f"llama.cpp tokenizes {text!r} as {theirs}, the tokenizer as {ids}")
    llama.reset()
    llama.eval(ids)
    got = torch.from_numpy(np.array(llama.scores[:len(ids)])).log_softmax(-1)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return got, want
