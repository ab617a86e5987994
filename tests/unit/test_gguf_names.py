"""GGUF export's pure parts, by hand: the per-head q/k layout and the pre-tokenizer's llama.cpp name."""

import pytest
import torch

from preftune.errors import ModelSpecError
from preftune.models.gguf_export import permute_heads, tokenizer_pre_name

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def test_permute_heads_interleaves_each_heads_halves():
    # 2 heads of 4 rows: HF keeps each head's rotary halves apart ([0 1 | 2 3]); llama.cpp pairs them ([0 2 1 3])
    weight = torch.arange(8.0).unsqueeze(1).repeat(1, 3)
    assert permute_heads(weight, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert permute_heads(weight, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_pre_tokenizer_names():
    assert tokenizer_pre_name({"pre_tokenizer": BYTE_LEVEL}) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert tokenizer_pre_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, BYTE_LEVEL]}}) \
        == "smollm"
    for other in ({**BYTE_LEVEL, "add_prefix_space": True}, {"type": "Metaspace", "replacement": "▁"},
                  {"type": "Sequence", "pretokenizers": [{**digits, "individual_digits": False}, BYTE_LEVEL]}, None):
        with pytest.raises(ModelSpecError, match="--tokenizer-pre NAME"):
            tokenizer_pre_name({"pre_tokenizer": other})
