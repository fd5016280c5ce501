"""
jepa_cartpole.py: a Joint-Embedding Predictive Architecture (JEPA) that trains a PPO agent on pixel Cart Pole.

A single-file reference implementation of
    Kenneweg, Kenneweg & Hammer, "JEPA for RL: Investigating Joint-Embedding Predictive Architectures
    for Reinforcement Learning", ESANN 2025 (arXiv 2504.16591).

The paper's claim: a vision transformer trained with a JEPA loss (predict the embedding of the *next* frames
from the embedding of the current frames, in latent space, never in pixels) learns a compact state s_x that a
PPO agent can act on; the JEPA loss alone collapses (every image -> the same embedding), and either the RL
gradients or a variance regulariser prevent that.

    frames f(t-2) f(t-1) f(t)                  frames f(t-1) f(t) f(t+1)
              |                                           |
     x-encoder (ViT, CLS token)  --- EMA of weights -->  y-encoder (same ViT, no gradient)
              |                                           |
             s_x  --+--> actor  (PPO policy)             s_y
              |     +--> critic (PPO value)               |
              |                                           |
     predictor(s_x, action) ------- Eq. 1: || pred - s_y ||^2 -------+
     Eq. 2: -min(1, mean batch variance of s_x)   (collapse guard)
     Eq. 3: total = actor + critic + JEPA (+ regulariser)

The paper's four configurations (Section 3, Figure 3):
    python jepa_cartpole.py --no-jepa --rl-grad    --no-reg   # 1: baseline, encoder trained by PPO only
    python jepa_cartpole.py --jepa    --rl-grad    --no-reg   # 2: JEPA + RL gradients (the paper's best)
    python jepa_cartpole.py --jepa    --no-rl-grad --no-reg   # 3: JEPA only: collapses
    python jepa_cartpole.py --jepa    --no-rl-grad --reg      # 4: JEPA + regulariser: no collapse, slower
and the default set-up command of the README:
    python jepa_cartpole.py --jepa --rl-grad --reg

Read it top to bottom: settings -> pixel Cart Pole -> ViT x-encoder -> EMA y-encoder -> predictor ->
losses (Eq. 1-3) -> gradient propagation -> PPO -> the training loop -> Figure 3 experiments and plots ->
using a trained agent. Other modes: --figure3, --plot, --eval RUN_DIR, --gif RUN_DIR, --obs state (--help).
Shape comments use B = batch, N = number of envs, T = rollout length, F = 3 frames, P = patches per frame,
D = embedding width.
"""

import argparse
import copy
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ======================================================================================================
# 1. Settings
# ======================================================================================================
# Everything the paper fixes has the paper's value as its default (d = 64, tau = 0.99, the three switches,
# 100k steps). Everything it leaves open (image size, ViT size, PPO settings) is our choice, explained in the
# flag's help text.

CONFIGURATIONS_HELP = """
the paper's four configurations (Section 3):
  1  --no-jepa --rl-grad    --no-reg   baseline: encoder trained by the actor/critic losses only
  2  --jepa    --rl-grad    --no-reg   JEPA + RL gradients: the paper's best
  3  --jepa    --no-rl-grad --no-reg   JEPA only: the encoder collapses
  4  --jepa    --no-rl-grad --reg      JEPA + variance regulariser: no collapse, learns more slowly
the other four switch combinations run too (they are not in the paper).
"""


def build_parser():
    p = argparse.ArgumentParser(
        description="JEPA + PPO on pixel Cart Pole (Kenneweg et al., ESANN 2025).",
        epilog=CONFIGURATIONS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bool_flag = argparse.BooleanOptionalAction
    # --- the paper's three switches
    # (None = not given: pixels mode then uses the default in brackets; --obs state refuses them)
    p.add_argument("--jepa", action=bool_flag, default=None,
                   help="add the JEPA loss of Eq. 1 to the encoder's training signal [on]")
    p.add_argument("--rl-grad", action=bool_flag, default=None,
                   help="let actor and critic gradients flow into the x-encoder (--no-rl-grad detaches s_x) [on]")
    p.add_argument("--reg", action=bool_flag, default=None,
                   help="add the variance regulariser of Eq. 2 [off, as in configs 1-3]")
    p.add_argument("--obs", choices=["pixels", "state"], default="pixels",
                   help="pixels: the paper's set-up. state: a reference that is not in the paper, the same PPO "
                        "on the true 4-number state, with no encoder (so no JEPA switches)")
    # --- the run
    p.add_argument("--seed", type=int, default=1, help="seeds torch, numpy and the environments")
    p.add_argument("--total-steps", type=int, default=100_000,
                   help="environment steps, summed over all envs (the paper plots the first 100k)")
    p.add_argument("--num-envs", type=int, default=16,
                   help="parallel Cart Poles; more envs = bigger, cheaper batches for the network")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 keeps torch's default (one per core)")
    p.add_argument("--out", type=Path, default=None,
                   help="run folder; default runs/<jepa|nojepa>-<rlgrad|norlgrad>-<reg|noreg>-seed<k>")
    p.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty --out")
    p.add_argument("--probe-every", type=int, default=1,
                   help="fit the linear probe of the true state every this many updates (0: never)")
    # --- experiments (Section 3, Figure 3)
    p.add_argument("--figure3", action="store_true",
                   help="run the paper's 4 configurations x --seeds seeds x --total-steps, then --plot. "
                        "Resumable: finished runs are skipped, unfinished ones redone")
    p.add_argument("--plot", action="store_true", help="draw plots/figure3.png and its tables from --sweep-dir")
    p.add_argument("--sweep-dir", type=Path, default=Path("runs/figure3"), help="where --figure3 keeps its runs")
    p.add_argument("--plots-dir", type=Path, default=Path("plots"), help="where --plot writes figures and tables")
    p.add_argument("--seeds", type=int, default=5, help="seeds per configuration for --figure3 (paper: 5)")
    p.add_argument("--workers", type=int, default=2,
                   help="--figure3 runs this many runs side by side, one torch thread each (2 cores: 2)")
    p.add_argument("--window", type=int, default=20, help="episodes in the running average of the return plot")
    p.add_argument("--reference", action=bool_flag, default=True,
                   help="--figure3 also runs the state-based PPO reference (--obs state), drawn dashed")
    p.add_argument("--eval", type=Path, metavar="RUN_DIR",
                   help="load RUN_DIR/model.pt, play --eval-episodes episodes greedily, report mean +- std")
    p.add_argument("--eval-episodes", type=int, default=20, help="episodes for --eval")
    p.add_argument("--gif", type=Path, metavar="RUN_DIR",
                   help="write <plots-dir>/agent.gif: one greedy episode of RUN_DIR's agent, the full scene "
                        "beside the three frames its encoder receives")
    p.add_argument("--benchmark-renderer", action="store_true",
                   help="time render_frames against gymnasium's own render (+ crop, downsample), then exit")
    p.add_argument("--renderer", choices=["numpy", "gymnasium"], default="numpy",
                   help="numpy: our fast vectorised drawing; gymnasium: gymnasium's own pygame rgb_array "
                        "render, cropped and downsampled the same way (slow, for checking)")
    # --- pixels and the ViT (the paper fixes only d = 64)
    p.add_argument("--image-height", type=int, default=16,
                   help="rows of the grayscale frame; the crop keeps the band where cart and pole live")
    p.add_argument("--image-width", type=int, default=64,
                   help="columns of the grayscale frame; the full 4.8-unit track is always visible")
    p.add_argument("--patch-size", type=int, default=8, help="square patch side in pixels")
    p.add_argument("--embed-dim", type=int, default=64, help="d, the width of s_x (paper: 64)")
    p.add_argument("--depth", type=int, default=2, help="transformer blocks in each encoder")
    p.add_argument("--heads", type=int, default=4, help="attention heads per block")
    p.add_argument("--mlp-ratio", type=int, default=2, help="hidden width of the block MLP, in units of d")
    p.add_argument("--predictor-hidden", type=int, default=128, help="hidden width of the two-layer predictor")
    p.add_argument("--ema-tau", type=float, default=0.99,
                   help="y-encoder EMA rate: theta_y <- tau*theta_y + (1-tau)*theta_x (paper: 0.99)")
    p.add_argument("--jepa-coef", type=float, default=1.0,
                   help="weight of Eq. 1 in Eq. 3 (the paper's sum has no weights: 1)")
    p.add_argument("--reg-coef", type=float, default=1.0,
                   help="weight of Eq. 2 in Eq. 3 (the paper's sum has no weights: 1)")
    p.add_argument("--final-norm", action=bool_flag, default=True,
                   help="LayerNorm on the CLS output, as in a standard ViT (the paper does not say). It fixes "
                        "each s_x's scale across its d features (up to a learned gain); without it config 2 "
                        "learned far slower (README: what mattered)")
    p.add_argument("--fresh-targets", action=bool_flag, default=False,
                   help="recompute s_y with the current y-encoder for every minibatch (+1 forward pass each); "
                        "default: once per rollout, the y-encoder then lags by the update's EMA steps")
    # --- PPO (CleanRL's Cart Pole settings, except the rollout shape and no value-loss clipping)
    p.add_argument("--num-steps", type=int, default=32, help="rollout length per env between updates")
    p.add_argument("--num-minibatches", type=int, default=8,
                   help="minibatches per epoch; 8 (of 64 transitions) gives twice CleanRL's optimiser steps for "
                        "the same compute, which the ViT needs (README: what mattered)")
    p.add_argument("--update-epochs", type=int, default=4, help="passes over each rollout")
    p.add_argument("--learning-rate", type=float, default=5e-4,
                   help="Adam learning rate (start value); CleanRL's 2.5e-4 is too slow for the encoder "
                        "(README: what mattered)")
    p.add_argument("--anneal-lr", action=bool_flag, default=True, help="decay the learning rate linearly to 0")
    p.add_argument("--gamma", type=float, default=0.99, help="discount factor")
    p.add_argument("--gae-lambda", type=float, default=0.95, help="lambda of generalised advantage estimation")
    p.add_argument("--clip-coef", type=float, default=0.2, help="PPO ratio clipping")
    p.add_argument("--ent-coef", type=float, default=0.01, help="entropy bonus weight")
    p.add_argument("--vf-coef", type=float, default=0.5, help="value loss weight")
    p.add_argument("--max-grad-norm", type=float, default=5.0,
                   help="gradient clipping (total norm over all trained networks). Not CleanRL's 0.5: the JEPA "
                        "loss brings gradient norms of ~100, and 0.5 learned far slower (README: what mattered)")
    return p


def run_name(obs, jepa, rl_grad, reg):
    if obs == "state":
        return "state"
    return f"{'jepa' if jepa else 'nojepa'}-{'rlgrad' if rl_grad else 'norlgrad'}-{'reg' if reg else 'noreg'}"


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    switches = {"jepa": True, "rl_grad": True, "reg": False}          # pixels defaults: configuration 2
    if args.obs == "state":
        given = [f"--{'' if getattr(args, k) else 'no-'}{k.replace('_', '-')}" for k in switches
                 if getattr(args, k) is not None]
        if given:
            parser.error(f"{' '.join(given)}: --obs state trains PPO on the true state with no encoder, "
                         "so the JEPA switches do not apply")
        switches = dict.fromkeys(switches, False)
    for k, default in switches.items():
        if getattr(args, k) is None:
            setattr(args, k, default)
    # Bad input is refused here, before anything is written.
    if args.image_height % args.patch_size or args.image_width % args.patch_size:
        parser.error(f"--patch-size {args.patch_size} must divide --image-height {args.image_height} "
                     f"and --image-width {args.image_width}")
    if args.embed_dim % args.heads:
        parser.error(f"--heads {args.heads} must divide --embed-dim {args.embed_dim}")
    for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "total_steps", "depth"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.ema_tau <= 1.0:
        parser.error("--ema-tau must lie in [0, 1]")

    # Derived sizes, all in one place (CleanRL style).
    args.batch_size = args.num_envs * args.num_steps                 # transitions per rollout
    if args.batch_size % args.num_minibatches:
        parser.error(f"--num-minibatches {args.num_minibatches} must divide the batch "
                     f"--num-envs x --num-steps = {args.batch_size}")
    if args.total_steps < args.batch_size:
        parser.error(f"--total-steps {args.total_steps} is smaller than one rollout "
                     f"(--num-envs x --num-steps = {args.batch_size})")
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.num_updates = math.ceil(args.total_steps / args.batch_size)  # whole rollouts, at least total-steps
    args.patches_per_frame = (args.image_height // args.patch_size) * (args.image_width // args.patch_size)
    args.tokens = 1 + 3 * args.patches_per_frame                      # CLS + the patches of 3 frames

    if args.figure3 or args.plot or args.benchmark_renderer or args.eval or args.gif:
        args.out = None                 # these modes write elsewhere (--sweep-dir, --plots-dir) or nothing
    elif args.out is None:
        args.out = Path("runs") / f"{run_name(args.obs, args.jepa, args.rl_grad, args.reg)}-seed{args.seed}"
    if args.out is not None and args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} exists and is not empty; pick another --out or pass --overwrite")
    if args.device == "auto":
        args.device = ("cuda" if torch.cuda.is_available()
                       else "mps" if torch.backends.mps.is_available() else "cpu")
    return args


# ======================================================================================================
# 2. Pixel Cart Pole (paper Section 3: "Cart Pole ... using pixel observations")
# ======================================================================================================
# Physics: gymnasium's CartPole-v1, natively vectorised. The agent never sees its 4-number state; we only use
# the state to *draw* the frame. Our renderer draws the same scene as gymnasium's own rgb_array renderer
# (a 600 x 400 screen showing 4.8 world units of track), but straight at the network's resolution and only
# the band of the screen where cart and pole can be: the sky above and the floor below carry no information.

SCREEN_WIDTH = 600.0                    # gymnasium's screen, in screen pixels
SCREEN_HEIGHT = 400.0
SCALE = SCREEN_WIDTH / 4.8              # screen pixels per world unit (world width = 2 * x_threshold)
CART_HALF_WIDTH, CART_HALF_HEIGHT = 25.0, 15.0
CART_Y = 100.0                          # cart centre (gymnasium calls it "carty"); the track line is here
AXLE_Y = CART_Y + CART_HALF_HEIGHT / 2  # the pole's pivot, 7.5 px above the cart centre
POLE_HALF_WIDTH = 5.0
POLE_LENGTH = SCALE * 1.0               # 2 * half-length 0.5 -> 125 px; drawn from -5 px to 120 px
AXLE_RADIUS = 5.0
CROP_BOTTOM = 80.0                      # screen y of the frame's bottom edge (just under the cart)
# Grayscale (ITU-R 601 luma) of gymnasium's colours: white sky, black cart and track, brown pole, blue axle.
SKY, CART_GRAY, POLE_GRAY, AXLE_GRAY = 255.0, 0.0, 161.0, 139.2


def box_coverage(offset, low, high, pixel):
    """Fraction of a pixel of width `pixel`, centred at `offset`, that lies inside [low, high].

    This is exact anti-aliasing (a box filter) for an edge aligned with the pixel grid: sub-pixel motion of
    the cart changes the gray level of its edge pixels, so the network can see motion smaller than a pixel.
    """
    return np.clip((np.minimum(offset + pixel / 2, high) - np.maximum(offset - pixel / 2, low)) / pixel, 0.0, 1.0)


def render_frames(states, height, width):
    """Draw Cart Pole frames from physics states, vectorised over envs.

    states: (N, 4) float array [x, x_dot, theta, theta_dot]. Returns (N, height, width) uint8 grayscale,
    white sky, dark objects, row 0 at the top, exactly the scene gymnasium draws (cropped, downsampled).
    """
    n = states.shape[0]
    pixel = SCREEN_WIDTH / width                                   # screen pixels per image pixel
    top = CROP_BOTTOM + height * pixel                             # screen y of the frame's top edge
    xs = ((np.arange(width) + 0.5) * pixel).astype(np.float32)    # (W,) pixel-centre screen x
    ys = (top - (np.arange(height) + 0.5) * pixel).astype(np.float32)  # (H,) pixel-centre screen y (y up)
    cart_x = (states[:, 0] * SCALE + SCREEN_WIDTH / 2).astype(np.float32)  # (N,)
    theta = states[:, 2].astype(np.float32)                        # (N,) radians, positive = leaning right

    image = np.full((n, height, width), SKY, dtype=np.float32)    # (N, H, W)

    def paint(coverage, gray):  # alpha-composite one shape, in gymnasium's drawing order
        image[:] = image + coverage * (gray - image)

    # Cart: an axis-aligned box, so its coverage is the product of two 1-D coverages.
    dx = xs[None, :] - cart_x[:, None]                                                   # (N, W)
    paint(box_coverage(dx, -CART_HALF_WIDTH, CART_HALF_WIDTH, pixel)[:, None, :]          # (N, 1, W)
          * box_coverage(ys - CART_Y, -CART_HALF_HEIGHT, CART_HALF_HEIGHT, pixel)[None, :, None], CART_GRAY)
    # Pole: the same box test in the pole's own rotated frame (along / across the pole).
    dx = dx[:, None, :]                                                                   # (N, 1, W)
    dy = (ys - AXLE_Y)[None, :, None]                                                     # (1, H, 1)
    sin, cos = np.sin(theta)[:, None, None], np.cos(theta)[:, None, None]                 # (N, 1, 1)
    along = dx * sin + dy * cos                                                           # (N, H, W)
    across = dx * cos - dy * sin                                                          # (N, H, W)
    paint(box_coverage(along, -POLE_HALF_WIDTH, POLE_LENGTH - POLE_HALF_WIDTH, pixel)
          * box_coverage(across, -POLE_HALF_WIDTH, POLE_HALF_WIDTH, pixel), POLE_GRAY)
    # Axle: a disc of radius 5 px; a one-pixel ramp on its distance is close enough at this size.
    paint(np.clip((AXLE_RADIUS - np.sqrt(dx * dx + dy * dy)) / pixel + 0.5, 0.0, 1.0), AXLE_GRAY)
    # Track: gymnasium's one-screen-pixel horizontal line at y = 100, drawn last.
    paint(box_coverage(ys - CART_Y, 0.0, 1.0, pixel)[None, :, None], CART_GRAY)
    return np.rint(image).astype(np.uint8)


class GymnasiumRenderer:
    """gymnasium's own rgb_array renderer, reduced to our frame: grayscale, same crop, box-downsampled.

    Slow (a pygame drawing of 600 x 400 pixels per frame); it is here to check `render_frames` against it
    (see the tests) and to train on it with --renderer gymnasium if you want to be sure.
    """

    def __init__(self, height, width):
        from gymnasium.envs.classic_control.cartpole import CartPoleEnv
        self.env = CartPoleEnv(render_mode="rgb_array")
        self.env.reset(seed=0)
        pixel = SCREEN_WIDTH / width
        # Screen row r covers screen y in [399 - r, 400 - r) (gymnasium flips y before returning the image).
        row_top = SCREEN_HEIGHT - (CROP_BOTTOM + height * pixel)
        self.rows = (int(round(row_top)), int(round(SCREEN_HEIGHT - CROP_BOTTOM)))
        self.down_rows = self.box_downsample_matrix(self.rows[1] - self.rows[0], height)  # (H, rows)
        self.down_cols = self.box_downsample_matrix(int(SCREEN_WIDTH), width)             # (W, 600)

    @staticmethod
    def box_downsample_matrix(n_in, n_out):
        """(n_out, n_in) matrix averaging each output pixel's share of input pixels (works for any ratio)."""
        edges = np.linspace(0, n_in, n_out + 1)
        lo, hi = edges[:-1, None], edges[1:, None]
        i = np.arange(n_in)[None, :]
        overlap = np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0, None)
        return overlap / overlap.sum(1, keepdims=True)

    def full_scene(self, state):
        """gymnasium's own 400 x 600 RGB picture of one physics state."""
        self.env.state = np.asarray(state, dtype=np.float64)
        return self.env.render()                                            # (400, 600, 3) uint8

    def __call__(self, states):
        frames = []
        for state in states:
            rgb = self.full_scene(state).astype(np.float32)                 # (400, 600, 3)
            gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (400, 600)
            crop = gray[self.rows[0]:self.rows[1]]                          # (rows, 600)
            frames.append(self.down_rows @ crop @ self.down_cols.T)         # (H, W)
        return np.rint(np.stack(frames)).astype(np.uint8)                   # (N, H, W)


def make_renderer(name, height, width):
    """--renderer: states (N, 4) -> frames (N, height, width) uint8."""
    if name == "gymnasium":
        return GymnasiumRenderer(height, width)
    return lambda states: render_frames(states, height, width)


def benchmark_renderer(height, width, num_envs, repeats=200):
    """Microseconds per frame: our batched numpy drawing vs gymnasium's pygame render + crop + downsample."""
    states = np.random.default_rng(0).uniform(-0.2, 0.2, size=(num_envs, 4)).astype(np.float32)
    tick = time.perf_counter()
    for _ in range(repeats):
        render_frames(states, height, width)
    ours = (time.perf_counter() - tick) / (repeats * num_envs)
    gymnasium_renderer = GymnasiumRenderer(height, width)
    tick = time.perf_counter()
    for _ in range(max(1, repeats // 20)):
        gymnasium_renderer(states)
    theirs = (time.perf_counter() - tick) / (max(1, repeats // 20) * num_envs)
    print(f"{num_envs} envs, {height}x{width} frames: numpy {ours * 1e6:.1f} us/frame, gymnasium "
          f"{theirs * 1e6:.0f} us/frame -> numpy is {theirs / ours:.0f}x faster")
    return ours, theirs


def push_frame(windows, frames, episode_start):
    """Slide each env's 3-frame window forward by one frame.

    windows: (N, 3, H, W) uint8, [f(t-2), f(t-1), f(t)];  frames: (N, H, W), f(t+1);
    episode_start: (N,) bool. Returns [f(t-1), f(t), f(t+1)]. Where a new episode starts there is no past to
    show, so its first frame is repeated three times: a window never mixes two episodes.
    """
    new = np.concatenate([windows[:, 1:], frames[:, None]], axis=1)  # (N, 3, H, W)
    new[episode_start] = frames[episode_start, None]
    return new


def step_pixels(envs, actions, window, autoreset, render):
    """One step of N pixel Cart Poles, with gymnasium 1.x "next-step" autoreset handled.

    After an episode ends, gymnasium's NEXT step() ignores the action and returns the first observation of a
    new episode, with reward 0. `autoreset` (N,) bool marks those envs (the previous step ended their
    episode): their new frame starts a fresh window, and the step is not a real transition (valid = False).
    Returns (window, states, reward, terminated, episode_end, valid); episode_end = terminated OR truncated;
    states (N, 4) is the true physics state of the newest frame (the agent sees it only with --obs state).
    """
    states, reward, terminated, truncated, _ = envs.step(actions)
    window = push_frame(window, render(states), episode_start=autoreset)
    return window, states, reward, terminated, terminated | truncated, ~autoreset


# ======================================================================================================
# 3. Input and x-encoder (paper Section 2, "Input and Encoder" and "Learning Objective")
# ======================================================================================================
# A small vision transformer. The patch embeddings of all three frames enter ONE transformer together, so
# attention can compare the cart in f(t-2) with the cart in f(t): that is where velocity comes from. Each
# token gets a positional encoding of its patch row, its patch column AND its frame index (without the frame
# index the three frames would be an unordered set and the direction of motion would be lost). A learnable
# CLS token is prepended; only its last-layer output, s_x (width d = 64), is used downstream.


class Block(nn.Module):
    """Pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, cls_only=False):                                       # (B, L, D), L = 1 + 3P
        B, L, D = x.shape
        hs = D // self.heads
        h = self.norm1(x)
        if not cls_only:
            q, k, v = self.qkv(h).view(B, L, 3, self.heads, hs).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, L, hs)
        else:
            # Speed: only the CLS output is ever read, so in the last block only the CLS token needs a query,
            # an attention output and an MLP; every token still provides keys and values. Same s_x, ~1.8x
            # cheaper encoder (a test checks the two paths agree).
            q = F.linear(h[:, :1], self.qkv.weight[:D], self.qkv.bias[:D])             # (B, 1, D)
            q = q.view(B, 1, self.heads, hs).transpose(1, 2)                             # (B, nh, 1, hs)
            k, v = F.linear(h, self.qkv.weight[D:], self.qkv.bias[D:]).view(B, L, 2, self.heads, hs).permute(
                2, 0, 3, 1, 4)                                                           # 2 x (B, nh, L, hs)
            x, L = x[:, :1], 1                                                           # (B, 1, D)
        attended = F.scaled_dot_product_attention(q, k, v)                      # (B, nh, L, hs)
        x = x + self.proj(attended.transpose(1, 2).reshape(B, L, D))            # (B, L, D)
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """Three grayscale frames -> s, the CLS token's last-layer embedding (width D)."""

    def __init__(self, image_height, image_width, patch_size, dim, depth, heads, mlp_ratio, frames=3,
                 final_norm=True):
        super().__init__()
        self.dim = dim
        self.patch_size = patch_size
        self.rows, self.cols = image_height // patch_size, image_width // patch_size
        # Patch embedding: one linear map of a patch's p*p pixels, shared by all patches of all frames (the
        # same as a strided convolution with kernel = stride = p, but cheaper to back-propagate on a CPU).
        self.patch_embed = nn.Linear(patch_size * patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Learnable positional encoding, factorised into three tables that are summed per token:
        # pos(frame f, row r, column c) = frame_pos[f] + row_pos[r] + col_pos[c].
        self.frame_pos = nn.Parameter(torch.randn(frames, dim) * 0.02)
        self.row_pos = nn.Parameter(torch.randn(self.rows, dim) * 0.02)
        self.col_pos = nn.Parameter(torch.randn(self.cols, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()

    def positional_encoding(self):
        pos = (self.frame_pos[:, None, None, :]        # (F, 1, 1, D)
               + self.row_pos[None, :, None, :]        # (1, R, 1, D)
               + self.col_pos[None, None, :, :])       # (1, 1, C, D)  -> (F, R, C, D)
        return pos.flatten(0, 2)                       # (F*R*C, D), in the token order below

    def forward(self, windows, cls_only_last_block=True):              # (B, F, H, W) uint8
        B, Fr, H, W = windows.shape
        R, C, p = self.rows, self.cols, self.patch_size
        # "Ink": 0 on the white sky, 1 on the black cart, so empty patches embed to (almost) nothing.
        ink = 1.0 - windows.float() / 255.0                            # (B, F, H, W)
        # Cut every frame into R x C patches of p x p pixels, in (frame, row, column) order.
        patches = ink.view(B, Fr, R, p, C, p).permute(0, 1, 2, 4, 3, 5).reshape(B, Fr * R * C, p * p)
        x = self.patch_embed(patches)                                  # (B, 3P, D)
        x = x + self.positional_encoding()                             # (B, 3P, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)    # (B, 1+3P, D)
        for i, block in enumerate(self.blocks):
            x = block(x, cls_only=cls_only_last_block and i == len(self.blocks) - 1)
        return self.norm(x[:, 0])                                      # (B, D)  s = the CLS token


# ======================================================================================================
# 4. y-encoder: an exponential moving average of the x-encoder (paper Section 2, "Input and Encoder")
# ======================================================================================================
# The y-encoder has the x-encoder's architecture and starts from the same weights (a deep copy). It reads
# the window one step later, [f(t-1), f(t), f(t+1)], which is exactly the x-encoder's NEXT input, so s_y is
# "the embedding of where the system went". It never receives gradients (requires_grad_(False), not in the
# optimiser); after every optimiser step its weights follow the x-encoder's:
#     theta_y <- tau * theta_y + (1 - tau) * theta_x,   tau = 0.99
# A slowly moving target is what keeps BYOL-style methods (paper ref. [8]) from collapsing at once.


def make_y_encoder(x_encoder):
    return copy.deepcopy(x_encoder).requires_grad_(False)


@torch.no_grad()
def ema_update(y_encoder, x_encoder, tau):
    y_params, x_params = list(y_encoder.parameters()), list(x_encoder.parameters())
    # theta_y <- tau * theta_y + (1 - tau) * theta_x  (foreach: one call for all tensors, not a Python loop)
    torch._foreach_mul_(y_params, tau)
    torch._foreach_add_(y_params, x_params, alpha=1.0 - tau)


# ======================================================================================================
# 5. Predictor (paper Section 2, "Predictor")
# ======================================================================================================
# Intentionally shallow, so that the work of predicting is done in the embedding, not in the predictor.
# It needs the action (the latent variable z of JEPA): the next frames depend on which way the cart was
# pushed. The one-hot action is projected to the hidden width and added after the first layer.


class Predictor(nn.Module):
    def __init__(self, dim, hidden, num_actions):
        super().__init__()
        self.num_actions = num_actions
        self.fc1 = nn.Linear(dim, hidden)
        self.action_proj = nn.Linear(num_actions, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, s_x, action):                                   # (B, D), (B,) int
        one_hot = F.one_hot(action, self.num_actions).float()         # (B, A)
        hidden = F.relu(self.fc1(s_x) + self.action_proj(one_hot))    # (B, hidden)
        return self.fc2(hidden)                                       # (B, D)  prediction of s_y


# ======================================================================================================
# 6. Losses (paper Section 2, Eq. 1-3)
# ======================================================================================================


def jepa_loss(s_y_pred, s_y):
    # Eq. 1:  L_jepa = || s_y_pred - s_y ||_2^2, averaged over the batch.
    # s_y comes from the y-encoder and carries no gradient: only the x-encoder and predictor learn from it.
    return (s_y_pred - s_y).pow(2).sum(dim=-1).mean()


def variance_regulariser(s_x):
    # Eq. 2:  L_reg = - min(1, (1/d) * sum_i Var_batch(s_x)_i)
    # Rewards spread across the batch (the opposite of collapse). Clamped at 1 because variance is unbounded:
    # once the embeddings vary enough, the regulariser stops pushing.
    return -torch.clamp(embedding_variance(s_x), max=1.0)


def embedding_variance(s_x):
    # The collapse indicator: mean over the d dimensions of the batch-wise variance; < 1e-7 means collapsed.
    return s_x.var(dim=0).mean()


def total_loss(actor_loss, critic_loss, l_jepa, l_reg, args):
    # Eq. 3:  L = L_actor + L_critic + L_jepa (+ L_reg)
    loss = actor_loss + critic_loss
    if args.jepa:
        loss = loss + args.jepa_coef * l_jepa
    if args.reg:
        loss = loss + args.reg_coef * l_reg
    return loss


# ======================================================================================================
# 7. Gradient propagation (paper Section 2, "Gradient Propagation")
# ======================================================================================================


def rl_input(s_x, rl_grad):
    # --rl-grad: the actor and critic losses back-propagate into the x-encoder (configs 1 and 2).
    # --no-rl-grad: this detach cuts that path; the encoder then learns from Eq. 1 (and 2) only (configs 3, 4),
    # while actor and critic still train on the (frozen-to-them) embedding.
    return s_x if rl_grad else s_x.detach()


# ======================================================================================================
# 8. PPO actor-critic (paper Section 3: "an actor-critic-style PPO algorithm")
# ======================================================================================================
# Standard clipped PPO as in CleanRL (without its optional value-loss clipping), acting on s_x through two
# small heads. One gradient-norm clip covers all trained networks together, encoder included.


def layer_init(layer, std=np.sqrt(2), bias=0.0):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


def make_heads(dim, num_actions, hidden=64):
    actor = nn.Sequential(layer_init(nn.Linear(dim, hidden)), nn.Tanh(),
                          layer_init(nn.Linear(hidden, num_actions), std=0.01))  # near-uniform first policy
    critic = nn.Sequential(layer_init(nn.Linear(dim, hidden)), nn.Tanh(), layer_init(nn.Linear(hidden, 1), std=1.0))
    return actor, critic


def compute_gae(rewards, values, terminated, episode_end, gamma, gae_lambda):
    """Generalised advantage estimation over a rollout.

    rewards, terminated, episode_end: (T, N); values: (T+1, N), where values[t] = V(window t) and values[T]
    is the value of the window after the rollout. episode_end = terminated OR truncated.
    A termination (the pole fell) has no future: V(next) counts as 0. A truncation (the 500-step time limit)
    is not a failure: the future is bootstrapped with V of the final window, which gymnasium's next-step
    autoreset still hands us as the observation after the last step. Either way the advantage recursion stops
    at the episode's end. Returns (advantages, returns), both (T, N).
    """
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        # delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
        delta = rewards[t] + gamma * values[t + 1] * (1.0 - terminated[t]) - values[t]
        # A_t = delta_t + gamma * lambda * (1 - episode_end_t) * A_{t+1}
        next_advantage = delta + gamma * gae_lambda * (1.0 - episode_end[t]) * next_advantage
        advantages[t] = next_advantage
    return advantages, advantages + values[:-1]


def ppo_losses(logits, new_values, actions, old_logprobs, advantages, returns, args):
    """Actor loss (clipped surrogate minus entropy bonus) and critic loss, for one minibatch."""
    dist = torch.distributions.Categorical(logits=logits)
    logratio = dist.log_prob(actions) - old_logprobs
    ratio = logratio.exp()
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)  # per-minibatch normalisation
    policy_loss = torch.max(-advantages * ratio,
                            -advantages * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
    entropy = dist.entropy().mean()
    value_loss = 0.5 * (new_values - returns).pow(2).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
    return policy_loss, value_loss, entropy, approx_kl


# ======================================================================================================
# 9. Training loop (flat, CleanRL style)
# ======================================================================================================

STATE_NAMES = ["x", "x_dot", "theta", "theta_dot"]
UPDATE_COLUMNS = ["step", "jepa_loss", "reg_loss", "policy_loss", "value_loss", "entropy", "embedding_var",
                  "approx_kl", "grad_norm", "learning_rate", "mean_return", "sps"] + [
                  f"probe_r2_{n}" for n in STATE_NAMES]
COLLAPSE_THRESHOLD = 1e-7  # the paper's collapse indicator threshold


class StateInput(nn.Module):
    """--obs state: no encoder; the "embedding" is the true 4-number state itself."""
    dim = 4

    def forward(self, states):                                         # (B, 4)
        return states


NETWORK_NAMES = ("x_encoder", "y_encoder", "predictor", "actor", "critic")   # make_networks' order


def make_networks(args, num_actions, device):
    if args.obs == "pixels":
        x_encoder = ViTEncoder(args.image_height, args.image_width, args.patch_size, args.embed_dim, args.depth,
                               args.heads, args.mlp_ratio, final_norm=args.final_norm)
    else:
        x_encoder = StateInput()
    y_encoder = make_y_encoder(x_encoder)
    predictor = Predictor(x_encoder.dim, args.predictor_hidden, num_actions)
    actor, critic = make_heads(x_encoder.dim, num_actions)
    return [net.to(device) for net in (x_encoder, y_encoder, predictor, actor, critic)]


def linear_probe_r2(fit_s, fit_state, test_s, test_state, ridge=1e-3):
    """R^2 of a ridge regression s -> true state, per state variable, on held-out data.

    The ridge strength is absolute (in units of embedding variance): an embedding whose batch variance has
    fallen far below it, as in collapse, is shrunk to the mean prediction and scores R^2 ~ 0.
    """
    if len(fit_s) < 2 or len(test_s) < 2:
        return torch.full((fit_state.shape[1],), float("nan"))
    s_mean, y_mean = fit_s.mean(0), fit_state.mean(0)
    fit_x, test_x = fit_s - s_mean, test_s - s_mean                           # (n, D)
    gram = fit_x.T @ fit_x / len(fit_x) + ridge * torch.eye(fit_x.shape[1])  # (D, D)
    weights = torch.linalg.solve(gram, fit_x.T @ (fit_state - y_mean) / len(fit_x))  # (D, 4)
    prediction = test_x @ weights + y_mean                                    # (m, 4)
    residual = (test_state - prediction).pow(2).sum(0)
    total = (test_state - test_state.mean(0)).pow(2).sum(0)
    return 1.0 - residual / total


def train(args):
    # ---- set-up: seeds, folders, logs
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items()}, indent=2))
    # One row per line, flushed at once: a killed run keeps everything it did.
    episodes_file = open(args.out / "episodes.csv", "w", newline="")
    updates_file = open(args.out / "updates.csv", "w", newline="")
    episodes_log = csv.writer(episodes_file)
    updates_log = csv.DictWriter(updates_file, fieldnames=UPDATE_COLUMNS)
    episodes_log.writerow(["step", "return", "length"])
    updates_log.writeheader()
    episodes_file.flush()
    updates_file.flush()

    # ---- environments and renderer
    envs = gym.make_vec("CartPole-v1", num_envs=args.num_envs, vectorization_mode="vector_entry_point")
    num_actions = envs.single_action_space.n
    H, W, N, T = args.image_height, args.image_width, args.num_envs, args.num_steps
    render = make_renderer(args.renderer, H, W)

    # ---- networks: x-encoder, its EMA copy (y-encoder), predictor, actor and critic
    x_encoder, y_encoder, predictor, actor, critic = make_networks(args, num_actions, device)
    trained = nn.ModuleList([x_encoder, predictor, actor, critic])   # the y-encoder is deliberately absent
    optimizer = torch.optim.Adam(trained.parameters(), lr=args.learning_rate, eps=1e-5)

    # ---- rollout storage. windows[t] is the x-encoder input at step t; windows[t+1] is its y-encoder target.
    windows = torch.zeros((T + 1, N, 3, H, W), dtype=torch.uint8)    # uint8: 4x less memory than float
    true_states = torch.zeros((T + 1, N, 4))                         # the physics state of each window's f(t)
    inputs = windows if args.obs == "pixels" else true_states       # what the agent observes
    rollout_s_x = torch.zeros((T, N, x_encoder.dim))                 # s_x while acting, for the linear probe
    actions = torch.zeros((T, N), dtype=torch.long)
    logprobs = torch.zeros((T, N))
    rewards = torch.zeros((T, N))
    values = torch.zeros((T + 1, N))
    terminated = torch.zeros((T, N))
    episode_end = torch.zeros((T, N))
    valid = torch.zeros((T, N), dtype=torch.bool)

    # gymnasium 1.x "next-step" autoreset (see step_pixels): the step after an episode's end is not a real
    # transition; it is marked invalid and no loss is computed on it.
    states, _ = envs.reset(seed=args.seed)
    window = push_frame(np.zeros((N, 3, H, W), np.uint8), render(states), np.ones(N, dtype=bool))  # (N,3,H,W)
    last_step_ended = np.zeros(N, dtype=bool)
    episode_return, episode_length = np.zeros(N), np.zeros(N, dtype=int)
    recent_returns = []
    global_step = 0
    timing = {"env_and_render": 0.0, "rollout_inference": 0.0, "update": 0.0}
    start = time.time()

    for update in range(1, args.num_updates + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (update - 1.0) / args.num_updates)

        # ---- 9a. Rollout: act with the current policy for T steps in N envs.
        windows[0], true_states[0] = torch.from_numpy(window), torch.from_numpy(states)
        for t in range(T):
            tick = time.perf_counter()
            with torch.inference_mode():   # no autograd bookkeeping while acting
                s_x = x_encoder(inputs[t].to(device))                          # (N, D)
                logits, value = actor(s_x), critic(s_x).squeeze(-1)            # (N, A), (N,)
                dist = torch.distributions.Categorical(logits=logits)
                action = dist.sample()                                         # (N,)
            actions[t], logprobs[t], values[t] = action.cpu(), dist.log_prob(action).cpu(), value.cpu()
            rollout_s_x[t] = s_x.cpu()
            tock = time.perf_counter()
            timing["rollout_inference"] += tock - tick

            window, states, reward, term, ended, is_valid = step_pixels(envs, action.cpu().numpy(), window,
                                                                        autoreset=last_step_ended, render=render)
            global_step += N                                   # counts autoreset steps too, as CleanRL does
            windows[t + 1], true_states[t + 1] = torch.from_numpy(window), torch.from_numpy(states)
            valid[t] = torch.from_numpy(is_valid)
            rewards[t] = torch.from_numpy(reward)
            terminated[t] = torch.from_numpy(term.astype(np.float32))
            episode_end[t] = torch.from_numpy(ended.astype(np.float32))
            last_step_ended = ended

            episode_return += reward                           # reward is 0 on an autoreset step
            episode_length += is_valid
            for i in np.flatnonzero(ended):
                episodes_log.writerow([global_step, episode_return[i], episode_length[i]])
                recent_returns.append(episode_return[i])
                episode_return[i], episode_length[i] = 0.0, 0
            if ended.any():
                episodes_file.flush()
            timing["env_and_render"] += time.perf_counter() - tock

        tick = time.perf_counter()
        with torch.inference_mode():
            values[T] = critic(x_encoder(inputs[T].to(device))).squeeze(-1).cpu()  # bootstrap value
        advantages, returns = compute_gae(rewards, values, terminated, episode_end, args.gamma, args.gae_lambda)
        timing["rollout_inference"] += time.perf_counter() - tick

        # ---- 9b. Update: PPO + JEPA on the rollout, in minibatches.
        tick = time.perf_counter()
        b_inputs = inputs[:T].flatten(0, 1)                     # (B, 3, H, W)  x-encoder inputs
        b_next_inputs = inputs[1:].flatten(0, 1)                # (B, 3, H, W)  y-encoder inputs
        b_actions, b_logprobs = actions.reshape(-1), logprobs.reshape(-1)
        b_advantages, b_returns = advantages.reshape(-1), returns.reshape(-1)
        valid_idx = torch.nonzero(valid.reshape(-1)).squeeze(1)  # drop the autoreset steps
        if args.jepa and not args.fresh_targets:
            # Targets s_y for the whole rollout in one pass: the y-encoder's input at step t is the x-encoder's
            # input at t+1. Speed: computed once per rollout, so within an update the targets lag the y-encoder
            # (by the default 4 x 8 = 32 EMA steps of 1%, it has moved ~27% of the way to the x-encoder by the
            # last minibatch). --fresh-targets recomputes them for every minibatch instead.
            with torch.no_grad():
                b_s_y = torch.cat([y_encoder(chunk.to(device)) for chunk in
                                   b_next_inputs.split(args.minibatch_size)])                         # (B, D)

        stats = {k: 0.0 for k in ("jepa_loss", "reg_loss", "policy_loss", "value_loss", "entropy",
                                  "embedding_var", "approx_kl", "grad_norm")}
        num_minibatch_steps = 0
        for epoch in range(args.update_epochs):
            # --num-minibatches near-equal minibatches of the valid steps (never a tiny leftover one).
            for mb in valid_idx[torch.randperm(len(valid_idx))].tensor_split(args.num_minibatches):
                mb_dev = mb.to(device)
                s_x = x_encoder(b_inputs[mb].to(device))                       # (M, D)
                # Gradient propagation switch (Section 2): the one place where --no-rl-grad acts.
                s_rl = rl_input(s_x, args.rl_grad)
                policy_loss, value_loss, entropy, approx_kl = ppo_losses(
                    actor(s_rl), critic(s_rl).squeeze(-1), b_actions[mb].to(device), b_logprobs[mb].to(device),
                    b_advantages[mb].to(device), b_returns[mb].to(device), args)
                actor_loss = policy_loss - args.ent_coef * entropy
                critic_loss = args.vf_coef * value_loss
                l_jepa = torch.zeros((), device=device)
                if args.jepa:
                    if args.fresh_targets:
                        with torch.no_grad():
                            s_y = y_encoder(b_next_inputs[mb].to(device))         # (M, D)
                    else:
                        s_y = b_s_y[mb_dev]                                      # (M, D)
                    l_jepa = jepa_loss(predictor(s_x, b_actions[mb].to(device)), s_y)
                l_reg = variance_regulariser(s_x)
                loss = total_loss(actor_loss, critic_loss, l_jepa, l_reg, args)
                if not torch.isfinite(loss):
                    episodes_file.close()
                    updates_file.close()
                    sys.exit(f"error: non-finite loss ({loss.item()}) at step {global_step} "
                             f"(jepa {l_jepa.item()}, reg {l_reg.item()}, policy {policy_loss.item()}, "
                             f"value {value_loss.item()}); the logs so far are in {args.out}")

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(trained.parameters(), args.max_grad_norm)  # before clipping
                optimizer.step()
                if args.jepa:                                    # only the JEPA loss reads the y-encoder
                    ema_update(y_encoder, x_encoder, args.ema_tau)   # after every optimiser step

                for k, v in (("jepa_loss", l_jepa), ("reg_loss", l_reg), ("policy_loss", policy_loss),
                             ("value_loss", value_loss), ("entropy", entropy),
                             ("embedding_var", embedding_variance(s_x.detach())), ("approx_kl", approx_kl),
                             ("grad_norm", grad_norm)):
                    stats[k] += v.item()
                num_minibatch_steps += 1
        timing["update"] += time.perf_counter() - tick

        # ---- 9c. A linear probe: how much of the true state can a linear map read from s_x? (Not in the
        # paper; it shows what the embedding knows. Collapse reads as R^2 near 0.) Fit on half of the envs'
        # rollout steps, scored on the other half.
        probe = {}
        if args.probe_every and update % args.probe_every == 0 and args.obs == "pixels":
            half = N // 2
            fit, held_out = valid[:, :half], valid[:, half:]
            r2 = linear_probe_r2(rollout_s_x[:, :half][fit], true_states[:T, :half][fit],
                                 rollout_s_x[:, half:][held_out], true_states[:T, half:][held_out])
            probe = {f"probe_r2_{name}": f"{v:.4f}" for name, v in zip(STATE_NAMES, r2.tolist())}

        # ---- 9d. Log one row per update and one console line.
        elapsed = time.time() - start
        sps = global_step / elapsed
        mean_return = float(np.mean(recent_returns[-args.window:])) if recent_returns else float("nan")
        row = {k: v / max(num_minibatch_steps, 1) for k, v in stats.items()}
        row.update(step=global_step, learning_rate=optimizer.param_groups[0]["lr"], mean_return=mean_return,
                   sps=sps, **probe)
        updates_log.writerow(row)
        updates_file.flush()
        eta = (args.num_updates * args.batch_size - global_step) / sps
        print(f"step {global_step:>7}/{args.num_updates * args.batch_size} | sps {sps:5.0f} | eta {eta:5.0f}s"
              f" | return(last {args.window}) {mean_return:6.1f} | embedding var {row['embedding_var']:.2e}"
              f" | jepa {row['jepa_loss']:.3f}", flush=True)
        if row["embedding_var"] < COLLAPSE_THRESHOLD:
            print(f"warning: embedding variance {row['embedding_var']:.1e} < {COLLAPSE_THRESHOLD:g}: "
                  "the encoder has collapsed (every input maps to the same s_x)", flush=True)

    episodes_file.close()
    updates_file.close()
    envs.close()
    networks = (x_encoder, y_encoder, predictor, actor, critic)
    torch.save({name: net.state_dict() for name, net in zip(NETWORK_NAMES, networks)}, args.out / "model.pt")
    summary = {"steps": global_step, "wall_s": time.time() - start, "sps": global_step / (time.time() - start),
               "final_mean_return": mean_return, "return_window_episodes": args.window,
               "final_embedding_var": row["embedding_var"],
               "timing_s": timing}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done: {global_step} steps in {summary['wall_s']:.0f}s ({summary['sps']:.0f} sps); "
          f"timing {', '.join(f'{k} {v:.0f}s' for k, v in timing.items())}; logs in {args.out}")
    return summary, networks


# ======================================================================================================
# 10. Experiments and plots (paper Section 3, Figure 3)
# ======================================================================================================
# Figure 3: running average of the episodic return over the first 100k environment steps, 5 runs for each of
# the four configurations, and the batch-wise embedding variance (the collapse indicator).

FIGURE3_CONFIGS = {  # paper number: (jepa, rl_grad, reg, label)
    1: (False, True, False, "1: no JEPA, RL gradients (baseline)"),
    2: (True, True, False, "2: JEPA + RL gradients"),
    3: (True, False, False, "3: JEPA, no RL gradients"),
    4: (True, False, True, "4: JEPA + regulariser, no RL gradients"),
}
CONFIG_COLORS = {1: "tab:purple", 2: "tab:blue", 3: "tab:red", 4: "tab:green"}


def is_finished(out):
    return (out / "summary.json").exists()   # written only after the last update


# Flags that differ between the runs of one sweep, or do not change what a run computes.
PER_RUN_FLAGS = {"out", "seed", "threads", "jepa", "rl_grad", "reg", "obs", "device", "overwrite", "figure3",
                 "plot", "sweep_dir", "plots_dir", "seeds", "workers", "window", "reference", "eval",
                 "eval_episodes", "gif", "benchmark_renderer"}


def check_same_settings(out, args):
    """Refuse to reuse or plot a finished run that was made with other settings than this command's."""
    saved = json.loads((out / "config.json").read_text())
    different = {k: (saved.get(k), v) for k, v in vars(args).items()
                 if k not in PER_RUN_FLAGS and saved.get(k) != (str(v) if isinstance(v, Path) else v)}
    if different:
        listed = ", ".join(f"{k}: run {a} vs now {b}" for k, (a, b) in different.items())
        sys.exit(f"error: {out} was made with other settings ({listed}); use another --sweep-dir or the same flags")


def _sweep_worker(run_args):
    """One run of the sweep, in its own process; its console lines go to console.log in its folder."""
    torch.set_num_threads(1)
    run_args.out.mkdir(parents=True, exist_ok=True)
    with open(run_args.out / "console.log", "w") as console:
        sys.stdout = console
        train(run_args)


def last_logged_step(out):
    try:
        with open(out / "updates.csv") as f:
            last = f.readlines()[-1]
        return int(last.split(",")[0])
    except (OSError, IndexError, ValueError):
        return 0


def sweep_configs(args):
    """The paper's four configurations, plus the state-based reference (not in the paper) unless --no-reference."""
    configs = {c: dict(obs="pixels", jepa=j, rl_grad=g, reg=r) for c, (j, g, r, _) in FIGURE3_CONFIGS.items()}
    if args.reference:
        configs["state"] = dict(obs="state", jepa=False, rl_grad=False, reg=False)
    return configs


def run_dir(sweep_dir, config, seed):
    if config == "state":
        return sweep_dir / f"state-seed{seed}"
    jepa, rl_grad, reg, _ = FIGURE3_CONFIGS[config]
    return sweep_dir / f"{run_name('pixels', jepa, rl_grad, reg)}-seed{seed}"


def figure3(args):
    """Run every (configuration, seed) that has not finished yet, `--workers` at a time, then plot."""
    import multiprocessing
    jobs = []
    for config, switches in sweep_configs(args).items():
        for seed in range(1, args.seeds + 1):
            out = run_dir(args.sweep_dir, config, seed)
            if is_finished(out):
                check_same_settings(out, args)
                continue                                   # never overwrite a finished run
            jobs.append(argparse.Namespace(**{**vars(args), **switches, "seed": seed, "out": out, "threads": 1}))
    total_runs = len(sweep_configs(args)) * args.seeds
    steps_per_run = args.num_updates * args.batch_size
    print(f"figure3: {total_runs - len(jobs)}/{total_runs} runs already finished in {args.sweep_dir}; "
          f"running {len(jobs)} with {args.workers} workers (progress: console.log in each run folder)")
    start = time.time()
    with multiprocessing.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        pending = [pool.apply_async(_sweep_worker, (job,)) for job in jobs]
        # One progress line for the whole sweep: redrawn in place on a terminal, a new line a minute in a log.
        last_print = 0.0
        while True:
            done = sum(p.ready() for p in pending)
            if done == len(jobs) or time.time() - last_print > (2 if sys.stdout.isatty() else 60):
                last_print = time.time()
                steps = sum(steps_per_run if p.ready() else last_logged_step(job.out)
                            for p, job in zip(pending, jobs))
                sps = steps / max(time.time() - start, 1e-9)
                eta = f"{(len(jobs) * steps_per_run - steps) / sps / 60:5.1f} min" if steps else "?"
                print(f"\rfigure3: {done}/{len(jobs)} runs done | {steps:,}/{len(jobs) * steps_per_run:,} steps | "
                      f"{sps:4.0f} sps | {time.time() - start:5.0f}s elapsed | eta {eta}",
                      end="" if sys.stdout.isatty() else "\n", flush=True)
            if done == len(jobs):
                break
            time.sleep(1)
        print()
        for p in pending:
            p.get()                                       # re-raise a failed run's error here
    plot(args)


def running_average_curve(episodes, grid, window):
    """Mean return of the last `window` episodes finished by each step of `grid` (NaN before the first)."""
    steps, returns = episodes[:, 0], episodes[:, 1]
    cumulative = np.concatenate([[0.0], np.cumsum(returns)])
    finished = np.searchsorted(steps, grid, side="right")            # episodes finished by each grid step
    first = np.maximum(finished - window, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (cumulative[finished] - cumulative[first]) / (finished - first)


def load_sweep(args, grid):
    """Per configuration, the finished runs' curves on `grid`: return (running average), variance, probe R^2."""
    sweep = {}
    for config in sweep_configs(args):
        runs = [run_dir(args.sweep_dir, config, s) for s in range(1, args.seeds + 1)]
        runs = [r for r in runs if is_finished(r)]
        if not runs:
            continue
        seeds, curves, variances, probes, final_var, walls = [], [], [], [], [], []
        for seed_dir in runs:
            check_same_settings(seed_dir, args)
            episodes = np.loadtxt(seed_dir / "episodes.csv", delimiter=",", skiprows=1, ndmin=2)
            updates = read_csv(seed_dir / "updates.csv")
            seeds.append(int(seed_dir.name.rsplit("seed", 1)[1]))
            curves.append(running_average_curve(episodes, grid, args.window))
            variances.append(np.interp(grid, updates["step"], updates["embedding_var"]))
            probes.append(np.stack([np.interp(grid, updates["step"], updates[f"probe_r2_{n}"])
                                    for n in STATE_NAMES]))                         # (4, len(grid))
            final_var.append(updates["embedding_var"][-1])
            walls.append(json.loads((seed_dir / "summary.json").read_text())["wall_s"])
        sweep[config] = dict(seeds=seeds, curves=np.array(curves), variances=np.array(variances),
                             probes=np.array(probes), final_var=np.array(final_var), walls=np.array(walls))
    return sweep


def read_csv(path):
    """Columns of a CSV as float arrays (empty cells, such as steps without a probe, become NaN)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) if r[k] not in ("", None) else np.nan for r in rows]) for k in rows[0]}


def plot(args):
    """Figure 3, its summary table and curve data, the probe figure and the observation figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_per_run = args.num_updates * args.batch_size
    grid = np.arange(args.batch_size, steps_per_run + 1, args.batch_size)     # one point per rollout
    args.plots_dir.mkdir(parents=True, exist_ok=True)
    sweep = load_sweep(args, grid)
    labels = {**{c: v[3] for c, v in FIGURE3_CONFIGS.items()}, "state": "state-based PPO (reference, not in paper)"}
    colors = {**CONFIG_COLORS, "state": "black"}

    # ---- Figure 3: (a) running-average return, (b) embedding variance
    fig, (ax_ret, ax_var) = plt.subplots(1, 2, figsize=(15, 5.5))
    for config, runs in sweep.items():
        mean, std = np.nanmean(runs["curves"], 0), np.nanstd(runs["curves"], 0)
        style = dict(color=colors[config], lw=2, ls="--" if config == "state" else "-")
        ax_ret.plot(grid, mean, label=f"{labels[config]}, {len(runs['seeds'])} seeds", **style)
        ax_ret.fill_between(grid, mean - std, mean + std, color=colors[config], alpha=0.15)
        if config != "state":
            log_var = np.log10(np.maximum(runs["variances"], 1e-30))           # mean and band in log space
            ax_var.plot(grid, 10 ** log_var.mean(0), label=labels[config], **style)
            ax_var.fill_between(grid, 10 ** log_var.min(0), 10 ** log_var.max(0), color=colors[config], alpha=0.15)
    ax_ret.set(title=f"(a) episodic return, running average of the last {args.window} episodes",
               xlabel="environment steps", ylabel="return (steps balanced; max 500)")
    ax_var.axhline(COLLAPSE_THRESHOLD, color="black", ls=":", lw=1.5, label="collapse threshold 1e-7")
    ax_var.set(title="(b) mean batch-wise variance of s_x (collapse indicator)", xlabel="environment steps",
               ylabel="variance (log scale)", yscale="log")
    ax_ret.legend(fontsize=9, loc="upper left", title="line: mean over seeds; band: ±1 std across seeds",
                  title_fontsize=9)
    ax_var.legend(fontsize=9, loc="lower right", title="line: geometric mean over seeds; band: min to max",
                  title_fontsize=9)
    for ax in (ax_ret, ax_var):
        ax.grid(alpha=0.3)
    fig.suptitle("Figure 3 reproduced: JEPA + PPO on pixel Cart Pole", fontsize=14)
    fig.tight_layout()
    fig.savefig(args.plots_dir / "figure3.png", dpi=110)
    plt.close(fig)

    # ---- the summary table (the paper's four configurations) and the per-seed curves
    columns = ["config", "jepa", "rl_grad", "reg", "seeds", "return_mean", "return_std", "best_return_mean",
               "final_embedding_var", "collapsed_seeds", "wall_s_per_run"]
    rows = []
    for config, runs in sweep.items():
        at_end = runs["curves"][:, -1]
        jepa, rl_grad, reg = (FIGURE3_CONFIGS[config][:3] if config != "state" else (0, 0, 0))
        rows.append({"config": config, "jepa": int(jepa), "rl_grad": int(rl_grad), "reg": int(reg),
                     "seeds": len(runs["seeds"]), "return_mean": f"{at_end.mean():.1f}",
                     "return_std": f"{at_end.std():.1f}",
                     "best_return_mean": f"{np.nanmax(runs['curves'], 1).mean():.1f}",
                     "final_embedding_var": f"{runs['final_var'].mean():.3g}",
                     "collapsed_seeds": int((runs["final_var"] < COLLAPSE_THRESHOLD).sum()),
                     "wall_s_per_run": f"{runs['walls'].mean():.0f}"})
    with open(args.plots_dir / "figure3_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(r for r in rows if r["config"] != "state")
    with open(args.plots_dir / "figure3_curves.csv", "w", newline="") as f:   # re-plot without retraining
        writer = csv.writer(f)
        writer.writerow(["config", "seed", "step", "running_avg_return", "embedding_var"]
                        + [f"probe_r2_{n}" for n in STATE_NAMES])
        for config, runs in sweep.items():
            for k, seed in enumerate(runs["seeds"]):
                for g in range(len(grid)):
                    writer.writerow([config, seed, int(grid[g]), f"{runs['curves'][k, g]:.2f}",
                                     f"{runs['variances'][k, g]:.4g}"]
                                    + [f"{runs['probes'][k, v, g]:.3f}" for v in range(4)])
    print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")

    # ---- what the embedding knows: linear-probe R^2 of each true state variable
    pixel_configs = [c for c in sweep if c != "state"]
    if pixel_configs:
        fig, axes = plt.subplots(1, 4, figsize=(18, 4.5), sharey=True)
        for v, (ax, name) in enumerate(zip(axes, ["cart position x", "cart velocity x_dot", "pole angle theta",
                                                  "pole angular velocity theta_dot"])):
            for config in pixel_configs:
                r2 = np.nanmean(sweep[config]["probes"][:, v], 0)                # (len(grid),) mean over seeds
                k = min(10, len(r2))                                              # running mean of 10 updates
                ax.plot(grid[k - 1:], np.convolve(r2, np.ones(k) / k, mode="valid"), color=colors[config], lw=2,
                        label=labels[config])
            ax.set(title=name, xlabel="environment steps", ylim=(-0.1, 1.02))
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("held-out R² of a linear probe on s_x")
        axes[0].legend(fontsize=8, loc="lower left")
        fig.suptitle("What s_x knows: held-out R² of a ridge regression from s_x to the true state "
                     "(mean over seeds, running mean of 10 updates; raw values in updates.csv)", fontsize=13)
        fig.tight_layout()
        fig.savefig(args.plots_dir / "probe.png", dpi=110)
        plt.close(fig)
        print("probe R^2 at the end (x, x_dot, theta, theta_dot), mean of the last 10 updates and the seeds:")
        for config in pixel_configs:
            end = np.nanmean(sweep[config]["probes"][:, :, -10:], axis=(0, 2))                # (4,)
            print(f"  {config}: " + ", ".join(f"{r:.2f}" for r in end))

    plot_observation(args, plt)
    print(f"wrote figure3.png, figure3_summary.csv, figure3_curves.csv, probe.png, observation.png "
          f"in {args.plots_dir}")


def plot_observation(args, plt):
    """plots/observation.png: one transition as the networks see it, with the patch grid, beside the scene."""
    H, W, p = args.image_height, args.image_width, args.patch_size
    envs = gym.make_vec("CartPole-v1", num_envs=1, vectorization_mode="vector_entry_point")
    states, _ = envs.reset(seed=3)
    window = push_frame(np.zeros((1, 3, H, W), np.uint8), render_frames(states, H, W), np.ones(1, bool))
    for _ in range(8):                     # push right a few times, so the frames show motion
        x_window = window
        window, states, *_ = step_pixels(envs, np.ones(1, dtype=np.int64), window, np.zeros(1, bool),
                                         make_renderer("numpy", H, W))
    scene = GymnasiumRenderer(H, W).full_scene(states[0])
    fig = plt.figure(figsize=(17, 4.8))
    grid_spec = fig.add_gridspec(3, 4, width_ratios=[1, 1, 1, 1.5], height_ratios=[1, 0.3, 1])
    titles = [["x-encoder input: f(t-2)", "f(t-1)", "f(t)"], ["y-encoder input: f(t-1)", "f(t)", "f(t+1)"]]
    for row, win in enumerate((x_window[0], window[0])):
        for k in range(3):
            ax = fig.add_subplot(grid_spec[row, k] if row == 0 else grid_spec[row + 1, k])
            ax.imshow(win[k], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks(np.arange(-0.5, W, p), minor=False, labels=[])
            ax.set_yticks(np.arange(-0.5, H, p), labels=[])
            ax.grid(color="tab:orange", lw=0.7, alpha=0.7)
            ax.tick_params(length=0)
            ax.set_title(titles[row][k], fontsize=11)
    ax = fig.add_subplot(grid_spec[:, 3])
    ax.imshow(scene)
    top = SCREEN_HEIGHT - (CROP_BOTTOM + H * SCREEN_WIDTH / W)
    ax.add_patch(plt.Rectangle((0, top), SCREEN_WIDTH - 1, H * SCREEN_WIDTH / W, fill=False, ec="tab:orange", lw=2))
    ax.set_title("gymnasium's 600 x 400 scene at f(t+1)\norange box: the band our frames show", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.text(0.36, 0.5, f"{H} x {W} pixels per frame, {p} x {p} patches (orange grid): "
             f"{(H // p) * (W // p)} tokens per frame, 1 + 3 x {(H // p) * (W // p)} = {args.tokens} with CLS",
             ha="center", va="center", fontsize=11)
    fig.suptitle("What the encoders see: one transition (the cart pushed right)", fontsize=14)
    fig.savefig(args.plots_dir / "observation.png", dpi=110)
    plt.close(fig)


# ======================================================================================================
# 11. Using a trained agent: load, evaluate, animate
# ======================================================================================================


def load_run(run_dir, device="cpu"):
    """Rebuild a finished run's networks from its config.json and model.pt."""
    run_args = argparse.Namespace(**json.loads((run_dir / "config.json").read_text()))
    networks = make_networks(run_args, num_actions=2, device=device)
    weights = torch.load(run_dir / "model.pt", map_location=device)
    for name, net in zip(NETWORK_NAMES, networks):
        net.load_state_dict(weights[name])
    return run_args, networks


def greedy_actions(x_encoder, actor, observation):
    with torch.inference_mode():
        return actor(x_encoder(torch.as_tensor(observation))).argmax(-1).numpy()   # (N,)


def play_greedy(run_dir, episodes, seed, on_step=None):
    """Play `episodes` episodes (one per env) with the greedy policy; returns their returns (episodes,)."""
    run_args, (x_encoder, _, _, actor, _) = load_run(run_dir)
    H, W = run_args.image_height, run_args.image_width
    render = make_renderer(run_args.renderer, H, W)
    envs = gym.make_vec("CartPole-v1", num_envs=episodes, vectorization_mode="vector_entry_point")
    states, _ = envs.reset(seed=seed)
    window = push_frame(np.zeros((episodes, 3, H, W), np.uint8), render(states), np.ones(episodes, bool))
    returns, finished = np.zeros(episodes), np.zeros(episodes, bool)
    while not finished.all():
        if on_step:
            on_step(states, window)
        observation = window if run_args.obs == "pixels" else states
        window, states, reward, _, ended, _ = step_pixels(envs, greedy_actions(x_encoder, actor, observation),
                                                          window, np.zeros(episodes, bool), render)
        returns += reward * ~finished            # count each env's first episode only
        finished |= ended
    return returns


def evaluate(args):
    returns = play_greedy(args.eval, args.eval_episodes, seed=10_000 + args.seed)
    print(f"{args.eval}: greedy return over {len(returns)} episodes: {returns.mean():.1f} +- {returns.std():.1f} "
          f"(min {returns.min():.0f}, max {returns.max():.0f})")
    return returns


def make_gif(args):
    """One greedy episode: gymnasium's full scene beside the three frames the encoder receives."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter
    scenes, windows = [], []
    gymnasium_renderer = GymnasiumRenderer(16, 64)           # only its full_scene is used

    def record(states, window):
        scenes.append(gymnasium_renderer.full_scene(states[0])[::2, ::2])   # (200, 300, 3): half size, small GIF
        windows.append(window[0])
    episode_return = play_greedy(args.gif, 1, seed=10_000 + args.seed, on_step=record)[0]
    frames = range(0, len(scenes), 2)                        # every 2nd step, played at 25 fps = real time
    fig = plt.figure(figsize=(9, 3.6))
    grid_spec = fig.add_gridspec(3, 2, width_ratios=[1.4, 1])
    ax_scene = fig.add_subplot(grid_spec[:, 0])
    scene_image = ax_scene.imshow(scenes[0])
    ax_scene.axis("off")
    frame_images = []
    for k, name in enumerate(["f(t-2)", "f(t-1)", "f(t)"]):
        ax = fig.add_subplot(grid_spec[k, 1])
        frame_images.append(ax.imshow(windows[0][k], cmap="gray", vmin=0, vmax=255, interpolation="nearest"))
        ax.set_title(f"encoder input {name}", fontsize=9)
        ax.axis("off")
    title = fig.suptitle("")
    fig.tight_layout()

    def draw(i):
        scene_image.set_data(scenes[i])
        for k in range(3):
            frame_images[k].set_data(windows[i][k])
        title.set_text(f"{args.gif.name}: step {i + 1} of {len(scenes)} (episode return {episode_return:.0f})")
        return [scene_image, *frame_images, title]
    args.plots_dir.mkdir(parents=True, exist_ok=True)
    FuncAnimation(fig, draw, frames=frames).save(args.plots_dir / "agent.gif", writer=PillowWriter(fps=25), dpi=72)
    plt.close(fig)
    print(f"wrote {args.plots_dir / 'agent.gif'}: {len(scenes)} steps, return {episode_return:.0f}")


if __name__ == "__main__":
    args = parse_args()
    if args.benchmark_renderer:
        benchmark_renderer(args.image_height, args.image_width, args.num_envs)
    elif args.figure3:
        figure3(args)
    elif args.plot:
        plot(args)
    elif args.eval:
        evaluate(args)
    elif args.gif:
        make_gif(args)
    else:
        train(args)
