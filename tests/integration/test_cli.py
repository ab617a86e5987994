"""Every CLI command end to end on the tiny model, and every bad-input case with its promised error."""

import json

import pytest

from preftune.cli import main

from conftest import PAIRS, write_jsonl

FAST = ["model=tiny", "train.progress=false", "train.precision=fp32"]


def _run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dpo_then_eval_then_sample_then_score(tmp_path, pairs_file, capsys):
    run_dir = tmp_path / "dpo"
    code, out, err = _run(capsys, ["dpo", *FAST, f"data.train={pairs_file}", f"data.eval={pairs_file}",
                                   "train.max_steps=4", "train.batch_size=2", "train.eval_every=2",
                                   "train.lr=1e-3", f"run.dir={run_dir}"])
    assert code == 0, err
    for name in ("config.yaml", "env.json", "metrics.jsonl", "training.png", "policy/model.safetensors",
                 "policy/config.json", "policy/tokenizer.json", "checkpoints/latest"):
        assert (run_dir / name).exists(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert [r["step"] for r in eval_rows] == [2, 4]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "pairs_per_s", "tokens_per_s"):
        assert key in train_rows[0], key
    # where each step's time went: the phases are positive and add up to at most the step's wall time
    phases = ("time/data_s", "time/forward_s", "time/backward_s", "time/optimizer_s")
    for row in train_rows:
        assert all(row[k] > 0 for k in phases), row
        assert sum(row[k] for k in phases) <= 2 / row["pairs_per_s"] * 1.001  # 2 pairs per step, log_every 1
    assert "eval/rewards/accuracies" in eval_rows[0]
    env = json.loads((run_dir / "env.json").read_text())
    assert env["seed"] == 0 and "torch" in env and env["allocator"] in ("system", "tcmalloc", "jemalloc")

    # eval: the trained policy against the tiny reference must reproduce the run's final eval metrics
    code, out, err = _run(capsys, ["eval", "model=" + str(run_dir / "policy"), "ref_model=tiny",
                                   f"data.eval={pairs_file}", "train.precision=fp32",
                                   "--out", str(tmp_path / "eval.json")])
    assert code == 0, err
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["pairs"] == len(PAIRS)
    assert result["eval/loss"] == pytest.approx(eval_rows[-1]["eval/loss"], abs=1e-4)
    assert result["eval/rewards/accuracies"] == pytest.approx(eval_rows[-1]["eval/rewards/accuracies"])

    # with data.eval_fraction (no data.eval): the pairs a run with that config held out of data.train, the same
    # metrics as evaluating a file of exactly those pairs
    from preftune.data.splits import split_eval

    held = write_jsonl(tmp_path / "held.jsonl", split_eval(PAIRS, 0.5, 0)[1])
    results = []
    for data in ([f"data.train={pairs_file}", "data.eval_fraction=0.5"], [f"data.eval={held}"]):
        code, out, err = _run(capsys, ["eval", "model=" + str(run_dir / "policy"), "ref_model=tiny", *data,
                                       "train.precision=fp32"])
        assert code == 0, err
        results.append(json.loads(out))
    assert results[0]["pairs"] == results[1]["pairs"] == len(PAIRS) // 2
    assert results[0]["held_out_fraction"] == 0.5 and "held_out_fraction" not in results[1]
    assert results[0]["eval/loss"] == pytest.approx(results[1]["eval/loss"], abs=1e-6)

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "The movie was"}, {"prompt": "I felt"}])
    samples = tmp_path / "samples.jsonl"
    code, out, err = _run(capsys, ["sample", str(run_dir / "policy"), "--prompts", str(prompts), "--out",
                                   str(samples), "--num-samples", "3", "--max-new-tokens", "5"])
    assert code == 0, err
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 6 and [r["prompt"] for r in rows[:3]] == ["The movie was"] * 3
    assert all(isinstance(r["completion"], str) for r in rows)

    code, out, err = _run(capsys, ["score", str(samples), "--scorer", "vader"])
    assert code == 0, err
    scored = [json.loads(line) for line in samples.read_text().splitlines()]
    mean = sum(r["score_vader"] for r in scored) / len(scored)
    assert f"{mean:.4f}" in out


def test_sampling_is_seeded_and_greedy_is_deterministic(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    outs = []
    for seed in (1, 1, 2):
        path = tmp_path / f"s{len(outs)}.jsonl"
        assert main(["sample", "tiny", "--prompts", str(prompts), "--out", str(path), "--num-samples", "2",
                     "--max-new-tokens", "6", "--seed", str(seed)]) == 0
        outs.append([json.loads(x)["completion"] for x in path.read_text().splitlines()])
    assert outs[0] == outs[1] and outs[0] != outs[2]
    # settings that were silently something else (a negative temperature: greedy; 0 samples: an empty file)
    for option, value, rule in (("--temperature", "-0.5", ">= 0"), ("--top-p", "0.0", "in (0, 1]"),
                                ("--num-samples", "0", ">= 1"), ("--max-new-tokens", "0", ">= 1")):
        code, _, err = _run(capsys, ["sample", "tiny", "--prompts", str(prompts), "--out", str(tmp_path / "x.jsonl"),
                                     option, value])
        assert code == 2 and f"{option} {value}: must be {rule}" in err, err
        assert not (tmp_path / "x.jsonl").exists()


def test_sft_end_to_end(tmp_path, pairs_file, capsys):
    run_dir = tmp_path / "sft"
    code, out, err = _run(capsys, ["sft", *FAST, f"data.train={pairs_file}", "data.eval_fraction=0.25",
                                   "train.max_steps=3", "train.batch_size=2", "train.lr=1e-3", f"run.dir={run_dir}"])
    assert code == 0, err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] > rows[-2]["loss"]  # NLL on the chosen responses falls
    assert "eval/perplexity" in rows[-1]
    assert (run_dir / "policy" / "model.safetensors").is_file()


def test_dpo_from_sft_reference(tmp_path, pairs_file, capsys):
    """The reference may be a different checkpoint than the policy's start (here: an SFT model)."""
    sft_dir = tmp_path / "sft"
    assert main(["sft", *FAST, f"data.train={pairs_file}", "train.max_steps=2", "train.lr=1e-3",
                 f"run.dir={sft_dir}"]) == 0
    capsys.readouterr()
    dpo_dir = tmp_path / "dpo"
    code, out, err = _run(capsys, ["dpo", *FAST[1:], f"model={sft_dir / 'policy'}", "ref_model=tiny",
                                   f"data.train={pairs_file}", "train.max_steps=1", f"run.dir={dpo_dir}"])
    assert code == 0, err
    first = json.loads((dpo_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] != pytest.approx(0.6931472, abs=1e-4)  # policy != reference at step 1
    assert json.loads(out)["step"] == 1


def test_demo_end_to_end_on_tiny(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    code, out, err = _run(capsys, ["demo", "--quick", "--out", str(out_dir), *FAST, "demo.train_prompts=16",
                                   "demo.heldout_prompts=4", "demo.samples_per_prompt=2", "demo.pairs_per_prompt=1",
                                   "demo.min_score_gap=0", "demo.eval_samples_per_prompt=2",
                                   "demo.max_new_tokens=6", "train.max_steps=2", "train.eval_every=1"])
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    for key in ("reference_reward", "policy_reward", "kl", "reference_vader", "policy_vader", "oracle", "pairs"):
        assert key in summary, key
    assert 0.0 <= summary["reference_reward"] <= 1.0
    assert summary["oracle"]["heldout_accuracy"] > 0.7
    for name in ("pairs.jsonl", "samples_reference.jsonl", "samples_policy.jsonl", "demo.png", "training.png",
                 "policy/model.safetensors", "config.yaml"):
        assert (out_dir / name).exists(), name
    rows = [json.loads(x) for x in (out_dir / "samples_policy.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"prompt", "completion", "score_sentiment", "score_vader", "kl_sample"} <= set(rows[0])
    assert summary["kl"] == pytest.approx(sum(r["kl_sample"] for r in rows) / len(rows), abs=1e-6)
    assert "DPO policy" in out and "reference" in out


# ---- bad input: a clear error naming file, line and field; exit code 2; nothing trained -------------------

BAD = {
    "invalid_json": ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', 2, None),
    "missing_field": ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n', 2,
                      "rejected"),
    "empty_field": ('{"prompt": "a", "chosen": "  ", "rejected": "c"}\n', 1, "chosen"),
    "wrong_type": ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 2 + '{"prompt": 7, "chosen": "b", '
                   '"rejected": "c"}\n', 3, "prompt"),
    "identical": ('{"prompt": "a", "chosen": "same", "rejected": "same"}\n', 1, "chosen"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_file_line_field(tmp_path, capsys, case):
    text, line, field = BAD[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_text(text)
    run_dir = tmp_path / "run"
    code, out, err = _run(capsys, ["dpo", *FAST, f"data.train={path}", "train.max_steps=1", f"run.dir={run_dir}"])
    assert code == 2
    assert f"{path}:{line}" in err
    if field:
        assert f"field '{field}'" in err
    assert "Traceback" not in err
    assert not (run_dir / "policy").exists()


def test_prompt_longer_than_limit_is_an_error_when_asked(tmp_path, capsys):
    path = write_jsonl(tmp_path / "long.jsonl", [PAIRS[0], {"prompt": "word " * 80, "chosen": " a", "rejected": " b"}])
    code, out, err = _run(capsys, ["dpo", *FAST, f"data.train={path}", "data.max_prompt_tokens=16",
                                   "data.prompt_overflow=error", "train.max_steps=1", f"run.dir={tmp_path / 'r'}"])
    assert code == 2 and f"{path}:2: field 'prompt'" in err and "max_prompt_tokens=16" in err


def test_skip_mode_reports_and_trains_on_the_rest(tmp_path, capsys, caplog):
    rows = PAIRS[:4] + [{"prompt": "x", "chosen": "same", "rejected": "same"}, {"prompt": "x"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    code, out, err = _run(capsys, ["dpo", *FAST, f"data.train={path}", "data.on_invalid=skip", "train.max_steps=1",
                                   f"run.dir={tmp_path / 'r'}"])
    assert code == 0, err
    assert "skipped 2 of 6 records" in caplog.text

    # nothing left to train or evaluate on: an error naming the file and why, never another split in its place
    bad = write_jsonl(tmp_path / "bad.jsonl", rows[4:])
    for data, message in (([f"data.train={bad}"], f"{bad}: no training items left (skipped 2 of 2 records"),
                          ([f"data.train={path}", f"data.eval={bad}", "data.eval_fraction=0.5"],
                           f"{bad}: no evaluation items left (skipped 2 of 2 records"),
                          ([f"data.train={path}", "data.eval_fraction=0.9"],
                           f"{path}: data.eval_fraction=0.9 of its 4 items leaves nothing to train on")):
        code, out, err = _run(capsys, ["dpo", *FAST, *data, "data.on_invalid=skip", "train.max_steps=1",
                                       f"run.dir={tmp_path / 'r2'}"])
        assert code == 2 and message in err, err
        assert not (tmp_path / "r2").exists()


def test_missing_data_file_and_bad_model_spec(tmp_path, capsys):
    code, _, err = _run(capsys, ["dpo", *FAST, f"data.train={tmp_path / 'nope.jsonl'}"])
    assert code == 2 and "nope.jsonl" in err and "not found" in err
    code, _, err = _run(capsys, ["dpo", "model=./no/such/dir", f"data.train={tmp_path}"])
    assert code == 2 and "no/such/dir" in err


def test_every_command_has_help(capsys):
    for command in ("dpo", "sft", "eval", "sample", "score", "demo"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert "usage: preftune " + command in capsys.readouterr().out


def test_multi_response_records_expand_and_cap(tmp_path, capsys, caplog):
    """Several scored responses per prompt train as all ordered pairs; the cap keeps the largest gaps."""
    import logging

    caplog.set_level(logging.INFO)
    path = write_jsonl(tmp_path / "multi.jsonl", [
        {"prompt": "The film", "responses": [" is great.", " is fine.", " is awful."], "scores": [3, 2, 1]},
        {"prompt": "Its music", "ranked": [" soars.", " works.", " grates.", " hurts."]},
    ])
    for cap, expected in (("null", 3 + 6), ("2", 2 + 2)):
        caplog.clear()
        code, out, err = _run(capsys, ["dpo", *FAST, f"data.train={path}", f"data.max_pairs_per_prompt={cap}",
                                       "train.max_steps=1", f"run.dir={tmp_path / cap}", "run.plot=false"])
        assert code == 0, err
        assert f"{expected} train / 0 eval pairs" in caplog.text
    from preftune.data.records import read_preference_pairs

    pairs, _ = read_preference_pairs(path, max_pairs_per_prompt=2)
    # gaps: great>awful 2, great>fine 1, fine>awful 1 (tie: the first in rank order wins); ranked: soars>hurts 3,
    # soars>grates 2, works>hurts 2 (tie again). The kept pairs are listed in rank order.
    assert [(p.chosen, p.rejected) for p in pairs] == [
        (" is great.", " is fine."), (" is great.", " is awful."), (" soars.", " grates."), (" soars.", " hurts.")]


UNREAD = [
    (["frontier", "dpo.loss=ipo"], "config key 'dpo.loss': preftune frontier does not read it (its DPO arms use"),
    (["frontier", "dpo.beta=0.2"], "config key 'dpo.beta': preftune frontier does not read it"),
    (["frontier", "reference.mode=precomputed"], "config key 'reference.mode': preftune frontier does not read it"),
    (["frontier", "lora.enabled=true"], "config key 'lora.enabled': preftune frontier does not read it"),
    (["frontier", "ref_model=tiny"], "config key 'ref_model': preftune frontier does not read it"),
    (["frontier", "run.report_to=tensorboard"], "config key 'run.report_to': preftune frontier does not read it"),
    (["frontier", "train.save_final=false"], "config key 'train.save_final': preftune frontier does not read it"),
    (["frontier", "frontier.temperature=0.7"], "config key 'frontier.temperature': preftune frontier does not"),
    (["winrate", "dpo.label_smoothing=0.1"], "config key 'dpo.label_smoothing': preftune winrate does not read it"),
    (["winrate", "ref_model=tiny"], "config key 'ref_model': preftune winrate does not read it"),
    (["demo", "data.train=x.jsonl"], "config key 'data.train': preftune demo does not read it"),
    (["demo", "lora.r=4"], "config key 'lora.r': preftune demo does not read it (lora.enabled is false"),
    (["frontier", "data.train=x.jsonl"], "config key 'data.train': preftune frontier does not read it"),
    (["winrate", "judge.mode=text"], "config key 'judge.mode' applies to an endpoint judge, not to a reward-model"),
    (["demo", "demo.pairs_per_prompt=3"], "config key 'demo.pairs_per_prompt': 3 pairs a prompt need 6 samples, "
                                          "demo.samples_per_prompt is 4"),
    (["frontier", "frontier.samples_per_prompt=3"], "config key 'frontier.pairs_per_prompt': 2 pairs a prompt need"),
    (["sft", "train.layout=packed"], "config key 'train.layout': SFT trains on padded rows"),
    (["sft", "data.max_pairs_per_prompt=2"], "config key 'data.max_pairs_per_prompt': preftune sft does not read"),
    (["dpo", "lora.r=8"], "config key 'lora.r': preftune dpo does not read it (lora.enabled is false"),
    (["sft", "lora.target_modules=q_proj"], "config key 'lora.target_modules': preftune sft does not read it"),
    (["dpo", "dpo.loss=simpo", "reference.mode=none", "ref_model=other"],
     "config key 'ref_model': loss 'simpo' is reference-free and reads no reference"),
]


@pytest.mark.parametrize("argv, message", UNREAD, ids=[" ".join(argv) for argv, _ in UNREAD])
def test_a_key_the_command_does_not_read_is_refused_not_ignored(tmp_path, pairs_file, capsys, argv, message):
    """Keys a command's config accepts (shared sections) but the command would not honour: exit 2 naming the key,
    before anything loads or is written."""
    experiment = argv[0] in ("frontier", "winrate", "demo")
    where = ["--out", str(tmp_path / "out")] if experiment else [f"data.train={pairs_file}", "train.max_steps=1",
                                                                 f"run.dir={tmp_path / 'run'}"]
    code, out, err = _run(capsys, [*argv, *FAST, *where])
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_a_reward_model_judge_refuses_the_endpoint_judges_keys():
    from preftune.errors import ConfigError
    from preftune.eval.judges import JudgeSettings, check_judge_settings

    check_judge_settings(JudgeSettings(spec="rm:/some/dir"))
    for key, value in (("mode", "text"), ("template", "summarization"), ("top_logprobs", 5)):
        with pytest.raises(ConfigError, match=f"config key 'judge.{key}' applies to an endpoint judge, not to a "
                                              "reward-model judge"):
            check_judge_settings(JudgeSettings(spec="rm:/some/dir", **{key: value}))
    check_judge_settings(JudgeSettings(spec="http://127.0.0.1:1/v1", mode="text", template="summarization"))
