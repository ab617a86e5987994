"""PPO maths against numbers computed by hand (in the comments), with padded rows holding garbage that must
never reach an output."""

import math

import pytest
import torch

from preftune.rl.ppo_math import (AdaptiveKLController, FixedKLController, clipped_policy_loss, clipped_value_loss,
                                  entropy_from_logits, gae, kl_shaped_rewards, last_token_index, masked_mean,
                                  to_grid, whiten)

NAN = float("nan")


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_kl_shaped_rewards_hand_computed_with_padding():
    # row 0 (3 tokens): log pi - log pi_ref = [-1 - -1.5, -2 - -1, -0.5 - -0.5] = [0.5, -1.0, 0.0]
    #   -0.1 * kl = [-0.05, 0.1, 0.0]; score 2.0 lands on the last token t=2 -> [-0.05, 0.1, 2.0]
    # row 1 (2 tokens, t=2 is padding with garbage): kl = [-0.3 - -0.1, -1.2 - -1.2] = [-0.2, 0.0]
    #   -0.1 * kl = [0.02, 0.0]; score -1.0 on t=1 -> [0.02, -1.0, 0.0]
    logprobs = t([-1.0, -2.0, -0.5], [-0.3, -1.2, 9.9])
    ref = t([-1.5, -1.0, -0.5], [-0.1, -1.2, NAN])
    mask = t([1, 1, 1], [1, 1, 0])
    rewards = kl_shaped_rewards(t(2.0, -1.0), logprobs, ref, mask, kl_coef=0.1)
    assert rewards.tolist() == [pytest.approx([-0.05, 0.1, 2.0]), pytest.approx([0.02, -1.0, 0.0])]


def test_last_token_index_follows_the_mask_not_the_length():
    # a left-padded row ([0, 1, 1]) and a one-token row ([1, 0, 0])
    assert last_token_index(t([0, 1, 1], [1, 0, 0], [1, 1, 1])).tolist() == [2, 0, 2]


def test_to_grid_places_each_rows_tokens_left_aligned():
    # packed tokens: row 0 has 2 (a, b), row 1 none, row 2 has 3 (c, d, e) -> [[a, b, 0], [0, 0, 0], [c, d, e]]
    flat = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    grid = to_grid(flat, torch.tensor([0, 0, 2, 2, 2]), (3, 3))
    assert grid.tolist() == [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 4.0, 5.0]]
    (grid * torch.arange(9.0).view(3, 3)).sum().backward()  # d/dflat = the weights at [0,0] [0,1] [2,0] [2,1] [2,2]
    assert flat.grad.tolist() == [0.0, 1.0, 6.0, 7.0, 8.0]


def test_gae_1x3_gamma_1_lambda_095():
    # rewards r = [0.1, -0.2, 1.0], values V = [0.5, 0.6, 0.7], V after the last token = 0
    # delta_2 = 1.0 + 1*0 - 0.7 = 0.3;  delta_1 = -0.2 + 0.7 - 0.6 = -0.1;  delta_0 = 0.1 + 0.6 - 0.5 = 0.2
    # A_2 = 0.3;  A_1 = -0.1 + 0.95*0.3 = 0.185;  A_0 = 0.2 + 0.95*0.185 = 0.2 + 0.17575 = 0.37575
    # returns = A + V = [0.87575, 0.785, 1.0]
    adv, ret = gae(t([0.1, -0.2, 1.0]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=1.0, lam=0.95)
    assert adv[0].tolist() == pytest.approx([0.37575, 0.185, 0.3], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.87575, 0.785, 1.0], abs=1e-6)


def test_gae_discounted_with_padded_row():
    # gamma 0.9, lambda 0.5 (gamma*lambda = 0.45)
    # row 0: delta_2 = 1.0 - 0.7 = 0.3; delta_1 = -0.2 + 0.9*0.7 - 0.6 = -0.17; delta_0 = 0.1 + 0.9*0.6 - 0.5 = 0.14
    #        A_2 = 0.3; A_1 = -0.17 + 0.45*0.3 = -0.035; A_0 = 0.14 + 0.45*-0.035 = 0.12425
    #        returns = [0.62425, 0.565, 1.0]
    # row 1 (2 tokens; t=2 is padding holding garbage reward 7 and value 9, which must not bootstrap):
    #        delta_1 = 1.0 + 0.9*0 - 0.4 = 0.6; delta_0 = 0.5 + 0.9*0.4 - 0.2 = 0.66
    #        A_1 = 0.6; A_0 = 0.66 + 0.45*0.6 = 0.93; returns = [1.13, 1.0, 0]
    rewards = t([0.1, -0.2, 1.0], [0.5, 1.0, 7.0])
    values = t([0.5, 0.6, 0.7], [0.2, 0.4, 9.0])
    adv, ret = gae(rewards, values, t([1, 1, 1], [1, 1, 0]), gamma=0.9, lam=0.5)
    assert adv.tolist() == [pytest.approx([0.12425, -0.035, 0.3], abs=1e-6), pytest.approx([0.93, 0.6, 0.0])]
    assert ret.tolist() == [pytest.approx([0.62425, 0.565, 1.0], abs=1e-6), pytest.approx([1.13, 1.0, 0.0])]


def test_gae_limits_monte_carlo_and_td():
    r, v, m = t([0.1, -0.2, 1.0]), t([0.5, 0.6, 0.7]), t([1, 1, 1])
    # lambda = 1, gamma = 1: A_t = (sum of rewards from t) - V_t = [0.9 - 0.5, 0.8 - 0.6, 1.0 - 0.7]
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.4, 0.2, 0.3], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.9, 0.8, 1.0], abs=1e-6)
    # lambda = 0: A_t = delta_t = [0.2, -0.1, 0.3] (from the 1x3 example)
    adv, _ = gae(r, v, m, gamma=1.0, lam=0.0)
    assert adv[0].tolist() == pytest.approx([0.2, -0.1, 0.3], abs=1e-6)


def test_gae_left_and_right_padding_agree():
    # the same 2-token row padded on the right and on the left (padding holds NaN)
    right = gae(t([0.5, 1.0, NAN]), t([0.2, 0.4, NAN]), t([1, 1, 0]), gamma=0.9, lam=0.5)
    left = gae(t([NAN, 0.5, 1.0]), t([NAN, 0.2, 0.4]), t([0, 1, 1]), gamma=0.9, lam=0.5)
    assert right[0][0, :2].tolist() == pytest.approx([0.93, 0.6]) == left[0][0, 1:].tolist()
    assert right[0][0, 2].item() == 0.0 == left[0][0, 0].item()
    assert right[1][0, :2].tolist() == pytest.approx([1.13, 1.0]) == left[1][0, 1:].tolist()


def test_whiten_uses_masked_positions_only():
    # masked-in values [1, 3, 5] (the pad holds 100): mean 3, unbiased variance ((-2)^2 + 0 + 2^2) / (3 - 1) = 4
    # whiten -> (x - 3) / 2 = [-1, 0, 1]; shift_mean=False -> [-1 + 3, 0 + 3, 1 + 3] = [2, 3, 4]
    x, mask = t([1.0, 3.0], [5.0, 100.0]), t([1, 1], [1, 0])
    assert whiten(x, mask).tolist() == [pytest.approx([-1.0, 0.0]), pytest.approx([1.0, 0.0])]
    assert whiten(x, mask, shift_mean=False).tolist() == [pytest.approx([2.0, 3.0]), pytest.approx([4.0, 0.0])]
    assert masked_mean(x, mask).item() == pytest.approx(3.0)


def test_clipped_policy_loss_hand_computed():
    # clip range 0.2; tokens (ratio r, advantage A), loss term max(-A r, -A clip(r, 0.8, 1.2)):
    #   (1.5,  1): max(-1.5, -1.2) = -1.2  clipped term larger -> counts as clipped
    #   (0.5, -1): max( 0.5,  0.8) =  0.8  clipped
    #   (1.0,  2): max(-2.0, -2.0) = -2.0  not clipped
    #   (0.5,  1): max(-0.5, -0.8) = -0.5  not clipped (ratio below range but A > 0: the unclipped term wins)
    #   row 1 then has 2 padding tokens with garbage (log-ratio 5, advantage 100, NaN)
    # loss = (-1.2 + 0.8 - 2.0 - 0.5) / 4 = -2.9 / 4 = -0.725; clip fraction 2/4 = 0.5
    # approx_kl = mean 1/2 (log r)^2 = (0.16440195 + 0.48045301 + 0 + 0.48045301) / 2 / 4 = 0.14066350
    old = t([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    new = t([math.log(1.5), math.log(0.5), 0.0], [math.log(0.5), 5.0, NAN]).requires_grad_()
    adv = t([1.0, -1.0, 2.0], [1.0, 100.0, NAN])
    mask = t([1, 1, 1], [1, 0, 0])
    loss, clip_fraction, approx_kl = clipped_policy_loss(new, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-0.725, abs=1e-6)
    assert clip_fraction.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(0.14066350, abs=1e-6)
    # gradient: d/dlogp (-A r / 4) = -A r / 4 where unclipped: token (1.0, 2) -> -0.5, token (0.5, 1) -> -0.125;
    # clipped tokens and padding get 0
    loss.backward()
    assert new.grad.tolist() == [pytest.approx([0.0, 0.0, -0.5]), pytest.approx([-0.125, 0.0, 0.0])]


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    # r = 1 everywhere: loss = -mean(A) = -(0.5 - 1.5 + 2.0) / 3 = -1/3; nothing clipped; approx_kl 0
    logps = t([-1.0, -2.0, -3.0])
    loss, clip_fraction, approx_kl = clipped_policy_loss(logps, logps, t([0.5, -1.5, 2.0]), t([1, 1, 1]), 0.2)
    assert loss.item() == pytest.approx(-1 / 3)
    assert clip_fraction.item() == 0.0 and approx_kl.item() == 0.0


def test_clipped_value_loss_hand_computed():
    # clip range 0.2; tokens (V, V_old, R): clipped V = clip(V, V_old - 0.2, V_old + 0.2)
    #   (1.0, 0.5, 1.2):  (V-R)^2 = 0.04, clipped V 0.7 -> (0.7-1.2)^2 = 0.25 -> 0.25, clipped term larger
    #   (0.4, 0.5, 0.0):  inside the range: 0.16 both                     -> 0.16
    #   (-0.5, 0.0, -1.0): 0.25, clipped V -0.2 -> (-0.2+1)^2 = 0.64      -> 0.64, clipped term larger
    #   (0.9, 1.0, 0.0):  inside: 0.81 both                                -> 0.81
    #   (1.0, 0.5, 0.6):  0.16, clipped V 0.7 -> 0.01 (clipping would help) -> 0.16, unclipped larger
    # loss = 1/2 * (0.25 + 0.16 + 0.64 + 0.81 + 0.16) / 5 = 1/2 * 2.02 / 5 = 0.202; fraction 2/5 = 0.4
    values = t([1.0, 0.4, -0.5], [0.9, 1.0, NAN])
    old = t([0.5, 0.5, 0.0], [1.0, 0.5, 3.0])
    returns = t([1.2, 0.0, -1.0], [0.0, 0.6, 8.0])
    loss, fraction = clipped_value_loss(values, old, returns, t([1, 1, 1], [1, 1, 0]), clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.202, abs=1e-6)
    assert fraction.item() == pytest.approx(0.4)


def test_entropy_from_logits_masked_mean():
    # uniform over 2: ln 2 = 0.69314718; logits [0, ln 3] -> p = [1/4, 3/4]:
    #   H = 1/4 ln 4 + 3/4 ln(4/3) = 0.34657359 + 0.21576155 = 0.56233514; mean = 0.62774116
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [50.0, NAN]]])
    assert entropy_from_logits(logits, t([1, 1, 0])).item() == pytest.approx(0.62774116, abs=1e-6)


def test_kl_controllers():
    # target 6, horizon 10000, 256 samples per batch:
    #   KL 9:   9/6 - 1 = 0.5 -> clipped to 0.2  -> 0.1 * (1 + 0.2 * 256/10000) = 0.100512
    #   KL 3:   3/6 - 1 = -0.5 -> clipped to -0.2 -> 0.1 * (1 - 0.0512 / 10) = 0.099488
    #   KL 6.6: 6.6/6 - 1 = 0.1 (inside the clip) -> 0.1 * (1 + 0.1 * 0.0256) = 0.100256
    for kl, expected in ((9.0, 0.100512), (3.0, 0.099488), (6.6, 0.100256)):
        ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
        ctl.update(kl, n_steps=256)
        assert ctl.value == pytest.approx(expected, rel=1e-9)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=256)
    assert fixed.value == 0.05
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
