"""The benchmark's MFU accounting, against hand-computed numbers."""

from __future__ import annotations

import pytest

from preftune.benchmark.flops import count_parameters, flops_per_token, gpu_peak_tflops, mfu


def test_mfu_matches_the_issues_accounting():
    # the issue: TRL at ~31k policy tokens/s on a 0.4B model, live reference, H200 -> "about 10%" of the bf16 peak
    assert flops_per_token(400_000_000, "model") == 3_200_000_000  # 6N policy + 2N reference forward
    assert flops_per_token(400_000_000, "precomputed") == 2_400_000_000  # no reference forward in the step
    assert mfu(31_000, 3_200_000_000, 989.4) == pytest.approx(31_000 * 3.2e9 / 989.4e12) == pytest.approx(0.1003,
                                                                                                             abs=1e-4)
    assert mfu(31_000, 3_200_000_000, None) is None and mfu(None, 3_200_000_000, 989.4) is None


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5),
                                        ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA GH200 480GB", 989.4),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.1), ("NVIDIA L40", 181.0),
                                        ("NVIDIA L4", 121.0), ("Tesla T4", None), (None, None)])
def test_gpu_peaks_by_device_name(name, peak):
    assert gpu_peak_tflops(name) == peak


def test_parameter_count_holds_a_tied_embedding_once(tmp_path):
    from preftune.models.load import load_causal_lm

    model = load_causal_lm("tiny", seed=0)
    model.save_pretrained(tmp_path, safe_serialization=True)
    embedding = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embedding
    body = sum(p.numel() for name, p in model.named_parameters() if p is not embedding)
    # by hand: embedding 49152 x 64; per layer q 64x64, k and v 64x32, o 64x64, MLP 3 x 64x128, 2 norms of 64;
    # 2 layers and the final norm
    by_hand = 49152 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
    assert count_parameters(str(tmp_path)) == body + embedding.numel() == by_hand == 3_219_776
