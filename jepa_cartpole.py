"""
jepa_cartpole.py: a Joint-Embedding Predictive Architecture (JEPA) that trains a PPO agent on pixel Cart Pole.

A minimal reference implementation of Kenneweg, Kenneweg & Hammer, "JEPA for RL: Investigating Joint-Embedding
Predictive Architectures for Reinforcement Learning", ESANN 2025 (arXiv 2504.16591). A vision transformer learns a
state s_x for a PPO agent from a JEPA loss: predict the embedding of the *next* frames from that of the current ones.
The target s_y is itself an embedding, so the prediction lives in latent space, never in pixels. The paper reports
that the JEPA loss alone collapses (every image -> one embedding); the RL gradients or a variance regulariser help.

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
    python jepa_cartpole.py --jepa    --no-rl-grad --no-reg   # 3: JEPA only (the paper: collapses)
    python jepa_cartpole.py --jepa    --no-rl-grad --reg      # 4: JEPA + regulariser (the paper: no collapse)

This file is the method (Part 1, in the paper's order) and one run (Part 2). plots/experiments.py makes plots/.
Shapes: N envs, T steps per env in a rollout, F (Fr in code) = 3 frames of H x W pixels, p x p pixels a patch, R x C
patches a frame (P = R * C), L = 1 + F * P tokens (CLS first), D = d = width of s_x, nh heads of hs = D / nh, A actions.
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
    # --- the run (Part 2 adds --threads, --out, --overwrite and --window)
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
                   "paper does not say; plots/README.md: What mattered for learning)")
    p.add_argument("--frame-index", action=on_off, default=True, help="frame index in the position (off: unordered)")
    # --- JEPA (the paper fixes tau = 0.99 and the unweighted sum of Eq. 3)
    p.add_argument("--predictor-hidden", type=int, default=128, help="hidden width of the two-layer predictor")
    p.add_argument("--ema-tau", type=float, default=0.99, help="the y-encoder's EMA rate tau (paper: 0.99)")
    p.add_argument("--jepa-coef", type=float, default=1.0, help="weight of Eq. 1 in Eq. 3 (paper: 1)")
    p.add_argument("--reg-coef", type=float, default=1.0, help="weight of Eq. 2 in Eq. 3 (paper: 1)")
    p.add_argument("--reg-form", choices=["var", "std"], default="var", help="with --reg: Eq. 2 or VICReg's (sec. 6)")
    p.add_argument("--fresh-targets", action=on_off, default=False, help="s_y per minibatch (slower), not per rollout")
    # --- PPO: CleanRL's ppo.py, except 16 envs x 32 steps (CleanRL: 4 x 128, the same 512 per rollout), one hidden
    #     layer per head (CleanRL: two) and every value whose help says otherwise (plots/README.md: What mattered).
    p.add_argument("--num-steps", type=int, default=32, help="rollout length per env between updates")
    p.add_argument("--num-minibatches", type=int, default=8, help="minibatches per epoch: 8 of at most 64 "
                   "(autoreset steps are left out), twice CleanRL's optimiser steps (plots/README.md: What mattered)")
    p.add_argument("--update-epochs", type=int, default=4, help="passes over each rollout")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate (CleanRL's: 2.5e-4)")
    p.add_argument("--predictor-lr-scale", type=float, default=1.0, help="the predictor's lr / --learning-rate; the "
                   "collapse demonstration slows it to 0.01 (why: plots/README.md, When does JEPA collapse?)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on all trained networks")
    p.add_argument("--anneal-lr", action=on_off, default=True, help="decay the learning rate linearly to 0")
    p.add_argument("--gamma", type=float, default=0.98, help="discount factor (RL Zoo's for Cart Pole)")
    p.add_argument("--gae-lambda", type=float, default=0.8, help="lambda of the advantage estimate (RL Zoo's)")
    p.add_argument("--clip-coef", type=float, default=0.2, help="PPO ratio clipping")
    p.add_argument("--ent-coef", type=float, default=0.0, help="entropy bonus weight (RL Zoo's)")
    p.add_argument("--vf-coef", type=float, default=0.5, help="value loss weight (no value clipping)")
    p.add_argument("--max-grad-norm", type=float, default=1000.0, help="gradient clipping over all trained networks: "
                   "off in practice, a safety net (plots/README.md: What mattered for learning)")
    return p   # Part 2 adds the run's flags, and checks every value's range before a run starts


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


def make_envs(num_envs):  # N Cart Poles; RecordEpisodeStatistics puts each ended episode's return in `info`
    envs = gym.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="vector_entry_point")
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


def ended_episodes(info, step):                      # [(step, return, length)] of the episodes ended at this step
    episode = info.get("episode", {"r": [], "l": []})   # only where one ended, with the mask info["_episode"]
    return [(step, float(r), int(n)) for r, n, e in zip(episode["r"], episode["l"], info.get("_episode", [])) if e]


def reset_pixels(envs, seed, render):
    """Reset N pixel Cart Poles: (frame_stack (N, 3, H, W), physics (N, 4)). No past yet: each first frame 3 times."""
    physics, _ = envs.reset(seed=seed)
    return np.repeat(render(physics)[:, None], 3, axis=1), physics


def step_pixels(envs, actions, frame_stack, previous_episode_end, render):
    """One step of N pixel Cart Poles, with gymnasium 1.x "next-step" autoreset. An episode ends in one of two ways:
    terminated (the pole fell or the cart left the track) or truncated (500 steps). Either way, gymnasium's NEXT
    step() ignores the action and returns the first observation of a new episode, with reward 0. That autoreset step
    is no real transition: valid = False there, and no loss uses it. Returns (frame_stack, physics, reward,
    terminated, episode_end, valid, info), episode_end = terminated or truncated."""
    physics, reward, terminated, truncated, info = envs.step(actions)
    frame_stack = push_frame(frame_stack, render(physics), episode_start=previous_episode_end)
    return frame_stack, physics, reward, terminated, terminated | truncated, ~previous_episode_end, info


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

    def attention(self, x, queries):          # x (B, L, D) normed -> (B, Q, D): the first Q tokens, each over all L
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)   # (B, nh, L, hs)
        return self.proj(F.scaled_dot_product_attention(q[:, :, :queries], k, v).transpose(1, 2).flatten(2))

    def forward(self, x):                                             # (B, L, D)
        x = x + self.attention(self.norm1(x), queries=x.shape[1])     # every token asks: Q = L
        return x + self.mlp(self.norm2(x))


def last_block_cls_only(block, x):
    """Speed, same result: after the last block only the CLS output is read, so there only the CLS token needs a
    query and an MLP (every token still gives keys and values). It equals block(x)[:, :1] (a test)."""
    cls = x[:, :1] + block.attention(block.norm1(x), queries=1)       # (B, 1, D)
    return cls + block.mlp(block.norm2(cls))


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
        # its own, not the batch, so it cannot prevent collapse (Eq. 2, section 6, says what it means for the clamp).
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
    # Eq. 2: L_reg = -min(1, (1/d) sum_i Var_batch(s_x)_i) rewards spread, the opposite of collapse. The clamp ends
    # the reward at a mean variance of 1; after the final LayerNorm (gain 1) each s lies at length sqrt(d) from its
    # bias, so the mean variance can hardly pass 1 and the clamp rarely acts.
    # Its push fades as the batch closes in: on feature i of one s_x, -dL_reg/ds_i = 2 (s_i - mean_i) / (d (B - 1)),
    # in proportion to the spread. VICReg's hinge on each feature's standard deviation (Bardes et al. 2022, 4.1;
    # --reg-form std) divides by the spread, and so pushes as hard until the spread is ~0.01 (its 1e-4 under the root).
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
    # train() anneals it. fused=True: speed, same result (a test; plots/README.md: Speed has the time it saves).
    return torch.optim.AdamW(
        [{"params": [p for k in ("x_encoder", "actor", "critic") for p in nets[k].parameters()],
          "lr": args.learning_rate, "base_lr": args.learning_rate},
         {"params": nets["predictor"].parameters(), "lr": args.learning_rate * args.predictor_lr_scale,
          "base_lr": args.learning_rate * args.predictor_lr_scale}],
        eps=1e-5, weight_decay=args.weight_decay, fused=True)


def training_step(nets, optimizer, mb, args):
    """One optimiser step on one minibatch `mb` of M transitions (a dict of tensors): PPO + Eq. 1-3, then the EMA.
    mb: windows (M, 3, H, W) = [f(t-2), f(t-1), f(t)]; s_y (M, D), the y-encoder's embedding of [f(t-1), f(t), f(t+1)];
    actions, logprobs, advantages, returns (M,). Returns the logged numbers."""
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

    # 6. Backward and step, all trained networks, ONE gradient clip over all. The default 1000 is a safety net that
    #    hardly ever acts (plots/README.md: What mattered for learning, round 3, has the norms and why not 5).
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
    """The log door: train() calls update(step, means, rollout) per update, finish(nets) once. This one prints."""

    def __init__(self, window=20):
        self.window, self.start = window, time.time()
        self.recent_returns = collections.deque(maxlen=window)       # the last `window` episodes' returns

    def record(self, step, means, rollout):          # the update's row, with the running average of the return
        self.recent_returns.extend(episode_return for _, episode_return, _ in rollout["episodes"])
        mean_return = float(np.mean(self.recent_returns)) if self.recent_returns else float("nan")
        return dict(means, step=step, mean_return=mean_return, sps=step / (time.time() - self.start))

    def line(self, row, extra=""):                   # extra: a subclass's diagnostics, shown before the JEPA loss
        collapsed = f" <- collapsed (var < {COLLAPSE_THRESHOLD:g})" if row["embedding_var"] < COLLAPSE_THRESHOLD else ""
        return (f"step {row['step']:>7} | sps {row['sps']:4.0f} | return(last {self.window}) {row['mean_return']:5.1f}"
                f" | embedding var {row['embedding_var']:.1e}{extra} | jepa {row['jepa_loss']:.3f}{collapsed}")

    def update(self, step, means, rollout):
        self.row = self.record(step, means, rollout)
        print(self.line(self.row), flush=True)

    def finish(self, nets):                           # nets: for a logger that saves them (Part 2's RunLog)
        wall = time.time() - self.start
        return {"steps": self.row["step"], "wall_s": wall, "sps": self.row["step"] / wall,
                "final_mean_return": self.row["mean_return"], "return_window_episodes": self.window}


def rollout_sizes(num_envs, num_steps, total_steps):
    """(transitions per rollout, updates per run): whole rollouts, at least total_steps env steps."""
    return num_envs * num_steps, math.ceil(total_steps / (num_envs * num_steps))


def train(args, render=None, log=None):
    """Train an agent -> (summary, nets). Two doors: render draws each frame, physics (N, 4) -> (N, H, W); log gets
    each update (ConsoleLog's methods). Part 2 and plots/experiments.py pass their own."""
    # ---- set-up: seeds, environments, networks, optimiser
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    H, W, N, T, D = args.image_height, args.image_width, args.num_envs, args.num_steps, args.embed_dim
    batch_size, num_updates = rollout_sizes(N, T, args.total_steps)   # num_updates: the learning-rate schedule's
    run_updates = rollout_sizes(N, T, args.stop_after or args.total_steps)[1]   # --stop-after: its first part
    log, render = log or ConsoleLog(), render or (lambda physics: render_frames(physics, H, W))
    envs = make_envs(N)
    nets = {k: net.to(device) for k, net in make_networks(args, envs.single_action_space.n).items()}
    x_encoder, y_encoder, actor, critic = nets["x_encoder"], nets["y_encoder"], nets["actor"], nets["critic"]
    optimizer = make_optimizer(nets, args)

    # ---- rollout storage. windows[t] is the x-encoder's input at step t; windows[t+1] is the y-encoder's.
    # terminated: the pole fell, no future (V(next) = 0); episode_end: terminated or truncated (500 steps, cut but not
    # failed); valid: False on the autoreset step after an episode end, which trains nothing (step_pixels).
    windows = torch.zeros((T + 1, N, 3, H, W), dtype=torch.uint8)    # uint8: 4x less memory than float
    actions = torch.zeros((T, N), dtype=torch.long)
    logprobs, rewards, terminated, episode_end = (torch.zeros((T, N)) for _ in range(4))
    values = torch.zeros((T + 1, N))                                 # values[T]: the bootstrap value
    valid = torch.zeros((T, N), dtype=torch.bool)
    rollout_s_x = torch.zeros((T, N, D))                             # the s_x acted on: Part 2's rank reads them
    frame_stack, physics = reset_pixels(envs, args.seed, render)    # each env's window now (N, 3, H, W); (N, 4)
    previous_episode_end, global_step = np.zeros(N, dtype=bool), 0

    for update in range(1, run_updates + 1):
        if args.anneal_lr:                  # linearly from base_lr at the first update towards 0 after the last
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * (1.0 - (update - 1.0) / num_updates)

        # ---- 1. Rollout: act with the current policy for T steps in N envs.
        windows[0], episodes = torch.from_numpy(frame_stack), []     # episodes: (step, return, length) of those ended
        for t in range(T):
            with torch.inference_mode():                            # no autograd bookkeeping while acting
                s_x = x_encoder(windows[t].to(device))              # (N, D)
                dist = torch.distributions.Categorical(logits=actor(s_x))
                action = dist.sample()                              # (N,)
                values[t], logprobs[t] = critic(s_x).squeeze(-1).cpu(), dist.log_prob(action).cpu()
            actions[t], rollout_s_x[t] = action.cpu(), s_x.cpu()
            frame_stack, physics, reward, term, ended, is_valid, info = step_pixels(
                envs, action.cpu().numpy(), frame_stack, previous_episode_end, render)
            global_step += N               # every env step, the autoreset steps too (one per finished episode)
            windows[t + 1], valid[t], rewards[t] = (torch.from_numpy(a) for a in (frame_stack, is_valid, reward))
            terminated[t], episode_end[t] = torch.from_numpy(term * 1.0), torch.from_numpy(ended * 1.0)
            previous_episode_end = ended
            episodes += ended_episodes(info, global_step)

        # ---- 2. Advantages (GAE), and the JEPA targets s_y for the whole rollout.
        next_windows = windows[1:].flatten(0, 1)                    # (N*T, 3, H, W): the y-encoder's inputs
        with torch.inference_mode():
            values[T] = critic(x_encoder(windows[T].to(device))).squeeze(-1).cpu()   # bootstrap value
            # Speed, NOT the same result: s_y = y-encoder(windows[t+1]) once per rollout. The EMA moves the y-encoder
            # after every optimiser step, so within an update these targets lag it by up to epochs x minibatches - 1
            # steps (31 at the defaults: 1 - 0.99^31 = 27% of the way to the x-encoder). --fresh-targets computes
            # them per minibatch instead; plots/README.md (When does JEPA collapse?) has what the lag changes.
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
        log.update(global_step, means, rollout=dict(episodes=episodes, windows=windows, s_x=rollout_s_x,
                                                   x_encoder=x_encoder))

    envs.close()
    return log.finish(nets), nets


# ======================================================================================================
# PART 2: ONE RUN (skip on a first reading)
# ======================================================================================================
# What one run needs beyond the method: its flags and their checks, the collapse indicators the console shows, the
# run folder and its figure. plots/experiments.py runs many through train()'s `log` and `render` doors.
import csv
import json
import platform
import sys
from pathlib import Path


# ---- 9. The run's flags, and the check of every flag before anything is written ----------------------------------
def add_run_flags(p):
    p.epilog = __doc__[__doc__.index("The paper's four"):__doc__.index("This file is")]   # the docstring's list
    run = p.add_argument_group("where the run runs and writes")
    run.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    run.add_argument("--out", type=Path, default=None, help="run folder [runs/<switches>-seed<k>]")
    run.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty --out")
    run.add_argument("--window", type=int, default=20, help="episodes in the running average of the return")
    return p


# Every number flag's valid range, [low, high] inclusive (None: unbounded).
FLAG_RANGES = {
    "seed": (0, 2**32 - 1), "threads": (0, None), **dict.fromkeys(["ema_tau", "gamma", "gae_lambda"], (0.0, 1.0)),
    **dict.fromkeys(["learning_rate", "clip_coef", "max_grad_norm"], (1e-12, None)),        # > 0
    **dict.fromkeys(["jepa_coef", "reg_coef", "predictor_lr_scale", "weight_decay", "ent_coef", "vf_coef"],
                    (0.0, None)),
    **dict.fromkeys(["total_steps", "num_envs", "window", "image_height", "image_width", "patch_size", "embed_dim",
                     "depth", "heads", "mlp_ratio", "predictor_hidden", "num_steps", "num_minibatches",
                     "update_epochs"], (1, None)),
}
POLE_SPAN = AXLE_Y + POLE_LENGTH - POLE_HALF_WIDTH - CROP_BOTTOM   # screen px above the frame's bottom the pole needs
SCREEN_HEIGHT = 400.0


def check_args(parser, args, ranges=FLAG_RANGES):
    """Every check of the method's and the run's flags: a bad value is an argparse error naming it (exit code 2)."""
    for name, (low, high) in ranges.items():
        value, flag = getattr(args, name), f"--{name.replace('_', '-')}"
        if not math.isfinite(value):
            parser.error(f"{flag} {value}: must be a finite number")
        if not (low <= value if high is None else low <= value <= high):
            parser.error(f"{flag} {value}: must be " + (f"at least {low}" if high is None else f"in [{low}, {high}]"))
    if args.image_height % args.patch_size or args.image_width % args.patch_size:
        parser.error(f"--patch-size {args.patch_size} must divide --image-height {args.image_height} "
                     f"and --image-width {args.image_width}")
    if args.embed_dim % args.heads:
        parser.error(f"--heads {args.heads} must divide --embed-dim {args.embed_dim}")
    band, room = args.image_height * SCREEN_WIDTH / args.image_width, SCREEN_HEIGHT - CROP_BOTTOM   # screen px
    if not POLE_SPAN <= band <= room:
        parser.error(f"--image-height {args.image_height} with --image-width {args.image_width} shows {band:.0f} "
                     f"screen pixels of height; the upright pole needs {POLE_SPAN:.0f} and the screen has {room:.0f}")
    rollout = args.num_envs * args.num_steps
    if rollout < 8 * args.num_minibatches:
        parser.error(f"--num-minibatches {args.num_minibatches}: minibatches of the rollout's {rollout} "
                     "transitions (--num-envs x --num-steps) need at least 8 samples each (Eq. 2's batch variance)")
    if args.total_steps < rollout:
        parser.error(f"--total-steps {args.total_steps} is smaller than one rollout (--num-envs x --num-steps)")
    if args.stop_after is not None and not rollout <= args.stop_after <= args.total_steps:
        parser.error(f"--stop-after {args.stop_after}: must be in [one rollout ({rollout}), --total-steps]")
    try:
        torch.zeros(1, device=args.device)                            # a device this machine has
    except (RuntimeError, AssertionError, NotImplementedError) as error:
        parser.error(f"--device {args.device}: not usable here ({str(error).splitlines()[0][:80]}); try cpu")


def parse_args(argv=None):
    """Parse and check every flag before anything is written; the run folder is runs/<switches>-seed<k> by default."""
    parser = add_run_flags(build_parser())
    args = parser.parse_args(argv)
    check_args(parser, args)
    args.out = args.out or Path("runs") / f"{run_name(args.jepa, args.rl_grad, args.reg)}-seed{args.seed}"
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: is a file, not a folder")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} exists and is not empty; pick another --out or pass --overwrite")
    return args


def run_name(jepa, rl_grad, reg):
    return f"{'jepa' if jepa else 'nojepa'}-{'rlgrad' if rl_grad else 'norlgrad'}-{'reg' if reg else 'noreg'}"


# ---- 10. What the embedding knows: effective rank and linear probes of the true state (not in the paper) ---------
def effective_rank(s):
    # How many directions the embeddings use (RankMe, Garrido et al. 2023): with p_k the singular values of s (n, d)
    # normalised to sum 1, exp(-sum_k p_k log p_k), from 1 (all on one line) to d (fully spread). Uncentred: a big
    # offset shared by all s is a direction too, so a rank near 1 is collapse OR a small spread around a big common
    # mean; the variance tells which.
    singular_values = torch.linalg.svdvals(s)                         # (min(n, d),)
    p = singular_values / singular_values.sum()
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


STATE_NAMES = ["x", "x_dot", "theta", "theta_dot"]
PROBE_EVERY = 8        # updates between two uniform probes (and the last): each encodes 2048 windows
ONPOLICY_EVERY = 32    # updates between two on-policy probes (and the last): rarer, to keep a run's speed
ONPOLICY_ROLLOUTS = 4  # the on-policy probe reads the last 4 rollouts' windows (2048 at the defaults)


def make_probe_set(seed, height, width, size=2048):
    """Fixed windows [f(t-2), f(t-1), f(t)] and the true state at f(t), from the seed: start states over the range an
    episode can visit, then two random pushes with gymnasium's physics, so that each window shows real motion."""
    rng = np.random.default_rng([seed, 2024])
    env = gym.make("CartPole-v1").unwrapped
    env.reset(seed=seed)
    trajectory = [rng.uniform([-2.0, -1.0, -0.15, -1.0], [2.0, 1.0, 0.15, 1.0], size=(size, 4))]   # t-2, t-1, t
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
    """{probe_r2_<variable>: R^2} on the fixed probe set, half fitted, half scored: states over the whole range."""
    windows, states = probe_set
    s, half = encode(x_encoder, windows, device), len(windows) // 2
    r2 = linear_probe_r2(s[:half], states[:half].double(), s[half:], states[half:].double())
    return {f"probe_r2_{name}": value for name, value in zip(STATE_NAMES, r2.tolist())}


def onpolicy_probe_r2(x_encoder, recent_rollouts, device):
    """{onpolicy_r2_<variable>: R^2} on the visited states, the last rollouts [(windows (T, N, 3, H, W), states
    (T, N, 4))] re-encoded now: fitted on half of the envs, scored on the rest (by env: neighbouring steps of one env
    are near-duplicates, and a probe split by sample would be scored on copies of what it fitted)."""
    windows = torch.cat([w for w, _ in recent_rollouts]).transpose(0, 1)            # (N, K*T, 3, H, W)
    states = torch.cat([st for _, st in recent_rollouts]).transpose(0, 1).double()  # (N, K*T, 4)
    half = windows.shape[0] // 2
    if half == 0:                                                                   # one env: nothing to hold out
        return {f"onpolicy_r2_{name}": float("nan") for name in STATE_NAMES}
    fit, test = (encode(x_encoder, w.flatten(0, 1), device) for w in (windows[:half], windows[half:]))
    r2 = linear_probe_r2(fit, states[:half].flatten(0, 1), test, states[half:].flatten(0, 1))
    return {f"onpolicy_r2_{name}": value for name, value in zip(STATE_NAMES, r2.tolist())}


# ---- 11. The run folder: config.json, episodes.csv, updates.csv, then model.pt, summary.json and training.png ----
UPDATE_COLUMNS = ["step", "mean_return", "loss", "jepa_loss", "reg_loss", "policy_loss", "value_loss", "entropy",
                  "approx_kl", "grad_norm", "embedding_var", "effective_rank",
                  *(f"{kind}_r2_{v}" for kind in ("probe", "onpolicy") for v in STATE_NAMES), "learning_rate", "sps"]


def machine():
    """What a run's numbers depend on beyond its seed (plots/README.md: Reproducibility): the CPU model, torch's
    kernels for it, torch's version and the thread count."""
    cpuinfo = Path("/proc/cpuinfo").read_text().split("\n\n")[0] if Path("/proc/cpuinfo").exists() else ""   # Linux
    info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in cpuinfo.splitlines())}
    ids = [info.get(k, "") for k in ("cpu family", "model", "stepping")]
    return {"cpu_vendor": info.get("vendor_id", platform.system()),
            "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
            "cpu_family_model_stepping": "/".join(ids) if all(ids) else "",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


class RunLog(ConsoleLog):
    """Part 1's logger door with a run folder, each row flushed as it comes (a killed run keeps what it did). Its
    `render`, train()'s render door, keeps the true state behind the last T + 1 frames for the on-policy probe."""

    def __init__(self, args):
        self.out, self.device, self.probe_theta, self.updates = args.out, args.device, float("nan"), 0
        self.frames = lambda physics: render_frames(physics, args.image_height, args.image_width)
        self.drawn = collections.deque(maxlen=args.num_steps + 1)     # the physics behind the last T + 1 frames
        self.num_updates = rollout_sizes(args.num_envs, args.num_steps, args.stop_after or args.total_steps)[1]
        self.probe_set = make_probe_set(args.seed, args.image_height, args.image_width)
        self.recent_rollouts = collections.deque(maxlen=ONPOLICY_ROLLOUTS)   # for the on-policy probe
        args.out.mkdir(parents=True, exist_ok=True)
        for stale in ("summary.json", "model.pt", "training.png"):   # --overwrite: never a finished-looking mix
            (args.out / stale).unlink(missing_ok=True)
        (args.out / "config.json").write_text(json.dumps(vars(args), indent=2, default=str))   # a Path as its text
        self.files = [open(args.out / name, "w", newline="", buffering=1)    # line-buffered: each row flushed at once
                      for name in ("episodes.csv", "updates.csv")]
        self.episodes_csv, self.updates_csv = csv.writer(self.files[0]), csv.DictWriter(self.files[1], UPDATE_COLUMNS)
        self.episodes_csv.writerow(["step", "return", "length"])
        self.updates_csv.writeheader()
        super().__init__(args.window)                                  # starts the clock

    def render(self, physics):                                         # (N, 4) -> (N, H, W)
        self.drawn.append(torch.tensor(physics))
        return self.frames(physics)

    def update(self, step, means, rollout):
        self.updates += 1
        row, last = self.record(step, means, rollout), self.updates == self.num_updates
        self.recent_rollouts.append((rollout["windows"][:-1].clone(), torch.stack(list(self.drawn)[:-1])))
        row.update({f"{kind}_r2_{name}": float("nan") for kind in ("probe", "onpolicy") for name in STATE_NAMES},
                   effective_rank=effective_rank(rollout["s_x"].flatten(0, 1)).item())   # of the s_x acted on
        if self.updates % PROBE_EVERY == 0 or last:
            row.update(probe_r2(rollout["x_encoder"], self.probe_set, self.device))
            self.probe_theta = row["probe_r2_theta"]                  # the console shows the latest probe
        if self.updates % ONPOLICY_EVERY == 0 or last:
            row.update(onpolicy_probe_r2(rollout["x_encoder"], self.recent_rollouts, self.device))
        self.episodes_csv.writerows(rollout["episodes"])
        self.updates_csv.writerow(row)
        self.row = row
        print(super().line(row, f" | eff. rank {row['effective_rank']:4.1f} | probe R2 theta {self.probe_theta:5.2f}"),
              flush=True)

    def finish(self, nets):
        summary = {**super().finish(nets), "final_embedding_var": self.row["embedding_var"],
                   "final_effective_rank": self.row["effective_rank"], "machine": machine()}
        for file in self.files:
            file.close()
        torch.save({k: net.state_dict() for k, net in nets.items()}, self.out / "model.pt")
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"done: {summary['steps']} steps in {summary['wall_s']:.0f}s ({summary['sps']:.0f} sps); "
              f"logs in {self.out}")
        return summary


def plot_training(run_dir):
    """<run>/training.png: return, embedding variance, effective rank and JEPA loss against steps, for one run."""
    import matplotlib
    matplotlib.use("Agg")                                              # to a file: no screen needed
    import matplotlib.pyplot as plt
    updates = np.genfromtxt(run_dir / "updates.csv", delimiter=",", names=True)
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for ax, column, title in zip(axes, ["mean_return", "embedding_var", "effective_rank", "jepa_loss"],
                                 ["return (running average)", "embedding variance (collapse indicator)",
                                  "effective rank of s_x", "JEPA loss (Eq. 1)"]):
        ax.plot(updates["step"], updates[column], lw=1.5)
        ax.set(title=title, xlabel="environment steps", yscale="log" if column == "embedding_var" else "linear")
        ax.grid(alpha=0.3)
    axes[1].axhline(COLLAPSE_THRESHOLD, color="black", ls=":", label="the paper's collapse threshold 1e-7")
    axes[1].legend(fontsize=8)
    fig.suptitle(str(run_dir), fontsize=12)
    fig.tight_layout()
    fig.savefig(run_dir / "training.png", dpi=80)
    plt.close(fig)
    return run_dir / "training.png"


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = RunLog(args)
    try:
        train(args, render=log.render, log=log)
    except KeyboardInterrupt:
        sys.exit(f"\ninterrupted: the logs so far are in {args.out}")
    except FloatingPointError as error:
        sys.exit(f"error: {error}; the logs so far are in {args.out}")
    except OSError as error:          # a failed write (disk full, permissions): one line, the rows so far stay
        print(f"error: writing to {args.out} failed ({error}); the rows written so far are kept", file=sys.stderr)
        sys.exit(2)
    print(f"figure of this run: {plot_training(args.out)}")


if __name__ == "__main__":
    main()
