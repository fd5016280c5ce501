"""The paper's mechanisms as executable facts. Run: python -m pytest -q

Each test states one thing the method relies on; if the implementation broke it, the test would fail.
"""

import copy
import csv
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import jepa_cartpole as jc

SCRIPT = Path(__file__).with_name("jepa_cartpole.py")
H, W, PATCH, D = 16, 64, 8, 64
TINY = ["--total-steps", "128", "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2",
        "--update-epochs", "1", "--depth", "1", "--threads", "1"]


def small_encoder(depth=1):
    torch.manual_seed(0)
    return jc.ViTEncoder(H, W, PATCH, D, depth=depth, heads=4, mlp_ratio=2)


def random_states(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(-2.4, 2.4, n), rng.normal(0, 1, n),
                     rng.uniform(-0.25, 0.25, n), rng.normal(0, 1, n)], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------- pixels
def test_numpy_renderer_draws_the_same_scene_as_gymnasium():
    states = random_states(24)
    ours = jc.render_frames(states, H, W)
    theirs = jc.GymnasiumRenderer(H, W)(states)
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
    # moving the cart by a tenth of an image pixel changes the picture: velocity is visible from frame to frame
    states = np.zeros((2, 4), np.float32)
    states[1, 0] = 0.1 * (4.8 / W)
    frames = jc.render_frames(states, H, W)
    assert (frames[0] != frames[1]).any()


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
    (the next x-window) is [f(t-1), f(t), f(t+1)], and all six frames come from one episode.
    """
    n = 3
    envs = gym.make_vec("CartPole-v1", num_envs=n, vectorization_mode="vector_entry_point")
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
        window, _, _, _, ended, valid = jc.step_pixels(envs, np.ones(n, dtype=np.int64), window, last_ended,
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


# ---------------------------------------------------------------------------------------------- encoder
def test_shapes():
    enc = small_encoder()
    windows = torch.randint(0, 256, (5, 3, H, W), dtype=torch.uint8)
    assert enc.positional_encoding().shape == (3 * (H // PATCH) * (W // PATCH), D)
    s_x = enc(windows)
    assert s_x.shape == (5, D)
    pred = jc.Predictor(D, 32, num_actions=2)(s_x, torch.tensor([0, 1, 0, 1, 1]))
    assert pred.shape == (5, D)


def test_cls_only_last_block_gives_the_same_embedding():
    enc = small_encoder(depth=2)
    windows = torch.randint(0, 256, (6, 3, H, W), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(enc(windows, cls_only_last_block=True), enc(windows, cls_only_last_block=False))


def test_positional_encoding_tells_frames_apart():
    enc = small_encoder()
    pos = enc.positional_encoding().view(3, -1, D)            # (frame, patch, D)
    assert not torch.allclose(pos[0], pos[1]) and not torch.allclose(pos[1], pos[2])
    # A cart moving right, and the same three frames played backwards (moving left): only the frame index
    # tells these apart. Without it, a transformer over a set of tokens gives the same s_x for both.
    states = np.zeros((3, 4), np.float32)
    states[:, 0] = [-0.3, 0.0, 0.3]
    forward = torch.from_numpy(jc.render_frames(states, H, W))[None]   # (1, 3, H, W)
    backward = forward.flip(1)
    with torch.no_grad():
        assert not torch.allclose(enc(forward), enc(backward), atol=1e-6)
        enc.frame_pos.zero_()
        assert torch.allclose(enc(forward), enc(backward), atol=1e-5)


def test_predictor_uses_the_action():
    pred = jc.Predictor(D, 32, num_actions=2)
    s_x = torch.randn(1, D)
    assert not torch.allclose(pred(s_x, torch.tensor([0])), pred(s_x, torch.tensor([1])))


# ---------------------------------------------------------------------------------------------- y-encoder
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
    assert all(torch.equal(a, b) for a, b in zip(y_enc.parameters(), x_enc.parameters()))


def test_ema_blends_with_tau():
    x_enc = small_encoder()
    y_enc = jc.make_y_encoder(x_enc)
    with torch.no_grad():
        for p in y_enc.parameters():
            p.zero_()
    jc.ema_update(y_enc, x_enc, tau=0.99)
    for a, b in zip(y_enc.parameters(), x_enc.parameters()):
        torch.testing.assert_close(a, 0.01 * b)


def test_y_encoder_starts_equal_and_never_receives_gradients():
    x_enc = small_encoder()
    y_enc = jc.make_y_encoder(x_enc)
    assert all(torch.equal(a, b) for a, b in zip(y_enc.parameters(), x_enc.parameters()))
    predictor = jc.Predictor(D, 32, 2)
    windows = torch.randint(0, 256, (8, 3, H, W), dtype=torch.uint8)
    s_x, s_y = x_enc(windows), y_enc(windows.roll(1, 0))       # no torch.no_grad() here on purpose
    loss = jc.jepa_loss(predictor(s_x, torch.zeros(8, dtype=torch.long)), s_y) + jc.variance_regulariser(s_y)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in y_enc.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in x_enc.parameters())


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("rl_grad", [True, False])
def test_rl_grad_switch_controls_whether_ppo_trains_the_encoder(rl_grad):
    enc = small_encoder()
    actor, critic = jc.make_heads(D, 2)
    windows = torch.randint(0, 256, (8, 3, H, W), dtype=torch.uint8)
    s_rl = jc.rl_input(enc(windows), rl_grad)
    args = jc.build_parser().parse_args([])
    actions = torch.randint(0, 2, (8,))
    policy_loss, value_loss, entropy, _ = jc.ppo_losses(actor(s_rl), critic(s_rl).squeeze(-1), actions,
                                                        torch.full((8,), -0.69), torch.randn(8), torch.randn(8), args)
    (policy_loss + value_loss - 0.01 * entropy).backward()
    encoder_grad = sum(p.grad.abs().sum().item() for p in enc.parameters() if p.grad is not None)
    assert (encoder_grad > 0) == rl_grad
    assert all(p.grad is not None for p in actor.parameters())   # the heads learn either way


# ---------------------------------------------------------------------------------------------- losses
def test_eq1_jepa_loss_is_the_squared_euclidean_distance():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    # ||(0, 2)||^2 = 4 and ||(-3, -4)||^2 = 25, averaged over the batch
    assert jc.jepa_loss(pred, target).item() == pytest.approx(14.5)


def test_eq2_regulariser_rewards_variance_and_is_clamped_at_1():
    s = torch.tensor([[0.0, 0.0], [0.2, 0.4]])
    # unbiased batch variances: 0.02 and 0.08 -> mean 0.05 -> L_reg = -0.05
    assert jc.variance_regulariser(s).item() == pytest.approx(-0.05)
    assert jc.embedding_variance(s).item() == pytest.approx(0.05)
    wide = torch.tensor([[0.0, 0.0], [4.0, 6.0]])                  # variances 8 and 18: clamped
    assert jc.variance_regulariser(wide).item() == -1.0
    wide.requires_grad_(True)
    jc.variance_regulariser(wide).backward()
    assert wide.grad.abs().sum() == 0                              # variance >= 1: no push any more
    collapsed = torch.ones(4, 3, requires_grad=True)
    assert jc.variance_regulariser(collapsed).item() == 0.0


def test_eq3_total_loss_follows_the_switches():
    args = jc.build_parser().parse_args([])
    a, c, j, r = (torch.tensor(v) for v in (1.0, 2.0, 10.0, -0.5))
    for jepa, reg, expected in [(False, False, 3.0), (True, False, 13.0), (True, True, 12.5), (False, True, 2.5)]:
        args.jepa, args.reg = jepa, reg
        assert jc.total_loss(a, c, j, r, args).item() == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------- PPO
def test_gae_with_a_termination_and_a_truncation():
    gamma, lam = 0.9, 0.5
    # one env, 4 steps: step 1 terminates (pole fell), step 3 is truncated (time limit) -> bootstrap from V[4]
    rewards = torch.tensor([[1.0], [1.0], [1.0], [1.0]])
    values = torch.tensor([[0.5], [0.4], [0.3], [0.2], [10.0]])
    terminated = torch.tensor([[0.0], [1.0], [0.0], [0.0]])
    episode_end = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    adv, ret = jc.compute_gae(rewards, values, terminated, episode_end, gamma, lam)
    d3 = 1 + 0.9 * 10.0 - 0.2            # truncation: bootstrapped with V(final window)
    d2 = 1 + 0.9 * 0.2 - 0.3
    a2 = d2 + 0.9 * 0.5 * d3
    d1 = 1 + 0.0 - 0.4                   # termination: no future value
    d0 = 1 + 0.9 * 0.4 - 0.5
    a0 = d0 + 0.9 * 0.5 * d1
    torch.testing.assert_close(adv[:, 0], torch.tensor([a0, d1, a2, d3]))
    torch.testing.assert_close(ret, adv + values[:-1])


# ---------------------------------------------------------------------------------------------- whole runs
def run_script(*flags, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=cwd, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.parametrize("jepa", ["--jepa", "--no-jepa"])
@pytest.mark.parametrize("rl_grad", ["--rl-grad", "--no-rl-grad"])
@pytest.mark.parametrize("reg", ["--reg", "--no-reg"])
def test_every_switch_combination_trains_end_to_end(jepa, rl_grad, reg, tmp_path):
    result = run_script(jepa, rl_grad, reg, *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    name = "-".join(flag[2:].replace("-", "") for flag in (jepa, rl_grad, reg))   # e.g. nojepa-rlgrad-reg
    out = tmp_path / "runs" / f"{name}-seed1"
    assert out.is_dir(), list((tmp_path / "runs").iterdir())
    with open(out / "updates.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {"step", "jepa_loss", "reg_loss", "policy_loss", "value_loss", "entropy",
                               "embedding_var", "sps"} <= set(rows[0])
    assert (out / "episodes.csv").read_text().startswith("step,return,length")
    assert (out / "config.json").exists()


def test_same_seed_gives_identical_episodes(tmp_path):
    logs = []
    for k in range(2):
        result = run_script(*TINY, "--total-steps", "256", "--seed", "7", "--out", str(tmp_path / f"run{k}"),
                            cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        logs.append((tmp_path / f"run{k}" / "episodes.csv").read_text())
    assert logs[0] == logs[1] and logs[0].count("\n") > 5


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("flags, message", [
    (["--image-height", "20"], "--patch-size"),
    (["--num-envs", "3", "--num-steps", "5", "--num-minibatches", "4"], "--num-minibatches"),
    (["--total-steps", "100"], "--total-steps"),
])
def test_bad_input_is_refused_and_writes_nothing(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        jc.parse_args([*flags, "--out", str(out)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "episodes.csv").write_text("precious")
    with pytest.raises(SystemExit):
        jc.parse_args(["--out", str(out)])
    assert "--out" in capsys.readouterr().err and (out / "episodes.csv").read_text() == "precious"
    assert jc.parse_args(["--out", str(out), "--overwrite"]).out == out


def test_non_finite_loss_stops_with_a_message_and_keeps_the_logs(tmp_path, monkeypatch):
    monkeypatch.setattr(jc, "jepa_loss", lambda pred, target: torch.tensor(float("nan")))
    args = jc.parse_args([*TINY, "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exit_info:
        jc.train(args)
    assert "non-finite loss" in str(exit_info.value.code)
    assert (tmp_path / "run" / "episodes.csv").read_text().startswith("step,return,length")
    assert (tmp_path / "run" / "updates.csv").read_text().startswith("step,")


# ---------------------------------------------------------------------------------------------- beyond the paper
def test_linear_probe_reads_a_linear_embedding_and_nothing_from_a_constant_one():
    torch.manual_seed(0)
    states = torch.from_numpy(random_states(400))
    mixing = torch.randn(4, D)
    linear = states @ mixing + 0.01 * torch.randn(400, D)          # s_x = a linear function of the state
    r2 = jc.linear_probe_r2(linear[:200], states[:200], linear[200:], states[200:])
    assert (r2 > 0.99).all()
    constant = torch.ones(400, D)                                  # a collapsed encoder
    r2 = jc.linear_probe_r2(constant[:200], states[:200], constant[200:], states[200:])
    assert (r2.abs() < 0.05).all()


def test_state_reference_refuses_the_jepa_switches(capsys):
    for flag in ("--jepa", "--no-rl-grad", "--reg"):
        with pytest.raises(SystemExit):
            jc.parse_args(["--obs", "state", flag])
        assert flag in capsys.readouterr().err
    args = jc.parse_args(["--obs", "state", "--out", "unused"])
    assert (args.jepa, args.rl_grad, args.reg) == (False, False, False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run trained in this process, with its networks as they were at the end of training."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    summary, networks = jc.train(jc.parse_args([*TINY, "--out", str(out)]))
    return out, networks


def test_checkpoint_round_trip_gives_identical_actions(tiny_run):
    out, (x_encoder, _, _, actor, _) = tiny_run
    _, (loaded_encoder, _, _, loaded_actor, _) = jc.load_run(out)
    windows = torch.from_numpy(jc.render_frames(random_states(30), H, W)).view(10, 3, H, W)
    with torch.no_grad():
        torch.testing.assert_close(loaded_actor(loaded_encoder(windows)), actor(x_encoder(windows)))
    assert (jc.greedy_actions(loaded_encoder, loaded_actor, windows)
            == jc.greedy_actions(x_encoder, actor, windows)).all()


def test_eval_and_gif_run_on_a_trained_run(tiny_run, tmp_path):
    out, _ = tiny_run
    result = run_script("--eval", str(out), "--eval-episodes", "3", cwd=tmp_path)
    assert result.returncode == 0 and "greedy return over 3 episodes" in result.stdout, result.stderr
    result = run_script("--gif", str(out), "--plots-dir", str(tmp_path / "plots"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "plots" / "agent.gif").read_bytes()[:6] == b"GIF89a"


def test_figure3_sweep_is_resumable_and_writes_its_plots(tmp_path):
    flags = ["--figure3", "--seeds", "1", "--sweep-dir", str(tmp_path / "runs"), "--plots-dir",
             str(tmp_path / "plots"), *TINY]
    first = run_script(*flags, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    for name in ("figure3.png", "figure3_summary.csv", "figure3_curves.csv", "probe.png", "observation.png"):
        assert (tmp_path / "plots" / name).exists(), name
    with open(tmp_path / "plots" / "figure3_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == ["1", "2", "3", "4"]
    assert {"jepa", "rl_grad", "reg", "seeds", "return_mean", "return_std", "best_return_mean",
            "final_embedding_var", "collapsed_seeds", "wall_s_per_run"} <= set(rows[0])
    finished = (tmp_path / "runs" / "jepa-rlgrad-noreg-seed1" / "episodes.csv").read_text()
    (tmp_path / "runs" / "state-seed1" / "summary.json").unlink()          # as if killed before the end
    again = run_script(*flags, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "4/5 runs already finished" in again.stdout                      # only the unfinished run is redone
    assert (tmp_path / "runs" / "jepa-rlgrad-noreg-seed1" / "episodes.csv").read_text() == finished
    assert (tmp_path / "runs" / "state-seed1" / "summary.json").exists()
