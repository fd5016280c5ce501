"""The paper's mechanisms as executable facts, then the run, then the harness. Run: python -m pytest -q

Part 1 follows the paper (Kenneweg et al., "JEPA for RL", ESANN 2025) in its own order: pixel Cart Pole, the
x-encoder, the y-encoder, the predictor, Eq. 1-3, the --rl-grad switch, PPO and the training loop.
Part 2 checks one run of jepa_cartpole.py: its flags, its folder and logs, bad input, Ctrl-C, the collapse
indicators and that its numbers do not move. Part 3 checks the harness, plots/experiments.py: inspection, the sweeps,
the statistics and the README's commands. Each test states one fact; if the implementation broke it, it would fail.
"""

import copy
import csv
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn

import jepa_cartpole as jc
from plots import experiments as ex

SCRIPT = Path(__file__).with_name("jepa_cartpole.py")
HARNESS = Path(__file__).with_name("plots") / "experiments.py"
H, W, PATCH, D = 16, 64, 8, 64           # the default frame and embedding sizes
TINY_METHOD = ["--total-steps", "128", "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2",
               "--update-epochs", "1", "--depth", "1"]   # 2 updates of 64 transitions: seconds per run
TINY = [*TINY_METHOD, "--threads", "1"]

def small_encoder(depth=1):
    torch.manual_seed(0)
    return jc.ViTEncoder(H, W, PATCH, D, depth=depth, heads=4, mlp_ratio=2)


def random_states(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(-2.4, 2.4, n), rng.normal(0, 1, n),
                     rng.uniform(-0.25, 0.25, n), rng.normal(0, 1, n)], axis=1).astype(np.float32)


def random_windows(n, seed=0):
    """n windows (n, 3, H, W) uint8 of real rendered Cart Poles."""
    return torch.from_numpy(jc.render_frames(random_states(3 * n, seed), H, W)).view(n, 3, H, W)


def tiny_args(*flags):
    """The TINY configuration as parse_args gives it (parse_args writes nothing; the --out is never created)."""
    return jc.parse_args([*TINY, *flags, "--out", "never-written"])


def crafted_minibatch(m=16, seed=0):
    """A minibatch as the training step receives it: windows, the JEPA targets s_y, and PPO's rollout numbers."""
    g = torch.Generator().manual_seed(seed)
    return {"windows": random_windows(m, seed), "s_y": torch.randn(m, D, generator=g),
            "actions": torch.randint(0, 2, (m,), generator=g), "logprobs": torch.full((m,), math.log(0.5)),
            "advantages": torch.randn(m, generator=g), "returns": torch.randn(m, generator=g)}


def networks(args, seed=0):
    torch.manual_seed(seed)
    nets = jc.make_networks(args, num_actions=2)
    return nets, jc.make_optimizer(nets, args)


def weights(net):
    return [p.detach().clone() for p in net.parameters()]


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ######################################################################################################
# Part 1: the paper's mechanisms as facts
# ######################################################################################################

# ---------------------------------------------------------------------------------------------- 1. settings
def test_with_no_flags_the_run_is_configuration_2_with_the_papers_values():
    """No flags = configuration 2 (JEPA + RL gradients, no regulariser), d = 64, tau = 0.99, 100k steps."""
    args = jc.parse_args(["--out", "never-written"])
    assert (args.jepa, args.rl_grad, args.reg) == (True, True, False)
    assert (args.embed_dim, args.ema_tau, args.total_steps, args.jepa_coef, args.reg_coef) == (64, 0.99, 100_000, 1, 1)
    assert jc.run_name(args.jepa, args.rl_grad, args.reg) == "jepa-rlgrad-noreg"


# ---------------------------------------------------------------------------------------------- 2. pixels
def test_numpy_renderer_draws_the_same_scene_as_gymnasium():
    """Our renderer draws gymnasium's own scene (cropped, downsampled) directly at 16 x 64."""
    states = random_states(24)
    ours = jc.render_frames(states, H, W)
    theirs = ex.GymnasiumRenderer(H, W)(states)
    assert ours.shape == theirs.shape == (24, H, W) and ours.dtype == np.uint8
    cols = np.arange(W)
    for a, b in zip(ours, theirs):
        fg_a, fg_b = a < 200, b < 200                      # foreground: cart, pole, axle, track
        assert (fg_a & fg_b).sum() / (fg_a | fg_b).sum() > 0.85
        ink_a, ink_b = 255.0 - a, 255.0 - b
        # the cart's horizontal position (ink-weighted centre of the cart rows) agrees to a fraction of a pixel
        assert abs((ink_a[-3:] * cols).sum() / ink_a[-3:].sum() - (ink_b[-3:] * cols).sum() / ink_b[-3:].sum()) < 0.3
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 3


def test_renderer_antialiases_subpixel_motion():
    """One image pixel is 4.8/64 = 0.075 world units. A cart moved by a tenth of that (7.5 mm) still changes the
    picture: edges are anti-aliased, so velocity is visible from frame to frame, not only in whole pixels."""
    states = np.zeros((2, 4), np.float32)
    states[1, 0] = 0.1 * (4.8 / W)
    frames = jc.render_frames(states, H, W)
    assert (frames[0] != frames[1]).any()
    # box_coverage is the exact fraction of a pixel inside an edge: a pixel of width 1 centred 0.3 inside [0, 10]
    # is covered from 0 to 0.8, i.e. 80%.
    assert jc.box_coverage(np.array(0.3), 0.0, 10.0, 1.0) == pytest.approx(0.8)


def test_push_frame_slides_the_window_and_pads_new_episodes():
    window = np.stack([np.full((2, H, W), v, np.uint8) for v in (1, 2, 3)], axis=1)   # (N=2, 3, H, W)
    new_frames = np.full((2, H, W), 4, np.uint8)
    out = jc.push_frame(window, new_frames, episode_start=np.array([False, True]))
    assert [out[0, k, 0, 0] for k in range(3)] == [2, 3, 4]    # [f(t-1), f(t), f(t+1)]
    assert [out[1, k, 0, 0] for k in range(3)] == [4, 4, 4]    # new episode: first frame repeated


def test_x_and_y_windows_are_the_right_frames_and_never_cross_an_episode():
    """Drive the real vectorised Cart Pole (always pushing right, so episodes end quickly).

    Each frame is stamped with a serial number; the test knows which episode each serial belongs to from the
    env's own done flags. For every real transition t: the x-window is [f(t-2), f(t-1), f(t)], the y-window
    (the next x-window) is [f(t-1), f(t), f(t+1)], and all six frames come from one episode. The autoreset step
    (gymnasium 1.x starts the new episode one step after the end) is marked invalid.
    """
    n = 3
    envs = jc.make_envs(n)
    serial = [0]

    def stamping_render(states):
        frames = np.zeros((len(states), H, W), np.uint8)
        for i in range(len(states)):
            serial[0] += 1
            frames[i, 0, 0], frames[i, 0, 1] = divmod(serial[0], 256)
        return frames

    def ids(window):                                    # (3, H, W) -> the three frames' serials
        return [int(f[0, 0]) * 256 + int(f[0, 1]) for f in window]

    states, _ = envs.reset(seed=0)
    window = jc.push_frame(np.zeros((n, 3, H, W), np.uint8), stamping_render(states), np.ones(n, bool))
    episode_of = {s: (i, 0) for i, s in enumerate(ids(w)[0] for w in window)}
    history = [[ids(w)[0]] for w in window]              # per env: serials of frames of the current episode
    episode = [0] * n
    last_ended = np.zeros(n, bool)
    checked_ends = 0
    for _ in range(60):
        old = window.copy()
        window, _, _, _, ended, valid, _ = jc.step_pixels(envs, np.ones(n, dtype=np.int64), window, last_ended,
                                                       stamping_render)
        for i in range(n):
            x_ids, y_ids = ids(old[i]), ids(window[i])
            new_id = y_ids[-1]
            if last_ended[i]:                            # autoreset step: a new episode starts here
                assert not valid[i]
                episode[i] += 1
                history[i] = [new_id]
                assert y_ids == [new_id] * 3             # padded with its first frame
            else:
                assert valid[i]
                history[i].append(new_id)
                expected = (history[i][:1] * 3 + history[i])[-4:]     # padded f(t-2), f(t-1), f(t), f(t+1)
                assert x_ids == expected[:3] and y_ids == expected[1:]
                assert {episode_of[s] for s in x_ids} == {(i, episode[i])}
                checked_ends += bool(ended[i])
            episode_of[new_id] = (i, episode[i])
            assert {episode_of[s] for s in y_ids} == {(i, episode[i])}  # never two episodes in one window
        last_ended = ended
    assert checked_ends >= 3                              # the episode ends really were exercised


# ---------------------------------------------------------------------------------------------- 3. x-encoder
def test_shapes():
    """16 x 64 frames in 8 x 8 patches: 2 x 8 = 16 patches per frame, 48 tokens for 3 frames (+ CLS)."""
    enc = small_encoder()
    windows = random_windows(5)
    assert enc.positional_encoding().shape == (48, 64)                 # 3 frames x 16 patches, one row per token
    assert enc.patch_embed.in_features == PATCH * PATCH == 64            # a flattened 8 x 8 patch
    s_x = enc(windows)
    assert s_x.shape == (5, D)
    pred = jc.Predictor(D, 32, num_actions=2)(s_x, torch.tensor([0, 1, 0, 1, 1]))
    assert pred.shape == (5, D)


def test_positional_encoding_tells_frames_apart():
    """A cart moving right and the same three frames played backwards (moving left): only the frame index tells
    them apart. Without it, a transformer over a set of tokens gives the same s_x for both."""
    enc = small_encoder()
    pos = enc.positional_encoding().view(3, -1, D)            # (frame, patch, D)
    assert not torch.allclose(pos[0], pos[1]) and not torch.allclose(pos[1], pos[2])
    states = np.zeros((3, 4), np.float32)
    states[:, 0] = [-0.3, 0.0, 0.3]
    forward = torch.from_numpy(jc.render_frames(states, H, W))[None]   # (1, 3, H, W)
    backward = forward.flip(1)
    with torch.no_grad():
        assert not torch.allclose(enc(forward), enc(backward), atol=1e-6)
        enc.frame_index = False                                   # --no-frame-index: the lab's extra
        assert torch.allclose(enc(forward), enc(backward), atol=1e-5)
        enc.frame_index = True
        enc.frame_pos.zero_()                                     # the same thing, by hand
        assert torch.allclose(enc(forward), enc(backward), atol=1e-5)


def test_last_block_for_the_cls_token_only_is_speed_with_the_same_result():
    """Only the CLS output is read after the last block, so computing that block for the CLS query alone (every
    token still gives keys and values) must give exactly what the full block gives at position 0."""
    torch.manual_seed(0)
    block = jc.Block(D, heads=4, mlp_ratio=2)
    x = torch.randn(7, 1 + 48, D)                                     # (B, 1 + 3P, D) random tokens
    with torch.no_grad():
        fast = jc.last_block_cls_only(block, x)
        assert fast.shape == (7, 1, D)
        torch.testing.assert_close(fast, block(x)[:, :1])
    # and through the whole encoder, on random windows: s_x is the same as with the full last block
    enc = small_encoder(depth=2)
    windows = torch.randint(0, 256, (6, 3, H, W), dtype=torch.uint8)
    with torch.no_grad():
        fast = enc(windows)
        original = jc.last_block_cls_only
        try:
            jc.last_block_cls_only = lambda block, x: block(x)[:, :1]   # the full last block, CLS read after
            full = enc(windows)
        finally:
            jc.last_block_cls_only = original
    torch.testing.assert_close(fast, full)


# ---------------------------------------------------------------------------------------------- 4. y-encoder
def test_y_encoder_starts_equal_and_never_receives_gradients():
    x_enc = small_encoder()
    y_enc = jc.make_y_encoder(x_enc)
    assert same_weights(y_enc.parameters(), x_enc.parameters())
    predictor = jc.Predictor(D, 32, 2)
    windows = random_windows(8)
    s_x, s_y = x_enc(windows), y_enc(windows.roll(1, 0))       # no torch.no_grad() here on purpose
    loss = jc.jepa_loss(predictor(s_x, torch.zeros(8, dtype=torch.long)), s_y) + jc.variance_regulariser(s_y)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in y_enc.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in x_enc.parameters())


def test_y_encoder_is_not_in_the_optimiser_and_everything_else_is():
    """The y-encoder learns only through the EMA; the optimiser holds the x-encoder, predictor, actor and critic."""
    nets, optimizer = networks(tiny_args())
    in_optimizer = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(in_optimizer) == len(set(in_optimizer))                 # each parameter once
    trained = {id(p) for k in ("x_encoder", "predictor", "actor", "critic") for p in nets[k].parameters()}
    assert set(in_optimizer) == trained
    assert not {id(p) for p in nets["y_encoder"].parameters()} & set(in_optimizer)
    assert set(nets) == set(jc.make_networks(tiny_args(), 2)) == {"x_encoder", "y_encoder", "predictor", "actor",
                                                                  "critic"}


def test_fused_adamw_is_speed_with_the_same_result():
    """make_optimizer asks for the fused AdamW (one kernel for all tensors). Five steps on the same gradients move
    the weights exactly as the plain per-tensor loop does, up to float rounding."""
    args = tiny_args("--weight-decay", "0.01", "--predictor-lr-scale", "0.5")
    nets, fused = networks(args)
    plain_nets = copy.deepcopy(nets)
    plain = torch.optim.AdamW([{**{k: v for k, v in group.items() if k not in ("params", "fused")},
                                "params": list(plain_params)}
                               for group, plain_params in zip(fused.param_groups, (
                                   [p for k in ("x_encoder", "actor", "critic") for p in plain_nets[k].parameters()],
                                   plain_nets["predictor"].parameters()))], fused=False)
    assert fused.defaults["fused"] is True                                # make_optimizer asks for the fused kernel
    initial = weights(nets["x_encoder"])
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for group_fused, group_plain in zip(fused.param_groups, plain.param_groups):
            for p_fused, p_plain in zip(group_fused["params"], group_plain["params"]):
                p_fused.grad = torch.randn(p_fused.shape, generator=g)
                p_plain.grad = p_fused.grad.clone()
        fused.step()
        plain.step()
    for k in ("x_encoder", "predictor", "actor", "critic"):
        for a, b in zip(nets[k].parameters(), plain_nets[k].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not same_weights(initial, nets["x_encoder"].parameters())          # the steps really moved them


def test_ema_with_tau_0_copies_and_with_tau_1_freezes():
    x_enc = small_encoder()
    y_enc = jc.make_y_encoder(x_enc)
    with torch.no_grad():
        for p in x_enc.parameters():
            p.add_(1.0)
    frozen = copy.deepcopy(y_enc.state_dict())
    jc.ema_update(y_enc, x_enc, tau=1.0)
    assert all(torch.equal(frozen[k], v) for k, v in y_enc.state_dict().items())
    jc.ema_update(y_enc, x_enc, tau=0.0)
    assert same_weights(y_enc.parameters(), x_enc.parameters())


def test_ema_blends_with_tau():
    """theta_y <- tau * theta_y + (1 - tau) * theta_x. With tau = 0.99, theta_y = 2 and theta_x = 12:
    0.99 * 2 + 0.01 * 12 = 2.1. Each step moves the y-encoder 1% of the way to the x-encoder."""
    x_enc = small_encoder()
    y_enc = jc.make_y_encoder(x_enc)
    with torch.no_grad():
        for p_y, p_x in zip(y_enc.parameters(), x_enc.parameters()):
            p_y.fill_(2.0)
            p_x.fill_(12.0)
    jc.ema_update(y_enc, x_enc, tau=0.99)
    for p in y_enc.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 2.1))
    jc.ema_update(y_enc, x_enc, tau=0.99)                            # 0.99 * 2.1 + 0.01 * 12 = 2.199
    for p in y_enc.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 2.199))


def test_the_ema_runs_after_every_optimiser_step():
    """Six training steps move the x-encoder x0 -> x1 -> ... -> x6; the y-encoder (starting at y0 = x0) must follow
    the recursion by hand, y_k = tau * y_(k-1) + (1 - tau) * x_k, at every step. After two, with tau = 0.9:
    y2 = 0.81 x0 + 0.09 x1 + 0.1 x2. An EMA that stopped after some steps, or ran twice, would fall off it."""
    args = tiny_args()
    args.ema_tau, args.learning_rate = 0.9, 1e-2          # a large step, so that x0, x1, ... are far apart
    nets, optimizer = networks(args)
    mb = crafted_minibatch()
    x = [weights(nets["x_encoder"])]
    by_hand = weights(nets["x_encoder"])                  # y0 = x0
    for step in range(6):
        jc.training_step(nets, optimizer, mb, args)
        x.append(weights(nets["x_encoder"]))
        by_hand = [0.9 * y + 0.1 * new for y, new in zip(by_hand, x[-1])]
        for y, expected in zip(nets["y_encoder"].parameters(), by_hand):
            torch.testing.assert_close(y, expected, rtol=0, atol=1e-6, msg=f"after optimiser step {step + 1}")
            assert y.grad is None                         # and it still got no gradient
        if step == 1:
            for y, a, b, c in zip(by_hand, *x):
                torch.testing.assert_close(y, 0.81 * a + 0.09 * b + 0.1 * c, rtol=0, atol=1e-6)
    assert max((b - a).abs().max() for a, b in zip(x[5], x[6])) > 1e-4    # the x-encoder still moves at the end


# ---------------------------------------------------------------------------------------------- 5. predictor
def test_predictor_uses_the_action():
    """The action is JEPA's latent variable z: the same s_x with 'push left' and 'push right' predicts two
    different futures."""
    pred = jc.Predictor(D, 32, num_actions=2)
    s_x = torch.randn(1, D)
    assert not torch.allclose(pred(s_x, torch.tensor([0])), pred(s_x, torch.tensor([1])))


# ---------------------------------------------------------------------------------------------- 6. losses
def test_eq1_jepa_loss_is_the_squared_euclidean_distance():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    # ||(0, 2)||^2 = 4 and ||(-3, -4)||^2 = 25, averaged over the batch: 14.5
    assert jc.jepa_loss(pred, target).item() == pytest.approx(14.5)


def test_eq2_regulariser_rewards_variance_and_is_clamped_at_1():
    s = torch.tensor([[0.0, 0.0], [0.2, 0.4]])
    # unbiased batch variances: 0.02 and 0.08 -> mean 0.05 -> L_reg = -0.05
    assert jc.variance_regulariser(s).item() == pytest.approx(-0.05)
    assert jc.embedding_variance(s).item() == pytest.approx(0.05)
    wide = torch.tensor([[0.0, 0.0], [4.0, 6.0]], requires_grad=True)   # variances 8 and 18: clamped at 1
    loss = jc.variance_regulariser(wide)
    assert loss.item() == -1.0
    loss.backward()
    assert wide.grad.abs().sum() == 0                              # variance >= 1: no push any more
    collapsed = torch.ones(4, 3)
    assert jc.variance_regulariser(collapsed).item() == 0.0        # the worst value: everything the same


def test_eq2_gradient_fades_as_the_batch_collapses():
    """Eq. 2 pushes the embeddings apart with a force proportional to their spread. Worked example, d = 1:
    s = [0, 0.1] has variance 0.005, and dL_reg/ds = -2 (s - mean) / (n - 1) = [0.1, -0.1] (descent pulls them
    apart). For s = c + eps * noise the gradient's norm is proportional to eps: it vanishes at full collapse."""
    s = torch.tensor([[0.0], [0.1]], dtype=torch.float64, requires_grad=True)
    jc.variance_regulariser(s).backward()
    torch.testing.assert_close(s.grad, torch.tensor([[0.1], [-0.1]], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    c, noise = torch.randn(1, D, generator=g, dtype=torch.float64), torch.randn(32, D, generator=g, dtype=torch.float64)
    norms = []
    for eps in (1e-1, 1e-2, 1e-3, 0.0):
        s = (c + eps * noise).requires_grad_(True)
        jc.variance_regulariser(s).backward()
        norms.append(s.grad.norm().item())
    assert norms[0] > 0 and norms[1] / norms[0] == pytest.approx(0.1) and norms[2] / norms[1] == pytest.approx(0.1)
    assert norms[3] < 1e-12                                       # full collapse: no push at all (up to rounding)


def test_vicregs_std_form_keeps_pushing_as_the_batch_collapses():
    """--reg-form std, VICReg's variance term mean_i relu(1 - sqrt(Var_i + 1e-4)) (Bardes et al. 2022, Sec. 4.1).
    d sqrt(Var) / ds = (s - mean) / ((n - 1) sqrt(Var)): the spread cancels, so the push keeps its size as the batch
    closes in on its mean, down to the 1e-4 under the root (a spread of about 0.01). Eq. 2's push shrinks with it."""
    s = torch.tensor([[0.0], [0.2]], dtype=torch.float64)           # variance 0.02: L = 1 - sqrt(0.0201)
    assert jc.variance_regulariser(s, "std").item() == pytest.approx(1 - math.sqrt(0.0201))
    wide = torch.tensor([[0.0, 0.0], [4.0, 6.0]], requires_grad=True)   # standard deviations above 1: the hinge is 0
    jc.variance_regulariser(wide, "std").backward()
    assert wide.grad.abs().sum() == 0
    g = torch.Generator().manual_seed(0)
    c, noise = torch.randn(1, D, generator=g, dtype=torch.float64), torch.randn(32, D, generator=g, dtype=torch.float64)

    def push(form, spread):
        s = (c + spread * noise).requires_grad_(True)
        jc.variance_regulariser(s, form).backward()
        return s.grad.norm().item()
    assert push("var", 0.03) / push("var", 0.3) == pytest.approx(0.1)     # ten times less spread, ten times less push
    assert push("std", 0.03) / push("std", 0.3) > 0.9                     # about the same push


def test_a_constant_encoder_and_predictor_solve_eq1_perfectly():
    """The trivial solution collapse exploits: an encoder that ignores its input (patch weights 0) and a predictor
    that outputs that constant give JEPA loss 0, and the embedding variance is 0: collapse, by definition."""
    enc = small_encoder()
    with torch.no_grad():
        enc.patch_embed.weight.zero_()                             # every window -> the same tokens -> the same s
    y_enc = jc.make_y_encoder(enc)
    predictor = jc.Predictor(D, 32, 2)
    windows = random_windows(16)
    with torch.no_grad():
        s_x, s_y = enc(windows), y_enc(windows.roll(1, 0))
        for layer in (predictor.fc1, predictor.action_proj, predictor.fc2):
            layer.weight.zero_()
        predictor.fc2.bias.copy_(s_x[0])                           # always predict the constant
        loss = jc.jepa_loss(predictor(s_x, torch.randint(0, 2, (16,))), s_y)
    assert loss.item() < 1e-10
    assert jc.embedding_variance(s_x).item() < 1e-12 < jc.COLLAPSE_THRESHOLD
    assert jc.variance_regulariser(s_x).item() == pytest.approx(0.0, abs=1e-12)   # only Eq. 2 objects


# ---------------------------------------------------------------------------------------------- 7. PPO
def test_ppo_clips_the_ratio_pessimistically():
    """Two samples, advantages [1, -1] -> normalised [0.707, -0.707]; pi_old(a) = 0.5 for both.
    Sample 0: pi_new = 0.75, ratio 1.5 > 1.2, positive advantage: clipped, -0.707 * 1.2 = -0.849.
    Sample 1: pi_new = 0.25, ratio 0.5 < 0.8, negative advantage: clipped, +0.707 * 0.8 = +0.566.
    Policy loss = mean = -0.141. Value loss = 1/2 mean((1 - 0)^2, (2 - 0)^2) = 1.25. Entropy of (0.75, 0.25) =
    0.562."""
    logits = torch.log(torch.tensor([[0.75, 0.25], [0.75, 0.25]]))
    mb = {"actions": torch.tensor([0, 1]), "logprobs": torch.log(torch.tensor([0.5, 0.5])),
          "advantages": torch.tensor([1.0, -1.0]), "returns": torch.tensor([0.0, 0.0])}
    policy, value, entropy, approx_kl = jc.ppo_losses(logits, torch.tensor([1.0, 2.0]), mb, clip_coef=0.2)
    assert policy.item() == pytest.approx((-1.2 + 0.8) / 2 / math.sqrt(2), abs=1e-5)
    assert value.item() == pytest.approx(1.25)
    assert entropy.item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=1e-6)
    assert approx_kl.item() > 0


def test_gae_with_a_termination_and_a_truncation():
    gamma, lam = 0.9, 0.5
    # one env, 4 steps: step 1 terminates (pole fell), step 3 is truncated (time limit) -> bootstrap from V[4]
    rewards = torch.tensor([[1.0], [1.0], [1.0], [1.0]])
    values = torch.tensor([[0.5], [0.4], [0.3], [0.2], [10.0]])
    terminated = torch.tensor([[0.0], [1.0], [0.0], [0.0]])
    episode_end = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    adv, ret = jc.compute_gae(rewards, values, terminated, episode_end, gamma, lam)
    d3 = 1 + 0.9 * 10.0 - 0.2            # truncation: bootstrapped with V(final window) = 9.8
    d2 = 1 + 0.9 * 0.2 - 0.3             # 0.88
    a2 = d2 + 0.9 * 0.5 * d3             # 0.88 + 0.45 * 9.8 = 5.29
    d1 = 1 + 0.0 - 0.4                   # termination: no future value, 0.6
    d0 = 1 + 0.9 * 0.4 - 0.5             # 0.86
    a0 = d0 + 0.9 * 0.5 * d1             # 0.86 + 0.27 = 1.13; nothing flows back across the end at step 1
    torch.testing.assert_close(adv[:, 0], torch.tensor([a0, d1, a2, d3]))
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.13, 0.6, 5.29, 9.8]))
    torch.testing.assert_close(ret, adv + values[:-1])


# ---------------------------------------------------------------------------------------------- 8. training step
@pytest.mark.parametrize("jepa", [True, False], ids=["jepa", "no-jepa"])
@pytest.mark.parametrize("reg", [True, False], ids=["reg", "no-reg"])
def test_eq3_the_training_step_minimises_the_weighted_sum_the_switches_choose(jepa, reg):
    """Eq. 3, L = L_actor + L_critic (+ jepa_coef * L_jepa) (+ reg_coef * L_reg), with weights other than 1 so
    that each term's weight is visible. Each term is computed here, independently, before the step."""
    args = tiny_args("--jepa" if jepa else "--no-jepa", "--reg" if reg else "--no-reg")
    args.jepa_coef, args.reg_coef, args.ent_coef, args.vf_coef = 0.3, 2.0, 0.05, 0.7
    nets, optimizer = networks(args)
    mb = crafted_minibatch()
    with torch.no_grad():
        s_x = nets["x_encoder"](mb["windows"])
        policy, value, entropy, _ = jc.ppo_losses(nets["actor"](s_x), nets["critic"](s_x).squeeze(-1), mb,
                                                  args.clip_coef)
        l_jepa = jc.jepa_loss(nets["predictor"](s_x, mb["actions"]), mb["s_y"])
        l_reg = jc.variance_regulariser(s_x)
    expected = policy - 0.05 * entropy + 0.7 * value + (0.3 * l_jepa if jepa else 0) + (2.0 * l_reg if reg else 0)
    assert abs(l_jepa.item()) > 1 and abs(l_reg.item()) > 1e-4       # both terms matter at these weights
    logged = jc.training_step(nets, optimizer, mb, args)
    assert logged["loss"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert logged["policy_loss"].item() == pytest.approx(policy.item(), rel=1e-5, abs=1e-6)
    assert logged["reg_loss"].item() == pytest.approx(l_reg.item(), rel=1e-5, abs=1e-7)
    if jepa:
        assert logged["jepa_loss"].item() == pytest.approx(l_jepa.item(), rel=1e-5)


@pytest.mark.parametrize("rl_grad", [True, False], ids=["rl-grad", "no-rl-grad"])
def test_rl_grad_switch_decides_whether_ppo_trains_the_encoder(rl_grad):
    """With JEPA and the regulariser off, PPO's losses are the only possible teacher of the x-encoder:
    --no-rl-grad detaches s_x, so the encoder gets no gradient and does not move; the heads learn either way."""
    args = tiny_args("--no-jepa", "--no-reg", "--rl-grad" if rl_grad else "--no-rl-grad")
    nets, optimizer = networks(args)
    before = {k: weights(nets[k]) for k in ("x_encoder", "actor", "critic")}
    jc.training_step(nets, optimizer, crafted_minibatch(), args)
    assert not same_weights(before["actor"], nets["actor"].parameters())
    assert not same_weights(before["critic"], nets["critic"].parameters())
    assert same_weights(before["x_encoder"], nets["x_encoder"].parameters()) == (not rl_grad)
    if not rl_grad:
        assert all(p.grad is None or not p.grad.any() for p in nets["x_encoder"].parameters())


def test_with_no_jepa_no_rl_grad_no_reg_a_whole_run_leaves_the_encoder_at_its_initial_weights(tmp_path):
    """Nothing teaches the x-encoder then: a real (tiny) run of the training loop ends with the encoder exactly as
    it was initialised, while the actor learned. (The networks are rebuilt with the run's seed to compare.)"""
    args = jc.parse_args([*TINY, "--no-jepa", "--no-rl-grad", "--no-reg", "--out", str(tmp_path / "run")])
    _, nets = jc.train(args)
    torch.manual_seed(args.seed)
    initial = jc.make_networks(args, num_actions=2)
    assert same_weights(initial["x_encoder"].parameters(), nets["x_encoder"].parameters())
    assert not same_weights(initial["actor"].parameters(), nets["actor"].parameters())


class NewestFrameStamp(nn.Module):
    """A stand-in y-encoder: s_y = the stamp (serial, env) of the newest frame of the window it reads."""

    def forward(self, windows):                                              # (B, 3, H, W) uint8
        newest = windows[:, -1, 0, :3].long()                                # stamp pixels of f(t+1)
        s = torch.zeros(len(windows), D)
        s[:, 0], s[:, 1] = newest[:, 0] * 256 + newest[:, 1], newest[:, 2]
        return s


def test_train_feeds_the_y_encoder_the_next_window_and_trains_on_real_transitions_only(monkeypatch):
    """What train() hands to the networks, watched in a real (tiny) run. Every frame is stamped with the serial
    number of its step and its env, and the y-encoder is replaced by one that returns the stamp of the newest
    frame it reads. For every sample of every minibatch: the y-encoder read the SAME env's window one step LATER
    than the x-encoder's (Section 2: [f(t-1), f(t), f(t+1)] after [f(t-2), f(t-1), f(t)]), and the step was a
    real transition, never gymnasium's autoreset step (whose action the env ignored)."""
    serial, ended_after = [0], {}                 # ended_after[serial][env]: that step ended the env's episode

    def stamping_render(states):
        serial[0] += 1
        frames = np.full((len(states), H, W), 255, np.uint8)
        frames[:, 0, 0], frames[:, 0, 1] = divmod(serial[0], 256)
        frames[:, 0, 2] = np.arange(len(states))
        return frames

    real_step, real_networks, real_training_step = jc.step_pixels, jc.make_networks, jc.training_step

    def recording_step(*step_args):
        result = real_step(*step_args)
        ended_after[serial[0]] = result[4].copy()
        return result

    def networks_with_stamp(args, num_actions):
        return {**real_networks(args, num_actions), "y_encoder": NewestFrameStamp()}

    seen = []

    def recording_training_step(nets, optimizer, mb, args):
        seen.append({k: v.clone() for k, v in mb.items()})
        return real_training_step(nets, optimizer, mb, args)

    monkeypatch.setattr(jc, "step_pixels", recording_step)
    monkeypatch.setattr(jc, "make_networks", networks_with_stamp)
    monkeypatch.setattr(jc, "training_step", recording_training_step)
    jc.train(tiny_args(), render=stamping_render, log=jc.ConsoleLog())
    samples = 0
    for mb in seen:
        x_serial = mb["windows"][:, -1, 0, 0].long() * 256 + mb["windows"][:, -1, 0, 1].long()   # f(t)'s stamp
        x_env = mb["windows"][:, -1, 0, 2].long()
        assert torch.equal(mb["s_y"][:, 0].long(), x_serial + 1)               # the y-window ends in f(t+1)
        assert torch.equal(mb["s_y"][:, 1].long(), x_env)                      # of the same env
        assert not any(ended_after.get(int(s), np.zeros(4, bool))[int(n)] for s, n in zip(x_serial, x_env))
        samples += len(x_serial)
    autoreset_steps = sum(int(ended.sum()) for step, ended in ended_after.items() if step < serial[0])
    assert autoreset_steps >= 2                       # episodes did end, so autoreset steps were there to leave out
    assert samples == 2 * 64 - autoreset_steps        # 2 updates x 1 epoch: every real transition, once


def test_train_treats_a_truncation_as_an_episode_end_but_not_a_failure(monkeypatch):
    """CartPole-v1 cuts an episode at 500 steps: the pole did not fall, the time ran out. So inside train(), GAE must
    see a truncation as an episode end (no advantage flows into the next episode) but not as a termination (the
    value of where it stood still counts: V(next) is not 0). A tiny run whose episodes are cut at 8 steps, so that
    truncations happen: what compute_gae receives is exactly what the env said at every step."""
    said, given = [], []                          # the env's (terminated, truncated); GAE's (terminated, episode_end)

    class Recording(gym.vector.VectorWrapper):
        def step(self, actions):
            result = self.env.step(actions)
            said.append((result[2].copy(), result[3].copy()))
            return result

    def short_envs(num_envs):                     # Part 1's envs, but truncated at 8 steps instead of 500
        envs = gym.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="vector_entry_point",
                            max_episode_steps=8)
        return gym.wrappers.vector.RecordEpisodeStatistics(Recording(envs))

    real_gae = jc.compute_gae

    def recording_gae(rewards, values, terminated, episode_end, *rest):
        given.append((terminated.clone(), episode_end.clone()))
        return real_gae(rewards, values, terminated, episode_end, *rest)

    monkeypatch.setattr(jc, "make_envs", short_envs)
    monkeypatch.setattr(jc, "compute_gae", recording_gae)
    jc.train(tiny_args(), log=jc.ConsoleLog())
    terminated = torch.tensor(np.array([term for term, _ in said]), dtype=torch.float32)             # (2T, N)
    truncated = torch.tensor(np.array([trunc for _, trunc in said]), dtype=torch.float32)
    assert (truncated * (1 - terminated)).sum() >= 4                  # the run did reach truncations
    assert torch.equal(torch.cat([t for t, _ in given]), terminated)  # a truncation is no termination
    assert torch.equal(torch.cat([e for _, e in given]), torch.clamp(terminated + truncated, max=1))   # but an end


def test_part_1_alone_is_a_complete_program(tmp_path):
    """Cut jepa_cartpole.py at the Part 2 banner: what is left trains an agent, with a two-line entry point. So
    Part 1 uses no name and no flag defined below the banner, and it fits in 550 lines."""
    source = SCRIPT.read_text()
    part1 = source[:source.rindex("# ====", 0, source.index("# PART 2"))]
    assert source[:source.index("# PART 2")].count("\n") + 1 <= 550     # up to the banner's title: the method
    (tmp_path / "part1.py").write_text(part1)
    entry = ("import part1\n"
             "args = part1.build_parser().parse_args(['--total-steps', '64', '--num-envs', '4', '--num-steps', '16',"
             " '--num-minibatches', '2', '--depth', '1'])\n"
             "summary, nets = part1.train(args)\nprint('trained', summary['steps'], sorted(nets))")
    result = subprocess.run([sys.executable, "-c", entry], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "step      64 |" in result.stdout                          # ConsoleLog's line, one update
    assert "trained 64 ['actor', 'critic', 'predictor', 'x_encoder', 'y_encoder']" in result.stdout


# ######################################################################################################
# Part 2: one run of jepa_cartpole.py
# ######################################################################################################

# ---------------------------------------------------------------------------------------------- whole runs
def default_sigint():
    """For a child process that a test will signal: Python turns SIGINT into KeyboardInterrupt only if SIGINT is not
    ignored when it starts, and a background parent (`pytest &`, nohup, some CI runners) passes it on ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_script(*flags, cwd, script=SCRIPT, **popen):
    """A script as a child process, running while the test goes on, with SIGINT's default handler."""
    return subprocess.Popen([sys.executable, str(script), *flags], cwd=cwd, preexec_fn=default_sigint, **popen)


def run_script(*flags, cwd, script=SCRIPT, timeout=240):
    return subprocess.run([sys.executable, str(script), *flags], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def run_harness(*flags, cwd, timeout=240):
    return run_script(*flags, cwd=cwd, script=HARNESS, timeout=timeout)


def read_rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.mark.parametrize("jepa", ["--jepa", "--no-jepa"])
@pytest.mark.parametrize("rl_grad", ["--rl-grad", "--no-rl-grad"])
@pytest.mark.parametrize("reg", ["--reg", "--no-reg"])
def test_every_switch_combination_trains_end_to_end(jepa, rl_grad, reg, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    jc.main([jepa, rl_grad, reg, *TINY])                 # in this process: the script's own entry point, no start-up
    stdout = capsys.readouterr().out
    name = "-".join(flag[2:].replace("-", "") for flag in (jepa, rl_grad, reg))   # e.g. nojepa-rlgrad-reg
    out = tmp_path / "runs" / f"{name}-seed1"
    assert out.is_dir(), list((tmp_path / "runs").iterdir())
    for file in ("updates.csv", "episodes.csv", "config.json", "summary.json", "model.pt", "training.png"):
        assert (out / file).is_file(), file
    columns, rows = read_rows(out / "updates.csv")
    assert columns == jc.UPDATE_COLUMNS and len(rows) == 2                  # 128 steps = 2 rollouts of 64
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert all((float(r["jepa_loss"]) != 0) == (jepa == "--jepa") for r in rows)   # Eq. 1 only when switched on
    assert (out / "episodes.csv").read_text().startswith("step,return,length")
    assert json.loads((out / "config.json").read_text())["jepa"] == (jepa == "--jepa")
    machine = json.loads((out / "summary.json").read_text())["machine"]   # the run names what its numbers need
    assert machine == {**jc.machine(), "threads": machine["threads"]} and machine["threads"] >= 1
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["cpu_vendor"] and machine["cpu_model"]              # which CPU made these numbers
    assert "training.png" in stdout.strip().splitlines()[-1]


def test_same_seed_gives_identical_logs(tmp_path):
    """Everything is seeded: two runs of one command give the same episodes and the same logged numbers (only
    the speed, sps, differs)."""
    logs = []
    for k in range(2):
        result = run_script(*TINY, "--total-steps", "256", "--seed", "7", "--out", str(tmp_path / f"run{k}"),
                            cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        columns, rows = read_rows(tmp_path / f"run{k}" / "updates.csv")
        logs.append(((tmp_path / f"run{k}" / "episodes.csv").read_text(),
                     [{c: r[c] for c in columns if c != "sps"} for r in rows]))
    assert logs[0][0] == logs[1][0] and logs[0][0].count("\n") > 5
    assert logs[0][1] == logs[1][1] and len(logs[0][1]) == 4


def test_non_finite_loss_stops_with_a_message_and_keeps_the_logs(tmp_path, monkeypatch):
    monkeypatch.setattr(jc, "jepa_loss", lambda pred, target: torch.tensor(float("nan")))
    with pytest.raises(SystemExit) as exit_info:
        jc.main([*TINY, "--out", str(tmp_path / "run")])
    assert "non-finite loss" in str(exit_info.value.code)
    assert (tmp_path / "run" / "episodes.csv").read_text().startswith("step,return,length")
    assert (tmp_path / "run" / "updates.csv").read_text().startswith(",".join(jc.UPDATE_COLUMNS))


# ---------------------------------------------------------------------------------------------- bad input
def _parser_types():
    parser = jc.add_run_flags(jc.build_parser())
    return {a.dest: a.type for a in parser._actions if a.type in (int, float)}


def test_every_number_flag_has_a_checked_range():
    assert set(_parser_types()) == {*jc.FLAG_RANGES, "stop_after"}   # --stop-after: checked against --total-steps


def _range_cases():
    """From jc.FLAG_RANGES: a value below each low bound, above each high bound, NaN and inf for float flags."""
    types = _parser_types()
    cases = []
    for name, (low, high) in jc.FLAG_RANGES.items():
        flag = "--" + name.replace("_", "-")
        step = 1 if types[name] is int else 0.5
        cases.append(([flag, str(low - step)], flag))
        if high is not None:
            cases.append(([flag, str(high + step)], flag))
        if types[name] is float:
            cases += [([flag, "nan"], flag), ([flag, "inf"], flag)]
    return cases


EXPLICIT_CASES = [
    (["--patch-size", "0"], "--patch-size"),
    (["--patch-size", "5"], "--patch-size"),                 # 5 does not divide 16 x 64
    (["--image-height", "20"], "--patch-size"),              # 8 does not divide 20
    (["--heads", "0"], "--heads"),
    (["--heads", "3"], "--heads"),                           # 3 does not divide d = 64
    (["--learning-rate", "-1"], "--learning-rate"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--num-envs", "0"], "--num-envs"),
    (["--ema-tau", "1.5"], "--ema-tau"),
    (["--gamma", "1.5"], "--gamma"),
    (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--window", "0"], "--window"),
    (["--predictor-lr-scale", "-1"], "--predictor-lr-scale"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--image-height", "8"], "--image-height"),             # 8 x 64 crops the upright pole
    (["--device", "cuda:7"], "--device"),
    (["--device", "nonsense"], "--device"),
    (["--num-envs", "4", "--num-steps", "16", "--num-minibatches", "64"], "--num-minibatches"),   # 1 sample each
    (["--num-envs", "3", "--num-steps", "5", "--num-minibatches", "4"], "--num-minibatches"),
    (["--total-steps", "10"], "--total-steps"),              # less than one rollout of 16 x 32
    (["--seed", "nonsense"], "--seed"),
    (["--stop-after", "100"], "--stop-after"),               # less than one rollout
    (["--stop-after", "200000"], "--stop-after"),            # beyond --total-steps
    (["--out", "{tmp}/a-file"], "--out"),                    # a file, not a folder
]


def folder_with_bad_paths(tmp_path, monkeypatch):
    """A working folder with the paths the bad-input cases name; returns what is in it, to show nothing is added."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "no-model").mkdir()
    (tmp_path / "no-model" / "config.json").write_text("{}")
    (tmp_path / "empty-sweep").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    return sorted(tmp_path.rglob("*"))


@pytest.mark.parametrize("flags, named", _range_cases() + EXPLICIT_CASES,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_is_refused_naming_the_flag_and_writes_nothing(flags, named, tmp_path, monkeypatch, capsys):
    before = folder_with_bad_paths(tmp_path, monkeypatch)
    argv = [f.format(tmp=tmp_path) for f in flags]
    if "--out" not in flags:
        argv += ["--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        jc.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and named in err, err
    assert "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before                # nothing written: no --out, no runs/, no plots/


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "episodes.csv").write_text("precious")
    with pytest.raises(SystemExit) as exit_info:
        jc.parse_args(["--out", str(out)])
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err and (out / "episodes.csv").read_text() == "precious"
    assert jc.parse_args(["--out", str(out), "--overwrite"]).out == out


def test_ctrl_c_stops_cleanly_and_leaves_complete_logs(tmp_path):
    out = tmp_path / "run"
    process = start_script(*TINY, "--total-steps", "50000", "--out", str(out), cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            if (out / "updates.csv").is_file() and len((out / "updates.csv").read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be interrupted"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert "Traceback" not in stdout + stderr, stderr
    assert any(str(out) in line and "interrupted" in line for line in (stdout + stderr).splitlines()), stderr
    columns, rows = read_rows(out / "updates.csv")
    assert columns == jc.UPDATE_COLUMNS and len(rows) >= 1
    _, episodes = read_rows(out / "episodes.csv")
    for row in rows + episodes:
        assert None not in row and None not in row.values() and "" not in row.values(), row



def test_a_failed_write_stops_with_one_line_and_keeps_the_rows(tmp_path, monkeypatch, capsys):
    """A disk that fills up mid-run: the third update's row cannot be written. One line names the folder and the
    error, exit code 2, no traceback; the two rows already written still read whole."""
    real_update = jc.RunLog.update
    calls = []

    def failing_update(self, *update_args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_update(self, *update_args, **kwargs)

    monkeypatch.setattr(jc.RunLog, "update", failing_update)
    with pytest.raises(SystemExit) as exit_info:
        jc.main([*TINY, "--total-steps", "256", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and str(tmp_path / "run") in err and "No space left on device" in err
    columns, rows = read_rows(tmp_path / "run" / "updates.csv")
    assert columns == jc.UPDATE_COLUMNS and [int(r["step"]) for r in rows] == [64, 128]



# ---------------------------------------------------------------------------------------------- collapse indicators
def test_effective_rank_counts_the_directions_the_embeddings_use():
    """exp(entropy of the normalised singular values). Singular values (3, 1) -> p = (0.75, 0.25) ->
    exp(-(0.75 ln 0.75 + 0.25 ln 0.25)) = exp(0.562) = 1.755. All on one line: 1. Fully spread: d."""
    assert jc.effective_rank(torch.tensor([[3.0, 0.0], [0.0, 1.0]])).item() == pytest.approx(1.7548, abs=1e-4)
    g = torch.Generator().manual_seed(0)
    rank_one = torch.randn(500, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 16, generator=g,
                                                                                 dtype=torch.float64)
    assert jc.effective_rank(rank_one).item() == pytest.approx(1.0, abs=1e-3)
    isotropic = torch.randn(4000, 16, generator=g)
    assert jc.effective_rank(isotropic).item() > 0.9 * 16



class LookupEncoder(nn.Module):
    """A fake encoder that 'knows' the probe set: it looks each window up and returns f(true state)."""

    def __init__(self, probe_set, f):
        super().__init__()
        windows, states = probe_set
        self.index = {w.numpy().tobytes(): i for i, w in enumerate(windows)}
        self.states, self.f = states, f

    def forward(self, windows):
        return self.f(self.states[[self.index[w.numpy().tobytes()] for w in windows]])


@pytest.fixture(scope="module")
def probe_set():
    return jc.make_probe_set(1, H, W)


def test_probe_set_is_fixed_by_the_seed(probe_set):
    windows, states = probe_set
    size = len(windows)
    assert size >= 1024 and windows.shape == (size, 3, H, W) and windows.dtype == torch.uint8
    assert states.shape == (size, 4)
    again = jc.make_probe_set(1, H, W)
    assert torch.equal(again[0], windows) and torch.equal(again[1], states)
    assert not torch.equal(jc.make_probe_set(2, H, W)[1], states)
    assert len({w.numpy().tobytes() for w in windows}) == size          # every window different


def test_linear_probe_reads_a_linear_embedding_and_nothing_from_a_constant_one(probe_set):
    _, states = probe_set
    n, half = len(states), len(states) // 2
    torch.manual_seed(0)
    linear = states @ torch.randn(4, D) + 0.01 * torch.randn(n, D)     # s_x = a linear function of the state
    r2 = jc.linear_probe_r2(linear[:half], states[:half], linear[half:], states[half:])
    assert r2.shape == (4,) and (r2 > 0.99).all()
    constant = torch.ones(n, D)                                        # a collapsed encoder
    r2 = jc.linear_probe_r2(constant[:half], states[:half], constant[half:], states[half:])
    assert (r2.abs() < 0.05).all()


def test_probe_r2_scores_what_the_encoder_knows_on_the_probe_set(probe_set):
    mixing = torch.randn(4, D, generator=torch.Generator().manual_seed(0))
    keys = ["probe_r2_x", "probe_r2_x_dot", "probe_r2_theta", "probe_r2_theta_dot"]
    knows_all = jc.probe_r2(LookupEncoder(probe_set, lambda s: s @ mixing), probe_set, "cpu")
    assert list(knows_all) == keys and all(v > 0.99 for v in knows_all.values())
    knows_cart = jc.probe_r2(LookupEncoder(probe_set, lambda s: s[:, :2] @ mixing[:2]), probe_set, "cpu")
    assert knows_cart["probe_r2_x"] > 0.99 and knows_cart["probe_r2_x_dot"] > 0.99
    assert knows_cart["probe_r2_theta"] < 0.2                          # the pole is not in this embedding
    knows_nothing = jc.probe_r2(LookupEncoder(probe_set, lambda s: torch.ones(len(s), D)), probe_set, "cpu")
    assert all(abs(v) < 0.05 for v in knows_nothing.values())
    # Noise 256 wide, independent of the state: held out it reads about 0 or below (-0.35 to -0.25 here); scored on
    # the half it was fitted on, it would read about +0.23 (a wide enough embedding fits anything in-sample).
    noise = torch.Generator().manual_seed(0)
    knows_noise = jc.probe_r2(LookupEncoder(probe_set, lambda s: torch.randn(len(s), 256, generator=noise)),
                              probe_set, "cpu")
    assert all(-0.5 < v < 0.05 for v in knows_noise.values()), knows_noise   # held out: about 0 (or below)
    real = jc.probe_r2(small_encoder(), probe_set, "cpu")                 # and the real ViT runs through it
    assert list(real) == keys and all(math.isfinite(v) for v in real.values())



def test_on_policy_probe_fits_on_some_envs_and_scores_on_the_others():
    """On the states the agent visits, split by env: a linear embedding of the state reads R^2 ~ 1, a constant
    embedding reads ~0 (it cannot), and one env alone has nothing to hold out."""
    class StateInPixels(nn.Module):        # s = a linear map of the state, read back from stamped pixels
        def forward(self, windows):
            return windows[:, -1, 0, :4].double() @ torch.randn(4, D, generator=torch.Generator().manual_seed(0),
                                                              dtype=torch.float64)
    rng = np.random.default_rng(0)
    states = torch.from_numpy(rng.integers(0, 256, (32, 8, 4))).double()       # (T, N, 4)
    windows = torch.zeros((32, 8, 3, H, W), dtype=torch.uint8)
    windows[:, :, -1, 0, :4] = states.to(torch.uint8)
    r2 = jc.onpolicy_probe_r2(StateInPixels(), [(windows[:16], states[:16]), (windows[16:], states[16:])], "cpu")
    assert list(r2) == [f"onpolicy_r2_{n}" for n in jc.STATE_NAMES] and min(r2.values()) > 0.99
    constant = jc.onpolicy_probe_r2(lambda w: torch.ones(len(w), D), [(windows, states)], "cpu")
    assert max(constant.values()) < 0.01
    assert all(math.isnan(v) for v in jc.onpolicy_probe_r2(StateInPixels(), [(windows[:, :1], states[:, :1])],
                                                           "cpu").values())



# ---------------------------------------------------------------------------------------------- same numbers
# The refactor guard: a change that should not move a number proves it did not. A default run of 4096 steps (8
# updates, one thread) is compared with what the code gave when the guard was last made (at the default
# --max-grad-norm 1000 of issue 23, on an AMD EPYC whose torch reports AVX2), in two ways:
# - on any CPU, within a tolerance: the logged numbers, the episodes and a summary of every network's weights. Other
#   CPUs round differently, even at the same capability (an AMD EPYC and an Intel Xeon, both AVX512, gave other
#   hashes of the same run). Stand-ins measured beside the stored run: --threads 2, ATEN_CPU_CAPABILITY=default, and
#   that with MKL and oneDNN held to SSE4. Their largest difference used 0.21% of the tolerance below; a learning
#   rate 0.1% higher used 723 times it, and tau = 0.9901 instead of 0.99 430 times.
# - bit for bit, by hashes: only on the CPU model and torch version that made them.
GUARD_RUN = ["--total-steps", "4096", "--threads", "1"]
GUARD_RTOL, GUARD_ATOL = 1e-3, 1e-5
REFERENCE_UPDATES = {
    "mean_return": [17.117647, 20.4, 21.1, 18.2, 20.15, 23.35, 21.3, 19.4],
    "loss": [13.79976, 6.8288707, 4.9304342, 3.6292379, 2.9609932, 3.4045639, 3.4274706, 3.7629267],
    "jepa_loss": [13.02755, 5.1849649, 2.5856792, 1.0191547, 0.3132292, 0.12289635, 0.062691393, 0.044765957],
    "policy_loss": [0.00095444483, -0.010279821, -0.0060238823, -0.0041312441, -0.0020905321, 0.00039568692,
                    -0.0025046041, -0.0002073581],
    "value_loss": [1.5425114, 3.308371, 4.7015577, 5.2284288, 5.299709, 6.5625437, 6.7345677, 7.4367362],
    "entropy": [0.69141996, 0.69059803, 0.67042747, 0.67648681, 0.69056121, 0.69198353, 0.69264502, 0.69093223],
    "approx_kl": [0.0017480771, 0.010951185, 0.0091859666, 0.0051971573, 0.0020663351, 0.00022045553, 0.0014959849,
                  4.9919829e-05],
    "grad_norm": [53.047054, 35.820458, 25.615597, 16.215717, 9.5290298, 6.0921851, 5.1952717, 3.9225976],
    "embedding_var": [0.000516757, 0.00034689195, 4.5854162e-05, 2.6577335e-05, 3.1573689e-05, 2.3296703e-05,
                      2.7260471e-05, 2.885421e-05],
    "effective_rank": [1.6926521, 1.3931129, 1.1848181, 1.1257911, 1.1285098, 1.1170797, 1.1274662, 1.127172],
    "probe_r2_theta": [math.nan] * 7 + [-0.00016146401],
    "learning_rate": [0.001, 0.000875, 0.00075, 0.000625, 0.0005, 0.000375, 0.00025, 0.000125],
}
REFERENCE_WEIGHTS = {"x_encoder": [25.54720549, 13.63335636], "y_encoder": [25.5142669, 13.42400823],
                     "predictor": [11.27600944, 6.723412274], "actor": [11.28140334, -2.565982814],
                     "critic": [11.686286, -13.23659912]}
REFERENCE_EPISODES = [185, 3777, 392208]
# The exact fingerprints, keyed on what decides the bits: CPU vendor, model name, family/model/stepping, torch.
FINGERPRINTS = {("AuthenticAMD", "AMD EPYC", "25/1/1", "2.13.0+cpu"):
                {"updates": "d2b9f529cba0e5e4", "episodes": "fb569c070f43510d", "model": "34f1e700f1301d66"}}


def logged_numbers(run):
    """The columns of REFERENCE_UPDATES from a run's updates.csv (NaN where a probe did not run)."""
    rows = read_rows(run / "updates.csv")[1]
    return {c: [float(r[c]) if r[c] else math.nan for r in rows] for c in REFERENCE_UPDATES}


def weight_summary(run):
    """Per network: the length of all its weights as one vector, and their dot product with a fixed random vector
    (a change anywhere moves it; a rounding difference barely does)."""
    weights, summary = torch.load(run / "model.pt"), {}
    for net in ("x_encoder", "y_encoder", "predictor", "actor", "critic"):
        flat = torch.cat([t.flatten().double() for t in weights[net].values()])
        direction = torch.randn(len(flat), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        summary[net] = [flat.norm().item(), flat.dot(direction).item()]
    return summary


def episode_summary(run):
    """(episodes, sum of returns, sum of finishing steps): integers, the same unless an action changed."""
    episodes = np.loadtxt(run / "episodes.csv", delimiter=",", skiprows=1, ndmin=2)
    return [len(episodes), int(episodes[:, 1].sum()), int(episodes[:, 0].sum())]


def fingerprint(run):
    """Hashes of updates.csv (all but sps), episodes.csv and every weight: equal only if every bit is."""
    columns = [c for c in jc.UPDATE_COLUMNS if c != "sps"]
    updates = hashlib.sha256("".join(",".join(r[c] for c in columns) + "\n"
                                     for r in read_rows(run / "updates.csv")[1]).encode()).hexdigest()[:16]
    weights = torch.load(run / "model.pt")
    model = hashlib.sha256()
    for net in ("x_encoder", "y_encoder", "predictor", "actor", "critic"):
        for name, tensor in weights[net].items():
            model.update(name.encode())
            model.update(tensor.numpy().tobytes())
    return {"updates": updates, "episodes": hashlib.sha256((run / "episodes.csv").read_bytes()).hexdigest()[:16],
            "model": model.hexdigest()[:16]}


def this_cpu():
    cpu = jc.machine()
    return cpu["cpu_vendor"], cpu["cpu_model"], cpu["cpu_family_model_stepping"], torch.__version__


@pytest.fixture(scope="module")
def guard_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    result = run_script(*GUARD_RUN, "--out", str(root / "run"), cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "run"


def test_a_default_run_gives_the_numbers_it_gave_when_the_guard_was_made_within_rounding_on_any_cpu(guard_run):
    """Tolerant, so it holds on every CPU: each logged number, the weights' summary and the episodes."""
    logged = logged_numbers(guard_run)
    for column, stored in REFERENCE_UPDATES.items():
        assert np.allclose(logged[column], stored, rtol=GUARD_RTOL, atol=GUARD_ATOL, equal_nan=True), column
    for net, stored in REFERENCE_WEIGHTS.items():
        assert np.allclose(weight_summary(guard_run)[net], stored, rtol=GUARD_RTOL, atol=GUARD_ATOL), net
    assert episode_summary(guard_run) == REFERENCE_EPISODES


@pytest.mark.skipif(this_cpu() not in FINGERPRINTS, reason="exact: its fingerprint was made on another CPU model "
                    "or torch (the tolerant test above runs everywhere)")
def test_a_default_run_gives_the_numbers_it_gave_when_the_guard_was_made_bit_for_bit_on_its_cpu(guard_run):
    assert fingerprint(guard_run) == FINGERPRINTS[this_cpu()]



def test_stop_after_gives_the_first_part_of_the_longer_run_exactly(tmp_path):
    """--stop-after S ends a run after S steps on the --total-steps run's learning-rate schedule: its logs are the
    first rows of the full run, bit for bit (so a lab's short run is the start of Figure 3's, not a run of its own)."""
    full, part = tmp_path / "full", tmp_path / "part"
    jc.main([*TINY, "--total-steps", "256", "--out", str(full)])
    jc.main([*TINY, "--total-steps", "256", "--stop-after", "128", "--out", str(part)])
    drop_sps = lambda rows: [{k: v for k, v in r.items() if k != "sps"} for r in rows]
    full_rows, part_rows = read_rows(full / "updates.csv")[1], read_rows(part / "updates.csv")[1]
    assert len(full_rows) == 4 and len(part_rows) == 2
    # the last update of the short run also probes (its "last"), the full run's second update does not
    probes = [c for c in jc.UPDATE_COLUMNS if "_r2_" in c]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in probes} for r in rows]
    assert strip(drop_sps(part_rows)) == strip(drop_sps(full_rows[:2]))
    assert float(part_rows[1]["learning_rate"]) == float(full_rows[1]["learning_rate"]) > 0   # not annealed to 0
    episodes = lambda run: np.loadtxt(run / "episodes.csv", delimiter=",", skiprows=1, ndmin=2)
    full_episodes, part_episodes = episodes(full), episodes(part)
    assert np.array_equal(part_episodes, full_episodes[full_episodes[:, 0] <= 128])


# ######################################################################################################
# Part 3: the harness, plots/experiments.py
# ######################################################################################################

# ---------------------------------------------------------------------------------------------- its input
HARNESS_CASES = [
    (["eval", "{tmp}/missing"], "missing"),
    (["eval", "{tmp}/no-model"], "no-model"),                # has config.json, no model.pt
    (["gif", "{tmp}/no-model"], "no-model"),
    (["inspect", "{tmp}/no-model"], "no-model"),
    (["eval", "{tmp}/no-model", "--episodes", "0"], "no-model"),
    (["nonsense"], "usage"),                                 # not a subcommand
    (["plot", "--sweep-dir", "{tmp}/empty-sweep"], "no finished run"),
    (["collapse", "--weight-decay", "0.1"], "--weight-decay"),   # `collapse` sets its own setting
    (["collapse", "--reg-coef", "5"], "--reg-coef"),              # and its arms' own changes
    (["lab", "--no-jepa"], "--no-jepa"),                          # the lab runs the README's commands as written
    (["lab", "--total-steps", "1000"], "--total-steps"),
    (["lab", "--seed", "3"], "--seeds"),                              # the lab's seeds are its own
    (["class"], "--seed"),                                            # a student's own seed, never a default
    (["pool", "{tmp}/missing"], "missing"),
    (["pool", "{tmp}/empty-sweep", "--out", "{tmp}/a-file"], "--out"),
    (["plot", "--plots-dir", "{tmp}/a-file"], "--plots-dir"),
    (["figure3", "--sweep-dir", "{tmp}/a-file"], "--sweep-dir"),
    (["figure3", "--seeds", "0"], "--seeds"),
    (["figure3", "--workers", "0"], "--workers"),
    (["figure3", "--ema-tau", "2"], "--ema-tau"),                 # the method's flags are checked as a run checks them
    (["state-reference", "--total-steps", "200"], "8 envs x 32 steps = 256"),   # its own rollout, not 512
    (["state-reference", "--out", "{tmp}/a-file"], "--out"),
]


@pytest.mark.parametrize("argv, named", HARNESS_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_the_harness_refuses_bad_input_naming_it_and_writes_nothing(argv, named, tmp_path, monkeypatch, capsys):
    before = folder_with_bad_paths(tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        ex.parse_harness_args([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and named in err, err
    assert "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before


def test_the_state_reference_checks_its_own_rollout_size():
    """The state reference collects 8 envs x 32 steps = 256 transitions per rollout, the pixel agent 512."""
    assert ex.parse_harness_args(["state-reference", "--total-steps", "300", "--out", "never"]).total_steps == 300


def test_the_renderer_check_reports_the_difference_and_both_times(capsys):
    difference, (ours, theirs) = ex.check_renderer(H, W, num_envs=4)
    assert 0 <= difference < 255 and ours > 0 and theirs > 0           # timings are reported, never asserted
    assert "largest difference" in capsys.readouterr().out


def test_plot_without_finished_runs_leaves_the_plots_byte_identical(tmp_path):
    plots = tmp_path / "plots"
    repo_plots = SCRIPT.with_name("plots")
    if repo_plots.is_dir():
        shutil.copytree(repo_plots, plots)
    else:
        plots.mkdir()
    (plots / "figure3.png").write_bytes(b"\x89PNG not really")
    (plots / "figure3_summary.csv").write_text("config,seeds\n1,5\n")
    before = {p: p.read_bytes() for p in plots.rglob("*") if p.is_file()}      # plots/runs too
    (tmp_path / "empty").mkdir()
    result = run_harness("plot", "--sweep-dir", str(tmp_path / "empty"), "--plots-dir", str(plots), cwd=tmp_path)
    assert result.returncode == 2 and "no finished run" in result.stderr and "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in plots.rglob("*") if p.is_file()} == before



# ---------------------------------------------------------------------------------------------- a trained agent
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run trained in this process, with its networks as they were at the end of training."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    args = jc.parse_args([*TINY, "--out", str(out)])
    log = jc.RunLog(args)
    summary, nets = jc.train(args, render=log.render, log=log)
    return out, nets


def test_checkpoint_round_trip_gives_identical_actions(tiny_run):
    out, nets = tiny_run
    run_args, loaded = ex.load_run(out)
    assert set(loaded) == set(nets) and run_args.depth == 1
    windows = random_windows(10)
    with torch.no_grad():
        torch.testing.assert_close(loaded["actor"](loaded["x_encoder"](windows)),
                                   nets["actor"](nets["x_encoder"](windows)))
        torch.testing.assert_close(loaded["y_encoder"](windows), nets["y_encoder"](windows))
    assert (ex.greedy_actions(loaded["x_encoder"], loaded["actor"], windows)
            == ex.greedy_actions(nets["x_encoder"], nets["actor"], windows)).all()


def test_eval_and_gif_run_on_a_trained_run(tiny_run, tmp_path):
    out, _ = tiny_run
    result = run_harness("eval", str(out), "--episodes", "3", cwd=tmp_path)
    assert result.returncode == 0 and "greedy return over 3 episodes" in result.stdout, result.stderr
    result = run_harness("gif", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out / "agent.gif").read_bytes()[:6] == b"GIF89a"              # in the run's folder, not plots/


def test_inspect_reports_both_probes_and_the_parts_of_the_jepa_loss(tiny_run, capsys):
    out, _ = tiny_run
    ex.main(["inspect", str(out)])
    report = json.loads((out / "inspect.json").read_text())
    assert {f"{kind}_r2_{name}" for kind in ("probe", "onpolicy") for name in jc.STATE_NAMES} <= set(report)
    assert report["windows"] == jc.ONPOLICY_ROLLOUTS * 16 * 4                 # 4 rollouts of 4 envs x 16 steps
    assert 0 <= report["jepa_loss_mean_part"] <= report["jepa_loss"] + 1e-6   # a part of the whole
    assert report["jepa_loss_action_floor"] >= 0 and "inspect.json" in capsys.readouterr().out



def readme_commands(readme="README.md", section=None, inline=False):
    """The commands (lines of code blocks that start with `python `; with inline, also `python ...` in the text) of
    a README, or of one of its sections."""
    text = SCRIPT.with_name(readme).read_text() if readme == "README.md" else (SCRIPT.parent / readme).read_text()
    if section:
        text = text[text.index(f"\n## {section}"):]
        text = text[:text.index("\n## ", 5)] if "\n## " in text[5:] else text
    blocks = text.split("```")[1::2]                                        # code blocks' lines
    commands = [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("python ")]
    if inline:                                                              # and `python ...` in the text
        commands += [" ".join(span.split()) for span in re.findall(r"(?<!`)`(python [^`]+)`", "".join(
            text.split("```")[0::2]))]
    return commands


@pytest.mark.parametrize("readme", ["README.md", "plots/README.md"])
def test_every_readme_command_parses_as_written(readme, tmp_path, monkeypatch):
    """Every command in the two READMEs is one that the file or the harness accepts, flags and all."""
    monkeypatch.chdir(tmp_path)
    commands = readme_commands(readme, inline=True)
    assert len(commands) >= 10
    placeholders = {"S": "1", "W": "100", "G": "0.99", "L": "0.95", "E": "0.01", "LR": "0.001", "RUN": "run",
                    "DIR": "run", "N": "5"}                                 # a README's S: any seed, and so on
    for command in commands:
        for part in command.split(" #")[0].split(" && "):                     # a comment is no command
            words = [placeholders.get(w, w) for w in shlex.split(re.split(r" > | \| ", part)[0])]
            if words[-1] in ("-h", "--help"):
                continue
            assert words[0] == "python", command
            if words[1] == "jepa_cartpole.py":
                jc.parse_args([*words[2:], *(["--out", str(tmp_path / "run")] if "--out" not in words else [])])
            elif words[1:3] == ["-m", "pytest"] or words[1] == "-m":
                continue
            else:
                assert words[1] == "plots/experiments.py", command
                harness = ex.build_harness_parser(words[2])                     # a subcommand that exists
                harness.parse_args(words[3:])                                     # with flags that exist


def test_every_lab_command_runs_in_miniature(tmp_path, monkeypatch, capsys):
    """The README's lab stays true to the flags: each command runs, shortened to 2 tiny updates, and each
    `inspect` draws the run's embedding picture."""
    commands = readme_commands(section="A 90-minute lab")
    assert len(commands) >= 12
    monkeypatch.chdir(tmp_path)
    for command in commands:
        script, *argv = shlex.split(command)[1:]
        if script == "plots/experiments.py" and argv[0] == "class":          # a student's share, in miniature
            ex.main([*argv, *TINY_METHOD])
        elif script == "plots/experiments.py" and argv[0] == "pool":         # the teacher's copy of the class
            shutil.copytree("runs/class", Path(argv[1]) / "alice" / "class")
            ex.main(argv)
            assert (Path(argv[argv.index("--out") + 1]) / "figure3_summary.csv").is_file()
        elif script == "plots/experiments.py":
            assert argv[0] == "inspect", command
            ex.main(argv)
            assert (Path(argv[1]) / "embedding.png").is_file()
        else:
            jc.main([*argv, *TINY, "--stop-after", "128", "--overwrite"])
        assert "error" not in capsys.readouterr().err


def test_readme_lab_commands_are_the_lab_sweeps_runs(tmp_path, monkeypatch):
    """Each training command of the README's lab is one run of `lab`, with the same settings, and each run of `lab`
    has its command: the sweep remakes what the README quotes."""
    monkeypatch.chdir(tmp_path)
    sweep_args, named = ex.parse_harness_args(["lab"]), set()
    for argv in (shlex.split(c)[1:] for c in readme_commands(section="A 90-minute lab")):
        if argv[0] != "jepa_cartpole.py":
            continue
        args = jc.parse_args(argv[1:])
        name = args.out.name.rsplit("-seed", 1)[0]
        job = ex.sweep_job(sweep_args, "lab", name, args.seed)
        assert args.seed == ex.LAB_SEED and args.out.parent == Path("runs/lab")
        assert {k: getattr(args, k) for k in ex.METHOD_FLAGS} == {k: getattr(job, k) for k in ex.METHOD_FLAGS}, name
        named.add(name)
    assert named == set(ex.LAB)


def test_lab_sweep_inspects_each_run_and_tabulates_it(tmp_path, monkeypatch):
    """`lab`: each run is trained, then inspected while its weights are there; the tables have a row per run, one
    per lab run over its seeds, and one per comparison."""
    tiny = {"total_steps": 128, "num_envs": 4, "num_steps": 16, "num_minibatches": 2, "update_epochs": 1, "depth": 1}
    monkeypatch.setattr(ex, "LAB", {"tiny": tiny, "tiny-std": {**tiny, "reg": True, "reg_form": "std"}})
    monkeypatch.setattr(ex, "LAB_PAIRS", [("3", "tiny-std", "tiny", "var")])
    flags = ["lab", "--seeds", "2", "--sweep-dir", str(tmp_path / "sweep"), "--plots-dir", str(tmp_path)]
    ex.main(flags)
    rows = read_rows(tmp_path / "lab_runs.csv")[1]
    assert [(r["run"], r["seed"]) for r in rows] == [("tiny", "500"), ("tiny", "501"), ("tiny-std", "500"),
                                                      ("tiny-std", "501")]
    assert all(r["steps"] == "128" and r["onpolicy_r2_theta"] for r in rows)
    assert [r["seeds"] for r in read_rows(tmp_path / "lab_summary.csv")[1]] == ["2", "2"]
    (pair,) = read_rows(tmp_path / "lab_pairs.csv")[1]
    assert pair["a_above_b"] in ("0 of 2", "1 of 2", "2 of 2") and pair["measure"] == "var"
    assert json.loads((tmp_path / "sweep/lab/tiny-std-seed500/config.json").read_text())["reg_form"] == "std"
    assert (tmp_path / "sweep/lab/tiny-seed500/embedding.png").is_file()
    (tmp_path / "sweep/lab/tiny-seed500/inspect.json").unlink()           # as if stopped between training and inspect
    ex.main(flags)                                                        # nothing to train: the inspection is redone
    assert (tmp_path / "sweep/lab/tiny-seed500/inspect.json").exists()


def test_the_embedding_picture_keeps_one_scale_for_every_run(tiny_run, monkeypatch):
    """inspect draws s_x on its two main directions with axes fixed in s_x's units: a collapsed cloud (every s_x
    the same, but for a tiny jitter) stays a dot, as small as it is, instead of filling the picture."""
    drawn = []
    real_savefig = ex.pyplot().Figure.savefig

    def record(fig, path, **kwargs):
        ax = fig.axes[0]
        drawn.append((ax.get_xlim(), ax.get_ylim(), ax.collections[0].get_offsets()))
        return real_savefig(fig, path, **kwargs)

    monkeypatch.setattr(ex.pyplot().Figure, "savefig", record)
    out, _ = tiny_run
    g = torch.Generator().manual_seed(0)
    collapsed = torch.ones(200, D) + 1e-4 * torch.randn(200, D, generator=g)
    spread = torch.randn(200, D, generator=g)
    for s_x in (collapsed, spread):
        ex.plot_embedding(out, s_x, torch.zeros(200), {"embedding_var": 0.0, "effective_rank": 1.0})
    (x_lim, y_lim, dots), (x_lim2, y_lim2, cloud) = drawn
    assert x_lim == x_lim2 == y_lim == y_lim2 == (-ex.EMBEDDING_AXIS, ex.EMBEDDING_AXIS)
    assert np.abs(dots).max() < 0.01 * ex.EMBEDDING_AXIS < np.abs(cloud).max()


def test_the_class_pools_its_runs_into_figure3(tmp_path, monkeypatch, capsys):
    """Each student runs the four configurations on a seed with `class`; the teacher pools the folders, copied in any
    layout, into Figure 3 with its IQM, intervals and P(2 > 1). Missing configurations are listed; runs of other
    settings are refused, naming the flag."""
    monkeypatch.chdir(tmp_path)
    for seed in (3, 4):
        ex.main(["class", "--seed", str(seed), "--sweep-dir", f"student{seed}", *TINY_METHOD])
    collected = tmp_path / "collected"
    shutil.copytree(tmp_path / "student3" / "class", collected / "alice" / "class")
    for run in (tmp_path / "student4" / "class").iterdir():                       # another layout: flat, renamed
        if run.is_dir() and not run.name.startswith("jepa-norlgrad-reg"):       # and one configuration missing
            shutil.copytree(run, collected / f"bob-{run.name}")
    capsys.readouterr()
    ex.main(["pool", str(collected), "--out", str(tmp_path / "figure")])
    out = capsys.readouterr().out
    assert "seed 4 lacks configuration 4" in out and "seed 3 lacks" not in out
    rows = read_rows(tmp_path / "figure" / "figure3_summary.csv")[1]
    assert [(r["config"], r["seeds"]) for r in rows] == [("1", "2"), ("2", "2"), ("3", "2"), ("4", "1")]
    pairs = read_rows(tmp_path / "figure" / "figure3_comparisons.csv")[1]
    assert (pairs[0]["x"], pairs[0]["y"], pairs[0]["measure"]) == ("2", "1", "final") and pairs[0]["p_x_beats_y"]
    assert (tmp_path / "figure" / "figure3.png").is_file() and (tmp_path / "figure" / "intervals.png").is_file()
    other = collected / "carol"                                                  # a run made with other settings
    jc.main([*TINY, "--ema-tau", "0.9", "--seed", "5", "--out", str(other)])
    with pytest.raises(SystemExit) as refused:
        ex.main(["pool", str(collected), "--out", str(tmp_path / "figure2")])
    assert refused.value.code == 2 and "--ema-tau" in capsys.readouterr().err
    assert not (tmp_path / "figure2").exists()


# ---------------------------------------------------------------------------------------------- sweeps
def test_figure3_sweep_is_resumable_and_writes_its_plots(tmp_path):
    sweep, plots = tmp_path / "sweep", tmp_path / "plots"
    flags = ["figure3", "--seeds", "1", "--sweep-dir", str(sweep), "--plots-dir", str(plots), *TINY_METHOD]
    first = run_harness(*flags, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    runs = sweep / "figure3"
    for name in ("nojepa-rlgrad-noreg", "jepa-rlgrad-noreg", "jepa-norlgrad-noreg", "jepa-norlgrad-reg"):
        for file in ("updates.csv", "episodes.csv", "config.json", "summary.json", "model.pt"):
            assert (runs / f"{name}-seed1" / file).is_file(), (name, file)
    for file in ("episodes.csv", "updates.csv", "config.json", "summary.json"):
        assert (runs / "state-seed1" / file).is_file(), ("state reference", file)
    for name in ("figure3.png", "figure3_summary.csv", "figure3_curves.csv", "probe.png", "observation.png"):
        assert (plots / name).exists(), name
    columns, rows = read_rows(plots / "figure3_summary.csv")
    assert [r["config"] for r in rows] == ["1", "2", "3", "4", "state"]
    assert {"config", "seeds", "return_mean", "return_std", "collapsed_seeds", "final_var",
            "wall_s_per_run"} <= set(columns)
    kept = (runs / "jepa-rlgrad-noreg-seed1" / "episodes.csv").read_text()
    redo = runs / "jepa-norlgrad-reg-seed1"
    redone_before = (redo / "episodes.csv").read_text()
    (redo / "summary.json").unlink()                                    # as if killed before the end
    again = run_harness(*flags, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "4/5 runs already finished" in again.stdout                  # only the unfinished run is redone
    assert (runs / "jepa-rlgrad-noreg-seed1" / "episodes.csv").read_text() == kept
    assert (redo / "summary.json").exists()
    assert (redo / "episodes.csv").read_text() == redone_before         # and redone identically (same seed)



# ---------------------------------------------------------------------------------------------- statistics
def test_iqm_is_the_mean_of_the_middle_half():
    """rliable's interquartile mean: drop the lowest and highest 25% of the runs, average the rest."""
    assert ex.iqm(np.arange(10.0)) == np.mean([2, 3, 4, 5, 6, 7])            # 10 runs: 2 cut from each end
    assert ex.iqm([1.0, 2.0, 3.0, 4.0, 1000.0]) == 3.0                        # an outlier does not move it
    assert ex.iqm([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 9.0]]).tolist() == [2.5, 5.0]   # per row (bootstrap)


def test_probability_of_improvement_is_the_share_of_winning_pairs():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert ex.probability_of_improvement(x, x) == 0.5                        # identical samples: a coin toss
    assert ex.probability_of_improvement(x + 10, x) == 1.0                   # X dominates Y
    assert ex.probability_of_improvement(x, x + 10) == 0.0
    assert ex.probability_of_improvement([2.0], [1.0, 2.0, 3.0]) == 0.5     # one win, one tie, one loss


def test_bootstrap_interval_contains_its_point_estimate_and_is_reproducible():
    values = np.random.default_rng(0).normal(100, 30, 10)
    point, low, high = ex.bootstrap_interval(ex.iqm, values)
    assert low <= point <= high and high - low > 1
    assert (point, low, high) == ex.bootstrap_interval(ex.iqm, values)      # a fixed generator seed
    a, b = values + 60, values
    p, p_low, p_high = ex.bootstrap_interval(ex.probability_of_improvement, a, b)
    assert p_low <= p <= p_high and p_low > 0.5                              # a clear difference is resolved


def test_comparisons_resolve_only_what_the_interval_resolves():
    rng = np.random.default_rng(1)
    curves = lambda level: {"return": rng.normal(level, 20, (10, 5)), "seeds": list(range(10))}
    rows = ex.comparisons({2: curves(300), 1: curves(100), 3: curves(101)}, [(2, 1), (1, 3)])
    verdicts = {(r["x"], r["y"], r["measure"]): r["verdict"] for r in rows}
    assert verdicts[2, 1, "final"] == "2 better"
    assert verdicts[1, 3, "final"] == "not resolved at n = 10"
    assert all(r["seeds_needed"] for r in rows if r["x"] == 1)               # a power estimate where unresolved
    one_seed = {2: {"return": np.array([[1.0, 300.0]]), "seeds": [1]}, 1: {"return": np.array([[1.0, 100.0]]),
                                                                           "seeds": [1]}}
    rows = ex.comparisons(one_seed, [(2, 1)])    # one seed: the bootstrap interval is a point, nothing is resolved
    assert [(r["seeds_needed"], r["verdict"]) for r in rows] == [("", "not resolved at n = 1")] * 2


def test_collapse_dynamics_follow_the_written_criterion():
    """Collapsed: effective rank below 1.5 in at least 90% of the updates after the first 10k steps."""
    grid = np.arange(512, 100_352 + 1, 512)
    stays = np.where(grid < 5_000, 8.0, 1.1)                                   # collapses early and stays
    escapes = np.where((grid > 3_000) & (grid < 40_000), 1.1, 6.0)          # collapses, then escapes
    never = np.full(len(grid), 12.0)
    assert ex.collapse_dynamics(grid, stays) == (1.0, True, "never")
    share, collapsed, escape = ex.collapse_dynamics(grid, escapes)
    assert not collapsed and 0.2 < share < 0.4 and escape == grid[grid < 40_000][-1] + 512
    assert ex.collapse_dynamics(grid, never) == (0.0, False, "-")



# ---------------------------------------------------------------------------------------------- sweeps that survive
SWEEP_FLAGS = ["collapse", "--seeds", "1", *TINY_METHOD]


@pytest.fixture(scope="module")
def contested_sweep(tmp_path_factory):
    """A tiny collapse sweep, run to the end while a second sweep tries the same folder (one sweep's cost serves
    the lock test and the tests of a finished sweep). Returns the folder (root), the first sweep's process and its
    stderr, the second sweep's result, and whether the first was still running when the second was refused."""
    root = tmp_path_factory.mktemp("finished")
    sweep = root / "sweep"
    first = start_script(*SWEEP_FLAGS, "--sweep-dir", str(sweep), "--plots-dir", str(root / "plots"), cwd=root,
                         script=HARNESS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = sweep / "collapse" / "sweep.lock"
    deadline = time.time() + 60
    while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline:
        time.sleep(0.1)
    second = run_harness(*SWEEP_FLAGS, "--sweep-dir", str(sweep), cwd=root)
    ex.lock_sweep(root / "other" / "collapse").close()              # another folder's lock is free meanwhile
    first_held_lock = first.poll() is None                          # the second tried while the first was running
    _, err = first.communicate(timeout=300)
    return SimpleNamespace(root=root, first=first, first_err=err, second=second, first_held_lock=first_held_lock)


@pytest.fixture(scope="module")
def finished_sweep(contested_sweep):
    """The tiny finished collapse sweep: its run folders are damaged, one way each, in copies."""
    assert contested_sweep.first.returncode == 0, contested_sweep.first_err
    return contested_sweep.root


def test_a_second_sweep_into_the_same_folder_is_refused_and_the_first_finishes(contested_sweep):
    first, second, sweep = contested_sweep.first, contested_sweep.second, contested_sweep.root / "sweep"
    assert contested_sweep.first_held_lock
    assert second.returncode == 2, second.stderr
    assert f"{sweep / 'collapse'} is in use by another sweep (process {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, contested_sweep.first_err        # the first, undisturbed, finishes
    assert len(ex.finished_runs(sweep / "collapse")) == len(ex.COLLAPSE_ARMS)


def test_collapse_sweep_writes_its_figure_and_one_row_per_arm(finished_sweep, tmp_path):
    plots = finished_sweep / "plots"
    assert (plots / "collapse.png").is_file()
    columns, rows = read_rows(plots / "collapse_summary.csv")
    assert [r["arm"] for r in rows] == list(ex.COLLAPSE_ARMS)
    assert {"seeds", "collapsed_seeds", "collapsed_share_iqm", "escape_step_per_seed", "final_iqm", "final_ci_low",
            "final_ci_high", "auc_iqm", "final_var", "final_effective_rank", "probe_r2_theta", "probe_r2_theta_dot",
            "return_mean"} <= set(columns)
    assert all(r["seeds"] == "1" for r in rows)
    _, pairs = read_rows(plots / "collapse_comparisons.csv")              # each remedy against JEPA alone
    assert [(r["x"], r["y"], r["measure"]) for r in pairs] == [
        (arm, "JEPA only", measure) for arm in list(ex.COLLAPSE_ARMS)[1:] for measure in ("final", "auc")]
    config = json.loads((finished_sweep / "sweep" / "collapse" / "jepa-norlgrad-noreg-seed1" / "config.json").read_text())
    assert all(config[k] == v for k, v in ex.COLLAPSE_SETTING.items())           # the collapse setting
    x100 = json.loads((finished_sweep / "sweep" / "collapse" / "jepa-norlgrad-reg-regcoef100-seed1" / "config.json")
                      .read_text())                                       # and the arm's own change on top of it
    assert x100["reg"] and x100["reg_coef"] == 100.0 and config["reg_coef"] == 1.0
    assert all(x100[k] == v for k, v in ex.COLLAPSE_SETTING.items())
    again = run_harness("plot", "--sweep-dir", str(finished_sweep / "sweep"), "--plots-dir", str(tmp_path),
                        *TINY_METHOD, cwd=tmp_path)                       # `plot` redraws it from the finished runs
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "collapse.png").is_file()
    assert (tmp_path / "collapse_summary.csv").read_text() == (plots / "collapse_summary.csv").read_text()


def test_a_sweep_killed_with_sigkill_resumes_to_the_summary_of_an_uninterrupted_one(finished_sweep, tmp_path):
    """kill -9 of the sweep and its workers mid-run; the rerun redoes the unfinished runs (the lock died with
    the process) and ends with the same summary as a sweep that was never interrupted, wall time aside."""
    flags = [*SWEEP_FLAGS, "--workers", "1"]                      # the fixture's sweep is the uninterrupted one
    sweep = tmp_path / "killed"
    victim = start_script(*flags, "--sweep-dir", str(sweep), "--plots-dir", str(tmp_path / "p2"), cwd=tmp_path,
                          script=HARNESS, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not ex.finished_runs(sweep / "collapse") and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)                                  # the sweep and its worker, at once
    victim.wait()
    assert len(ex.finished_runs(sweep / "collapse")) < len(ex.COLLAPSE_ARMS)
    again = run_harness(*SWEEP_FLAGS, "--workers", "2", "--sweep-dir", str(sweep), "--plots-dir", str(tmp_path / "p2"),
                        cwd=tmp_path)                                       # the rerun may use more workers
    assert again.returncode == 0, again.stderr
    drop_wall = lambda rows: [{k: v for k, v in r.items() if k != "wall_s_per_run"} for r in rows]
    assert drop_wall(read_rows(tmp_path / "p2" / "collapse_summary.csv")[1]) == \
        drop_wall(read_rows(finished_sweep / "plots" / "collapse_summary.csv")[1])


DAMAGES = {  # name: (file, what is done to it, words of the message)
    "config.json truncated": ("config.json", lambda f: f.write_text('{"seed": 1'), "config.json cannot be read"),
    "config.json lacks a key": ("config.json", lambda f: f.write_text(json.dumps(
        {k: v for k, v in json.loads(f.read_text()).items() if k != "depth"})), "config.json lacks depth"),
    "model.pt truncated": ("model.pt", lambda f: f.write_bytes(f.read_bytes()[:1000]), "model.pt is missing, trunc"),
    "updates.csv truncated": ("updates.csv", lambda f: f.write_text("\n".join(f.read_text().splitlines()[:2])),
                              "updates.csv is truncated"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_run_folder_gets_a_message_naming_the_file(damage, finished_sweep, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    shutil.copytree(finished_sweep / "sweep", sweep)
    run = sweep / "collapse" / "jepa-rlgrad-noreg-seed1"
    file, harm, words = DAMAGES[damage]
    harm(run / file)
    for mode in ("eval", "gif"):                                  # exit 2 and a message naming the file
        with pytest.raises(SystemExit) as exit_info:
            ex.main([mode, str(run)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and str(run / file) in err and words in err, err
    if file != "model.pt":                                        # `plot` skips the run and draws the others
        ex.main(["plot", "--sweep-dir", str(sweep), "--plots-dir", str(tmp_path / "plots"), *TINY_METHOD])
        out = capsys.readouterr().out
        assert "warning" in out and str(run / file) in out
        rows = read_rows(tmp_path / "plots" / "collapse_summary.csv")[1]
        assert [r["arm"] for r in rows] == [arm for arm in ex.COLLAPSE_ARMS if arm != "JEPA + RL gradients"]
    ex.main([*SWEEP_FLAGS, "--sweep-dir", str(sweep), "--plots-dir", str(tmp_path / "plots")])
    arms = len(ex.COLLAPSE_ARMS)
    assert f"{arms - 1}/{arms} runs already finished" in capsys.readouterr().out   # it redoes the damaged run
    assert ex.check_run(run, need_model=True) is None



def test_printed_commands_make_the_runs_that_plot_collects(tmp_path, monkeypatch, capsys):
    """--print-commands: one shell line per run still to do, for any scheduler; run them, then `plot` collects
    every finished run of the folder, whatever its seed."""
    sweep = tmp_path / "sweep"
    monkeypatch.chdir(tmp_path)
    ex.main([*SWEEP_FLAGS, "--seeds", "2", "--sweep-dir", str(sweep), "--print-commands"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * len(ex.COLLAPSE_ARMS)                                # 2 seeds of every arm
    assert all(line.startswith("python jepa_cartpole.py ") for line in lines)
    assert all("--predictor-lr-scale" in line for line in lines)                 # the collapse setting travels
    train, inspect = lines[1].split(" && ")                                         # JEPA only, seed 2
    assert inspect.startswith("python plots/experiments.py inspect ")
    for command, script in ((train, SCRIPT), (inspect, HARNESS)):
        result = subprocess.run([sys.executable, str(script), *shlex.split(command)[2:]], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    ex.main([*SWEEP_FLAGS, "--seeds", "2", "--sweep-dir", str(sweep), "--print-commands"])
    assert capsys.readouterr().out.strip().splitlines() == lines[:1] + lines[2:]   # only the unfinished ones remain
    ex.main(["plot", "--sweep-dir", str(sweep), "--plots-dir", str(tmp_path / "plots"), *TINY_METHOD])
    rows = read_rows(tmp_path / "plots" / "collapse_summary.csv")[1]
    assert [(r["arm"], r["return_per_seed"].split(":")[0]) for r in rows] == [("JEPA only", "2")]
