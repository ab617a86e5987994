"""preftune.config: strict typed configs, YAML + dotted overrides, shipped configs, and the CLI's early check.

Each test names, in a comment, the bug it catches.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import pytest
import yaml

from preftune.config import Config, ConfigError, load_config, save_config
from preftune.recipes import RECIPES

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs"
# preftune's configs (configs/accelerate/ holds accelerate launch's own: tests/unit/test_sharding.py reads them)
SHIPPED = sorted(p for p in {*CONFIG_DIR.rglob("*.yaml"), *CONFIG_DIR.rglob("*.yml")}
                 if "accelerate" not in p.relative_to(CONFIG_DIR).parts) if CONFIG_DIR.is_dir() else []


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_load():
    # Catches: defaults that fail their own validation, or load_config() drifting from the dataclasses.
    cfg = load_config()
    fresh = Config()
    fresh.data.max_prompt_tokens = 256  # resolved at load from data.max_length (512)
    assert cfg == fresh
    assert (cfg.model, cfg.ref_model, cfg.dpo.beta, cfg.train.optimizer) == ("smollm2-135m", None, 0.1, "rmsprop")
    assert cfg.data.max_prompt_tokens < cfg.data.max_length


def test_load_config_does_not_mutate_a_fresh_default():
    # Catches: a shared mutable default (e.g. a module-level Config) being merged into in place.
    load_config(overrides=["dpo.beta=0.3", "train.max_steps=3"])
    fresh = Config()
    fresh.data.max_prompt_tokens = 256  # the one default resolved at load (from data.max_length)
    assert load_config() == fresh


def test_yaml_then_overrides_merge_and_override_wins(tmp_path):
    # Catches: overrides applied before the file (file wins), nested sections replaced wholesale instead
    # of merged (untouched keys reset), YAML-only values lost.
    path = write_yaml(tmp_path, """
model: tiny
data: {max_length: 128, max_prompt_tokens: 64}
train:
  max_steps: 7
  lr: 1e-5
  optimizer: adamw
dpo: {beta: 0.2}
""")
    cfg = load_config(path, ["dpo.beta=0.05", "train.max_steps=9"])
    assert cfg.dpo.beta == 0.05
    assert cfg.train.max_steps == 9
    assert cfg.model == "tiny"
    assert cfg.train.optimizer == "adamw"
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert (cfg.data.max_length, cfg.data.max_prompt_tokens) == (128, 64)
    assert cfg.train.batch_size == Config().train.batch_size  # untouched key keeps its default
    assert cfg.dpo.label_smoothing == 0.0


@pytest.mark.parametrize("overrides, yaml_text, key", [
    (["nope=1"], None, "nope"),
    (["dpo.bta=0.1"], None, "dpo.bta"),
    (["train.max_step=3"], None, "train.max_step"),
    (["nope.deeper=1"], None, "nope"),
    ([], "dpo: {bta: 0.1}\n", "dpo.bta"),
    ([], "lr: 0.1\n", "lr"),
])
def test_unknown_key_is_an_error_naming_it(tmp_path, overrides, yaml_text, key):
    # Catches: unknown keys (typos) silently ignored or stored as new attributes, at either level.
    path = write_yaml(tmp_path, yaml_text) if yaml_text else None
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(path, overrides)


@pytest.mark.parametrize("override, key", [
    ("train.max_steps=abc", "train.max_steps"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("train.max_steps=true", "train.max_steps"),
    ("dpo.beta=[1]", "dpo.beta"),
    ("dpo.beta=abc", "dpo.beta"),
    ("train.lr={a: 1}", "train.lr"),
    ("run.plot=maybe", "run.plot"),
    ("model=null", "model"),  # model is not optional
    ("dpo=0.1", "dpo"),  # a section is not a scalar
])
def test_wrong_type_is_an_error_naming_the_key(override, key):
    # Catches: values stored with the wrong type (crashing later, after a model loaded) or bools accepted
    # as ints.
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(overrides=[override])


def test_wrong_type_in_yaml_is_an_error_naming_the_key(tmp_path):
    # Catches: type checks applied to overrides only, not to the YAML file.
    with pytest.raises(ConfigError, match="'train.batch_size'"):
        load_config(write_yaml(tmp_path, "train: {batch_size: eight}\n"))


def test_float_written_without_a_dot_becomes_a_float(tmp_path):
    # Catches: YAML 1.1 reading "1e-6" as the STRING "1e-6" and the config keeping it (or rejecting it).
    cfg = load_config(overrides=["train.lr=1e-6"])
    assert cfg.train.lr == 1e-6 and type(cfg.train.lr) is float
    cfg = load_config(write_yaml(tmp_path, "train: {lr: 1e-6}\ndpo: {beta: 1}\n"))
    assert cfg.train.lr == 1e-6 and type(cfg.train.lr) is float
    assert cfg.dpo.beta == 1.0 and type(cfg.dpo.beta) is float  # int -> float


def test_string_key_keeps_its_raw_text():
    # Catches: a path like "123" or "1e3" parsed as a number (then rejected or turned into "1000.0").
    assert load_config(overrides=["data.train=123"]).data.train == "123"
    assert load_config(overrides=["data.eval=1e3"]).data.eval == "1e3"
    assert load_config(overrides=["model=true"]).model == "true"


def test_null_gives_none_and_later_override_wins():
    # Catches: "null" kept as the string "null" (then used as a model name), or override order ignored.
    assert load_config(overrides=["ref_model=null"]).ref_model is None
    assert load_config(overrides=["ref_model=tiny", "ref_model=null"]).ref_model is None
    assert load_config(overrides=["ref_model=null", "ref_model=tiny"]).ref_model == "tiny"
    assert load_config(overrides=["train.warmup_steps=5"]).train.warmup_steps == 5


def test_invalid_choice_names_the_choices():
    # Catches: free-form strings accepted for enumerated options (failing deep inside training).
    with pytest.raises(ConfigError, match="train.optimizer") as info:
        load_config(overrides=["train.optimizer=adam"])
    assert "rmsprop" in str(info.value) and "adamw" in str(info.value) and "sgd" in str(info.value)


def test_prompt_budget_must_leave_room_for_responses():
    # Catches: max_prompt_tokens >= max_length accepted (responses would be cut to nothing).
    with pytest.raises(ConfigError, match="data.max_prompt_tokens"):
        load_config(overrides=["data.max_length=64", "data.max_prompt_tokens=64"])
    with pytest.raises(ConfigError, match="data.max_prompt_tokens"):
        load_config(overrides=["data.max_length=64", "data.max_prompt_tokens=100"])
    assert load_config(overrides=["data.max_length=64", "data.max_prompt_tokens=63"]).data.max_length == 64


@pytest.mark.parametrize("override, message", [
    ("train.eval_batch_size=0", "'train.eval_batch_size' must be >= 1"),  # was a traceback at the final eval
    ("train.keep_checkpoints=0", "'train.keep_checkpoints' must be >= 1"),  # silently kept every checkpoint
    ("train.warmup_steps=-5", "'train.warmup_steps' must be >= 0"),  # silently meant no warm-up
])
def test_train_settings_out_of_range_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])
    from preftune.recipes.ppo import load_ppo_config

    if "keep_checkpoints" in override:
        with pytest.raises(ConfigError, match=message):
            load_ppo_config(overrides=[override])


def test_label_smoothing_range():
    # Catches: cDPO label smoothing >= 0.5 accepted (it flips which response the loss prefers).
    with pytest.raises(ConfigError, match="dpo.label_smoothing"):
        load_config(overrides=["dpo.label_smoothing=0.6"])
    with pytest.raises(ConfigError, match="dpo.label_smoothing"):
        load_config(overrides=["dpo.label_smoothing=0.5"])
    assert load_config(overrides=["dpo.label_smoothing=0.1"]).dpo.label_smoothing == 0.1


def test_save_then_load_round_trips(tmp_path):
    # Catches: save_config writing something load_config cannot read back identically (floats as strings,
    # None lost, nested sections flattened): a run directory's config.yaml must reproduce the run.
    cfg = load_config(overrides=["model=tiny", "ref_model=null", "data.train=123", "train.lr=1e-6",
                                 "train.optimizer=adamw", "train.warmup_steps=3", "dpo.beta=0.05",
                                 "dpo.label_smoothing=0.1", "data.append_eos=false", "run.dir=runs/x"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["train"]["lr"] == 1e-6


def test_demo_config_round_trips(tmp_path):
    # Catches: a saved demo config (with its `demo:` section) that build_config cannot read back identically.
    from preftune.recipes.demo import build_config

    cfg = build_config(None, ["demo.train_prompts=10", "dpo.beta=0.2"], quick=True)
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert build_config(str(path), [], quick=False) == cfg


@pytest.mark.parametrize("path", SHIPPED or [None], ids=[str(p.relative_to(REPO)) for p in SHIPPED] or ["none"])
def test_shipped_config_parses(path):
    # Catches: a shipped YAML with a typo'd key, a wrong type or a value its command would reject.
    if path is None:
        pytest.skip("configs/ has no YAML files yet")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    assert isinstance(raw, dict), f"{path}: top level must be a mapping"
    # each shipped config names its command and is parsed with that command's own config (not by sniffing keys)
    assert raw.get("command") in RECIPES, f"{path}: first key must be `command: <one of {', '.join(RECIPES)}>`"
    recipe = importlib.import_module(f"preftune.recipes.{raw['command']}")
    cfg = load_config(path, [], base=recipe.CONFIG())
    getattr(recipe, "check_config", lambda cfg: None)(cfg)
    for other in {"dpo", "sft", "reward", "ppo"} - {raw["command"]} - set(getattr(recipe.CONFIG, "COMMANDS", ())):
        with pytest.raises(ConfigError, match=f"config for `preftune {raw['command']}`"):
            load_config(path, [], base=importlib.import_module(f"preftune.recipes.{other}").CONFIG())


# ---------------------------------------------------------------- CLI


def _forbid_model_loading(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the config was checked")

    # Import the run modules first: they bind their own references to the loaders at import time, and
    # importing them while the loaders are patched would leave `boom` bound there for later tests.
    import preftune.models.load
    import preftune.train.policy  # noqa: F401

    for module in [m for n, m in sys.modules.items() if n.startswith("preftune.")]:
        for name in ("load_causal_lm", "load_reference", "load_tokenizer"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, boom)


@pytest.mark.parametrize("bad, key", [("nope=1", "nope"), ("dpo.bta=0.1", "dpo.bta"),
                                      ("train.max_steps=abc", "train.max_steps")])
def test_cli_rejects_a_bad_key_before_loading_a_model(monkeypatch, capsys, bad, key):
    # Catches: the CLI loading the model (minutes for a real one) before validating the config, or a
    # config error escaping as a traceback instead of exit status 2 with a one-line message naming the key.
    from preftune.cli import main

    _forbid_model_loading(monkeypatch)
    start = time.perf_counter()
    status = main(["dpo", "model=tiny", bad])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert status == 2
    assert f"'{key}'" in err and err.startswith("error:")
    assert elapsed < 5, f"took {elapsed:.1f} s"


def test_cli_rejects_an_unknown_loss_with_status_2(monkeypatch, capsys):
    # Catches: a typo'd loss name giving a traceback (or starting training) instead of a clean input error.
    from preftune.cli import main

    _forbid_model_loading(monkeypatch)
    status = main(["dpo", "model=tiny", "dpo.loss=nope"])
    assert status == 2
    assert "'nope'" in capsys.readouterr().err


def test_auto_layout_shares_the_prompt_when_it_saves_a_tenth_of_the_positions():
    from preftune.config import load_config
    from preftune.data.tokenize import TokenizedPair
    from preftune.train.layout import resolve_layout

    def items(prompt, response):
        return [TokenizedPair([1] * prompt, [2] * response, [3] * response, "x")] * 3

    auto = load_config(None, [])
    assert resolve_layout(auto, items(20, 50)) == "prefix_shared"  # 120 vs 140 positions per pair
    assert resolve_layout(auto, items(400, 40)) == "prefix_shared"
    assert resolve_layout(auto, items(5, 50)) == "padded"  # 105 vs 110: under the 10% threshold
    assert resolve_layout(auto, []) == "padded"
    assert resolve_layout(load_config(None, ["train.layout=packed"]), items(5, 50)) == "packed"


def test_shared_layouts_are_kept_within_a_sliding_attention_window():
    """The prefix-shared and packed layouts give the model its own (T, T) mask, which transformers uses as given,
    so a sliding-window model attends past its window there: measured on a tiny random Mistral with a 4-token
    window, shared and padded log-probs differ (by ~0.27 nats on 14-token sequences) and agree exactly with a
    64-token window. Such sequences get the padded layout (auto) or a config error (explicit)."""
    from types import SimpleNamespace

    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from preftune.config import ConfigError, load_config
    from preftune.data.collate import collate_pairs, collate_pairs_prefix_shared
    from preftune.data.tokenize import TokenizedPair
    from preftune.models.logprobs import batch_logps
    from preftune.train.layout import resolve_layout, sliding_window

    pairs = [TokenizedPair(list(range(1, 9)), list(range(10, 16)), list(range(20, 27)), "x")]  # longest: 15
    diffs = {}
    for window in (4, 64):
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 sliding_window=window)).eval()
        with torch.no_grad():
            padded = batch_logps(model, collate_pairs(pairs, 0)).logps
            shared = batch_logps(model, collate_pairs_prefix_shared(pairs, 0)).logps
        diffs[window] = (padded - shared).abs().max().item()
        assert sliding_window(model.config) == window
    assert diffs[4] > 0.05 and diffs[64] == 0.0

    auto = load_config(None, [])
    mistral = SimpleNamespace(sliding_window=4)
    assert resolve_layout(auto, pairs) == "prefix_shared"
    assert resolve_layout(auto, pairs, mistral) == "padded"
    assert resolve_layout(auto, pairs, SimpleNamespace(sliding_window=15)) == "prefix_shared"  # within the window
    for layout in ("prefix_shared", "packed"):
        with pytest.raises(ConfigError, match="train.layout.*15 tokens, over the model's 4-token sliding"):
            resolve_layout(load_config(None, [f"train.layout={layout}"]), pairs, mistral)
    # configs that name a window their layers do not use (Qwen2's default) or have none
    assert sliding_window(SimpleNamespace(sliding_window=4096, use_sliding_window=False)) is None
    assert sliding_window(SimpleNamespace(sliding_window=4096, layer_types=["full_attention"] * 2)) is None
    assert sliding_window(SimpleNamespace(sliding_window=512, layer_types=["sliding_attention", "full_attention"])) == 512
    assert sliding_window(SimpleNamespace()) is None


def test_train_tf32_turns_on_tf32_matmuls_process_wide(monkeypatch):
    """train.tf32=true sets torch's CUDA fp32-matmul precision to TF32 (the flag is settable without a GPU);
    false leaves torch's setting alone."""
    import torch

    from preftune.config import load_config
    from preftune.train.runtime import setup_threads

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        setup_threads(load_config(None, ["train.tf32=false"]))
        assert matmul.fp32_precision == before
        setup_threads(load_config(None, ["train.tf32=true"]))
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


def test_help_lists_every_config_key_with_its_default(capsys):
    """`preftune dpo --help` is generated from the config dataclasses: every key, its default, its choices and
    the note from its source comment (a hand-written list had left out a dozen keys, LoRA's among them)."""
    from preftune.cli import main
    from preftune.config import config_keys

    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    text = capsys.readouterr().out
    keys = config_keys()
    assert len(keys) > 50
    for key, default, _ in keys:
        assert f"  {key} (" in text, key
    assert "  train.layout (auto)  auto | padded | prefix_shared" in text
    assert "  reference.mode (model)  model: a frozen copy" in text and "precomputed:" in text
    assert "  data.max_pairs_per_prompt (none)  records with several ranked/scored responses" in text
    assert "  lora.r (16)" in text and "  train.tf32 (false)  CUDA: TF32" in text


def test_resume_reads_a_run_saved_when_commands_shared_one_config(tmp_path):
    # Catches: run directories saved when reward (and sft, ppo) configs still carried every section at its default
    # becoming impossible to resume; and a section set away from its default slipping through that leniency.
    from preftune.config import to_dict
    from preftune.recipes.reward import RewardRunConfig

    old = to_dict(Config()) | {"reward": {"normalize": True, "head_init": "zeros"}}
    path = write_yaml(tmp_path, yaml.safe_dump(old))
    assert load_config(path, [], base=RewardRunConfig(), skip_defaults=True).reward.head_init == "zeros"
    with pytest.raises(ConfigError, match="is not used by reward"):
        load_config(path, [], base=RewardRunConfig())  # a new run's YAML gets no such leniency
    old["dpo"]["beta"] = 0.5
    with pytest.raises(ConfigError, match=r"config key 'dpo\.beta' is not used by reward"):
        load_config(write_yaml(tmp_path, yaml.safe_dump(old)), [], base=RewardRunConfig(), skip_defaults=True)


def test_a_commands_help_shows_its_own_defaults_and_inherited_notes():
    # Catches: help built from the section classes' defaults (the demo's help said train.max_steps 100, lr 5e-06,
    # while the demo runs 64 steps at 2e-5) and notes lost for fields a command's config inherits.
    from preftune.config import config_help, config_keys
    from preftune.recipes.demo import DemoConfig

    keys = {key: (default, note) for key, default, note in config_keys(DemoConfig)}
    assert keys["train.max_steps"][0] == DemoConfig().train.max_steps == 64
    assert keys["train.lr"][0] == 2e-5 and keys["data.max_length"][0] == 64
    assert keys["model"][1].startswith("alias (smollm2-135m, tiny)")
    assert "  train.max_steps (64)" in config_help(DemoConfig)


def test_a_config_that_names_no_command_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'command' must name a command"):
        load_config(write_yaml(tmp_path, "command:\nmodel: tiny\n"))


def test_data_max_length_alone_is_enough():
    """max_prompt_tokens left unset follows max_length (min(256, max_length // 2)); it used to stay 256 and refuse
    any max_length up to 256. The resolved number is what the run records."""
    assert load_config(None, ["data.max_length=128"]).data.max_prompt_tokens == 64
    assert load_config(None, []).data.max_prompt_tokens == 256
    assert load_config(None, ["data.max_length=1024", "data.max_prompt_tokens=300"]).data.max_prompt_tokens == 300
    with pytest.raises(ConfigError, match="data.max_length' must be >= 2"):
        load_config(None, ["data.max_length=1"])
