"""`preftune judge` end to end: the reward-model judge on `tiny`, and the HTTP judge against a real
OpenAI-compatible server started here on 127.0.0.1 (llama-cpp-python's, serving the embedded SmolLM2 GGUF), in both
modes, with a canary API key that must appear in no file the run writes, and an interruption (the server stopped
mid-run, restarted, the run resumed) that repeats no call."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from preftune.cli import main

from conftest import write_jsonl

CANARY = "sk-canary-3f9d0c7e-never-written"
PAIRS = [  # short single-turn HH-style dialogues: the human-preferred response first
    ("\n\nHuman: How do I boil an egg?\n\nAssistant:", " Put it in boiling water for eight minutes, then cool it.",
     " I don't know."),
    ("\n\nHuman: What is the capital of France?\n\nAssistant:", " Paris.", " It is a country in Europe."),
    ("\n\nHuman: Can you help me write a thank-you note?\n\nAssistant:",
     " Of course: 'Thank you so much for the lovely gift, it made my day.'", " No."),
    ("\n\nHuman: How many legs does a spider have?\n\nAssistant:", " Eight.", " Spiders are insects with six legs."),
]


def _pairs_file(path: Path, n: int | None = None) -> Path:
    rows = [{"chosen": p.replace("?", "?" * (1 + k)) + c, "rejected": p.replace("?", "?" * (1 + k)) + r}
            for k in range(4) for p, c, r in PAIRS]  # distinct prompts: every comparison is its own judgment
    return write_jsonl(path, rows[:n] if n else rows[:len(PAIRS)])


# ---------------------------------------------------------------- the reward-model judge


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory) -> Path:
    from preftune.models.load import load_tokenizer
    from preftune.models.reward_model import build_reward_model

    path = tmp_path_factory.mktemp("rm") / "reward_model"
    model = build_reward_model("tiny", seed=0)
    model.info.update(base_model="tiny", append_eos=True, max_length=128, max_prompt_tokens=64)
    model.save(path, load_tokenizer("tiny"))
    return path


def test_reward_model_judge_scores_each_reply_once(tiny_reward_model):
    """P = sigmoid(r(a) - r(b)) from scores that are computed once per distinct (prompt, reply): the swapped order
    and a shared opponent reuse them."""
    import math

    from preftune.eval.judges import JudgeSettings, RewardModelJudge, judge_swapped, JudgmentCache
    from preftune.models.reward_model import RewardModel

    judge = RewardModelJudge(JudgeSettings(spec=f"rm:{tiny_reward_model}"))
    items = [("Q1", "yes", "the chosen one"), ("Q2", "no", "the chosen two"), ("Q1", "maybe", "the chosen one")]
    orders, combined = judge_swapped(judge, JudgmentCache(tiny_reward_model.parent / "j.jsonl"), items)
    assert judge.scored == 5  # 3 replies + 2 distinct opponents, not 2 x 2 x 3
    rm = RewardModel.load(tiny_reward_model)
    r = dict(zip(["yes", "no", "maybe", "c1", "c2"], rm.score_replies(
        ["Q1", "Q2", "Q1", "Q1", "Q2"], ["yes", "no", "maybe", "the chosen one", "the chosen two"], normalized=False)))
    expected = [1 / (1 + math.exp(r[c] - r[x])) for x, c in (("yes", "c1"), ("no", "c2"), ("maybe", "c1"))]
    assert [a for a, _ in orders] == pytest.approx(expected, abs=1e-6)
    assert [b for _, b in orders] == pytest.approx(expected, abs=1e-6)  # the other order: 1 - P(opponent first)
    assert combined == pytest.approx(expected, abs=1e-6)


def test_reward_model_judge_card_and_reuse(tmp_path, tiny_reward_model, capsys, caplog):
    from preftune.data.records import read_preference_pairs
    from preftune.data.tokenize import tokenize_pair
    from preftune.models.reward_model import RewardModel

    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    assert main(["judge", str(pairs), "--judge", f"rm:{tiny_reward_model}", "--out", str(out)]) == 0
    card = json.loads((out / "judge_card.json").read_text())
    assert card["pairs"] == len(PAIRS) and card["fails"] == 0
    rows = [json.loads(line) for line in (out / "comparisons.jsonl").read_text().splitlines()]
    # P(chosen better) = sigmoid(r(chosen) - r(rejected)) on the reward model's own tokenisation, the same in both
    # orders (a reward model has no slots)
    rm = RewardModel.load(tiny_reward_model)
    records, _ = read_preference_pairs(pairs)
    for row, record in zip(rows, records):
        t = tokenize_pair(rm.tokenizer, record, max_length=128, max_prompt_tokens=64, append_eos=True)
        r = rm.score_ids([t.prompt_ids] * 2, [t.chosen_ids, t.rejected_ids], normalized=False).tolist()
        assert row["p_a_first"] == pytest.approx(1 / (1 + math.exp(r[1] - r[0])), abs=1e-6)
        assert row["p_a_second"] == pytest.approx(row["p_a_first"], abs=1e-6)
    assert card["swap_consistency"] == 1.0
    assert sum(r["verdict"] == "a" for r in rows) / len(rows) == pytest.approx(card["accuracy"])
    capsys.readouterr()
    caplog.set_level(logging.INFO, logger="preftune.eval.judges")
    assert main(["judge", str(pairs), "--judge", f"rm:{tiny_reward_model}", "--out", str(out)]) == 0
    assert f"{2 * len(PAIRS)} judgments cached, 0 to ask" in caplog.text


def test_comparisons_file_gives_a_win_rate_and_bad_records_exit_2(tmp_path, tiny_reward_model, capsys):
    rows = [{"prompt": p, "a": c, "b": r} for p, c, r in PAIRS]
    path = write_jsonl(tmp_path / "cmp.jsonl", rows)
    assert main(["judge", str(path), "--judge", f"rm:{tiny_reward_model}", "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "winrate.json").read_text())
    assert result["n"] == len(PAIRS) and 0.0 <= result["win_rate"] <= 1.0 and result["fails"] == 0
    assert result["ci_low"] <= result["win_rate"] <= result["ci_high"]
    assert "length_controlled_win_rate" in result and result["mean_length_a"] > result["mean_length_b"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows[:1] + [{"prompt": "x", "a": "", "b": "y"}])
    capsys.readouterr()
    assert main(["judge", str(bad), "--judge", f"rm:{tiny_reward_model}", "--out", str(tmp_path / "b")]) == 2
    assert f"{bad}:2: field 'a': empty" in capsys.readouterr().err
    assert main(["judge", str(path), "--out", str(tmp_path / "c")]) == 2  # no judge named
    assert "judge.spec" in capsys.readouterr().err


# ---------------------------------------------------------------- the HTTP judge against a real local server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1 serving the embedded SmolLM2 GGUF."""

    def __init__(self, port: int | None = None):
        from preftune.models.load import embedded_gguf

        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf()),
                                      "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048",
                                      "--model_alias", "smollm2", "--n_threads", "2"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/models", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the llama.cpp server did not start (exit {self.proc.poll()})")
                time.sleep(0.5)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


def _need_llama_cpp():
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise  # CI installs it (make setup): the HTTP judge is tested there, never skipped
        pytest.skip("llama-cpp-python[server] is not installed (make setup installs it)")


@pytest.fixture(scope="module")
def server():
    _need_llama_cpp()
    srv = LocalServer()
    yield srv
    srv.stop()


def _files_text(root: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in root.rglob("*") if p.is_file())


def test_http_judge_logprobs_mode_and_the_canary_key(tmp_path, server, capsys, caplog, monkeypatch):
    monkeypatch.setenv("PREFTUNE_TEST_JUDGE_KEY", CANARY)
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    args = ["judge", str(_pairs_file(tmp_path / "pairs.jsonl", 3)), "--judge", server.url, "--out", str(out),
            "judge.model=smollm2", "judge.api_key_env=PREFTUNE_TEST_JUDGE_KEY", "judge.concurrency=2"]
    assert main(["-v", *args]) == 0
    captured = capsys.readouterr()
    card = json.loads((out / "judge_card.json").read_text())
    assert card["pairs"] == 3 and card["mode"] == "logprobs" and card["fails"] == 0
    rows = [json.loads(line) for line in (out / "comparisons.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["p_a_first"] <= 1.0 and 0.0 <= r["p_a_second"] <= 1.0 for r in rows)
    assert all(r["p"] == pytest.approx((r["p_a_first"] + r["p_a_second"]) / 2) for r in rows)
    for key in ("kappa", "swap_consistency", "first_slot_rate", "prefers_longer", "baseline_always_longer",
                "baseline_random_draw", "informative"):
        assert key in card, key
    # the key reached no file, no log line and no output
    assert CANARY not in _files_text(out) and CANARY not in caplog.text
    assert CANARY not in captured.out + captured.err
    assert "PREFTUNE_TEST_JUDGE_KEY" in (out / "config.yaml").read_text()  # its name is recorded, not its value


def test_http_judge_text_mode_counts_unparsable_verdicts(tmp_path, server, capsys):
    out = tmp_path / "out"
    assert main(["judge", str(_pairs_file(tmp_path / "pairs.jsonl", 2)), "--judge", server.url, "--out", str(out),
                 "judge.model=smollm2", "judge.mode=text", "judge.max_tokens=48"]) == 0
    card = json.loads((out / "judge_card.json").read_text())
    rows = [json.loads(line) for line in (out / "comparisons.jsonl").read_text().splitlines()]
    assert card["mode"] == "text" and card["pairs"] == 2
    # every order's answer is a verdict (0 or 1) or a failure; failures are counted, never a coin flip
    assert all(p in (0.0, 1.0, None) for r in rows for p in (r["p_a_first"], r["p_a_second"]))
    assert card["fails"] == sum(r["verdict"] == "fail" for r in rows)
    assert all((r["p"] is None) == (r["verdict"] == "fail") for r in rows)


def test_http_judge_interrupted_then_resumed_repeats_no_call(tmp_path, caplog):
    _need_llama_cpp()
    pairs = _pairs_file(tmp_path / "pairs.jsonl", 8)  # 16 judgments
    out, cache = tmp_path / "out", tmp_path / "out" / "judgments.jsonl"
    srv = LocalServer()
    args = ["judge", str(pairs), "--judge", srv.url, "--out", str(out), "judge.model=smollm2", "judge.concurrency=1",
            "judge.max_retries=0", "judge.timeout_s=20"]
    run = subprocess.Popen([sys.executable, "-m", "preftune.cli", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (cache.is_file() and len(cache.read_text().splitlines()) >= 3):
            assert run.poll() is None and time.monotonic() < deadline, "the judge run ended before the server stopped"
            time.sleep(0.1)
    finally:
        srv.stop()  # the server goes away mid-run
    _, err = run.communicate(timeout=120)
    assert run.returncode == 2 and f"judge {srv.url}" in err and "Traceback" not in err
    before = cache.read_text().splitlines()
    done = len(before)
    assert 3 <= done < 16 and not (out / "judge_card.json").exists()
    srv = LocalServer(srv.port)  # restarted; the same run resumed
    try:
        caplog.set_level(logging.INFO, logger="preftune.eval.judges")
        assert main(args) == 0
    finally:
        srv.stop()
    assert f"{done} judgments cached, {16 - done} to ask" in caplog.text
    after = cache.read_text().splitlines()
    # 16 comparisons, then the card's 16 of each chosen reply against an empty one
    assert after[:done] == before and len(after) == 32
    assert len({json.loads(line)["key"] for line in after}) == 32  # no judgment asked twice
    assert json.loads((out / "judge_card.json").read_text())["pairs"] == 8
