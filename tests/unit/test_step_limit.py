"""The step's limit (benchmark/limit.py): the matrix products a DPO step runs, counted by hand."""

from types import SimpleNamespace

from preftune.benchmark.limit import Shapes, flops, matmuls, rows_of, unmodelled
from preftune.config import load_config

# 1 layer, hidden 4, MLP 8, 2 heads of 2, 1 key-value head, vocabulary 10
CONFIG = SimpleNamespace(num_hidden_layers=1, hidden_size=4, intermediate_size=8, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=2, vocab_size=10)


def test_rows_per_layout():
    batch = [(2, 1, 3), (4, 2, 2)]  # (prompt, chosen, rejected) tokens
    assert rows_of(batch, "padded") == (4, 6)  # 2 rows a pair, each prompt + the longer response, longest 4 + 2
    assert rows_of(batch, "prefix_shared") == (2, 8)  # one row a pair: prompt + chosen + rejected
    assert rows_of(batch, "packed") == (1, 14)


def test_the_step_s_matrix_products_by_hand():
    shapes = Shapes.of(CONFIG)
    assert shapes.projections() == [(4, 4), (4, 2), (4, 2), (4, 4), (4, 8), (4, 8), (8, 4)]
    batch = [(2, 1, 1)]  # prefix_shared: one row of 4 tokens; 2 response tokens reach the head
    # body, per token: 2 x (16 + 8 + 8 + 16 + 32 + 32 + 32) = 288 FLOPs a pass; passes: policy forward, dX, dW,
    # reference forward = 4 -> 4 tokens x 288 x 4 = 4608. Head: forward 2 x 2 x 4 x 10 = 160 each for policy and
    # reference (fp32); backward dX and dW 160 each under bf16
    assert flops(matmuls(shapes, batch, "prefix_shared", reference=True, precision="bf16")) == {
        "bf16": 4608 + 320, "fp32": 320}
    assert flops(matmuls(shapes, batch, "prefix_shared", reference=False, precision="fp32")) == {
        "fp32": 3456 + 160 + 320}
    # gradient checkpointing: the backward runs the body's forward once more (5 passes), not the head's
    assert flops(matmuls(shapes, batch, "prefix_shared", reference=True, precision="bf16", recompute=True)) == {
        "bf16": 4 * 288 * 5 + 320, "fp32": 320}
    products = matmuls(shapes, batch, "prefix_shared", reference=True, precision="bf16")
    assert {(2, 4, 10, "fp32", 2), (2, 10, 4, "bf16", 1), (10, 2, 4, "bf16", 1)} <= set(products)  # the head


def test_no_limit_for_a_step_it_does_not_model():
    """LoRA and the adapter reference change the step's work: the limit names them instead of printing a wrong
    number; full fine-tuning (live or precomputed reference, recomputation or not) is modelled."""
    assert unmodelled(load_config(None, [])) == []
    assert unmodelled(load_config(None, ["reference.mode=precomputed", "train.compile=true",
                                         "train.gradient_checkpointing=true"])) == []
    assert unmodelled(load_config(None, ["lora.enabled=true", "train.gradient_checkpointing=true"])) == [
        "lora.enabled"]
    assert unmodelled(load_config(None, ["reference.mode=adapter"])) == ["reference.mode=adapter"]
