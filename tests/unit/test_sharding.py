"""FSDP2's pieces that need no second process: which modules become units, what is refused, the launcher configs.
Training on two sharded processes against one is tested in tests/integration/test_distributed.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from preftune.config import load_config
from preftune.errors import ConfigError
from preftune.models.load import load_causal_lm
from preftune.train.distributed import check_sharding, resolve_sharding
from preftune.train.sharding import local_fraction, transformer_blocks

ACCELERATE = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def test_each_decoder_layer_is_a_unit():
    model = load_causal_lm("tiny")
    blocks = transformer_blocks(model)
    assert blocks == list(model.get_decoder().layers) and len(blocks) == model.config.num_hidden_layers
    with pytest.raises(ValueError, match="no decoder layers found"):
        transformer_blocks(torch.nn.Linear(2, 2))
    assert local_fraction(model) == 1.0  # unsharded: every element is held


@pytest.mark.parametrize("setting", ["fsdp2", "zero2"])
def test_sharding_needs_several_processes(monkeypatch, setting):
    if setting.startswith("zero"):
        pytest.importorskip("deepspeed")
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=f"train.sharding={setting} shards across several processes"):
        resolve_sharding(setting)  # one process: refused, never silently unsharded
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_sharding(setting) == setting


def test_sharding_setting_and_the_accelerate_launcher(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_sharding("none") == "none"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert resolve_sharding("none") == "fsdp2"  # accelerate launch --config_file configs/accelerate/fsdp2.yaml
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ConfigError, match="fsdp_offload_params"):
        resolve_sharding("none")  # an accelerate FSDP option preftune does not take over: refused, not ignored
    monkeypatch.delenv("FSDP_OFFLOAD_PARAMS")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP version 1"):
        resolve_sharding("none")


def test_a_deepspeed_launch_config_asks_for_zero(monkeypatch):
    """accelerate launch --config_file configs/accelerate/zero3.yaml sets these; what preftune does not take over
    is refused, never ignored."""
    pytest.importorskip("deepspeed")
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                 "ACCELERATE_GRADIENT_CLIPPING", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert resolve_sharding("none") == "zero3"
    for name, value, message in [("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu", "offload"),
                                 ("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds.json", "deepspeed_config_file"),
                                 ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4", "train.grad_accum_steps"),
                                 ("ACCELERATE_GRADIENT_CLIPPING", "1.0", "train.max_grad_norm"),
                                 ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0", "ZeRO stage 0")]:
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(ConfigError, match=message):
                resolve_sharding("none")


def test_lora_the_adapter_reference_and_compile_train_sharded_but_compile_under_zero3_is_refused():
    for sharding in ("none", "fsdp2", "zero1", "zero2", "zero3"):  # parity: tests/integration/test_distributed.py
        for extra in ("lora.enabled=true", "reference.mode=adapter", "train.save_every=5"):
            check_sharding(SimpleNamespace(sharding=sharding), load_config(None, [extra]))
        if sharding != "zero3":
            check_sharding(SimpleNamespace(sharding=sharding), load_config(None, ["train.compile=true"]))
    with pytest.raises(ConfigError, match="train.sharding=zero3 does not support train.compile=true: ZeRO-3 gathers"):
        check_sharding(SimpleNamespace(sharding="zero3"), load_config(None, ["train.compile=true"]))


def test_the_shipped_accelerate_configs_are_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(ACCELERATE / "fsdp2.yaml"))
    assert fsdp.distributed_type == "FSDP" and str(fsdp.fsdp_config["fsdp_version"]) == "2"
    assert fsdp.mixed_precision == "no"  # precision is train.precision's
    assert load_config_from_file(str(ACCELERATE / "ddp.yaml")).distributed_type == "MULTI_GPU"
    for stage in (2, 3):
        zero = load_config_from_file(str(ACCELERATE / f"zero{stage}.yaml"))
        assert zero.distributed_type == "DEEPSPEED" and zero.deepspeed_config["zero_stage"] == stage
        assert zero.mixed_precision == "no"


def test_a_sharded_checkpoint_resumes_only_on_its_process_count(tmp_path):
    import json

    from preftune.train.checkpoint import load_checkpoint, load_sharded_checkpoint

    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2, "sharded": {"kind": "fsdp2",
                                                                                      "processes": 2}}))
    with pytest.raises(ConfigError, match="written by 2 sharded processes, resumed on 3"):
        load_sharded_checkpoint(tmp_path, SimpleNamespace(world=3, rank=0, sharding="fsdp2"), model=None,
                                optimizer=None, scheduler=None)
    with pytest.raises(ConfigError, match="written with train.sharding=fsdp2, resumed with zero2"):
        load_sharded_checkpoint(tmp_path, SimpleNamespace(world=2, rank=0, sharding="zero2"), model=None,
                                optimizer=None, scheduler=None)
    with pytest.raises(ConfigError, match="written sharded by 2 processes"):  # unsharded resume of a sharded run
        load_checkpoint(tmp_path, model=None, optimizer=None, scheduler=None)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2}))
    with pytest.raises(ConfigError, match="written unsharded"):
        load_sharded_checkpoint(tmp_path, SimpleNamespace(world=2, rank=0, sharding="fsdp2"), model=None,
                                optimizer=None, scheduler=None)
