"""Loss values against numbers computed by hand (not by re-running the implementation's formula)."""

import math

import pytest
import torch

from preftune.losses import get_loss, loss_names


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_sigmoid_at_policy_equals_reference_is_log2():
    loss = get_loss("sigmoid", beta=0.1)
    logps = t(-12.5, -3.0, -40.0)
    out = loss(logps, logps - 1.0, logps, logps - 1.0)
    assert torch.allclose(out.losses, torch.full((3,), math.log(2.0)))
    assert torch.equal(out.chosen_rewards, torch.zeros(3))


def test_sigmoid_hand_computed():
    # pair 1: h = (-10 - -12) - (-15 - -14) = 2 - (-1) = 3; beta 0.5 -> logit 1.5
    #   -log sigmoid(1.5) = log(1 + e^-1.5) = log(1.2231301601484298) = 0.20141327798275246
    # pair 2: h = (-8 - -6) - (-7 - -9) = -2 - 2 = -4 -> logit -2
    #   -log sigmoid(-2) = log(1 + e^2) = log(8.38905609893065) = 2.1269280110429727
    loss = get_loss("sigmoid", beta=0.5)
    out = loss(t(-10.0, -8.0), t(-15.0, -7.0), t(-12.0, -6.0), t(-14.0, -9.0))
    assert out.losses.tolist() == pytest.approx([0.20141327798275246, 2.1269280110429727], rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([1.0, -1.0])  # 0.5 * (-10 + 12), 0.5 * (-8 + 6)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, 1.0])  # 0.5 * (-15 + 14), 0.5 * (-7 + 9)


def test_label_smoothing_hand_computed_and_zero_equals_plain():
    # logit 1.5, eps 0.2: 0.8 * log(1 + e^-1.5) + 0.2 * log(1 + e^1.5)
    #   = 0.8 * 0.20141327798275246 + 0.2 * 1.7014132779827524 = 0.5014132779827524
    args = (t(-10.0), t(-15.0), t(-12.0), t(-14.0))
    smoothed = get_loss("sigmoid", beta=0.5, label_smoothing=0.2)(*args)
    assert smoothed.losses.item() == pytest.approx(0.5014132779827524, rel=1e-6)
    plain = get_loss("sigmoid", beta=0.5)(*args)
    zero = get_loss("sigmoid", beta=0.5, label_smoothing=0.0)(*args)
    assert torch.equal(plain.losses, zero.losses)
    assert smoothed.losses.item() != plain.losses.item()  # the option is not silently ignored


def test_gradient_direction_raises_chosen_lowers_rejected():
    pc, pr = t(-10.0).requires_grad_(), t(-10.0).requires_grad_()
    get_loss("sigmoid", beta=0.1)(pc, pr, t(-10.0), t(-10.0)).losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descending the loss raises log pi(chosen)
    assert pc.grad.item() == pytest.approx(-0.05)  # -beta * sigmoid(0) = -0.1 * 0.5


def test_unknown_loss_and_unknown_parameter_fail_loudly():
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("nope")
    with pytest.raises(ValueError, match="does not take"):
        get_loss("sigmoid", beta=0.1, gamma=1.0)
    with pytest.raises(ValueError, match="needs reference"):
        get_loss("sigmoid")(t(-1.0), t(-2.0), None, None)
    assert "sigmoid" in loss_names()
