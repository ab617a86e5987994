"""The loss family (robust, ipo, hinge, simpo, orpo): values computed by hand in the comments (not by
re-running the implementation's formula), the deliberate choices each docstring documents, and invariants
every registered loss must satisfy."""

import math

import pytest
import torch

from preftune.losses import get_loss, loss_names, loss_params

LOG2 = math.log(2.0)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


# Two pairs shared by the reference-based losses (same as tests/unit/test_losses.py):
#   pair 1: h = (-10 - -12) - (-15 - -14) = 2 - (-1) = 3
#   pair 2: h = (-8 - -6) - (-7 - -9) = -2 - 2 = -4
TWO_PAIRS = (t(-10.0, -8.0), t(-15.0, -7.0), t(-12.0, -6.0), t(-14.0, -9.0))


# ---------------------------------------------------------------- registry and parameters

def test_family_is_registered_with_documented_reductions_and_reference_needs():
    expected = {  # name: (needs_reference, reduction with default params)
        "sigmoid": (True, "sum"), "robust": (True, "sum"), "hinge": (True, "sum"),
        "ipo": (True, "mean"), "simpo": (False, "mean"), "orpo": (False, "mean"),
    }
    assert set(expected) <= set(loss_names())
    for name, (needs_reference, reduction) in expected.items():
        loss = get_loss(name)
        assert (loss.needs_reference, loss.reduction) == (needs_reference, reduction), name


def test_loss_params_and_defaults():
    assert loss_params("sigmoid") == {"beta", "label_smoothing"}
    assert loss_params("robust") == {"beta", "label_smoothing"}
    assert loss_params("ipo") == {"beta", "average_log_probs"}
    assert loss_params("hinge") == {"beta"}
    assert loss_params("simpo") == {"beta", "gamma", "label_smoothing"}
    assert loss_params("orpo") == {"beta"}
    simpo = get_loss("simpo")
    assert (simpo.beta, simpo.gamma, simpo.label_smoothing) == (2.0, 0.5, 0.0)
    assert get_loss("orpo").beta == 0.1  # the paper's λ
    assert get_loss("ipo").average_log_probs is True
    assert get_loss("robust").label_smoothing == 0.0
    with pytest.raises(ValueError, match="unknown loss"):
        loss_params("nope")


def test_options_a_loss_would_ignore_are_refused():
    with pytest.raises(ValueError, match="does not take"):
        get_loss("hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="does not take"):
        get_loss("ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="does not take"):
        get_loss("orpo", gamma=0.5)
    with pytest.raises(ValueError, match="does not take"):
        get_loss("sigmoid", average_log_probs=True)


@pytest.mark.parametrize("name,params", [
    ("robust", {"label_smoothing": 0.5}), ("robust", {"beta": 0.0}), ("ipo", {"beta": -1.0}),
    ("hinge", {"beta": 0.0}), ("simpo", {"gamma": -0.1}), ("simpo", {"label_smoothing": 0.5}),
    ("orpo", {"beta": 0.0}),
])
def test_invalid_parameter_values_fail(name, params):
    with pytest.raises(ValueError):
        get_loss(name, **params)


# ---------------------------------------------------------------- robust (rDPO)

def test_robust_hand_computed():
    # beta 0.5, eps 0.2, denominator 1 - 2 * 0.2 = 0.6
    # pair 1: logit 0.5 * 3 = 1.5
    #   -log sigmoid(1.5) = log(1 + e^-1.5) = 0.20141327798275246
    #   -log sigmoid(-1.5) = log(1 + e^1.5) = 1.7014132779827524
    #   (0.8 * 0.20141327798275246 - 0.2 * 1.7014132779827524) / 0.6
    #   = (0.16113062238620193 - 0.3402826555965505) / 0.6 = -0.17915203321034857 / 0.6 = -0.2985867220172477
    #   (negative: rDPO is not bounded below for eps > 0)
    # pair 2: logit 0.5 * -4 = -2
    #   -log sigmoid(-2) = log(1 + e^2) = 2.1269280110429727; -log sigmoid(2) = log(1 + e^-2) = 0.12692801104297263
    #   (0.8 * 2.1269280110429727 - 0.2 * 0.12692801104297263) / 0.6
    #   = (1.7015424088343782 - 0.0253856022085945) / 0.6 = 1.6761568066257837 / 0.6 = 2.7935946777096397
    out = get_loss("robust", beta=0.5, label_smoothing=0.2)(*TWO_PAIRS)
    assert out.losses.tolist() == pytest.approx([-0.2985867220172477, 2.7935946777096397], rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([1.0, -1.0])  # 0.5 * (-10 + 12), 0.5 * (-8 + 6)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, 1.0])  # 0.5 * (-15 + 14), 0.5 * (-7 + 9)


def test_robust_with_zero_eps_is_dpo_and_differs_from_cdpo_otherwise():
    robust0 = get_loss("robust", beta=0.5, label_smoothing=0.0)(*TWO_PAIRS)
    dpo = get_loss("sigmoid", beta=0.5)(*TWO_PAIRS)
    assert torch.allclose(robust0.losses, dpo.losses, rtol=1e-6, atol=0)
    robust = get_loss("robust", beta=0.5, label_smoothing=0.2)(*TWO_PAIRS)
    cdpo = get_loss("sigmoid", beta=0.5, label_smoothing=0.2)(*TWO_PAIRS)
    # cDPO pair 1 (test_losses.py): 0.8 * 0.20141327798275246 + 0.2 * 1.7014132779827524 = 0.5014132779827524
    assert cdpo.losses[0].item() == pytest.approx(0.5014132779827524, rel=1e-6)
    assert robust.losses[0].item() == pytest.approx(-0.2985867220172477, rel=1e-6)
    assert (robust.losses - cdpo.losses).abs().min().item() > 0.1  # h != 0: the two estimators differ


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.49])
def test_robust_at_zero_margin_is_log2_for_any_eps(eps):
    # h = 0: ((1 - eps) log 2 - eps log 2) / (1 - 2 eps) = (1 - 2 eps) log 2 / (1 - 2 eps) = log 2
    logps = t(-12.5, -3.0)
    out = get_loss("robust", beta=0.1, label_smoothing=eps)(logps, logps - 1.0, logps, logps - 1.0)
    assert out.losses.tolist() == pytest.approx([LOG2, LOG2], rel=1e-6)


# ---------------------------------------------------------------- ipo

def test_ipo_hand_computed():
    # beta 0.25 -> target 1 / (2 * 0.25) = 2
    # pair 1: h = 3 -> (3 - 2)^2 = 1;  pair 2: h = -4 -> (-4 - 2)^2 = 36
    out = get_loss("ipo", beta=0.25)(*TWO_PAIRS)
    assert out.losses.tolist() == pytest.approx([1.0, 36.0], rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, -0.5])  # 0.25 * 2, 0.25 * -2
    assert out.rejected_rewards.tolist() == pytest.approx([-0.25, 0.5])  # 0.25 * -1, 0.25 * 2
    # beta 0.1 -> target 5: (3 - 5)^2 = 4, (-4 - 5)^2 = 81
    assert get_loss("ipo", beta=0.1)(*TWO_PAIRS).losses.tolist() == pytest.approx([4.0, 81.0], rel=1e-6)


def test_ipo_is_zero_at_the_target_margin():
    # beta 0.2 -> target 1 / 0.4 = 2.5; h = (-1 - -2) - (-3 - -1.5) = 1 - (-1.5) = 2.5
    out = get_loss("ipo", beta=0.2)(t(-1.0), t(-3.0), t(-2.0), t(-1.5))
    assert out.losses.item() == pytest.approx(0.0, abs=1e-6)


def test_ipo_average_log_probs_decides_the_reduction():
    averaged, summed = get_loss("ipo", average_log_probs=True), get_loss("ipo", average_log_probs=False)
    assert averaged.reduction == "mean"  # the IPO authors' and TRL's implementation
    assert summed.reduction == "sum"  # the paper's formula as written
    assert get_loss("ipo").reduction == "mean"  # default, and instances do not leak into each other
    with pytest.raises(TypeError):
        get_loss("ipo", average_log_probs="no")  # a truthy string would silently mean True


# ---------------------------------------------------------------- hinge

def test_hinge_hand_computed():
    # beta 0.5: pair 1: h = 3 -> max(0, 1 - 1.5) = 0;  pair 2: h = -4 -> max(0, 1 + 2) = 3
    # pair 3: h = (-5 - -5) - (-6 - -5) = 0 - (-1) = 1 -> max(0, 1 - 0.5) = 0.5
    pc, pr, rc, rr = (torch.cat([x, t(v)]) for x, v in zip(TWO_PAIRS, (-5.0, -6.0, -5.0, -5.0)))
    out = get_loss("hinge", beta=0.5)(pc, pr, rc, rr)
    assert out.losses.tolist() == pytest.approx([0.0, 3.0, 0.5], abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([1.0, -1.0, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, 1.0, -0.5])


def test_hinge_zero_at_and_beyond_the_margin_linear_below():
    loss = get_loss("hinge", beta=0.5)
    zeros = t(0.0, 0.0, 0.0, 0.0)
    # h = policy_chosen here (everything else 0); beta * h = 0.5 * h
    at_and_beyond = loss(t(2.0, 2.5, 10.0, 100.0), zeros, zeros, zeros).losses  # beta * h = 1, 1.25, 5, 50
    assert at_and_beyond.tolist() == [0.0, 0.0, 0.0, 0.0]
    below = loss(t(1.0, 0.0, -1.0, -3.0), zeros, zeros, zeros).losses  # 1 - 0.5 h = 0.5, 1, 1.5, 2.5
    assert below.tolist() == pytest.approx([0.5, 1.0, 1.5, 2.5], rel=1e-6)


# ---------------------------------------------------------------- simpo

def test_simpo_hand_computed():
    # beta 2, gamma 0.5; inputs are length-averaged log-probs
    # pair 1: 2 * (-0.8 - -1.3) - 0.5 = 2 * 0.5 - 0.5 = 0.5 -> log(1 + e^-0.5) = 0.4740769841801067
    # pair 2: 2 * (-1.5 - -1.0) - 0.5 = -1 - 0.5 = -1.5 -> log(1 + e^1.5) = 1.7014132779827524
    out = get_loss("simpo", beta=2.0, gamma=0.5)(t(-0.8, -1.5), t(-1.3, -1.0), None, None)
    assert out.losses.tolist() == pytest.approx([0.4740769841801067, 1.7014132779827524], rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([-1.6, -3.0])  # 2 * -0.8, 2 * -1.5
    assert out.rejected_rewards.tolist() == pytest.approx([-2.6, -2.0])  # 2 * -1.3, 2 * -1.0


def test_simpo_label_smoothing_and_gamma_are_used():
    # pair 1 with eps 0.1: 0.9 * log(1 + e^-0.5) + 0.1 * log(1 + e^0.5)
    #   = 0.9 * 0.4740769841801067 + 0.1 * 0.9740769841801067
    #   = 0.426669285762096 + 0.09740769841801067 = 0.5240769841801067
    smoothed = get_loss("simpo", label_smoothing=0.1)(t(-0.8), t(-1.3))
    assert smoothed.losses.item() == pytest.approx(0.5240769841801067, rel=1e-6)
    # gamma 0: logit 2 * 0.5 = 1 -> log(1 + e^-1) = 0.31326168751822286
    assert get_loss("simpo", gamma=0.0)(t(-0.8), t(-1.3)).losses.item() == pytest.approx(0.31326168751822286, rel=1e-6)


# ---------------------------------------------------------------- orpo

def test_orpo_hand_computed():
    # beta (lambda) 0.1; inputs are length-averaged log-probs a = log p
    # pair 1: p_w = 0.5 -> odds 0.5 / 0.5 = 1; p_l = 0.25 -> odds 0.25 / 0.75 = 1/3; odds ratio 3
    #   L_OR = -log sigmoid(log 3) = log(1 + 1/3) = log(4/3) = 0.28768207245178085
    #   loss = -log 0.5 + 0.1 * 0.28768207245178085 = 0.6931471805599453 + 0.028768207245178085 = 0.7219153878051233
    # pair 2: p_w = 0.2 -> odds 0.2 / 0.8 = 1/4; p_l = 0.8 -> odds 0.8 / 0.2 = 4; odds ratio 1/16
    #   L_OR = -log sigmoid(-log 16) = log(1 + 16) = log 17 = 2.833213344056216
    #   loss = -log 0.2 + 0.1 * 2.833213344056216 = 1.6094379124341003 + 0.2833213344056216 = 1.8927592468397219
    pc, pr = t(math.log(0.5), math.log(0.2)), t(math.log(0.25), math.log(0.8))
    out = get_loss("orpo", beta=0.1)(pc, pr, None, None)
    assert out.losses.tolist() == pytest.approx([0.7219153878051233, 1.8927592468397219], rel=1e-6)
    # rewards beta * avg log p: 0.1 * log 0.5, 0.1 * log 0.2 | 0.1 * log 0.25, 0.1 * log 0.8
    assert out.chosen_rewards.tolist() == pytest.approx([-0.06931471805599453, -0.16094379124341004], rel=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.13862943611198905, -0.022314355131420972], rel=1e-6)


def test_orpo_log_odds_accurate_near_zero():
    # a_w = -x, a_l = -2x, x = 3e-5. Since 1 - e^-2x = (1 - e^-x)(1 + e^-x), the odds ratio is
    #   [e^-x / (1 - e^-x)] / [e^-2x / (1 - e^-2x)] = e^x (1 + e^-x) = e^x + 1 = 2.0000300004500042
    #   L_OR = log(1 + 1 / (e^x + 1)) = log((2 + e^x) / (1 + e^x)) = log(3.0000300004500042 / 2.0000300004500042)
    #        = log(1.4999925000000007) = 0.40546010809566485
    #   beta 1: loss = x + L_OR = 0.00003 + 0.40546010809566485 = 0.4054901080956648
    # (log1p(-exp(a)) in fp32 is off by ~1e-3 relative here; log(-expm1(a)) is not.)
    out = get_loss("orpo", beta=1.0)(t(-3e-5), t(-6e-5))
    assert out.losses.item() == pytest.approx(0.4054901080956648, rel=1e-5)


@pytest.mark.parametrize("avg_logp", [0.0, -1e-9, -1e-3, -5.0, -50.0])
def test_orpo_finite_values_and_gradients(avg_logp):
    for pc_value, pr_value in ((avg_logp, -1.0), (-1.0, avg_logp), (avg_logp, avg_logp)):
        pc, pr = t(pc_value).requires_grad_(), t(pr_value).requires_grad_()
        out = get_loss("orpo")(pc, pr, None, None)
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all() and torch.isfinite(out.chosen_rewards).all()
        assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
        assert pc.grad.item() <= -1.0  # the NLL term alone contributes -1; the odds-ratio term only adds


# ---------------------------------------------------------------- reference-free losses

@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_losses_ignore_the_reference(name):
    loss = get_loss(name)
    assert loss.needs_reference is False and loss.reduction == "mean"
    pc, pr = t(-0.8, -1.5), t(-1.3, -1.0)
    without = loss(pc, pr, None, None)
    with_ref = loss(pc, pr, t(-3.0, -0.1), t(-0.2, -7.0))
    for a, b in ((without.losses, with_ref.losses), (without.chosen_rewards, with_ref.chosen_rewards),
                 (without.rejected_rewards, with_ref.rejected_rewards)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- every registered loss

@pytest.mark.parametrize("name", loss_names())
def test_every_loss_shapes_detached_rewards_and_gradient_direction(name):
    loss = get_loss(name)
    assert loss.reduction in ("sum", "mean")
    # a generic point (plausible as summed or averaged log-probs, all < 0): h = -0.2 - 0.2 = -0.4 for the
    # first pair, well below every margin target (IPO's 1/(2 beta) = 5, hinge's 1/beta = 10)
    pc = t(-1.2, -0.7, -2.0).requires_grad_()
    pr = t(-0.9, -1.4, -1.6).requires_grad_()
    rc, rr = t(-1.0, -0.8, -1.7), t(-1.1, -1.2, -1.9)
    out = loss(pc, pr, rc, rr)
    for x in (out.losses, out.chosen_rewards, out.rejected_rewards):
        assert x.shape == (3,)
        assert torch.isfinite(x).all()
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    assert (pc.grad < 0).all(), "raising log pi(chosen) must lower the loss"
    assert (pr.grad > 0).all(), "raising log pi(rejected) must raise the loss"


@pytest.mark.parametrize("name", [n for n in loss_names() if get_loss(n).needs_reference])
def test_reference_based_rewards_are_zero_at_policy_equals_reference(name):
    logps_chosen, logps_rejected = t(-12.5, -3.0, -0.4), t(-13.0, -2.0, -0.9)
    out = get_loss(name)(logps_chosen, logps_rejected, logps_chosen.clone(), logps_rejected.clone())
    assert torch.equal(out.chosen_rewards, torch.zeros(3))
    assert torch.equal(out.rejected_rewards, torch.zeros(3))
