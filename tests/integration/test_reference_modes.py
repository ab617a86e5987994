"""Every way of holding the reference (model, adapter, precomputed, none) on the tiny model."""

import json
import logging

import pytest
from safetensors.torch import load_file

from preftune.cli import main
from preftune.train.rundir import read_metrics

FAST = ["train.progress=false", "train.precision=fp32", "run.plot=false", "train.lr=1e-3", "train.optimizer=adamw"]


@pytest.fixture(scope="module")
def sft_ref(tmp_path_factory):
    """A reference that differs from the policy's start: tiny after a few SFT steps (so policy != reference
    and the loss at step 1 is not trivially log 2)."""
    from conftest import PAIRS, write_jsonl

    root = tmp_path_factory.mktemp("sftref")
    data = write_jsonl(root / "pairs.jsonl", PAIRS)
    assert main(["sft", "model=tiny", *FAST, f"data.train={data}", "train.max_steps=3", f"run.dir={root / 'sft'}"]) == 0
    return root / "sft" / "policy"


def _dpo(tmp_path, pairs_file, name, *extra):
    run_dir = tmp_path / name
    code = main(["dpo", *FAST, f"data.train={pairs_file}", f"data.eval={pairs_file}", "train.max_steps=3",
                 "train.batch_size=2", f"reference.cache_dir={tmp_path / 'refcache'}", f"run.dir={run_dir}", *extra])
    assert code == 0
    return run_dir, read_metrics(run_dir / "metrics.jsonl")


def _eval(tmp_path, capsys, *args):
    out = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["eval", "train.precision=fp32", f"reference.cache_dir={tmp_path / 'refcache'}", *args,
                 "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_model_and_precomputed_give_the_same_losses(tmp_path, pairs_file, sft_ref):
    runs = {mode: _dpo(tmp_path, pairs_file, mode, "model=tiny", f"ref_model={sft_ref}", f"reference.mode={mode}")[1]
            for mode in ("model", "precomputed")}
    first = runs["model"][0]
    assert first["loss"] != pytest.approx(0.6931472, abs=1e-3)  # a real reference, not the policy's copy
    # training rows (eval rows are separate); indexing with [key] fails if a metric goes missing or is renamed
    train = {m: [r for r in rows if not any(k.startswith("eval/") for k in r)] for m, rows in runs.items()}
    assert train["model"] and len(train["model"]) == len(train["precomputed"])
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "grad_norm"):
        assert [r[key] for r in train["model"]] == pytest.approx([r[key] for r in train["precomputed"]],
                                                                 abs=1e-5), key
    evals = [[r["eval/loss"] for r in runs[m] if "eval/loss" in r] for m in runs]
    assert evals[0] and evals[0] == pytest.approx(evals[1], abs=1e-5)


def test_adapter_reference_is_the_base_and_matches_a_frozen_copy(tmp_path, pairs_file, capsys):
    run_dir, rows = _dpo(tmp_path, pairs_file, "adapter", "model=tiny", "reference.mode=adapter", "lora.r=4")
    assert rows[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # LoRA starts at B = 0: policy == base
    assert (run_dir / "policy" / "adapter_config.json").is_file()
    assert (run_dir / "policy-merged" / "model.safetensors").is_file()
    ckpt = load_file(str(run_dir / "checkpoints" / "step-000003" / "model.safetensors"))
    assert ckpt and all("lora_" in k for k in ckpt)  # checkpoints hold the adapter only
    final_eval = [r for r in rows if "eval/loss" in r][-1]
    # the same trained policy evaluated against a separate frozen copy of the base gives the same metrics
    for policy in (run_dir / "policy", run_dir / "policy-merged"):
        result = _eval(tmp_path, capsys, f"model={policy}", "ref_model=tiny", f"data.eval={pairs_file}")
        assert result["eval/loss"] == pytest.approx(final_eval["eval/loss"], abs=1e-4)
        assert result["eval/rewards/margins"] == pytest.approx(final_eval["eval/rewards/margins"], abs=1e-4)
    # an adapter run's own eval needs no ref_model: the base is read from the adapter directory
    result = _eval(tmp_path, capsys, f"model={run_dir / 'policy'}", "reference.mode=adapter", f"data.eval={pairs_file}")
    assert result["ref_model"] == "tiny"


def test_precomputed_cache_reuse_and_invalidation(tmp_path, pairs_file, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    _dpo(tmp_path, pairs_file, "p1", "model=tiny", "reference.mode=precomputed")
    assert "computing" in caplog.text
    caplog.clear()

    import preftune.train.policy as dpo

    def no_reference(*a, **k):
        raise AssertionError("the reference model was loaded although the cache holds its log-probs")

    monkeypatch.setattr(dpo, "load_reference", no_reference)
    _dpo(tmp_path, pairs_file, "p2", "model=tiny", "reference.mode=precomputed")
    assert "reusing cache" in caplog.text and "computing" not in caplog.text
    monkeypatch.undo()
    caplog.clear()
    _dpo(tmp_path, pairs_file, "p3", "model=tiny", "reference.mode=precomputed", "data.max_length=12",
         "data.max_prompt_tokens=8")
    assert "computing" in caplog.text  # truncation settings are part of the key
    caplog.clear()
    _dpo(tmp_path, pairs_file, "p4", "model=tiny", "reference.mode=precomputed", "train.seed=1")
    assert "computing" in caplog.text  # other reference weights (tiny with another seed)


def test_precomputed_eval_after_training_uses_the_cached_reference(tmp_path, pairs_file, capsys):
    run_dir, rows = _dpo(tmp_path, pairs_file, "pre", "model=tiny", "reference.mode=precomputed")
    final_eval = [r for r in rows if "eval/loss" in r][-1]
    assert final_eval["eval/rewards/chosen"] != 0.0  # the trained policy was not used as its own reference
    live = _eval(tmp_path, capsys, f"model={run_dir / 'policy'}", "ref_model=tiny", f"data.eval={pairs_file}")
    assert live["eval/loss"] == pytest.approx(final_eval["eval/loss"], abs=1e-5)
    cached = _eval(tmp_path, capsys, f"model={run_dir / 'policy'}", "ref_model=tiny", "reference.mode=precomputed",
                   f"data.eval={pairs_file}")
    assert cached["eval/loss"] == pytest.approx(final_eval["eval/loss"], abs=1e-5)


def test_reference_free_loss_with_mode_none(tmp_path, pairs_file, capsys):
    run_dir, rows = _dpo(tmp_path, pairs_file, "simpo", "model=tiny", "dpo.loss=simpo", "dpo.beta=2.0",
                         "reference.mode=none")
    assert (run_dir / "policy" / "model.safetensors").is_file()
    assert rows[0]["loss"] > 0
    capsys.readouterr()
    assert main(["dpo", "model=tiny", "dpo.loss=sigmoid", "reference.mode=none", f"data.train={pairs_file}"]) == 2
    assert "needs a reference" in capsys.readouterr().err
    assert main(["dpo", "model=tiny", "dpo.loss=hinge", "dpo.label_smoothing=0.1", f"data.train={pairs_file}"]) == 2
    assert "does not use it" in capsys.readouterr().err  # an option the loss would ignore is refused


def test_dpo_continues_from_an_sft_lora_adapter(tmp_path, pairs_file, capsys):
    assert main(["sft", "model=tiny", *FAST, f"data.train={pairs_file}", "train.max_steps=3", "lora.enabled=true",
                 "lora.r=4", f"run.dir={tmp_path / 'sft'}"]) == 0
    adapter = tmp_path / "sft" / "policy"
    assert (adapter / "adapter_config.json").is_file()
    run_dir, rows = _dpo(tmp_path, pairs_file, "dpo", f"model={adapter}", "reference.mode=adapter", "lora.r=4")
    # new adapter on the merged SFT model: at step 1 the policy equals its reference (the SFT model), not the
    # raw base model
    assert rows[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    vs_base = _eval(tmp_path, capsys, f"model={run_dir / 'policy-merged'}", "ref_model=tiny", f"data.eval={pairs_file}")
    vs_sft = _eval(tmp_path, capsys, f"model={run_dir / 'policy-merged'}", f"ref_model={adapter}",
                   f"data.eval={pairs_file}")
    final_eval = [r for r in rows if "eval/loss" in r][-1]
    assert vs_sft["eval/loss"] == pytest.approx(final_eval["eval/loss"], abs=1e-4)
    assert vs_base["eval/loss"] != pytest.approx(final_eval["eval/loss"], abs=1e-3)


def test_adapter_run_killed_and_resumed_equals_uninterrupted(tmp_path, pairs_file):
    import os
    import subprocess
    import sys

    args = ["dpo", "model=tiny", *FAST, f"data.train={pairs_file}", "train.max_steps=6", "train.batch_size=2",
            "train.save_every=2", "reference.mode=adapter", "lora.r=4", "lora.export_merged=false"]
    env = dict(os.environ)
    run = lambda extra, **kw: subprocess.run([sys.executable, "-m", "preftune.cli", *extra], capture_output=True,
                                             text=True, timeout=300, **kw)
    assert run(args + [f"run.dir={tmp_path / 'a'}"], env=env).returncode == 0
    killed = run(args + [f"run.dir={tmp_path / 'b'}"], env=dict(env, PREFTUNE_FAULT="after_step:3"))
    assert killed.returncode == -9
    assert run(["dpo", "--resume", str(tmp_path / "b")], env=env).returncode == 0
    a = load_file(str(tmp_path / "a" / "policy" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "policy" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_weights_identity_of_an_adapter_covers_its_base(tmp_path):
    """A LoRA adapter used as the reference: its log-probs are those of base + adapter, so rewriting the base's
    weights must change the precompute cache key (it reused stale log-probs: eval loss 0.7205 vs 0.7233)."""
    import json

    from preftune.models.lora import BASE_FILE
    from preftune.models.reference import weights_identity

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"base weights v1")
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"lora weights")
    (adapter / BASE_FILE).write_text(json.dumps({"model": str(base), "seed": 0}))
    before = weights_identity(str(adapter), 0)
    assert weights_identity(str(adapter), 0) == before  # stable
    (base / "model.safetensors").write_bytes(b"base weights v2")
    assert weights_identity(str(adapter), 0) != before


def test_a_reference_with_another_tokenizer_is_refused(tmp_path, pairs_file, capsys):
    """The reference scores the policy's token ids: a reference whose tokenizer gives those tokens other ids
    would compare different text. Refused by dpo, eval and ppo before any weights load."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from preftune.models.load import load_causal_lm

    other = tmp_path / "other"
    words = Tokenizer(models.WordLevel({"<unk>": 0, "movie": 1, "film": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="<unk>").save_pretrained(other)
    load_causal_lm("tiny").save_pretrained(other)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The movie was"}\n', encoding="utf-8")
    for argv in (["dpo", f"data.train={pairs_file}", f"run.dir={tmp_path / 'run'}"],
                 ["eval", f"data.eval={pairs_file}"],
                 ["ppo", "ppo.scorer=vader", f"ppo.prompts={prompts}", f"run.dir={tmp_path / 'ppo'}"]):
        assert main([*argv, "model=tiny", f"ref_model={other}", "train.precision=fp32"]) == 2, argv
        err = capsys.readouterr().err
        assert f"ref_model {other}: its tokenizer gives" in err and "must share the policy's tokenizer" in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "ppo").exists()
