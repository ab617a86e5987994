"""Win rates, judge cards and verdict parsing against hand-computed values (preftune.eval.judging / judges)."""

from __future__ import annotations

import math

import pytest

from preftune.eval.judges import ab_probability, load_template, parse_verdict, render
from preftune.eval.judging import (cohens_kappa, first_slot_rate, judge_card, length_controlled_win_rate, logistic_fit,
                                   summarise, swap_average, swap_consistency, verdict, wilson_interval,
                                   win_rate)


def test_swap_average_in_both_modes():
    assert swap_average(0.8, 0.6) == pytest.approx(0.7)  # logprobs: the mean of the two orders
    assert swap_average(1.0, 1.0, "text") == 1.0 and swap_average(0.0, 0.0, "text") == 0.0
    assert swap_average(1.0, 0.0, "text") == 0.5  # text: disagreeing orders are a tie, not a coin flip
    assert swap_average(None, 0.6) is None and swap_average(0.6, None, "text") is None  # a failed order fails it


def test_win_rate_with_ties_and_fails_by_hand():
    r = win_rate([0.9, 0.2, 0.5, None, 0.7])
    # judged 4 (one failed): wins 0.9 and 0.7, a tie counts half: (2 + 0.5) / 4
    assert (r.n, r.wins, r.ties, r.fails) == (5, 2, 1, 1) and r.win_rate == pytest.approx(0.625)
    # Wilson, z = 1.96: centre (0.625 + 3.8415/8) / (1 + 3.8415/4) = 0.56376,
    # half-width 1.96 sqrt(0.625*0.375/4 + 3.8415/64) / 1.96037 = 0.34434
    assert (r.ci_low, r.ci_high) == pytest.approx((0.21942, 0.90810), abs=2e-4)
    assert math.isnan(win_rate([None, None]).win_rate) and win_rate([None, None]).fails == 2


def test_verdict_and_summary_by_hand():
    assert [verdict(p, "a", "b") for p in (0.9, 0.1, 0.5, None)] == ["a", "b", "tie", "fail"]
    s = summarise([0.9, 0.2, 0.5, None], [10, 20, 30, 40], [5, 5, 5, 5])
    # judged 3: one win, one tie: 1.5 / 3; lengths are means over every comparison, failures included
    assert s["win_rate"] == pytest.approx(0.5) and (s["ties"], s["fails"]) == (1, 1)
    assert (s["mean_length"], s["mean_length_opponent"]) == (25.0, 5.0) and "length_controlled_win_rate" in s
    assert s["empty"] == 0 and summarise([0.9, 0.9], [0, 3], [5, 5])["empty"] == 1


def test_empty_reply_preference_by_hand():
    from preftune.eval.judging import empty_reply_preference

    # P(chosen better than empty): 0.2 and 0.4 prefer the empty reply, 0.5 is a tie, 0.9 does not, None failed
    out = empty_reply_preference([0.2, 0.4, 0.5, 0.9, None])
    assert out["prefers_empty_reply"] == pytest.approx(2.5 / 4)
    low, high = out["prefers_empty_reply_ci95"]
    assert low < 2.5 / 4 < high
    from preftune.eval.judging import with_empty_probe

    good = {"informative": True}
    assert with_empty_probe(good, {"prefers_empty_reply": 0.5})["informative"] is True  # not more often than not
    gamed = with_empty_probe(good, out)
    assert gamed["informative"] is False and gamed["prefers_empty_reply"] == out["prefers_empty_reply"]
    assert gamed["uninformative_because"] == "prefers an empty reply to the human-chosen one on 62% of the pairs"
    both = with_empty_probe({"informative": False}, out)["uninformative_because"]
    assert both.startswith("does not beat always-longer; prefers an empty reply")


def test_wilson_interval_edges():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.27753, abs=1e-4)  # z^2 / (n + z^2) = 3.8415 / 13.8415
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_cohens_kappa_by_hand():
    # observed agreement 3/4; judge says "first" half the time, humans a quarter: chance 0.5*0.25 + 0.5*0.75 = 0.5
    assert cohens_kappa([True, True, False, False], [True, False, False, False]) == pytest.approx(0.5)
    assert cohens_kappa([True, False], [True, False]) == pytest.approx(1.0)
    assert cohens_kappa([True, False], [False, True]) == pytest.approx(-1.0)


def test_swap_consistency_and_first_slot_rate_by_hand():
    p_first, p_second = [0.9, 0.8, 0.3, None], [0.7, 0.4, 0.2, 0.6]
    # both orders judged for the first three: (0.9, 0.7) agree, (0.8, 0.4) disagree, (0.3, 0.2) agree
    assert swap_consistency(p_first, p_second) == pytest.approx(2 / 3)
    # slot A preferred: first order when P > 0.5 (0.9, 0.8), second order when P < 0.5 (0.4, 0.2): 4 of 7
    assert first_slot_rate(p_first, p_second) == pytest.approx(4 / 7)
    # a judge that always answers "A": every P(x) is 1 in the first order and 0 in the second
    assert first_slot_rate([1.0, 1.0], [0.0, 0.0]) == 1.0 and swap_consistency([1.0, 1.0], [0.0, 0.0]) == 0.0


def test_length_controlled_win_rate_by_hand():
    # longer by one sd: 3 wins of 4; shorter by one sd: 2 wins of 4. The logistic model fits each group exactly,
    # so the intercept is (logit 3/4 + logit 2/4) / 2 = ln(3) / 2 and the controlled rate sqrt(3) / (1 + sqrt(3))
    probs = [1.0, 1.0, 1.0, 0.0] + [1.0, 1.0, 0.0, 0.0]
    lengths_x, lengths_y = [20] * 4 + [10] * 4, [10] * 4 + [20] * 4
    assert win_rate(probs).win_rate == pytest.approx(0.625)
    assert length_controlled_win_rate(probs, lengths_x, lengths_y) == pytest.approx(3 ** 0.5 / (1 + 3 ** 0.5),
                                                                                    abs=1e-5)
    # no length difference at all: the controlled rate is the raw one
    assert length_controlled_win_rate([1.0, 1.0, 1.0, 0.0], [5] * 4, [5] * 4) == pytest.approx(0.75, abs=1e-6)
    a, b = logistic_fit([1.0, 1.0, -1.0, -1.0], [1.0, 0.5, 0.5, 0.0])  # ties are half a win
    assert a == pytest.approx(0.0, abs=1e-9) and b == pytest.approx(math.log(3), abs=1e-5)


def test_judge_card_by_hand():
    # 4 labelled pairs (x = chosen, each judged in both orders); combined P 0.75, 0.75, 0.8, 0.4: 3 right
    p_first, p_second = [0.9, 0.8, 0.7, 0.6], [0.6, 0.7, 0.9, 0.2]
    card = judge_card(p_first, p_second, [30, 10, 10, 10], [10, 30, 30, 30])
    assert card["accuracy"] == pytest.approx(3 / 4) and card["ties"] == 0 and card["fails"] == 0
    assert card["swap_consistency"] == pytest.approx(3 / 4)  # the 4th pair's orders disagree (0.6 vs 0.2)
    assert card["first_slot_rate"] == pytest.approx(5 / 8)  # first order: 4 of 4 pick slot A; second: 1 of 4
    assert card["baseline_always_longer"] == pytest.approx(1 / 4)  # the chosen response is longer only once
    # prefers the longer response on pair 1 (chosen, longer) and pair 4 (rejected, longer): 2 of 4
    assert card["prefers_longer"] == pytest.approx(1 / 2)
    assert card["informative"] is True and card["baseline_random"] == 0.5
    lengthy = judge_card([1.0, 0.0], [1.0, 0.0], [30, 10], [10, 30], mode="text")  # always the longer one
    assert lengthy["accuracy"] == 0.5 and lengthy["prefers_longer"] == 1.0 and lengthy["informative"] is False


def test_parse_verdict():
    assert parse_verdict("Comparison: A is clearer.\nMore helpful: A") == "A"
    assert parse_verdict('Comparison: B explains more.\nPreferred: "B"') == "B"
    assert parse_verdict("**More helpful:** B") == "B"
    assert parse_verdict("Both are fine.\nB") == "B"
    assert parse_verdict("A: boiling is simple.\nB: eggs are safe.") is None  # no verdict: a counted failure
    assert parse_verdict("More helpful: A or B") is None and parse_verdict("") is None


def test_ab_probability_from_top_logprobs():
    assert ab_probability([("You", -1.54), ("A", -1.57), ("B", -3.89)]) == pytest.approx(
        1 / (1 + math.exp(-(3.89 - 1.57))))
    # several spellings of a letter add up: P(A) = (0.3 + 0.1) / (0.3 + 0.1 + 0.2)
    assert ab_probability([(" A", math.log(0.3)), ("A", math.log(0.1)), ('"B', math.log(0.2))]) == pytest.approx(2 / 3)
    assert ab_probability([("A", -2.0)]) == 1.0 and ab_probability([("The", -0.1)]) is None


def test_templates_render_and_logprobs_mode_uses_the_verdict_variant():
    text = load_template("dialogue", "text")
    assert "More helpful:" in text and "FIRST provide a one-sentence comparison" in text
    verdict = load_template("dialogue", "logprobs")
    assert "More helpful:" not in verdict and 'State only "A" or "B"' in verdict
    assert "Preferred:" in load_template("summarization", "text")
    rendered = render(text, "  What is {x}? ", "use {braces}", "no")
    assert "Query: What is {x}?" in rendered and "Response A:\nuse {braces}" in rendered
