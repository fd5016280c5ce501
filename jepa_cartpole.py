"""
jepa_cartpole.py: a Joint-Embedding Predictive Architecture (JEPA) that trains a PPO agent on pixel Cart Pole.

A single-file reference implementation of Kenneweg, Kenneweg & Hammer, "JEPA for RL: Investigating Joint-Embedding
Predictive Architectures for Reinforcement Learning", ESANN 2025 (arXiv 2504.16591). The idea: a vision transformer
trained with a JEPA loss (predict the embedding of the *next* frames from the embedding of the current ones, in
latent space, never in pixels) learns a compact state s_x for a PPO agent. The paper reports that the JEPA loss alone
collapses (every image -> the same embedding) and that the RL gradients or a variance regulariser prevent it. The
README says what our runs show.

    frames f(t-2) f(t-1) f(t)                  frames f(t-1) f(t) f(t+1)
              |                                           |
     x-encoder (ViT, CLS token)  --- EMA of weights -->  y-encoder (same ViT, no gradient)
              |                                           |
             s_x  --+--> actor  (PPO policy)             s_y
              |     +--> critic (PPO value)               |
              |                                           |
     predictor(s_x, action) --> Eq. 1: ||pred - s_y||^2 <-+
     Eq. 2: -min(1, mean batch variance of s_x) (collapse guard); Eq. 3: total = actor + critic + JEPA (+ Eq. 2)

The paper's four configurations (Section 3, Figure 3):
    python jepa_cartpole.py --no-jepa --rl-grad    --no-reg   # 1: baseline, encoder trained by PPO only
    python jepa_cartpole.py --jepa    --rl-grad    --no-reg   # 2: JEPA + RL gradients (the paper's best)
    python jepa_cartpole.py --jepa    --no-rl-grad --no-reg   # 3: JEPA only (paper: collapses; at our defaults: no)
    python jepa_cartpole.py --jepa    --no-rl-grad --reg      # 4: JEPA + regulariser (the paper: no collapse)

Part 1, the method in the paper's order, is a complete program: `train(build_parser().parse_args())` trains and prints
a line per update. Part 2 (skip it at first) adds the tools, hooked in only through train()'s `render` and `log`.
Shapes: N envs, T steps per env in a rollout, F (Fr in code) = 3 frames of H x W pixels, p x p pixels a patch, R x C
patches a frame (P = R * C), L = 1 + F * P tokens (CLS first), Q tokens that get an output (L, or 1 in the last block),
D = d = width of s_x, nh heads of width hs = D / nh, A = 2 actions, B a batch of windows, M a minibatch (a rollout's
N * T steps less its autoreset steps, in --num-minibatches parts: at most 512 / 8 = 64 at the defaults).
"""

import argparse
import collections
import copy
import math
import time

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ======================================================================================================
# PART 1: THE METHOD
# ======================================================================================================

# ---- 1. Settings --------------------------------------------------------------------------------------------------
# What the paper fixes has its value as default (d = 64, tau = 0.99, 100k steps; the switches: configuration 2, its
# best). What it leaves open (image and ViT size, PPO) is our choice, a flag; the help gives reasons where we have them.

def build_parser():
    p = argparse.ArgumentParser(description="JEPA + PPO on pixel Cart Pole (Kenneweg et al., ESANN 2025).",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    on_off = argparse.BooleanOptionalAction
    # --- the paper's three switches (with no flags: configuration 2)
    p.add_argument("--jepa", action=on_off, default=True, help="add the JEPA loss of Eq. 1 to the loss (Eq. 3)")
    p.add_argument("--rl-grad", action=on_off, default=True, help="let the actor and critic gradients flow into "
                   "the x-encoder (--no-rl-grad: the heads get s_x.detach())")
    p.add_argument("--reg", action=on_off, default=False, help="add the variance regulariser of Eq. 2")
    # --- the run (Part 2 adds --threads, --out, --overwrite, --window and --renderer)
    p.add_argument("--seed", type=int, default=1, help="seeds torch, numpy and the environments")
    p.add_argument("--device", default="cpu", help="a torch device: cpu, cuda, cuda:1, mps")
    p.add_argument("--total-steps", type=int, default=100_000, help="env steps, all envs (paper: 100k)")
    p.add_argument("--stop-after", type=int, default=None, help="end the run after this many env steps, on the "
                   "--total-steps run's learning-rate schedule: the first part of that run, exactly")
    p.add_argument("--num-envs", type=int, default=16, help="parallel Cart Poles: bigger, cheaper network batches")
    # --- pixels and the ViT (the paper fixes only d = 64)
    # 16 rows of 600 / 64 = 9.375 screen px show 150 px above the frame's bottom; the upright pole needs 147.5
    p.add_argument("--image-height", type=int, default=16, help="rows: at 64 columns, the band with cart and pole")
    p.add_argument("--image-width", type=int, default=64, help="columns of the frame: the whole track")
    p.add_argument("--patch-size", type=int, default=8, help="square patch side in pixels")
    p.add_argument("--embed-dim", type=int, default=64, help="d, the width of s_x (paper: 64)")
    p.add_argument("--depth", type=int, default=2, help="transformer blocks in each encoder")
    p.add_argument("--heads", type=int, default=4, help="attention heads per block")
    p.add_argument("--mlp-ratio", type=int, default=2, help="hidden width of the block MLP, in units of d")
    p.add_argument("--final-norm", action=on_off, default=True, help="LayerNorm on s_x as in a standard ViT (the "
                   "paper does not say); without it configuration 2 learned slower in a tuning run")
    p.add_argument("--frame-index", action=on_off, default=True, help="frame index in the position (off: unordered)")
    # --- JEPA (the paper fixes tau = 0.99 and the unweighted sum of Eq. 3)
    p.add_argument("--predictor-hidden", type=int, default=128, help="hidden width of the two-layer predictor")
    p.add_argument("--ema-tau", type=float, default=0.99, help="the y-encoder's EMA rate tau (paper: 0.99)")
    p.add_argument("--jepa-coef", type=float, default=1.0, help="weight of Eq. 1 in Eq. 3 (paper: 1)")
    p.add_argument("--reg-coef", type=float, default=1.0, help="weight of Eq. 2 in Eq. 3 (paper: 1)")
    p.add_argument("--reg-form", choices=["var", "std"], default="var", help="with --reg: Eq. 2 or VICReg's (ex. 8)")
    p.add_argument("--fresh-targets", action=on_off, default=False, help="s_y per minibatch (slower), not per rollout")
    # --- PPO: CleanRL's ppo.py, except 16 envs x 32 steps (CleanRL: 4 x 128, the same 512 per rollout), one hidden
    #     layer per head (CleanRL: two) and every value whose help says otherwise (plots/README.md: What mattered).
    p.add_argument("--num-steps", type=int, default=32, help="rollout length per env between updates")
    p.add_argument("--num-minibatches", type=int, default=8, help="minibatches per epoch: 8 of at most 64 "
                   "(autoreset steps are left out), twice CleanRL's optimiser steps, which the ViT needs")
    p.add_argument("--update-epochs", type=int, default=4, help="passes over each rollout")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate; CleanRL's 2.5e-4 was slow")
    p.add_argument("--predictor-lr-scale", type=float, default=1.0, help="the predictor's lr / --learning-rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on all trained networks")
    p.add_argument("--anneal-lr", action=on_off, default=True, help="decay the learning rate linearly to 0")
    p.add_argument("--gamma", type=float, default=0.98, help="discount factor (RL Zoo's for Cart Pole)")
    p.add_argument("--gae-lambda", type=float, default=0.8, help="lambda of the advantage estimate (RL Zoo's)")
    p.add_argument("--clip-coef", type=float, default=0.2, help="PPO ratio clipping")
    p.add_argument("--ent-coef", type=float, default=0.0, help="entropy bonus weight (RL Zoo's)")
    p.add_argument("--vf-coef", type=float, default=0.5, help="value loss weight (no value clipping)")
    p.add_argument("--max-grad-norm", type=float, default=1000.0, help="gradient clipping over all trained networks: "
                   "off in practice; under a clip of 5 (97%% of updates clipped) configuration 2 learned slower")
    return p   # Part 2 adds the tools' flags, and checks every value's range before a run starts


# ---- 2. Pixel Cart Pole (paper Section 3: "Cart Pole ... using pixel observations") -------------------------------
# gymnasium's CartPole-v1, vectorised. The agent never sees its 4 numbers (`physics`; "state" means s_x): they only
# *draw* the frame, gymnasium's own 600 x 400 scene (4.8 world units of track) straight at the network's resolution,
# in grayscale, only the band cart and pole can reach. A test checks it against gymnasium's own renderer.

SCREEN_WIDTH = 600.0                    # gymnasium's screen, in screen pixels
SCALE = SCREEN_WIDTH / 4.8              # screen pixels per world unit (world width = 2 * x_threshold)
CART_HALF_WIDTH, CART_HALF_HEIGHT = 25.0, 15.0
CART_Y = 100.0                          # cart centre (gymnasium's "carty"); the track line is here
AXLE_Y = CART_Y + CART_HALF_HEIGHT / 2  # the pole's pivot
POLE_HALF_WIDTH, POLE_LENGTH, AXLE_RADIUS = 5.0, SCALE * 1.0, 5.0   # the pole is 2 x 0.5 world units long
CROP_BOTTOM = 80.0                      # screen y of the frame's bottom edge (just under the cart)
SKY, CART_GRAY, POLE_GRAY, AXLE_GRAY = 255.0, 0.0, 161.0, 139.2  # luma of gymnasium's colours


def box_coverage(offset, low, high, pixel):
    """Fraction of a pixel of width `pixel`, centred at `offset`, inside [low, high]: anti-aliasing (exact for an
    axis-aligned edge, close for the tilted pole), so the network can see motion smaller than a pixel."""
    return np.clip((np.minimum(offset + pixel / 2, high) - np.maximum(offset - pixel / 2, low)) / pixel, 0.0, 1.0)


def render_frames(physics, height, width):
    """(N, 4) physics [x, x_dot, theta, theta_dot] -> (N, height, width) uint8 frames, white sky, dark objects."""
    pixel = SCREEN_WIDTH / width                                   # screen pixels per image pixel
    xs = ((np.arange(width) + 0.5) * pixel).astype(np.float32)    # (W,) pixel-centre screen x
    ys = (CROP_BOTTOM + (height - np.arange(height) - 0.5) * pixel).astype(np.float32)  # (H,) screen y, y up
    cart_x = (physics[:, 0] * SCALE + SCREEN_WIDTH / 2).astype(np.float32)  # (N,)
    theta = physics[:, 2].astype(np.float32)                       # (N,) radians, positive = leaning right
    image = np.full((len(physics), height, width), SKY, dtype=np.float32)  # (N, H, W)

    def paint(coverage, gray):  # alpha-composite one shape, in gymnasium's drawing order
        image[:] = image + coverage * (gray - image)

    dx = xs[None, :] - cart_x[:, None]                                                   # (N, W)
    paint(box_coverage(dx, -CART_HALF_WIDTH, CART_HALF_WIDTH, pixel)[:, None, :]          # cart: (N, H, W)
          * box_coverage(ys - CART_Y, -CART_HALF_HEIGHT, CART_HALF_HEIGHT, pixel)[None, :, None], CART_GRAY)
    dx, dy = dx[:, None, :], (ys - AXLE_Y)[None, :, None]                                 # (N, 1, W), (1, H, 1)
    sin, cos = np.sin(theta)[:, None, None], np.cos(theta)[:, None, None]                 # (N, 1, 1)
    along, across = dx * sin + dy * cos, dx * cos - dy * sin      # pole's own frame: (N, H, W) each
    paint(box_coverage(along, -POLE_HALF_WIDTH, POLE_LENGTH - POLE_HALF_WIDTH, pixel)
          * box_coverage(across, -POLE_HALF_WIDTH, POLE_HALF_WIDTH, pixel), POLE_GRAY)
    paint(np.clip((AXLE_RADIUS - np.sqrt(dx * dx + dy * dy)) / pixel + 0.5, 0.0, 1.0), AXLE_GRAY)  # axle disc
    paint(box_coverage(ys - CART_Y, 0.0, 1.0, pixel)[None, :, None], CART_GRAY)         # track line, drawn last
    return np.rint(image).astype(np.uint8)


def push_frame(frame_stack, frames, episode_start):
    """Slide each env's window (its 3 stacked frames [f(t-2), f(t-1), f(t)], (N, 3, H, W)) on by the new frames
    (N, H, W). Where an episode starts there is no past: its first frame fills all 3 slots, never mixing episodes."""
    new = np.concatenate([frame_stack[:, 1:], frames[:, None]], axis=1)  # (N, 3, H, W)
    new[episode_start] = frames[episode_start, None]
    return new


def reset_pixels(envs, seed, render):
    """Reset N pixel Cart Poles: (frame_stack (N, 3, H, W), physics (N, 4)). No past yet: each first frame 3 times."""
    physics, _ = envs.reset(seed=seed)
    return np.repeat(render(physics)[:, None], 3, axis=1), physics


def step_pixels(envs, actions, frame_stack, previous_episode_end, render):
    """One step of N pixel Cart Poles, with gymnasium 1.x "next-step" autoreset.
    After an episode ends, gymnasium's NEXT step() ignores the action and returns the first observation of a new
    episode with reward 0. That step is not a real transition: valid = False there, and no loss uses it.
    Returns (frame_stack, physics, reward, terminated, episode_end, valid), episode_end = terminated or truncated."""
    physics, reward, terminated, truncated, _ = envs.step(actions)
    frame_stack = push_frame(frame_stack, render(physics), episode_start=previous_episode_end)
    return frame_stack, physics, reward, terminated, terminated | truncated, ~previous_episode_end


# ---- 3. x-encoder (paper Section 2, "Input and Encoder") ----------------------------------------------------------
# A small vision transformer. The patches of all three frames enter ONE transformer together, so attention can
# compare the cart in f(t-2) with the cart in f(t): one frame shows where things are, three show how they move.
# Each token's positional encoding encodes its patch row, its patch column AND its frame index (without it the
# frames are an unordered set: try --no-frame-index). A learnable CLS token is prepended; its last-layer output,
# s_x (width d = 64), is the state. Defaults: 2 x 8 patches of 8 x 8 a frame, 1 + 3 x 16 = 49 tokens, 72,128 weights.
ENCODE_CHUNK = 256   # windows per pass when many are encoded: at most 256 x 4 heads x 49 x 49 attention weights (10 MB)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, num_queries=None):     # (B, L, D); num_queries=Q: outputs for the first Q tokens only
        B, L, D = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads)   # (B, L, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                         # each (B, nh, L, hs)
        q, x = q[:, :, :num_queries], x[:, :num_queries]  # [:None] keeps all: q (B, nh, Q, hs), x (B, Q, D)
        attended = F.scaled_dot_product_attention(q, k, v)      # (B, nh, Q, hs): each query over all L tokens
        x = x + self.proj(attended.transpose(1, 2).flatten(2))  # (B, Q, D)
        return x + self.mlp(self.norm2(x))


def last_block_cls_only(block, x):
    """Speed, same result: only the CLS output is read after the last block, so only the CLS token needs a query, an
    attention output and an MLP there (every token still gives keys and values). A default run: 29% less time."""
    return block(x, num_queries=1)                                    # (B, 1, D)


class ViTEncoder(nn.Module):
    """Three grayscale frames (B, 3, H, W) uint8 -> s, the CLS token's last-layer embedding (B, D)."""

    def __init__(self, image_height, image_width, patch_size, dim, depth, heads, mlp_ratio, final_norm=True,
                 frame_index=True):
        super().__init__()
        self.patch_size, self.rows, self.cols = patch_size, image_height // patch_size, image_width // patch_size
        # Patch embedding as in the ViT paper: flatten each p x p patch, one linear map shared by all patches.
        self.patch_embed = nn.Linear(patch_size * patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Learnable positional encoding, three tables summed per token: pos(f, r, c) = frame[f] + row[r] + col[c].
        self.frame_pos = nn.Parameter(torch.randn(3, dim) * 0.02)
        self.row_pos = nn.Parameter(torch.randn(self.rows, dim) * 0.02)
        self.col_pos = nn.Parameter(torch.randn(self.cols, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        # A final LayerNorm fixes each s's scale across its d features (up to a learned gain and bias): each sample on
        # its own, not the batch, so it cannot prevent collapse. With gain 1 each s lies at length sqrt(d) from the
        # bias, so the batch variance averaged over features can hardly exceed 1: Eq. 2's clamp rarely acts.
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()
        self.frame_index = frame_index                                 # False: --no-frame-index

    def positional_encoding(self):
        frame = self.frame_pos if self.frame_index else 0 * self.frame_pos   # --no-frame-index: frames unordered
        pos = frame[:, None, None] + self.row_pos[None, :, None] + self.col_pos[None, None, :]  # (F, R, C, D)
        return pos.flatten(0, 2)                                       # (F*R*C, D), in the token order below

    def forward(self, windows):                                        # (B, F, H, W) uint8
        (B, Fr, H, W), R, C, p = windows.shape, self.rows, self.cols, self.patch_size
        ink = 1.0 - windows.float() / 255.0        # 0 on the white sky, 1 on the black cart: empty patches ~ 0
        patches = ink.view(B, Fr, R, p, C, p).permute(0, 1, 2, 4, 3, 5).reshape(B, Fr * R * C, p * p)  # (B, 3P, p*p)
        x = self.patch_embed(patches) + self.positional_encoding()    # (B, 3P, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)   # (B, 1+3P, D)
        for block in self.blocks[:-1]:
            x = block(x)                                               # (B, 1+3P, D)
        x = last_block_cls_only(self.blocks[-1], x)                    # (B, 1, D)
        return self.norm(x[:, 0])                                      # (B, D)  s = the CLS token


# ---- 4. y-encoder: an exponential moving average of the x-encoder (paper Section 2, "Input and Encoder") ----------
# Same architecture, same initial weights (a deep copy). It reads the window one step later, [f(t-1), f(t), f(t+1)],
# exactly the x-encoder's NEXT input: s_y is "the embedding of where the system went". No gradients, not in the
# optimiser; after every optimiser step, in every configuration:  theta_y <- tau * theta_y + (1 - tau) * theta_x

def make_y_encoder(x_encoder):
    return copy.deepcopy(x_encoder).requires_grad_(False)


@torch.no_grad()
def ema_update(y_encoder, x_encoder, tau):
    for theta_y, theta_x in zip(y_encoder.parameters(), x_encoder.parameters()):
        theta_y.lerp_(theta_x, 1.0 - tau)            # theta_y + (1 - tau) * (theta_x - theta_y)


# ---- 5. Predictor (paper Section 2, "Predictor") ------------------------------------------------------------------
# Two layers, as the paper says. It needs the action: the next frames depend on which way the cart was pushed (the
# known action plays a JEPA's latent z). The one-hot action, projected to the hidden width, is added "to the embedding
# after the first layer" (the paper; before the ReLU: our reading). 64 -> 128 (+ action 2 -> 128) -> 64: 16,960 weights.

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
        return self.fc2(hidden)                                       # (B, D)  the prediction of s_y


# ---- 6. Losses and the collapse indicator (paper Section 2, Eq. 1-2; Eq. 3 is written in the training step) -------
def jepa_loss(s_y_pred, s_y):
    # Eq. 1: L_jepa = || s_y_pred - s_y ||_2^2, averaged over the batch (its text says "Euclidean distance"). The
    # square's gradient shrinks to 0 at a perfect prediction; the distance's has length 1 however close it gets.
    return (s_y_pred - s_y).pow(2).sum(dim=-1).mean()


COLLAPSE_THRESHOLD = 1e-7   # the paper's: a mean batch-wise variance of s_x below it means collapse


def embedding_variance(s):
    # The paper's collapse indicator: the batch-wise variance of each of the d features, averaged over them.
    # Below COLLAPSE_THRESHOLD the encoder has collapsed: every input maps to (almost) the same s_x.
    return s.var(dim=0).mean()


def variance_regulariser(s_x, form="var"):
    # Eq. 2: L_reg = -min(1, (1/d) sum_i Var_batch(s_x)_i) rewards spread, the opposite of collapse (the clamp at 1
    # rarely acts with our final LayerNorm). Its push, dVar/ds = 2 (s - mean) / (B - 1), fades as the batch closes in;
    # VICReg's hinge on each feature's std (Bardes et al. 2022, 4.1) pushes on down to a spread of ~0.01 (ex. 8).
    if form == "std":
        return F.relu(1 - torch.sqrt(s_x.var(dim=0) + 1e-4)).mean()
    return -torch.clamp(embedding_variance(s_x), max=1.0)


# ---- 7. PPO actor-critic (paper Section 3: "an actor-critic-style PPO algorithm") ---------------------------------
# Clipped PPO as in CleanRL (no value-loss clipping), on s_x through two small heads; --rl-grad: see training_step.

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
    """GAE. rewards, terminated, episode_end: (T, N); values: (T+1, N) -> (advantages, returns), (T, N) each.
    A termination (pole past 12 degrees, cart off the track) has no future: V(next) = 0. A truncation (500 steps) is
    no failure: bootstrap with V of the final window, which the next-step autoreset still gives."""
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        # delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
        delta = rewards[t] + gamma * values[t + 1] * (1.0 - terminated[t]) - values[t]
        # A_t = delta_t + gamma * lambda * (1 - episode_end_t) * A_{t+1}
        next_advantage = delta + gamma * gae_lambda * (1.0 - episode_end[t]) * next_advantage
        advantages[t] = next_advantage
    return advantages, advantages + values[:-1]


def ppo_losses(logits, values, mb, clip_coef):
    """Clipped surrogate policy loss, value loss, entropy and approximate KL on one minibatch."""
    dist = torch.distributions.Categorical(logits=logits)
    log_ratio = dist.log_prob(mb["actions"]) - mb["logprobs"]
    ratio = log_ratio.exp()                                           # pi_new(a|s) / pi_old(a|s)
    # Advantages normalised per minibatch, as CleanRL does: the policy loss's scale does not grow with the return's.
    advantages = (mb["advantages"] - mb["advantages"].mean()) / (mb["advantages"].std() + 1e-8)
    # L_policy = E[ max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) ]: the negative clipped surrogate.
    policy_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    value_loss = 0.5 * (values - mb["returns"]).pow(2).mean()        # L_value = 1/2 E[(V(s) - R)^2]
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
    return policy_loss, value_loss, dist.entropy().mean(), approx_kl


# ---- 8. The training step and the training loop (flat, CleanRL style) ---------------------------------------------
def make_networks(args, num_actions):
    x_encoder = ViTEncoder(args.image_height, args.image_width, args.patch_size, args.embed_dim, args.depth,
                           args.heads, args.mlp_ratio, final_norm=args.final_norm, frame_index=args.frame_index)
    y_encoder = make_y_encoder(x_encoder)
    predictor = Predictor(args.embed_dim, args.predictor_hidden, num_actions)
    actor, critic = make_heads(args.embed_dim, num_actions)
    return {"x_encoder": x_encoder, "y_encoder": y_encoder, "predictor": predictor, "actor": actor, "critic": critic}


def make_optimizer(nets, args):
    # No y-encoder: it learns only through the EMA. AdamW with weight decay 0 is Adam. base_lr: a group's rate before
    # train() anneals it. fused=True: speed, same result (0.8 against 3.6 ms a step, plots/README.md#speed; a test).
    return torch.optim.AdamW(
        [{"params": [p for k in ("x_encoder", "actor", "critic") for p in nets[k].parameters()],
          "lr": args.learning_rate, "base_lr": args.learning_rate},
         {"params": nets["predictor"].parameters(), "lr": args.learning_rate * args.predictor_lr_scale,
          "base_lr": args.learning_rate * args.predictor_lr_scale}],
        eps=1e-5, weight_decay=args.weight_decay, fused=True)


def training_step(nets, optimizer, mb, args):
    """One optimiser step on one minibatch `mb` (a dict of tensors): PPO + Eq. 1-3, then the EMA. mb: windows
    (M, 3, H, W) = [f(t-2), f(t-1), f(t)]; s_y (M, D), the y-encoder's embedding of [f(t-1), f(t), f(t+1)]; actions,
    logprobs, advantages, returns (M,). Returns the logged numbers."""
    # 1. Encode: s_x = x-encoder(f(t-2), f(t-1), f(t)).
    s_x = nets["x_encoder"](mb["windows"])                                            # (M, D)

    # 2. PPO on s_x. SWITCH --rl-grad: with --no-rl-grad this detach cuts the path from the actor and critic
    #    losses into the x-encoder (the heads still learn on the embedding they are given).
    s_rl = s_x if args.rl_grad else s_x.detach()
    policy_loss, value_loss, entropy, approx_kl = ppo_losses(
        nets["actor"](s_rl), nets["critic"](s_rl).squeeze(-1), mb, args.clip_coef)

    # 3. JEPA: predict the embedding of the next window from s_x and the action (Eq. 1). s_y carries no gradient.
    l_jepa = jepa_loss(nets["predictor"](s_x, mb["actions"]), mb["s_y"]) if args.jepa else torch.zeros(())

    # 4. The variance regulariser (Eq. 2; or VICReg's, --reg-form std) on this minibatch's s_x.
    l_reg = variance_regulariser(s_x, args.reg_form)

    # 5. Eq. 3: L = L_actor + L_critic + jepa_coef * L_jepa (+ reg_coef * L_reg), both coefficients 1 by default,
    #    with L_actor = L_policy - ent_coef * entropy and L_critic = vf_coef * L_value (CleanRL's form).
    loss = policy_loss - args.ent_coef * entropy + args.vf_coef * value_loss
    if args.jepa:   # SWITCH --jepa: the only path from Eq. 1 into the x-encoder and the predictor
        loss = loss + args.jepa_coef * l_jepa
    if args.reg:    # SWITCH --reg: the only path from Eq. 2 into the x-encoder
        loss = loss + args.reg_coef * l_reg
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} (jepa {l_jepa.item()}, reg {l_reg.item()}, "
                                 f"policy {policy_loss.item()}, value {value_loss.item()})")

    # 6. Backward and step, all trained networks, ONE gradient clip over all. At the default 1000 it is a safety net
    #    only: in our tuning runs the update means of the norm stayed below 419 (a clip of 5 held learning back).
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = nn.utils.clip_grad_norm_(trained, args.max_grad_norm)              # the norm before clipping
    optimizer.step()

    # 7. Momentum update of the y-encoder, after every optimiser step.
    ema_update(nets["y_encoder"], nets["x_encoder"], args.ema_tau)

    return {"loss": loss, "jepa_loss": l_jepa, "reg_loss": l_reg, "policy_loss": policy_loss,
            "value_loss": value_loss, "entropy": entropy, "approx_kl": approx_kl, "grad_norm": grad_norm,
            "embedding_var": embedding_variance(s_x.detach())}


class ConsoleLog:
    """The door to the tools: train() calls update(step, means, rollout) once per update and finish() once. This one
    counts episodes and prints a line; Part 2's RunLog reads more of the rollout and writes files."""

    def __init__(self, window=20):
        self.window, self.start, self.open_episodes = window, time.time(), None   # open: each env's return, length
        self.recent_returns = collections.deque(maxlen=window)       # the last `window` episodes' returns: the mean

    def record(self, step, means, rollout):
        """The update's row (with the mean return of the last `window` episodes) and its rollout's ended episodes."""
        rewards, valid, ended = (rollout[k].numpy() for k in ("rewards", "valid", "episode_end"))   # (T, N) each
        T, N = rewards.shape
        returns, lengths = self.open_episodes or (np.zeros(N), np.zeros(N, dtype=int))
        finished = []
        for t in range(T):
            returns += rewards[t]                                      # reward is 0 on an autoreset step
            lengths += valid[t]
            for i in np.flatnonzero(ended[t]):
                finished.append((step - (T - 1 - t) * N, returns[i], lengths[i]))
                returns[i], lengths[i] = 0.0, 0
        self.open_episodes = returns, lengths
        self.recent_returns.extend(r for _, r, _ in finished)
        mean_return = float(np.mean(self.recent_returns)) if self.recent_returns else float("nan")
        return dict(means, step=step, mean_return=mean_return, sps=step / (time.time() - self.start)), finished

    def line(self, row, extra=""):                   # extra: a subclass's diagnostics, shown before the JEPA loss
        collapsed = f" <- collapsed (var < {COLLAPSE_THRESHOLD:g})" if row["embedding_var"] < COLLAPSE_THRESHOLD else ""
        return (f"step {row['step']:>7} | sps {row['sps']:4.0f} | return(last {self.window}) {row['mean_return']:5.1f}"
                f" | embedding var {row['embedding_var']:.1e}{extra} | jepa {row['jepa_loss']:.3f}{collapsed}")

    def update(self, step, means, rollout):
        self.row, _ = self.record(step, means, rollout)
        print(self.line(self.row), flush=True)

    def finish(self, nets):                           # nets: for a logger that saves them (Part 2's RunLog)
        wall = time.time() - self.start
        return {"steps": self.row["step"], "wall_s": wall, "sps": self.row["step"] / wall,
                "final_mean_return": self.row["mean_return"], "return_window_episodes": self.window}


def rollout_sizes(num_envs, num_steps, total_steps):
    """(transitions per rollout, updates per run): whole rollouts, at least total_steps env steps."""
    return num_envs * num_steps, math.ceil(total_steps / (num_envs * num_steps))


def train(args, render=None, log=None):
    """Train the agent of Part 1's flags; returns (summary, nets). render: physics -> frames; log: the tools' door."""
    # ---- set-up: seeds, environments, networks, optimiser
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    H, W, N, T, D = args.image_height, args.image_width, args.num_envs, args.num_steps, args.embed_dim
    batch_size, num_updates = rollout_sizes(N, T, args.total_steps)   # the learning-rate schedule's length
    run_updates = rollout_sizes(N, T, args.stop_after or args.total_steps)[1]   # --stop-after: its first part
    log, render = log or ConsoleLog(), render or (lambda physics: render_frames(physics, H, W))
    envs = gym.make_vec("CartPole-v1", num_envs=N, vectorization_mode="vector_entry_point")
    nets = {k: net.to(device) for k, net in make_networks(args, envs.single_action_space.n).items()}
    x_encoder, y_encoder, actor, critic = nets["x_encoder"], nets["y_encoder"], nets["actor"], nets["critic"]
    optimizer = make_optimizer(nets, args)

    # ---- rollout storage. windows[t] is the x-encoder's input at step t; windows[t+1] is the y-encoder's.
    windows = torch.zeros((T + 1, N, 3, H, W), dtype=torch.uint8)    # uint8: 4x less memory than float
    actions = torch.zeros((T, N), dtype=torch.long)
    logprobs, rewards, terminated, episode_end = (torch.zeros((T, N)) for _ in range(4))
    values = torch.zeros((T + 1, N))                                 # values[T]: the bootstrap value
    valid = torch.zeros((T, N), dtype=torch.bool)                    # False on autoreset steps (see step_pixels)
    rollout_s_x, rollout_physics = torch.zeros((T, N, D)), torch.zeros((T, N, 4))   # for the logger's diagnostics
    frame_stack, physics = reset_pixels(envs, args.seed, render)    # each env's window now (N, 3, H, W); (N, 4)
    previous_episode_end, global_step = np.zeros(N, dtype=bool), 0

    for update in range(1, run_updates + 1):
        if args.anneal_lr:                  # linearly from base_lr at the first update towards 0 after the last
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * (1.0 - (update - 1.0) / num_updates)

        # ---- 1. Rollout: act with the current policy for T steps in N envs.
        windows[0] = torch.from_numpy(frame_stack)
        for t in range(T):
            rollout_physics[t] = torch.from_numpy(physics)         # the physics at f(t); the agent never sees it
            with torch.inference_mode():                            # no autograd bookkeeping while acting
                s_x = x_encoder(windows[t].to(device))              # (N, D)
                dist = torch.distributions.Categorical(logits=actor(s_x))
                action = dist.sample()                              # (N,)
                values[t], logprobs[t] = critic(s_x).squeeze(-1).cpu(), dist.log_prob(action).cpu()
            actions[t], rollout_s_x[t] = action.cpu(), s_x.cpu()
            frame_stack, physics, reward, term, ended, is_valid = step_pixels(
                envs, action.cpu().numpy(), frame_stack, previous_episode_end, render)
            global_step += N               # every env step, the autoreset steps too (one per finished episode)
            windows[t + 1], valid[t], rewards[t] = (torch.from_numpy(a) for a in (frame_stack, is_valid, reward))
            terminated[t], episode_end[t] = torch.from_numpy(term * 1.0), torch.from_numpy(ended * 1.0)
            previous_episode_end = ended

        # ---- 2. Advantages (GAE), and the JEPA targets s_y for the whole rollout.
        next_windows = windows[1:].flatten(0, 1)                    # (N*T, 3, H, W): the y-encoder's inputs
        with torch.inference_mode():
            values[T] = critic(x_encoder(windows[T].to(device))).squeeze(-1).cpu()   # bootstrap value
            # Speed, NOT the same result: s_y = y-encoder(windows[t+1]) once per rollout. The EMA runs after every step,
            # so the targets lag it by up to epochs x minibatches - 1 = 31 steps (the y-encoder moves 1 - 0.99^31 = 27%)
            # At the defaults configuration 3 does not collapse (0 of 10 in Figure 3); with a slow predictor (x 0.1)
            # the lag mattered: per-minibatch targets (--fresh-targets) kept 2 of 2 seeds from collapse (plots/README).
            s_y = (torch.cat([y_encoder(w.to(device)) for w in next_windows.split(ENCODE_CHUNK)])
                   if args.jepa and not args.fresh_targets else torch.zeros(batch_size, D))   # (N*T, D)
        advantages, returns = compute_gae(rewards, values, terminated, episode_end, args.gamma, args.gae_lambda)

        # ---- 3. Update: --update-epochs passes over the rollout's valid steps, in --num-minibatches minibatches.
        batch = {"windows": windows[:T].flatten(0, 1), "s_y": s_y, "actions": actions.flatten(),
                 "logprobs": logprobs.flatten(), "advantages": advantages.flatten(), "returns": returns.flatten()}
        valid_indices = torch.nonzero(valid.flatten()).squeeze(1)   # (N*T minus the autoreset steps,)
        step_logs = []                                              # one dict of numbers per optimiser step
        for epoch in range(args.update_epochs):
            for mb_indices in valid_indices[torch.randperm(len(valid_indices))].tensor_split(args.num_minibatches):
                mb = {k: v[mb_indices].to(device) for k, v in batch.items()}
                if args.fresh_targets and args.jepa:
                    with torch.no_grad():
                        mb["s_y"] = y_encoder(next_windows[mb_indices].to(device))          # (M, D)
                step_logs.append({k: v.item() for k, v in training_step(nets, optimizer, mb, args).items()})

        # ---- 4. Log, in one block: the update's means over its optimiser steps, and its rollout, go to the logger.
        means = {k: np.mean([numbers[k] for numbers in step_logs]) for k in step_logs[0]}
        means["learning_rate"] = optimizer.param_groups[0]["lr"]
        log.update(global_step, means, rollout=dict(rewards=rewards, valid=valid, episode_end=episode_end,
                   windows=windows, s_x=rollout_s_x, physics=rollout_physics, x_encoder=x_encoder))  # for Part 2

    envs.close()
    return log.finish(nets), nets


# ======================================================================================================
# PART 2: EXPERIMENTS AND TOOLS (skip on a first reading)
# ======================================================================================================
# Nothing below is needed to follow the method. Here: the tools' flags and the range check of every flag, the
# linear probe, gymnasium's renderer for checking ours, the state-based PPO reference, the Figure 3, exercise and
# collapse sweeps with their plots, evaluation and the GIF of a trained agent.
import contextlib
import csv
import json
import multiprocessing
import os
import platform
import signal
import sys
import timeit
import warnings
from pathlib import Path

# ---- 9. The tools' flags, the range check of every flag, and a run's log files ------------------------------------
# The collapse demonstration's setting: choices the paper leaves open, never what it fixes (README: "When does
# JEPA collapse?" has the runs that chose it). Applied to the collapse sweep's runs by --collapse.
COLLAPSE_SETTING = {"predictor_lr_scale": 0.01, "weight_decay": 0.0}   # chosen on seeds 100-104: 5 of 5 (README)
COLLAPSE_ARMS = {  # name: (jepa, rl_grad, reg, what else the arm changes)
    "JEPA only": (True, False, False, {}),
    "JEPA + RL gradients": (True, True, False, {}),
    "JEPA + regulariser": (True, False, True, {}),
    # Not the paper's Eq. 3, whose terms have no weights: Eq. 2 at weight 1 did not prevent this collapse (10 of 10
    # seeds collapsed); x100 was chosen on seeds 100 and 101 (README: collapse).
    "JEPA + regulariser x100": (True, False, True, {"reg_coef": 100.0}),
}
# The lab's runs (README: Exercises for a lab): each run's Part 1 flags where they differ from the defaults, as the
# README's commands give them. --exercises runs them on --seeds seeds from EXERCISE_SEED (no figure or tuning uses
# seeds 400 upward), then --inspect on each: one command remakes every number the README's answers quote.
EXERCISE_SEED = 400
STEPS_30K, COLLAPSED_SETUP = {"total_steps": 30_000}, {"total_steps": 30_000, "rl_grad": False, **COLLAPSE_SETTING}
EXERCISES = {"worked": {"total_steps": 8192},                                                       # exercise 0
             "config2": STEPS_30K, "config3": {**STEPS_30K, "rl_grad": False},                      # 1 (and 2 to 4, 7)
             "noframe": {**STEPS_30K, "frame_index": False},                                        # 2
             "config3-tau0": {**STEPS_30K, "rl_grad": False, "ema_tau": 0.0},                       # 3
             "config3-tau1": {**STEPS_30K, "rl_grad": False, "ema_tau": 1.0},
             "collapse": COLLAPSED_SETUP, "collapse-nonorm": {**COLLAPSED_SETUP, "final_norm": False},  # 5, 6
             "hires": {**STEPS_30K, "image_height": 32, "image_width": 128},                        # 7
             "collapse-reg": {**COLLAPSED_SETUP, "reg": True},                                      # 8
             "collapse-regstd": {**COLLAPSED_SETUP, "reg": True, "reg_form": "std"}}


def add_tool_flags(p):
    p.epilog = __doc__[__doc__.index("The paper's four"):__doc__.index("Part 1, the method")]   # the docstring's list
    run = p.add_argument_group("where a run runs and writes")
    run.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    run.add_argument("--out", type=Path, default=None, help="run folder [runs/<switches>-seed<k>]")
    run.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty --out")
    run.add_argument("--window", type=int, default=20, help="episodes in the running average of the return")
    tools = p.add_argument_group("experiments and tools (Part 2); at most one of the modes")
    tools.add_argument("--figure3", action="store_true",
                       help="run the paper's 4 configurations x --seeds seeds (1, 2, ...) x --total-steps, plus "
                            "the state-based reference, each pixel run followed by --inspect, then --plot. Resumable: "
                            "finished runs are kept")
    tools.add_argument("--collapse", action="store_true", help=f"collapse demonstration: {', '.join(COLLAPSE_ARMS)} "
                       f"x --seeds seeds in the collapse setting {COLLAPSE_SETTING}, each followed by --inspect, "
                       "then --plot. Resumable")
    tools.add_argument("--exercises", action="store_true", help=f"the lab's runs (README: exercises) x --seeds "
                       f"seeds from {EXERCISE_SEED}, each followed by --inspect, then --plot. Resumable")
    tools.add_argument("--plot", action="store_true",
                       help="redraw the figures and tables in --plots-dir from the finished runs of the sweeps")
    tools.add_argument("--state-reference", action="store_true",
                       help="train the state-based PPO reference (not in the paper) on the true 4-number state")
    tools.add_argument("--eval", type=Path, metavar="RUN_DIR",
                       help="load RUN_DIR/model.pt, play --eval-episodes episodes greedily, report mean +- std")
    tools.add_argument("--gif", type=Path, metavar="RUN_DIR", help="write RUN_DIR/agent.gif: one greedy episode of "
                       "RUN_DIR's agent, the full scene beside the three frames its encoder receives")
    tools.add_argument("--inspect", type=Path, metavar="RUN_DIR", help="what RUN_DIR's encoder knows where its agent "
                       "goes (the on-policy probe) and what its JEPA loss is made of; writes RUN_DIR/inspect.json")
    tools.add_argument("--benchmark-renderer", action="store_true",
                       help="time render_frames against gymnasium's own render (+ crop, downsample), then exit")
    tools.add_argument("--sweep-dir", type=Path, default=Path("plots/runs"),
                       help="a sweep (--figure3, --collapse, --exercises) keeps its runs in <sweep-dir>/<sweep>; the "
                            "default holds our committed runs (their logs, not their weights)")
    tools.add_argument("--print-commands", action="store_true",
                       help="with a sweep's flag: print the runs still to do, one shell command each, for "
                            "a scheduler (GNU parallel, a SLURM array); then --plot collects them")
    tools.add_argument("--plots-dir", type=Path, default=Path("plots"), help="where figures and tables go")
    tools.add_argument("--seeds", type=int, default=5, help="seeds per configuration of a sweep (paper: 5)")
    tools.add_argument("--workers", type=int, default=2, help="a sweep's runs side by side, one thread each")
    tools.add_argument("--eval-episodes", type=int, default=20, help="episodes for --eval")
    tools.add_argument("--renderer", choices=["numpy", "gymnasium"], default="numpy",
                       help="numpy: our fast drawing; gymnasium: gymnasium's own pygame render, cropped and "
                            "downsampled the same way (slow, for checking)")
    return p


SWEEPS = ("figure3", "collapse", "exercises")
MODES = (*SWEEPS, "plot", "state_reference", "eval", "gif", "inspect", "benchmark_renderer")


def sweep_kind(args):
    """The sweep this command runs (figure3, collapse or exercises), or None."""
    return next((sweep for sweep in SWEEPS if getattr(args, sweep)), None)


# Every number flag's valid range, [low, high] inclusive (None: unbounded). Checked before anything is written.
FLAG_RANGES = {
    "seed": (0, 2**32 - 1), "threads": (0, None), **dict.fromkeys(["ema_tau", "gamma", "gae_lambda"], (0.0, 1.0)),
    **dict.fromkeys(["learning_rate", "clip_coef", "max_grad_norm"], (1e-12, None)),        # > 0
    **dict.fromkeys(["jepa_coef", "reg_coef", "predictor_lr_scale", "weight_decay", "ent_coef", "vf_coef"],
                    (0.0, None)),
    **dict.fromkeys(["total_steps", "num_envs", "window", "image_height", "image_width", "patch_size", "embed_dim",
                     "depth", "heads", "mlp_ratio", "predictor_hidden", "num_steps", "num_minibatches", "update_epochs",
                     "seeds", "workers", "eval_episodes"], (1, None)),
}
SCREEN_HEIGHT = 400.0
POLE_SPAN = AXLE_Y + POLE_LENGTH - POLE_HALF_WIDTH - CROP_BOTTOM   # screen px above the frame's bottom the pole needs


def check_device(name):
    """The error message for a torch device that does not exist here, or None."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name} is not a torch device (try cpu, cuda, cuda:0, mps)"
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        return f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); use --device cpu"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {name}: MPS is not available on this machine; use --device cpu"
    if device.type not in ("cpu", "cuda", "mps"):
        return f"--device {name}: only cpu, cuda and mps are supported"
    return None


def parse_args(argv=None):
    """Parse and check every flag, before anything is written: a bad value is an argparse error (exit code 2)."""
    parser = add_tool_flags(build_parser())
    args = parser.parse_args(argv)
    if args.stop_after is not None and not args.num_envs * args.num_steps <= args.stop_after <= args.total_steps:
        parser.error(f"--stop-after {args.stop_after}: must be in [one rollout ({args.num_envs * args.num_steps}), "
                     f"--total-steps ({args.total_steps})]")
    for name, (low, high) in FLAG_RANGES.items():
        value = getattr(args, name)
        if not math.isfinite(value):
            parser.error(f"--{name.replace('_', '-')} {value}: must be a finite number")
        if not (low <= value if high is None else low <= value <= high):
            bound = f"at least {low}" if high is None else f"in [{low}, {high}]"
            parser.error(f"--{name.replace('_', '-')} {value}: must be {bound}")
    if args.image_height % args.patch_size or args.image_width % args.patch_size:
        parser.error(f"--patch-size {args.patch_size} must divide --image-height {args.image_height} "
                     f"and --image-width {args.image_width}")
    if args.embed_dim % args.heads:
        parser.error(f"--heads {args.heads} must divide --embed-dim {args.embed_dim}")
    band = args.image_height * SCREEN_WIDTH / args.image_width          # screen px the frame shows above its bottom
    room = SCREEN_HEIGHT - CROP_BOTTOM                                  # screen px the screen has above it
    if not POLE_SPAN <= band <= room:
        parser.error(f"--image-height {args.image_height} with --image-width {args.image_width} shows {band:.0f} "
                     f"screen pixels of height; the upright pole needs {POLE_SPAN:.0f} and the screen has {room:.0f}: "
                     f"keep height/width in [{POLE_SPAN / SCREEN_WIDTH:.3f}, {room / SCREEN_WIDTH:.3f}]")
    batch_size, rollout = args.num_envs * args.num_steps, "--num-envs x --num-steps"
    if args.state_reference:                                            # its own rollout: 8 envs x 32 steps
        batch_size = STATE_REFERENCE["num_envs"] * STATE_REFERENCE["num_steps"]
        rollout = "the state reference's 8 envs x 32 steps"
    elif batch_size < 8 * args.num_minibatches:
        parser.error(f"--num-minibatches {args.num_minibatches}: minibatches of the rollout's {batch_size} "
                     "transitions (--num-envs x --num-steps) need at least 8 samples each (Eq. 2's batch variance)")
    if args.total_steps < batch_size:
        parser.error(f"--total-steps {args.total_steps} is smaller than one rollout ({rollout} = {batch_size})")
    if (message := check_device(args.device)):
        parser.error(message)
    modes = [f"--{m.replace('_', '-')}" for m in MODES if getattr(args, m)]
    if len(modes) > 1:
        parser.error(f"{' and '.join(modes)}: choose one mode")
    if (run := args.eval or args.gif or args.inspect) is not None:      # the one RUN_DIR mode; modes[0] is its flag
        if not ((run / "config.json").is_file() and (run / "model.pt").is_file()):
            parser.error(f"{modes[0]} {run}: not a finished run folder (it needs config.json and model.pt)")
        if run.name.startswith("state-"):
            parser.error(f"{modes[0]} {run}: the state reference has no pixel agent to load")
        if (problem := check_run(run, need_model=True)):
            parser.error(f"{modes[0]} {run}: {problem}")
    if args.print_commands and not sweep_kind(args):
        parser.error("--print-commands goes with --figure3, --collapse or --exercises")
    if args.plot and not any(finished_runs(args.sweep_dir / sweep) for sweep in SWEEPS):
        parser.error(f"--plot: no finished run in {args.sweep_dir}/figure3, collapse or exercises; run a sweep "
                     f"first ({args.plots_dir} is left as it is)")
    method = [a.option_strings[0 if getattr(args, a.dest) or len(a.option_strings) == 1 else 1]
              for a in build_parser()._actions if a.dest not in ("help", "seed", "device")
              and getattr(args, a.dest) != a.default]
    if args.exercises and method:
        parser.error(f"{' '.join(method)}: --exercises runs the README's commands as written, at the defaults")
    # What --collapse sets itself: the setting of all its arms, and what one arm changes (the x100 weight). A user's
    # value would be silently overridden in one arm and not in the others, so it is refused instead.
    set_by_collapse = [*COLLAPSE_SETTING, *(k for *_, changes in COLLAPSE_ARMS.values() for k in changes)]
    flags = [f"--{k.replace('_', '-')}" for k in set_by_collapse]
    given = [flag for k, flag in zip(set_by_collapse, flags) if getattr(args, k) != parser.get_default(k)]
    if args.collapse and given:
        parser.error(f"{' '.join(given)}: --collapse sets {', '.join(flags)} itself (README: collapse)")
    if args.renderer == "gymnasium":
        try:
            import pygame  # noqa: F401  (gymnasium's renderer draws with it)
        except ImportError:
            parser.error("--renderer gymnasium needs pygame: pip install -r requirements.txt")
    if modes and args.out is not None and not args.state_reference:
        parser.error(f"--out: {modes[0]} does not write a run folder (sweeps use --sweep-dir)")
    if not modes or args.state_reference:
        args.out = args.out or Path("runs") / (f"state-seed{args.seed}" if args.state_reference
                                               else f"{run_name(args.jepa, args.rl_grad, args.reg)}-seed{args.seed}")
    for name in ("sweep_dir", "plots_dir", "out"):                     # args.out is None where no run folder is made
        if (path := getattr(args, name)) is not None and path.exists() and not path.is_dir():
            parser.error(f"--{name.replace('_', '-')} {path}: is a file, not a folder")
    if args.out is not None and args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} exists and is not empty; pick another --out or pass --overwrite")
    return args


def run_name(jepa, rl_grad, reg):
    return f"{'jepa' if jepa else 'nojepa'}-{'rlgrad' if rl_grad else 'norlgrad'}-{'reg' if reg else 'noreg'}"


# The collapse criterion, fixed before the runs that test it (issue 15; README: collapse): a run is COLLAPSED when the
# effective rank of its rollouts' s_x (scale-free, unlike the variance) is below COLLAPSED_RANK for at least
# COLLAPSED_SHARE of its updates after the first COLLAPSE_GRACE_STEPS steps. It ESCAPES at the first update after
# its last collapsed one, if that is not the end. The paper's criterion (variance < COLLAPSE_THRESHOLD) is beside it.
COLLAPSED_RANK = 1.5        # an effective rank of s_x below it means (about) one direction
COLLAPSED_SHARE = 0.9
COLLAPSE_GRACE_STEPS = 10_000

# Every logged number, in the order of the columns of updates.csv: the training step's, then train()'s.
STATE_NAMES = ["x", "x_dot", "theta", "theta_dot"]
UPDATE_COLUMNS = ["step", "mean_return", "loss", "jepa_loss", "reg_loss", "policy_loss", "value_loss", "entropy",
                  "approx_kl", "grad_norm", "embedding_var", "effective_rank",
                  *(f"{kind}_r2_{v}" for kind in ("probe", "onpolicy") for v in STATE_NAMES), "learning_rate", "sps"]


def cpu_model():
    """The CPU's vendor, model name and (family, model, stepping): from /proc/cpuinfo on Linux, else `platform`'s."""
    info = {}
    with contextlib.suppress(OSError):                              # no /proc/cpuinfo: not Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())             # the first processor's values
    ids = [info.get(k, "") for k in ("cpu family", "model", "stepping")]
    return {"cpu_vendor": info.get("vendor_id", platform.system()),
            "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
            "cpu_family_model_stepping": "/".join(ids) if all(ids) else ""}


def machine():
    """What a run's numbers depend on beyond its seed: the CPU (an AMD EPYC and an Intel Xeon, both AVX512, gave other
    floating-point results: README, Reproducibility), torch's kernels for it, torch's version and the thread count."""
    return {**cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


class RunLog(ConsoleLog):
    """Part 1's logger door, with a run folder: config.json, episodes.csv, updates.csv (with section 10's diagnostics),
    each row flushed as it comes so a killed run keeps what it did, and at the end model.pt and summary.json."""

    def __init__(self, args):
        self.out, self.device, self.probe_theta = args.out, args.device, float("nan")
        self.updates = 0
        self.num_updates = rollout_sizes(args.num_envs, args.num_steps, args.stop_after or args.total_steps)[1]
        self.probe_set = make_probe_set(args.seed, args.image_height, args.image_width)
        self.recent_rollouts = collections.deque(maxlen=ONPOLICY_ROLLOUTS)   # for the on-policy probe
        args.out.mkdir(parents=True, exist_ok=True)
        for stale in ("summary.json", "model.pt", "training.png"):   # --overwrite: never a finished-looking mix
            (args.out / stale).unlink(missing_ok=True)
        (args.out / "config.json").write_text(json.dumps(vars(args), indent=2, default=str))   # a Path as its text
        self.episodes_file = open(args.out / "episodes.csv", "w", newline="", buffering=1)   # line-buffered: each
        self.updates_file = open(args.out / "updates.csv", "w", newline="", buffering=1)     # row flushed at once
        self.episodes_csv = csv.writer(self.episodes_file)
        self.updates_csv = csv.DictWriter(self.updates_file, fieldnames=UPDATE_COLUMNS)
        self.episodes_csv.writerow(["step", "return", "length"])
        self.updates_csv.writeheader()
        super().__init__(args.window)                                  # starts the clock

    def update(self, step, means, rollout):
        self.updates += 1
        row, finished = self.record(step, means, rollout)
        self.recent_rollouts.append((rollout["windows"][:-1].clone(), rollout["physics"].clone()))
        row.update(embedding_diagnostics(rollout["x_encoder"], rollout["s_x"], self.probe_set, self.recent_rollouts,
                                         self.device, self.updates, self.num_updates))
        self.episodes_csv.writerows(finished)
        self.updates_csv.writerow(row)
        self.row = row
        if math.isfinite(row["probe_r2_theta"]):                       # the console shows the latest probe
            self.probe_theta = row["probe_r2_theta"]
        print(self.line(row), flush=True)

    def line(self, row):                                               # Part 1's line, with the diagnostics
        return super().line(row, f" | eff. rank {row['effective_rank']:4.1f} | probe R2 theta {self.probe_theta:5.2f}")

    def finish(self, nets):
        summary = {**super().finish(nets), "final_embedding_var": self.row["embedding_var"],
                   "final_effective_rank": self.row["effective_rank"], "machine": machine()}
        self.episodes_file.close()
        self.updates_file.close()
        torch.save({k: net.state_dict() for k, net in nets.items()}, self.out / "model.pt")
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"done: {summary['steps']} steps in {summary['wall_s']:.0f}s ({summary['sps']:.0f} sps); "
              f"logs in {self.out}")
        return summary


# ---- 10. What the embedding knows: effective rank and a linear probe of the true state (not in the paper) ---------
def effective_rank(s):
    # How many directions the embeddings really use (RankMe, Garrido et al. 2023). With p_k the singular values
    # of s (n, d) normalised to sum 1: exp(-sum_k p_k log p_k), from 1 (all on one line) to d (fully spread).
    singular_values = torch.linalg.svdvals(s)                         # (min(n, d),)
    p = singular_values / singular_values.sum()
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


PROBE_EVERY = 8        # updates between two uniform probes (and the last): each encodes 2048 windows
ONPOLICY_EVERY = 32    # updates between two on-policy probes (and the last): rarer, to keep a run's speed
ONPOLICY_ROLLOUTS = 4  # the on-policy probe reads the last 4 rollouts' windows (2048 at the defaults)


def embedding_diagnostics(x_encoder, rollout_s_x, probe_set, recent_rollouts, device, update, num_updates):
    """The collapse indicators beyond the paper's variance: the effective rank of the rollout's s_x (T, N, D) at every
    update, and the linear probes of the true state (NaN between probes): on the uniform probe set (probe_r2_*,
    every PROBE_EVERY updates) and on the visited states (onpolicy_r2_*, every ONPOLICY_EVERY), both at the last."""
    nan = {f"{kind}_r2_{name}": float("nan") for kind in ("probe", "onpolicy") for name in STATE_NAMES}
    last = update == num_updates
    uniform = probe_r2(x_encoder, probe_set, device) if update % PROBE_EVERY == 0 or last else {}
    onpolicy = onpolicy_probe_r2(x_encoder, recent_rollouts, device) if update % ONPOLICY_EVERY == 0 or last else {}
    return {"effective_rank": effective_rank(rollout_s_x.flatten(0, 1)).item(), **nan, **uniform, **onpolicy}


def make_probe_set(seed, height, width, size=2048):
    """A fixed set of windows [f(t-2), f(t-1), f(t)] and the true state at f(t), made once per run from the seed: start
    states over the range an episode can visit (not only where a random policy goes), then two random pushes with
    gymnasium's physics, so every window shows real motion. Half fits the probe, half scores it (probe_r2)."""
    rng = np.random.default_rng([seed, 2024])
    env = gym.make("CartPole-v1").unwrapped
    env.reset(seed=seed)
    start = rng.uniform([-2.0, -1.0, -0.15, -1.0], [2.0, 1.0, 0.15, 1.0], size=(size, 4))
    trajectory = [start]                                               # the states at t-2, t-1, t
    for _ in range(2):
        nxt = []
        for state, action in zip(trajectory[-1], rng.integers(0, 2, size)):
            env.state = state.copy()
            nxt.append(env.step(int(action))[0])
        trajectory.append(np.array(nxt))
    windows = np.stack([render_frames(s, height, width) for s in trajectory], axis=1)   # (size, 3, H, W)
    return torch.from_numpy(windows), torch.tensor(trajectory[-1], dtype=torch.float32)  # (size, 3, H, W), (size, 4)


def linear_probe_r2(fit_s, fit_state, test_s, test_state, ridge=1e-2):
    """Held-out R^2 of a ridge regression s -> true state, per state variable. The ridge is absolute (in units of
    embedding variance): an embedding shrunk far below it, as in collapse, scores R^2 ~ 0: too small for PPO to use."""
    s_mean, y_mean = fit_s.mean(0), fit_state.mean(0)
    fit_x, test_x = fit_s - s_mean, test_s - s_mean                            # (n, D)
    gram = fit_x.T @ fit_x / len(fit_x) + ridge * torch.eye(fit_x.shape[1])   # (D, D)
    weights = torch.linalg.solve(gram, fit_x.T @ (fit_state - y_mean) / len(fit_x))  # (D, 4)
    residual = (test_state - (test_x @ weights + y_mean)).pow(2).sum(0)
    return 1.0 - residual / (test_state - test_state.mean(0)).pow(2).sum(0)


def encode(x_encoder, windows, device):
    with torch.inference_mode():                            # in chunks: less memory, and faster on a CPU
        return torch.cat([x_encoder(chunk.to(device)).cpu() for chunk in windows.split(ENCODE_CHUNK)]).double()


def probe_r2(x_encoder, probe_set, device):
    """{probe_r2_<variable>: held-out R^2} of the x-encoder on the fixed probe set: generalisation to states
    spread over the whole range an episode can visit, most of which a trained agent never goes near."""
    windows, states = probe_set
    s, half = encode(x_encoder, windows, device), len(windows) // 2
    r2 = linear_probe_r2(s[:half], states[:half].double(), s[half:], states[half:].double())
    return {f"probe_r2_{name}": value for name, value in zip(STATE_NAMES, r2.tolist())}


def onpolicy_probe_r2(x_encoder, recent_rollouts, device):
    """{onpolicy_r2_<variable>: held-out R^2} on the visited states: the last rollouts [(windows (T, N, 3, H, W), states
    (T, N, 4))], re-encoded now, fitted on half of the envs and scored on the rest. Split by env, never by sample:
    neighbouring steps of one env are near-duplicates, and the probe would be scored on copies of what it fitted."""
    windows = torch.cat([w for w, _ in recent_rollouts]).transpose(0, 1)            # (N, K*T, 3, H, W)
    states = torch.cat([st for _, st in recent_rollouts]).transpose(0, 1).double()  # (N, K*T, 4)
    half = windows.shape[0] // 2
    if half == 0:                                                                   # one env: nothing to hold out
        return {f"onpolicy_r2_{name}": float("nan") for name in STATE_NAMES}
    fit, test = (encode(x_encoder, w.flatten(0, 1), device) for w in (windows[:half], windows[half:]))
    r2 = linear_probe_r2(fit, states[:half].flatten(0, 1), test, states[half:].flatten(0, 1))
    return {f"onpolicy_r2_{name}": value for name, value in zip(STATE_NAMES, r2.tolist())}


# ---- 11. gymnasium's own renderer, to check ours (a test compares them) and to time it ----------------------------
def start_envs(num_envs, seed, height=None, width=None, render=None):
    """N Cart Poles reset from `seed` as train() starts them, with their renderer (Part 1's at height x width unless
    `render` is given): (envs, render, frame_stack (N, 3, H, W), physics (N, 4))."""
    render = render or (lambda physics: render_frames(physics, height, width))
    envs = gym.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="vector_entry_point")
    return envs, render, *reset_pixels(envs, seed, render)


def pyplot():
    """matplotlib's pyplot, drawing to files only (no screen needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


SCREEN = {}                           # gymnasium's one Cart Pole screen, made on first use


def full_scene(physics):
    """gymnasium's own 400 x 600 RGB picture of one physics state (4,)."""
    if not SCREEN:
        SCREEN["env"] = gym.make("CartPole-v1", render_mode="rgb_array").unwrapped
        SCREEN["env"].reset(seed=0)
    SCREEN["env"].state = np.asarray(physics, dtype=np.float64)
    return SCREEN["env"].render()                                       # (400, 600, 3) uint8


class GymnasiumRenderer:
    """gymnasium's own rgb_array renderer, reduced to our frame: grayscale, same crop, box-downsampled."""

    def __init__(self, height, width):
        pixel = SCREEN_WIDTH / width
        # Screen row r covers screen y in [399 - r, 400 - r) (gymnasium flips y before returning the image).
        self.rows = (int(round(SCREEN_HEIGHT - (CROP_BOTTOM + height * pixel))), int(round(SCREEN_HEIGHT - CROP_BOTTOM)))
        self.down_rows = self.box_downsample_matrix(self.rows[1] - self.rows[0], height)  # (H, rows)
        self.down_cols = self.box_downsample_matrix(int(SCREEN_WIDTH), width)             # (W, 600)

    @staticmethod
    def box_downsample_matrix(n_in, n_out):
        """(n_out, n_in) matrix averaging each output pixel's share of input pixels (works for any ratio)."""
        edges = np.linspace(0, n_in, n_out + 1)
        lo, hi, i = edges[:-1, None], edges[1:, None], np.arange(n_in)[None, :]
        overlap = np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0, None)
        return overlap / overlap.sum(1, keepdims=True)

    def __call__(self, states):
        grays = (full_scene(state).astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) for state in states)
        return np.rint(np.stack([self.down_rows @ gray[self.rows[0]:self.rows[1]] @ self.down_cols.T  # (H, W) each
                                 for gray in grays])).astype(np.uint8)                                # (N, H, W)


def benchmark_renderer(height, width, num_envs, repeats=200):
    """Microseconds per frame: our batched numpy drawing vs gymnasium's pygame render + crop + downsample."""
    states = np.random.default_rng(0).uniform(-0.2, 0.2, size=(num_envs, 4)).astype(np.float32)
    ours = timeit.timeit(lambda: render_frames(states, height, width), number=repeats) / (repeats * num_envs)
    gymnasium_renderer, slow_repeats = GymnasiumRenderer(height, width), max(1, repeats // 20)   # slow: fewer
    theirs = timeit.timeit(lambda: gymnasium_renderer(states), number=slow_repeats) / (slow_repeats * num_envs)
    print(f"{num_envs} envs, {height}x{width} frames: numpy {ours * 1e6:.1f} us/frame, gymnasium "
          f"{theirs * 1e6:.0f} us/frame -> numpy is {theirs / ours:.0f}x faster")
    return ours, theirs


# ---- 12. The state-based reference: PPO on the true 4-number state (not in the paper) -----------------------------
# The dashed line of Figure 3: what knowing the true state buys in 100k steps. A separate, well-tuned PPO with its
# own settings and networks: RL Baselines3 Zoo's tuned CartPole-v1 PPO (hyperparams/ppo.yml), reported to reach 500
# within 1e5 steps (ours: README). It reuses Part 1's GAE and PPO losses; nothing of it shapes the pixel agent.
STATE_REFERENCE = dict(num_envs=8, num_steps=32,        # 256 transitions per rollout
                       update_epochs=20,                 # 20 passes over ONE minibatch: the whole rollout
                       gamma=0.98, gae_lambda=0.8, ent_coef=0.0,
                       learning_rate=1e-3, clip_coef=0.2,  # both annealed linearly to 0 over the budget
                       vf_coef=1.0, max_grad_norm=0.5, hidden=64)  # vf_coef x our 1/2 MSE = SB3's 0.5 x MSE


def state_mlp(num_outputs, output_gain, hidden):
    """Two tanh hidden layers with orthogonal init, as Stable-Baselines3's MlpPolicy."""
    layers = [nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, num_outputs)]
    for linear, gain in zip(layers[::2], (math.sqrt(2), math.sqrt(2), output_gain)):
        layer_init(linear, gain)
    return nn.Sequential(*layers)


def train_state_reference(seed, total_steps, out, window=20):
    """PPO on the true 4-number state, into a run folder: Part 1's rollout (start_envs, step_pixels; the 4 numbers as
    the "frame") and episode accounting (ConsoleLog.record); the networks, update and settings are its own."""
    cfg = argparse.Namespace(**STATE_REFERENCE, seed=seed, total_steps=total_steps)
    N, T = cfg.num_envs, cfg.num_steps
    _, num_updates = rollout_sizes(N, T, total_steps)
    torch.manual_seed(seed)
    np.random.seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(vars(cfg), indent=2))
    episodes_file, updates_file = (open(out / n, "w", newline="", buffering=1) for n in ("episodes.csv", "updates.csv"))
    episodes_log, updates_log = csv.writer(episodes_file), csv.writer(updates_file)
    episodes_log.writerow(["step", "return", "length"])             # line-buffered files: each row flushed at once
    updates_log.writerow(["step", "mean_return", "learning_rate", "clip_coef", "policy_loss", "value_loss", "approx_kl"])
    envs, the_state, stack, physics = start_envs(N, seed, render=lambda physics: physics)   # (N, 3, 4): 3 states
    actor = state_mlp(envs.single_action_space.n, 0.01, cfg.hidden)           # near-uniform first policy
    critic = state_mlp(1, 1.0, cfg.hidden)
    params = [*actor.parameters(), *critic.parameters()]
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, eps=1e-5)
    observations = torch.zeros((T + 1, N, 4))
    actions = torch.zeros((T, N), dtype=torch.long)
    logprobs, rewards, terminated, episode_end = (torch.zeros((T, N)) for _ in range(4))
    valid = torch.zeros((T, N), dtype=torch.bool)
    log = ConsoleLog(window)                             # counts the episodes; its clock starts here
    previous_episode_end, global_step = np.zeros(N, dtype=bool), 0
    for update in range(num_updates):
        fraction_left = 1.0 - update / num_updates      # RL Zoo's lin_1e-3 and lin_0.2 schedules
        optimizer.param_groups[0]["lr"] = cfg.learning_rate * fraction_left
        observations[0] = torch.as_tensor(physics, dtype=torch.float32)
        for t in range(T):                              # ---- rollout
            with torch.no_grad():
                dist = torch.distributions.Categorical(logits=actor(observations[t]))   # (N, 2)
                actions[t] = dist.sample()
                logprobs[t] = dist.log_prob(actions[t])
            stack, physics, reward, term, ended, is_valid = step_pixels(envs, actions[t].numpy(), stack,
                                                                        previous_episode_end, the_state)
            global_step += N
            observations[t + 1] = torch.as_tensor(physics, dtype=torch.float32)
            rewards[t], terminated[t] = torch.as_tensor(reward), torch.as_tensor(term * 1.0)
            valid[t], episode_end[t] = torch.as_tensor(is_valid), torch.as_tensor(ended * 1.0)
            previous_episode_end = ended
        row, finished = log.record(global_step, {}, dict(rewards=rewards, valid=valid, episode_end=episode_end))
        episodes_log.writerows(finished)
        with torch.no_grad():                           # ---- advantages, with Part 1's GAE
            values = critic(observations).squeeze(-1)   # (T+1, N)
            advantages, returns = compute_gae(rewards, values, terminated, episode_end, cfg.gamma, cfg.gae_lambda)
        batch = {"observations": observations[:T][valid], "actions": actions[valid], "logprobs": logprobs[valid],
                 "advantages": advantages[valid], "returns": returns[valid]}          # the valid steps only
        for epoch in range(cfg.update_epochs):          # ---- update: the whole rollout is one minibatch
            policy_loss, value_loss, entropy, approx_kl = ppo_losses(
                actor(batch["observations"]), critic(batch["observations"]).squeeze(-1), batch,
                cfg.clip_coef * fraction_left)
            loss = policy_loss - cfg.ent_coef * entropy + cfg.vf_coef * value_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
        updates_log.writerow([global_step, row["mean_return"], cfg.learning_rate * fraction_left,
                              cfg.clip_coef * fraction_left, policy_loss.item(), value_loss.item(), approx_kl.item()])
    for file in (episodes_file, updates_file, envs):
        file.close()
    wall, mean_return = time.time() - log.start, row["mean_return"]
    summary = {"steps": global_step, "wall_s": wall, "sps": global_step / wall, "final_mean_return": mean_return,
               "machine": machine()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done: {global_step} steps in {wall:.0f}s; return (last {window} episodes) {mean_return:.1f}; logs in {out}")
    return summary


# ---- 13. Sweeps: Figure 3 (paper Section 3), the collapse demonstration and the lab's exercises ---------------------
FIGURE3_CONFIGS = {  # paper number: (jepa, rl_grad, reg, label)
    1: (False, True, False, "1: no JEPA, RL gradients (baseline)"),
    2: (True, True, False, "2: JEPA + RL gradients"),
    3: (True, False, False, "3: JEPA, no RL gradients"),
    4: (True, False, True, "4: JEPA + regulariser, no RL gradients"),
}
COLORS = {1: "tab:purple", 2: "tab:blue", 3: "tab:red", 4: "tab:green", "state": "black", "JEPA only": "tab:red",
          "JEPA + RL gradients": "tab:blue", "JEPA + regulariser": "tab:green", "JEPA + regulariser x100": "tab:olive"}
# Flags that may differ between the runs of one sweep, or do not change what a run computes.
PER_RUN_FLAGS = {"out", "seed", "threads", "jepa", "rl_grad", "reg", "device", "overwrite", "window", *MODES,
                 "sweep_dir", "plots_dir", "seeds", "workers", "eval_episodes", "renderer", "print_commands"}
# Flags added after runs were made: a config.json without them was made with these values.
LATER_FLAGS = {"frame_index": True, "reg_form": "var", "stop_after": None}


def fail(message):
    """A clear message and exit code 2, as argparse gives for a bad flag; nothing already written is touched."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def read_config(run_dir):
    """A run's config.json as a dict, with LATER_FLAGS filled in; raises ValueError naming the file."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{run_dir / 'config.json'} cannot be read ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{run_dir / 'config.json'} is not a JSON object")
    config = {**LATER_FLAGS, **config}
    needed = ({"seed", "total_steps"} if run_dir.name.startswith("state-")
              else {a.dest for a in build_parser()._actions} - {"help"})
    if (missing := sorted(needed - config.keys())):
        raise ValueError(f"{run_dir / 'config.json'} lacks {', '.join(missing)} (made by another version?)")
    return config


def check_run(run_dir, need_model=False):
    """None if run_dir's finished run reads whole (model.pt too with need_model), else what is wrong with which file."""
    try:
        read_config(run_dir)
    except ValueError as error:
        return str(error)
    readers = {"summary.json": lambda f: int(json.loads(f.read_text())["steps"]),
               "updates.csv": lambda f: read_csv(f)["step"][-1],
               "episodes.csv": lambda f: np.loadtxt(f, delimiter=",", skiprows=1, ndmin=2).reshape(-1, 3)}
    if need_model:
        readers["model.pt"] = lambda f: [torch.load(f, map_location="cpu")[k] for k in
                                         ("x_encoder", "y_encoder", "predictor", "actor", "critic")]
    read = {}
    for name, reader in readers.items():
        try:
            read[name] = reader(run_dir / name)
        except Exception as error:        # a truncated CSV, JSON or zip: whatever the parser raises, name the file
            return f"{run_dir / name} is missing, truncated or damaged ({type(error).__name__}: {error})"
    if read["updates.csv"] != read["summary.json"]:
        return f"{run_dir / 'updates.csv'} is truncated: its last row is not step {read['summary.json']}"
    return None


def finished_runs(sweep_dir):
    return sorted(d for d in sweep_dir.glob("*-seed*") if (d / "summary.json").exists()) if sweep_dir.is_dir() else []


def check_same_settings(out, args):
    """Refuse to reuse or plot a finished run that was made with other settings than this command's."""
    saved = read_config(out)
    compared = ["total_steps"] if out.name.startswith("state-") else vars(args)   # the reference has its own settings
    different = {k: (saved.get(k), getattr(args, k)) for k in compared      # (no Path flag is compared: all per-run)
                 if k not in PER_RUN_FLAGS and saved.get(k) != getattr(args, k)}
    if different:
        listed = ", ".join(f"{k}: run {a} vs now {b}" for k, (a, b) in different.items())
        fail(f"{out} was made with other settings ({listed}); use another --sweep-dir or the same flags")


def sweep_groups(kind):
    """{group: its runs' folder name without the seed}: Figure 3's configurations and the reference, the collapse
    demonstration's arms, or the exercises' runs."""
    if kind == "figure3":
        return {**{c: run_name(j, g, r) for c, (j, g, r, _) in FIGURE3_CONFIGS.items()}, "state": "state"}
    if kind == "exercises":
        return {name: name for name in EXERCISES}
    return {arm: run_name(j, g, r) + "".join(f"-{k.replace('_', '')}{v:g}" for k, v in changes.items())
            for arm, (j, g, r, changes) in COLLAPSE_ARMS.items()}              # e.g. jepa-norlgrad-reg-regcoef100


def sweep_job(args, kind, group, seed):
    """The Namespace of one run of a sweep: the sweep's flags, the group's switches (and the collapse setting), or
    for the exercises the defaults with the run's flags."""
    out = args.sweep_dir / kind / f"{sweep_groups(kind)[group]}-seed{seed}"
    if group == "state":
        return argparse.Namespace(**{**vars(args), "state_reference": True, "seed": seed, "threads": 1, "out": out})
    if kind == "exercises":          # the README's commands: Part 1's defaults and the run's flags, whatever args has
        defaults = {a.dest: a.default for a in build_parser()._actions if a.dest != "help"}
        return argparse.Namespace(**{**vars(args), **defaults, **EXERCISES[group], "seed": seed, "threads": 1,
                                     "exercises": False, "print_commands": False, "out": out})
    j, g, r, changes = (*FIGURE3_CONFIGS[group][:3], {}) if kind == "figure3" else COLLAPSE_ARMS[group]
    setting = {**COLLAPSE_SETTING, **changes} if kind == "collapse" else {}
    return argparse.Namespace(**{**vars(args), **setting, "jepa": j, "rl_grad": g, "reg": r, "seed": seed,
                                 "threads": 1, "state_reference": False, "figure3": False, "collapse": False,
                                 "print_commands": False, "out": out})


def command_line(job):
    """One run of a sweep as a shell command that writes the same run folder as the sweep would: Part 1's flags
    (the method's settings) where they differ from the defaults, the three switches always; then --inspect."""
    flags = ["--state-reference", "--total-steps", str(job.total_steps)] if job.state_reference else []
    for action in [] if job.state_reference else build_parser()._actions:
        value = getattr(job, action.dest, None)
        if isinstance(action, argparse.BooleanOptionalAction):
            if action.dest in ("jepa", "rl_grad", "reg") or value != action.default:
                flags.append(action.option_strings[0 if value else 1])
        elif action.dest not in ("help", "seed") and value != action.default:
            flags += [action.option_strings[0], str(value)]
    line = " ".join(["python", Path(__file__).name, *flags, "--seed", str(job.seed), "--threads", "1",
                     "--out", str(job.out), "--overwrite"])
    return line if job.state_reference else f"{line} && python {Path(__file__).name} --inspect {job.out}"


def _sweep_worker(run_args):
    """One run of a sweep, in its own process; its console lines go to console.log in its folder."""
    torch.set_num_threads(1)
    run_args.out.mkdir(parents=True, exist_ok=True)
    with open(run_args.out / "console.log", "w") as console:
        sys.stdout = console
        if run_args.state_reference:
            train_state_reference(run_args.seed, run_args.total_steps, run_args.out, window=run_args.window)
        else:
            train(run_args, log=RunLog(run_args))
            plot_training(run_args.out)
            inspect_run(run_args.out)                      # the final encoder's probes, while its weights are here


def last_logged_step(out):
    with contextlib.suppress(OSError, IndexError, ValueError):      # not started, or only its header so far
        return int((out / "updates.csv").read_text().splitlines()[-1].split(",")[0])
    return 0


def lock_sweep(folder):
    """Hold an OS lock on <folder>/sweep.lock for the sweep's life: a second sweep into the same folder is refused.
    The kernel releases it when the process ends in any way, kill -9 included (a lock file alone would stay)."""
    try:
        import fcntl                                       # POSIX only: elsewhere a sweep runs without the lock
    except ImportError:
        fcntl = None
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / "sweep.lock", "a+")
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            fail(f"{folder} is in use by another sweep (process {handle.read().strip() or '?'}); wait for it to "
                 "finish, or give this one another --sweep-dir")
    handle.truncate(0)                                     # "a+": the write goes to the (now empty) file's end
    handle.write(str(os.getpid()))
    handle.flush()
    return handle                                          # open for the sweep's life: the lock is held


def unfinished_jobs(args, kind):
    """The sweep's runs still to do: not finished, or finished but damaged (redone, with a warning)."""
    jobs, first = [], EXERCISE_SEED if kind == "exercises" else 1
    for group in sweep_groups(kind):
        for job in (sweep_job(args, kind, group, seed) for seed in range(first, first + args.seeds)):
            if (job.out / "summary.json").exists():
                weights = (job.out / "model.pt").exists()          # committed runs keep no weights
                if (problem := check_run(job.out, need_model=weights)) is None:
                    check_same_settings(job.out, job)
                    continue                               # never overwrite a finished run
                print(f"warning: {problem}: the run is redone", flush=True)
            jobs.append(job)
    return jobs


def run_sweep(args, kind):
    """Run every run of the sweep that has not finished yet, --workers at a time, then plot."""
    if args.print_commands:                                # for a scheduler: one line per run still to do
        print("\n".join(command_line(job) for job in unfinished_jobs(args, kind)))
        return
    lock = lock_sweep(args.sweep_dir / kind)
    jobs = unfinished_jobs(args, kind)
    for run in finished_runs(args.sweep_dir / kind):      # trained, but stopped before its --inspect: inspect it now
        if (run / "model.pt").exists() and not (run / "inspect.json").exists() and not run.name.startswith("state-"):
            inspect_run(run)
    total = len(sweep_groups(kind)) * args.seeds
    steps_per_run = [math.prod(rollout_sizes(job.num_envs, job.num_steps, job.total_steps)) for job in jobs]
    print(f"{kind}: {total - len(jobs)}/{total} runs already finished in {args.sweep_dir / kind}; running "
          f"{len(jobs)} with {args.workers} workers (progress: console.log in each run folder)")
    start = time.time()
    pool = multiprocessing.get_context("spawn").Pool(       # workers ignore Ctrl-C: it is the parent's to handle
        args.workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN), maxtasksperchild=1)
    failed = []
    try:
        pending = [pool.apply_async(_sweep_worker, (job,)) for job in jobs]
        last_print = 0.0
        while True:   # one progress line: redrawn in place on a terminal, a new line a minute in a log
            done = sum(p.ready() for p in pending)
            if done == len(jobs) or time.time() - last_print > (2 if sys.stdout.isatty() else 60):
                last_print = time.time()
                steps = sum(n if p.ready() else last_logged_step(job.out)
                            for p, job, n in zip(pending, jobs, steps_per_run))
                sps = steps / max(time.time() - start, 1e-9)
                eta = f"{(sum(steps_per_run) - steps) / sps / 60:5.1f} min" if steps else "?"
                print(f"\r{kind}: {done}/{len(jobs)} runs done | {steps:,}/{sum(steps_per_run):,} steps | "
                      f"{sps:4.0f} sps | {time.time() - start:5.0f}s elapsed | eta {eta}",
                      end="" if sys.stdout.isatty() else "\n", flush=True)
            if done == len(jobs):
                break
            time.sleep(1)
        print()
        for p, job in zip(pending, jobs):
            try:
                p.get()
            except Exception as error:                     # one failed run does not stop the others
                failed.append(f"{job.out}: {error!r}")
    finally:
        pool.terminate()                                   # on Ctrl-C: unfinished runs are redone next time
        pool.join()
    if jobs:                                               # a rerun with nothing to do keeps the last record
        (args.sweep_dir / kind / "sweep.json").write_text(json.dumps(
            {"runs": len(jobs), "wall_s": time.time() - start, "steps": sum(steps_per_run),
             "aggregate_sps": sum(steps_per_run) / (time.time() - start), "workers": args.workers}, indent=2))
    plot(args)
    lock.close()
    if failed:
        fail(f"{len(failed)} run(s) failed; the others are kept:\n" + "\n".join(failed))


# ---- 14. Statistics: rliable's interval estimates (Agarwal et al. 2021) and a power estimate (Colas et al. 2019) ---
# With one task and n seeds, rliable's stratified bootstrap is the ordinary bootstrap over the n per-seed numbers.
BOOTSTRAP_RESAMPLES = 20_000   # rliable's default is 50,000; 20,000 puts the interval's ends within ~1% of it
BOOTSTRAP_SEED = 0             # a fixed generator: the same runs always give the same interval
# The pairs that the paper's claims compare (Section 3): (better, worse) as the paper has it.
CLAIM_PAIRS = [(2, 1), (2, 3), (4, 3), (2, 4)]
# The collapse demonstration's: each remedy against JEPA alone (does the agent that avoids collapse act better?).
COLLAPSE_PAIRS = [(arm, "JEPA only") for arm in COLLAPSE_ARMS if arm != "JEPA only"]


def iqm(x):
    """Interquartile mean over the last axis: the mean of the middle 50% (rliable: trim 25% from each end)."""
    x = np.sort(np.asarray(x, dtype=float), axis=-1)
    cut = int(0.25 * x.shape[-1])
    return x[..., cut:x.shape[-1] - cut].mean(-1)


def iqm_band(curves, resamples=2_000, seed=BOOTSTRAP_SEED):
    """Learning curves (n seeds, G steps) -> the IQM over seeds at each step and its 95% percentile-bootstrap band
    (rliable's curves), seeds resampled together at every step; 2,000 resamples: a curve's band, not a verdict."""
    picks = np.random.default_rng(seed).integers(0, len(curves), size=(resamples, len(curves)))   # (R, n)
    resampled = iqm(np.moveaxis(curves[picks], 1, -1))                                           # (R, G)
    return iqm(curves.T), *np.nanpercentile(resampled, [2.5, 97.5], axis=0)


def probability_of_improvement(x, y):
    """P(X > Y) from x (..., n_x), y (..., n_y): a run of X beats one of Y, ties half (Mann-Whitney U / n_x n_y)."""
    x, y = np.asarray(x, dtype=float)[..., :, None], np.asarray(y, dtype=float)[..., None, :]
    return ((x > y) + 0.5 * (x == y)).mean((-2, -1))


def bootstrap_interval(statistic, *samples, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """(point, low, high): statistic(*samples) and its 95% percentile-bootstrap interval, samples resampled alone."""
    rng = np.random.default_rng(seed)
    draws = [np.asarray(x, dtype=float)[rng.integers(0, len(x), size=(resamples, len(x)))] for x in samples]
    low, high = np.percentile(statistic(*draws), [2.5, 97.5])
    return float(statistic(*samples)), float(low), float(high)


def seeds_needed(x, y, alpha=0.05, power=0.8):
    """Seeds per group for a two-sided Welch t-test to detect the observed difference of means at the given power
    (Colas et al. 2019), by the normal approximation n = 2 (z_a + z_b)^2 s^2 / delta^2, s^2 the mean sample variance:
    slightly optimistic at small n. None if the two means are equal or a group has one seed (no variance)."""
    if min(len(x), len(y)) < 2:
        return None
    z = {0.05: 1.959964, 0.8: 0.841621}
    delta, variance = np.mean(x) - np.mean(y), (np.var(x, ddof=1) + np.var(y, ddof=1)) / 2
    return math.ceil(2 * (z[alpha] + z[power]) ** 2 * variance / delta ** 2) if delta else None


def run_measures(runs):
    """Each seed's final return (the running average at the end) and area under the curve (its mean: how fast)."""
    return {"final": runs["return"][:, -1], "auc": np.nanmean(runs["return"], axis=1)}


def iqm_columns(name, values, digits):
    """{<name>_iqm, <name>_ci_low, <name>_ci_high}: the IQM of `values` and its 95% bootstrap interval, as text."""
    return {f"{name}_{part}": f"{number:.{digits}f}"
            for part, number in zip(("iqm", "ci_low", "ci_high"), bootstrap_interval(iqm, values))}


def comparisons(sweep, pairs):
    """One row per (pair, measure): the IQM difference and P(X > Y), each with its 95% interval, the verdict, and
    the seeds per group a Welch t-test would need to resolve a difference of this size."""
    rows = []
    for a, b in [(a, b) for a, b in pairs if a in sweep and b in sweep]:
        for measure in ("final", "auc"):
            x, y = run_measures(sweep[a])[measure], run_measures(sweep[b])[measure]
            diff = bootstrap_interval(lambda u, v: iqm(u) - iqm(v), x, y)
            poi = bootstrap_interval(probability_of_improvement, x, y)
            resolved = (diff[1] > 0 or diff[2] < 0 or poi[1] > 0.5 or poi[2] < 0.5) and min(len(x), len(y)) > 1
            better = a if diff[1] > 0 or poi[1] > 0.5 else b
            rows.append({"x": a, "y": b, "measure": measure, "n_x": len(x), "n_y": len(y),
                         "iqm_difference": f"{diff[0]:.1f}", "diff_ci_low": f"{diff[1]:.1f}",
                         "diff_ci_high": f"{diff[2]:.1f}", "p_x_beats_y": f"{poi[0]:.2f}",
                         "p_ci_low": f"{poi[1]:.2f}", "p_ci_high": f"{poi[2]:.2f}",
                         "verdict": f"{better} better" if resolved else f"not resolved at n = {min(len(x), len(y))}",
                         "seeds_needed": seeds_needed(x, y) or ""})
    return rows


# ---- 15. Plots: Figure 3, the collapse figure, a figure for every run ---------------------------------------------
def running_average_curve(episodes, grid, window):
    """Mean return of the last `window` episodes finished by each step of `grid` (NaN before the first)."""
    steps, returns = episodes[:, 0], episodes[:, 1]
    cumulative = np.concatenate([[0.0], np.cumsum(returns)])
    finished = np.searchsorted(steps, grid, side="right")            # episodes finished by each grid step
    first = np.maximum(finished - window, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (cumulative[finished] - cumulative[first]) / (finished - first)


def read_csv(path):
    """Columns of a CSV as float arrays (empty cells become NaN)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) if r[k] not in ("", None) else np.nan for r in rows]) for k in rows[0]}


def machine_label(machine):
    """A run's machine in a few words: its CPU model and torch's kernels, as far as its summary.json names them."""
    return " ".join(filter(None, [machine.get("cpu_model"), machine["cpu_capability"]])) if machine else "not recorded"


def load_runs(run_dirs, grid, window):
    """Finished runs' curves on `grid`: the running-average return and every column of updates.csv."""
    runs = {"seeds": [], "return": [], "wall_s": []}
    for run in run_dirs:
        episodes = np.loadtxt(run / "episodes.csv", delimiter=",", skiprows=1, ndmin=2).reshape(-1, 3)
        runs["seeds"].append(int(run.name.rsplit("seed", 1)[1]))
        runs["return"].append(running_average_curve(episodes, grid, window))
        summary = json.loads((run / "summary.json").read_text())
        runs["wall_s"].append(summary["wall_s"])
        runs.setdefault("machine", []).append(machine_label(summary.get("machine")))
        if (run / "inspect.json").exists():                # --inspect's probes of the final encoder, if made
            for key, value in json.loads((run / "inspect.json").read_text()).items():
                runs.setdefault(f"inspect_{key}", []).append(value)
        updates = read_csv(run / "updates.csv")
        for column in UPDATE_COLUMNS[2:-2]:
            if column in updates:                      # the probe's columns are empty between probes: skipped
                known = np.isfinite(updates[column])
                runs.setdefault(column, []).append(np.interp(grid, updates["step"][known], updates[column][known],
                                                             left=np.nan) if known.any() else np.full(len(grid), np.nan))
    return {k: np.array(v) for k, v in runs.items()}


def group_runs(args, kind, group):
    """[(seed, run folder)] of the group's finished runs, whatever their seeds (so runs made by a scheduler are
    collected too), in seed order; a damaged run is skipped with a warning, one made with other settings refused."""
    name, checked = sweep_groups(kind)[group], []
    for seed, run in sorted((int(d.name.rsplit("seed", 1)[1]), d) for d in finished_runs(args.sweep_dir / kind)
                            if d.name.rsplit("-seed", 1)[0] == name):
        if (problem := check_run(run)) is not None:
            print(f"warning: {problem}: this run is left out", flush=True)
            continue
        check_same_settings(run, sweep_job(args, kind, group, seed))
        checked.append((seed, run))
    return checked


def load_sweep(args, kind, grid):
    """{group: curves} of every finished run in the sweep's folder (group_runs)."""
    sweep = {}
    for group in sweep_groups(kind):
        if (finished := [run for _, run in group_runs(args, kind, group)]):
            sweep[group] = load_runs(finished, grid, args.window)
    return sweep


def write_csv(path, rows):
    columns = list(dict.fromkeys(k for row in rows for k in row))     # the state reference has fewer columns
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in columns) + " |")


def collapse_dynamics(grid, ranks):
    """One run's collapse by the criterion above: (share of updates after the grace period with effective rank
    below COLLAPSED_RANK, collapsed?, escape step: a step, "never" (collapsed at the end) or "-" (never collapsed))."""
    low, after = ranks < COLLAPSED_RANK, grid > COLLAPSE_GRACE_STEPS
    share = float(low[after].mean()) if after.any() else float("nan")     # a run too short to judge: NaN
    escape = "never" if low[-1] else "-" if not low.any() else int(grid[np.flatnonzero(low)[-1] + 1])
    return share, share >= COLLAPSED_SHARE, escape


def summary_row(runs, grid):
    """The IQM of the final return and of the area under the curve with their 95% intervals, mean +- std and the
    per-seed values, and the collapse indicators: the criterion above, and the paper's variance beside it."""
    final, auc = (run_measures(runs)[measure] for measure in ("final", "auc"))
    row = {"seeds": len(runs["seeds"]), **iqm_columns("final", final, 1), **iqm_columns("auc", auc, 1),
           "return_mean": f"{final.mean():.1f}", "return_std": f"{final.std():.1f}",
           "return_per_seed": " ".join(f"{s}:{r:.1f}" for s, r in zip(runs["seeds"], final))}
    if "embedding_var" in runs:
        dynamics = [collapse_dynamics(grid, ranks) for ranks in runs["effective_rank"]]
        shares = np.array([share for share, _, _ in dynamics])
        final_var = runs["embedding_var"][:, -1]
        row.update({"collapsed_seeds": sum(collapsed for _, collapsed, _ in dynamics),
                    **iqm_columns("collapsed_share", shares, 2),
                    "collapsed_share_per_seed": " ".join(f"{s}:{v:.2f}" for s, v in zip(runs["seeds"], shares)),
                    "escape_step_per_seed": " ".join(f"{s}:{e}" for s, (_, _, e) in zip(runs["seeds"], dynamics)),
                    "var_below_1e-7_seeds": int((runs["embedding_var"] < COLLAPSE_THRESHOLD).any(1).sum()),
                    "lowest_var": f"{runs['embedding_var'].min():.2g}", "final_var": f"{final_var.mean():.3g}",
                    "final_var_per_seed": " ".join(f"{s}:{v:.2g}" for s, v in zip(runs["seeds"], final_var)),
                    "final_effective_rank": f"{runs['effective_rank'][:, -1].mean():.1f}"})
        for column in ("probe_r2_theta", "probe_r2_theta_dot", "onpolicy_r2_theta", "onpolicy_r2_theta_dot"):
            if column in runs:
                row[column] = f"{np.nanmean(runs[column][:, -1]):.2f}"
    row["wall_s_per_run"] = f"{runs['wall_s'].mean():.0f}"
    labels, counts = np.unique(runs["machine"], return_counts=True)   # a row whose runs ran on several machines says so
    row["machines"] = "; ".join(f"{label}: {count}" for label, count in zip(labels, counts))
    return row


def write_exercise_table(args):
    """plots/exercises_summary.csv: one row per finished run of the lab (whatever its seed), with what the README's
    answers quote: first, lowest and last values of the return, the JEPA loss, the variance and the effective rank;
    the collapse criterion; both probes in the last update and --inspect's report."""
    rows = []
    for name in EXERCISES:
        for seed, run in group_runs(args, "exercises", name):
            u, summary = read_csv(run / "updates.csv"), json.loads((run / "summary.json").read_text())
            row, low = {"run": name, "seed": seed, "steps": int(u["step"][-1])}, u["effective_rank"] < COLLAPSED_RANK
            for column in ("mean_return", "jepa_loss", "embedding_var", "effective_rank"):
                known = np.isfinite(u[column])
                values, steps = u[column][known], u["step"][known]
                row.update({f"{column}_first": f"{values[0]:.3g}", f"{column}_lowest": f"{values.min():.3g}",
                            f"{column}_lowest_step": int(steps[values.argmin()]),
                            f"{column}_last": f"{values[-1]:.3g}"})
            share, collapsed, escape = collapse_dynamics(u["step"], u["effective_rank"])
            row.update({"rank_below_1.5_from": int(u["step"][low][0]) if low.any() else "-",
                        "rank_below_1.5_until": int(u["step"][low][-1]) if low.any() else "-",
                        "collapsed_share": f"{share:.2f}", "collapsed": collapsed, "escape_step": escape})
            row.update({c: f"{u[c][np.isfinite(u[c])][-1]:.2f}" for c in UPDATE_COLUMNS if "r2" in c})
            if (run / "inspect.json").exists():
                report = json.loads((run / "inspect.json").read_text())
                row.update({f"inspect_{k}": f"{v:.3g}" for k, v in report.items() if k not in ("seed", "windows")})
            rows.append({**row, "wall_s": f"{summary['wall_s']:.0f}", "machine": machine_label(summary.get("machine"))})
    if rows:
        write_csv(args.plots_dir / "exercises_summary.csv", rows)


def plot_intervals(args, sweep, plt):
    """plots/intervals.png, as rliable draws them: per configuration the IQM (tick) and its 95% bootstrap interval
    (bar) for the final return and for the area under the curve; then P(X > Y) for the paper's pairs."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    short = {1: "1: no JEPA (baseline)", 2: "2: JEPA + RL gradients", 3: "3: JEPA only", 4: "4: JEPA + regulariser",
             "state": "state-based reference"}
    for ax, (measure, title) in zip(axes, [("final", "final return\n(last %d episodes at the end)" % args.window),
                                           ("auc", "area under the curve\n(mean running-average return over the run)")]):
        for k, group in enumerate(sweep):
            point, low, high = bootstrap_interval(iqm, run_measures(sweep[group])[measure])
            ax.barh(k, high - low, left=low, height=0.6, color=COLORS[group], alpha=0.6)
            ax.plot([point, point], [k - 0.3, k + 0.3], color="black", lw=2)
            ax.plot(run_measures(sweep[group])[measure], np.full(len(sweep[group]["seeds"]), k), "k.", ms=3, alpha=0.5)
        ax.set_yticks(range(len(sweep)), [f"{short[g]} (n = {len(sweep[g]['seeds'])})" for g in sweep], fontsize=9)
        ax.invert_yaxis()
        ax.set(title=f"IQM (tick), 95% interval (bar), seeds (dots):\n{title}", xlabel="return")
        ax.grid(alpha=0.3, axis="x")
    rows = comparisons(sweep, CLAIM_PAIRS)
    ax = axes[2]
    for k, row in enumerate(rows):
        point, low, high = (float(row[c]) for c in ("p_x_beats_y", "p_ci_low", "p_ci_high"))
        ax.barh(k, high - low, left=low, height=0.6, color=COLORS[row["x"]] if row["measure"] == "final" else "gray",
                alpha=0.6)
        ax.plot([point, point], [k - 0.3, k + 0.3], color="black", lw=2)
    ax.axvline(0.5, color="black", ls=":")
    ax.set_yticks(range(len(rows)), [f"P({r['x']} > {r['y']}), {'final return' if r['measure'] == 'final' else 'area'}"
                                     for r in rows], fontsize=9)
    ax.invert_yaxis()
    ax.set(title="probability of improvement P(X > Y)\nand its 95% interval", xlabel="P(X > Y)", xlim=(0, 1))
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(args.plots_dir / "intervals.png", dpi=100)
    plt.close(fig)
    return rows


def plot(args):
    """Figure 3 and the collapse figure with their tables, and the exercises' table, from whichever sweeps have
    finished runs."""
    plt, (batch_size, num_updates) = pyplot(), rollout_sizes(args.num_envs, args.num_steps, args.total_steps)
    grid = np.arange(batch_size, num_updates * batch_size + 1, batch_size)     # one point per rollout
    args.plots_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():     # before a run's first probe or episode its curves are NaN: nothing to warn
        warnings.filterwarnings("ignore", "Mean of empty slice|Degrees of freedom|All-NaN slice", RuntimeWarning)
        for kind in ("figure3", "collapse"):
            plot_sweep(args, kind, grid, plt)
    write_exercise_table(args)
    print(f"figures and tables in {args.plots_dir}")


def plot_sweep(args, kind, grid, plt):
    """One sweep's figure and tables: Figure 3 (with the intervals, probes and observation) or the collapse figure."""
    sweep = load_sweep(args, kind, grid)
    if not sweep:
        print(f"{kind}: no finished runs in {args.sweep_dir / kind}; its figures are left as they are")
        return
    labels = ({**{c: v[3] for c, v in FIGURE3_CONFIGS.items()}, "state": "state-based PPO reference"}
              if kind == "figure3" else {arm: arm for arm in COLLAPSE_ARMS})
    panels = ([("return", "(a) episodic return, running average of the last %d episodes\n(IQM of the seeds, band: "
                          "its 95%% bootstrap interval)" % args.window),
               ("embedding_var", "(b) mean batch-wise variance of s_x (collapse indicator)\n(geometric mean of "
                                 "the seeds, band: lowest to highest)")]
              if kind == "figure3" else
              [("embedding_var", "mean batch-wise variance of s_x"), ("effective_rank", "effective rank of s_x"),
               ("collapsed", f"share of seeds collapsed (eff. rank < {COLLAPSED_RANK})"),
               ("probe_r2_theta", "probe: held-out R² of θ"), ("return", "return, running average of %d episodes"
                                                               % args.window)])
    fig, axes = plt.subplots(1, len(panels), figsize=((7.5 if kind == "figure3" else 5) * len(panels), 5.2))
    for ax, (column, title) in zip(axes, panels):
        for group, runs in sweep.items():
            if column == "collapsed":                # how many seeds are collapsed at each step
                ax.plot(grid, (runs["effective_rank"] < COLLAPSED_RANK).mean(0), lw=2, color=COLORS[group],
                        label=f"{labels[group]}: {sum(collapse_dynamics(grid, r)[1] for r in runs['effective_rank'])}"
                              f" of {len(runs['seeds'])} collapsed by the criterion")
                continue
            if column not in runs:
                continue
            style = dict(color=COLORS[group], ls="--" if group == "state" else "-")
            if column == "embedding_var":            # geometric mean and min-max band on a log axis
                log = np.log10(np.maximum(runs[column], 1e-30))
                ax.plot(grid, 10 ** log.mean(0), lw=2, label=labels[group], **style)
                ax.fill_between(grid, 10 ** log.min(0), 10 ** log.max(0), color=COLORS[group], alpha=0.15)
            else:                                    # the IQM over seeds and its 95% bootstrap band, as the tables
                point, low, high = iqm_band(runs[column])
                ax.plot(grid, point, lw=2, label=f"{labels[group]}, IQM of {len(runs['seeds'])} seeds", **style)
                ax.fill_between(grid, low, high, color=COLORS[group], alpha=0.15)
            for curve in runs[column]:               # every seed, thin
                ax.plot(grid, curve, lw=0.6, alpha=0.5, **style)
        if column in ("embedding_var", "effective_rank"):   # where collapse begins, on a log axis
            variance = column == "embedding_var"
            ax.axhline(COLLAPSE_THRESHOLD if variance else COLLAPSED_RANK, color="black", ls=":", lw=1.5,
                       label="collapse threshold 1e-7" if variance else f"collapsed below {COLLAPSED_RANK}")
            ax.set_yscale("log")
        if column == "collapsed":
            ax.axvline(COLLAPSE_GRACE_STEPS, color="black", ls=":", lw=1, label="the criterion counts from here")
            ax.set_ylim(-0.02, 1.02)
        ax.set(title=title, xlabel="environment steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, **(dict(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)   # off the curves
                                 if kind == "figure3" else {}))
    fig.suptitle("Figure 3 reproduced: JEPA + PPO on pixel Cart Pole (thin lines: single seeds)" if kind == "figure3"
                 else f"When does JEPA collapse? setting {COLLAPSE_SETTING} (thin lines: single seeds)", fontsize=13)
    fig.tight_layout()
    fig.savefig(args.plots_dir / f"{kind}.png", dpi=100)
    plt.close(fig)
    rows = [{"config" if kind == "figure3" else "arm": group, **summary_row(runs, grid)}
            for group, runs in sweep.items()]
    write_csv(args.plots_dir / f"{kind}_summary.csv", rows)
    if kind == "figure3":
        write_probe_table(args, sweep)
        if (pairs := plot_intervals(args, sweep, plt)):
            write_csv(args.plots_dir / "figure3_comparisons.csv", pairs)
        write_figure3_curves(args, sweep, grid)
        plot_probe(args, sweep, grid, plt)
        plot_observation(args, plt)
    elif (pairs := comparisons(sweep, COLLAPSE_PAIRS)):
        write_csv(args.plots_dir / "collapse_comparisons.csv", pairs)


def write_probe_table(args, sweep):
    """plots/probes_summary.csv: per configuration and state variable, the IQM over seeds (and its 95% interval)
    of the two linear probes of the final encoder: uniform (the run's probe set) and on-policy (--inspect)."""
    rows = []
    for group, runs in sweep.items():
        for name in STATE_NAMES:
            row = {"config": group, "variable": name}
            for kind, key in (("uniform", f"probe_r2_{name}"), ("onpolicy", f"inspect_onpolicy_r2_{name}")):
                if key in runs and len(runs[key]) == len(runs["seeds"]):
                    values = runs[key][:, -1] if runs[key].ndim == 2 else runs[key]
                    point, low, high = bootstrap_interval(iqm, values)
                    row.update({f"{kind}_iqm": f"{point:.2f}", f"{kind}_ci": f"[{low:.2f}, {high:.2f}]",
                                f"{kind}_n": len(values)})
            if len(row) > 2:
                rows.append(row)
    if rows:
        write_csv(args.plots_dir / "probes_summary.csv", rows)


def write_figure3_curves(args, sweep, grid):
    """Every seed's curves, to re-plot without retraining."""
    columns = ["return", "embedding_var", "effective_rank"] + [f"probe_r2_{n}" for n in STATE_NAMES]
    with open(args.plots_dir / "figure3_curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["config", "seed", "step", "running_avg_return"] + columns[1:])
        for config, runs in sweep.items():
            for k, seed in enumerate(runs["seeds"]):
                for g, step in enumerate(grid):
                    writer.writerow([config, seed, int(step)] + [f"{runs[c][k, g]:.4g}" if c in runs else ""
                                                                 for c in columns])


def plot_probe(args, sweep, grid, plt):
    """plots/probe.png: the held-out R^2 of the linear probe of each state variable, per configuration."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5), sharey=True)
    for ax, name, title in zip(axes, STATE_NAMES, ["cart position x", "cart velocity x_dot", "pole angle theta",
                                                   "pole angular velocity theta_dot"]):
        for config, runs in sweep.items():
            if f"probe_r2_{name}" in runs:
                ax.plot(grid, np.nanmean(runs[f"probe_r2_{name}"], 0), color=COLORS[config], lw=2,
                        label=FIGURE3_CONFIGS[config][3])
        ax.set(title=title, xlabel="environment steps", ylim=(-0.1, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out R² of a linear probe on s_x")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("What s_x knows: ridge regression from s_x to the true state on a fixed probe set "
                 "(mean over seeds)", fontsize=13)
    fig.tight_layout()
    fig.savefig(args.plots_dir / "probe.png", dpi=100)
    plt.close(fig)


def plot_training(run_dir):
    """<run>/training.png: return, embedding variance, effective rank and JEPA loss against steps, for one run."""
    plt = pyplot()
    updates = read_csv(run_dir / "updates.csv")
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for ax, column, title in zip(axes, ["mean_return", "embedding_var", "effective_rank", "jepa_loss"],
                                 ["return (running average)", "embedding variance (collapse indicator)",
                                  "effective rank of s_x", "JEPA loss (Eq. 1)"]):
        ax.plot(updates["step"], updates[column], lw=1.5)
        if column == "embedding_var":
            ax.axhline(COLLAPSE_THRESHOLD, color="black", ls=":", label="collapse threshold 1e-7")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        ax.set(title=title, xlabel="environment steps")
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir), fontsize=12)
    fig.tight_layout()
    fig.savefig(run_dir / "training.png", dpi=80)
    plt.close(fig)
    return run_dir / "training.png"


def plot_observation(args, plt):
    """plots/observation.png: one transition as the networks see it, with the patch grid, beside the scene."""
    H, W, p = args.image_height, args.image_width, args.patch_size
    envs, render, window, physics = start_envs(1, 3, H, W)
    for _ in range(8):                     # push right a few times, so the frames show motion
        x_window = window
        window, physics, *_ = step_pixels(envs, np.ones(1, dtype=np.int64), window, np.zeros(1, bool), render)
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
    ax.imshow(full_scene(physics[0]))
    top = SCREEN_HEIGHT - (CROP_BOTTOM + H * SCREEN_WIDTH / W)
    ax.add_patch(plt.Rectangle((0, top), SCREEN_WIDTH - 1, H * SCREEN_WIDTH / W, fill=False, ec="tab:orange", lw=2))
    ax.set_title("gymnasium's 600 x 400 scene at f(t+1)\norange box: the band our frames show", fontsize=11)
    ax.set(xticks=[], yticks=[])
    tokens = (H // p) * (W // p)
    fig.text(0.36, 0.5, f"{H} x {W} pixels per frame, {p} x {p} patches (orange grid): {tokens} tokens per frame, "
             f"1 + 3 x {tokens} = {1 + 3 * tokens} with CLS", ha="center", va="center", fontsize=11)
    fig.suptitle("What the encoders see: one transition (the cart pushed right)", fontsize=14)
    fig.savefig(args.plots_dir / "observation.png", dpi=110)
    plt.close(fig)


# ---- 16. Using a trained agent: load, evaluate, animate -----------------------------------------------------------
def load_run(run_dir, device="cpu"):
    """Rebuild a finished run's networks from its config.json and model.pt."""
    run_args = argparse.Namespace(**read_config(run_dir))
    nets = make_networks(run_args, num_actions=2)
    weights = torch.load(run_dir / "model.pt", map_location=device)
    for name, net in nets.items():
        net.load_state_dict(weights[name])
    return run_args, nets


def greedy_actions(x_encoder, actor, observation):
    with torch.inference_mode():
        return actor(x_encoder(torch.as_tensor(observation))).argmax(-1).numpy()   # (N,)


def play(run_args, nets, num_envs, seed, steps=None):
    """A finished run's agent in `num_envs` envs reset from `seed`: greedy until every env's first episode has ended,
    or, given `steps`, sampling its policy as in training for that many steps. Returns {returns: of the first
    episodes (N,), windows (S+1, N, 3, H, W), physics (S+1, N, 4), actions (S, N), valid (S, N)}."""
    envs, render, window, physics = start_envs(num_envs, seed, run_args.image_height, run_args.image_width)
    played = {"windows": [window], "physics": [physics], "actions": [], "valid": []}
    returns, finished, episode_end = np.zeros(num_envs), np.zeros(num_envs, bool), np.zeros(num_envs, bool)
    while len(played["actions"]) < steps if steps else not finished.all():
        if steps:
            with torch.inference_mode():
                action = torch.distributions.Categorical(logits=nets["actor"](nets["x_encoder"](
                    torch.from_numpy(window)))).sample().numpy()
        else:
            action = greedy_actions(nets["x_encoder"], nets["actor"], window)
        window, physics, reward, _, episode_end, is_valid = step_pixels(envs, action, window, episode_end, render)
        returns += reward * ~finished            # count each env's first episode only
        finished |= episode_end
        for key, value in zip(played, (window, physics, action, is_valid)):
            played[key].append(value)
    envs.close()
    return {"returns": returns, **{key: np.stack(values) for key, values in played.items()}}


def inspect_run(run_dir):
    """What a trained encoder knows and what its JEPA loss is made of, written to RUN_DIR/inspect.json.

    The agent acts as in training in --num-envs envs for ONPOLICY_ROLLOUTS rollouts, from seed 10,000 + its seed. On
    those windows: both probes, the spread of s_x, and Eq. 1 on the real transitions in parts (jepa_loss_mean_part:
    ||mean(pred) - mean(s_y)||^2, the mean prediction missing the mean target; the rest: missing how targets vary),
    and the share the action alone decides: whatever s_y is, ||pred(s_x, a) - s_y||^2 averaged over both actions is
    at least ||pred(s_x, 0) - pred(s_x, 1)||^2 / 4 (action_floor). A collapsed encoder cannot tell the actions apart."""
    run_args, nets = load_run(run_dir)
    H, W = run_args.image_height, run_args.image_width
    seed, steps = 10_000 + run_args.seed, ONPOLICY_ROLLOUTS * run_args.num_steps
    torch.manual_seed(seed)
    played = play(run_args, nets, run_args.num_envs, seed, steps)
    windows, visited = torch.from_numpy(played["windows"]), torch.from_numpy(played["physics"])   # (K*T+1, N, ...)
    report = {"seed": seed, "windows": int(steps * run_args.num_envs),
              **onpolicy_probe_r2(nets["x_encoder"], [(windows[:-1], visited[:-1])], "cpu"),
              **probe_r2(nets["x_encoder"], make_probe_set(run_args.seed, H, W), "cpu")}
    real = torch.from_numpy(played["valid"]).flatten()                                    # (K*T*N,)
    with torch.inference_mode():
        s_x = encode(nets["x_encoder"], windows[:-1].flatten(0, 1)[real], "cpu").float()
        s_y = encode(nets["y_encoder"], windows[1:].flatten(0, 1)[real], "cpu").float()
        a = torch.from_numpy(played["actions"]).flatten()[real]
        pred = nets["predictor"](s_x, a)
        pred_0, pred_1 = (nets["predictor"](s_x, torch.full_like(a, k)) for k in (0, 1))
        report.update(embedding_var=embedding_variance(s_x).item(), effective_rank=effective_rank(s_x).item(),
                      s_x_norm=s_x.norm(dim=1).mean().item(), s_y_norm=s_y.norm(dim=1).mean().item(),
                      jepa_loss=jepa_loss(pred, s_y).item(),
                      jepa_loss_mean_part=(pred.mean(0) - s_y.mean(0)).pow(2).sum().item(),
                      jepa_loss_action_floor=((pred_0 - pred_1).pow(2).sum(1) / 4).mean().item())
    (run_dir / "inspect.json").write_text(json.dumps(report, indent=2))
    print("\n".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in report.items()))
    print(f"written to {run_dir / 'inspect.json'}")
    return report


def make_gif(args):
    """One greedy episode: gymnasium's full scene beside the three frames the encoder receives."""
    plt = pyplot()
    from matplotlib.animation import FuncAnimation, PillowWriter
    played = play(*load_run(args.gif), 1, seed=10_000 + args.seed)
    scenes = [full_scene(physics[0])[::2, ::2] for physics in played["physics"][:-1]]   # (200, 300, 3): a small GIF
    windows, episode_return = played["windows"][:-1, 0], played["returns"][0]
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
    FuncAnimation(fig, draw, frames=frames).save(args.gif / "agent.gif", writer=PillowWriter(fps=25), dpi=72)
    plt.close(fig)
    print(f"wrote {args.gif / 'agent.gif'}: {len(scenes)} steps, return {episode_return:.0f}")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.benchmark_renderer:
            benchmark_renderer(args.image_height, args.image_width, args.num_envs)
        elif sweep_kind(args):
            run_sweep(args, sweep_kind(args))
        elif args.plot:
            plot(args)
        elif args.eval:
            returns = play(*load_run(args.eval), args.eval_episodes, seed=10_000 + args.seed)["returns"]
            print(f"{args.eval}: greedy return over {len(returns)} episodes: {returns.mean():.1f} +- "
                  f"{returns.std():.1f} (min {returns.min():.0f}, max {returns.max():.0f})")
        elif args.gif:
            make_gif(args)
        elif args.inspect:
            inspect_run(args.inspect)
        elif args.state_reference:
            train_state_reference(args.seed, args.total_steps, args.out, args.window)
        else:
            renderer = GymnasiumRenderer(args.image_height, args.image_width) if args.renderer == "gymnasium" else None
            train(args, renderer, RunLog(args))
            print(f"figure of this run: {plot_training(args.out)}")
    except KeyboardInterrupt:
        if sweep_kind(args):
            where = args.sweep_dir / sweep_kind(args)
            sys.exit(f"\ninterrupted: finished runs are kept in {where}; unfinished ones are redone when started again")
        sys.exit(f"\ninterrupted: the logs so far are in {args.out}" if args.out else "\ninterrupted")
    except FloatingPointError as error:
        sys.exit(f"error: {error}; the logs so far are in {args.out}")
    except OSError as error:          # a failed write (disk full, permissions): one line, the rows so far stay
        fail(f"writing to {args.out or args.plots_dir} failed ({error}); the rows written so far are kept")


if __name__ == "__main__":
    main()
