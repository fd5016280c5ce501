"""
plots/experiments.py: the harness that remakes every figure and table in plots/ from runs of jepa_cartpole.py.

jepa_cartpole.py is the method and one run; this script runs many (the sweeps), reads their run folders, and turns
them into the report's statistics, figures and tables. It imports jepa_cartpole and adds nothing to it: it drives
train() through its two doors, `log` (jepa_cartpole.RunLog, which writes a run folder) and `render`.

Run from the repository's root, one subcommand per job:
    python plots/experiments.py figure3 --seeds 10     # Figure 3: 4 configurations + the state reference, then plot
    python plots/experiments.py collapse --seeds 10    # the collapse demonstration, then plot
    python plots/experiments.py lab --seeds 5          # the lab's runs (README: A 90-minute lab), then plot
    python plots/experiments.py class --seed 601       # a student's share of the class's Figure 3: 4 runs of 100k
    python plots/experiments.py pool FOLDER...         # the class's runs, in any layout, pooled into Figure 3
    python plots/experiments.py plot                   # every figure and table from the finished runs
    python plots/experiments.py inspect RUN            # what RUN's encoder knows where its agent goes: inspect.json
    python plots/experiments.py eval RUN               # RUN's agent, greedy, over 20 episodes
    python plots/experiments.py gif RUN                # RUN/agent.gif: one greedy episode
    python plots/experiments.py state-reference        # PPO on the true 4-number state (Figure 3's dashed line)
    python plots/experiments.py renderer               # our numpy renderer against gymnasium's: difference, speed
A sweep is resumable (finished runs are kept), holds a lock on its folder, and with --print-commands prints the runs
still to do, one shell command each, for a scheduler; `plot` then collects them. plots/README.md is the report.
"""

import argparse
import contextlib
import csv
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import timeit
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # jepa_cartpole.py, one folder up
import jepa_cartpole as jc  # noqa: E402

DEFAULTS = {a.dest: a.default for a in jc.build_parser()._actions if a.dest != "help"}

# ---- 1. The sweeps' runs: Figure 3, the collapse demonstration, the lab, the class -------------------------------
FIGURE3_CONFIGS = {  # paper number: (jepa, rl_grad, reg, label)
    1: (False, True, False, "1: no JEPA, RL gradients (baseline)"),
    2: (True, True, False, "2: JEPA + RL gradients"),
    3: (True, False, False, "3: JEPA, no RL gradients"),
    4: (True, False, True, "4: JEPA + regulariser, no RL gradients"),
}
# The collapse demonstration's setting: choices the paper leaves open, never what it fixes (plots/README.md: "When
# does JEPA collapse?" has the runs that chose it). Applied to every arm of the collapse sweep.
COLLAPSE_SETTING = {"predictor_lr_scale": 0.01, "weight_decay": 0.0}
COLLAPSE_ARMS = {  # name: (jepa, rl_grad, reg, what else the arm changes)
    "JEPA only": (True, False, False, {}),
    "JEPA + RL gradients": (True, True, False, {}),
    "JEPA + regulariser": (True, False, True, {}),
    # Not the paper's Eq. 3, whose terms have no weights: the weight that prevents this collapse (plots/README.md:
    # Choosing the regulariser's weight).
    "JEPA + regulariser x100": (True, False, True, {"reg_coef": 100.0}),
}
# The lab's runs (README: A 90-minute lab): each run's flags where they differ from the defaults, as the README's
# commands give them. All stop at 30k steps on the 100k-step run's learning-rate schedule (--stop-after), so each is
# the start of the run Figure 3 makes. `lab` runs them on --seeds seeds from LAB_SEED (no figure or tuning uses seeds
# 500 to 599), then `inspect` on each: one command remakes every number the README's answers quote.
LAB_SEED, LAB_STEPS = 500, {"stop_after": 30_000}
IN_COLLAPSE_SETTING = {**LAB_STEPS, **COLLAPSE_SETTING, "rl_grad": False}          # JEPA only, slow predictor
LAB = {"worked": {"stop_after": 8192},                                                  # a worked example
       "config2": LAB_STEPS, "config1": {**LAB_STEPS, "jepa": False},                   # lesson 1
       "config3": {**LAB_STEPS, "rl_grad": False}, "collapse": IN_COLLAPSE_SETTING,     # lesson 2
       "collapse-rlgrad": {**IN_COLLAPSE_SETTING, "rl_grad": True},
       "collapse-reg": {**IN_COLLAPSE_SETTING, "reg": True},                            # lesson 3
       "collapse-reg100": {**IN_COLLAPSE_SETTING, "reg": True, "reg_coef": 100.0},
       "collapse-regstd": {**IN_COLLAPSE_SETTING, "reg": True, "reg_form": "std"},
       **{f"collapse-tau{tau:g}": {**IN_COLLAPSE_SETTING, "fresh_targets": True, "ema_tau": tau}   # lesson 4
          for tau in (0.0, 0.99, 1.0)},
       "noframe": {**LAB_STEPS, "frame_index": False},                                  # the extras
       "collapse-nonorm": {**IN_COLLAPSE_SETTING, "final_norm": False},
       "hires": {**LAB_STEPS, "image_height": 32, "image_width": 128}}
# The lab's comparisons, each (lesson, run A, run B, measure): the README counts the seeds on which A's measure at
# 30k is above B's: a column of plots/lab_runs.csv (return: running average; rank: effective rank; var: variance).
LAB_PAIRS = [("1", "config2", "config1", "return"), ("2", "config2", "config3", "return"),
             ("2", "collapse-rlgrad", "collapse", "rank"), ("3", "collapse-reg100", "collapse-reg", "rank"),
             ("3", "collapse-regstd", "collapse-reg", "var"), ("4", "collapse-tau1", "collapse-tau0.99", "rank"),
             ("4", "collapse-tau0", "collapse-tau0.99", "rank"),
             ("extra", "config2", "noframe", "return"), ("extra", "config2", "noframe", "onpolicy_r2_theta_dot"),
             ("extra", "config2", "noframe", "onpolicy_r2_x_dot"), ("extra", "hires", "config2", "probe_r2_theta_dot")]


# The collapse criterion, fixed before the runs that test it (plots/README.md: collapse): a run is COLLAPSED when the
# effective rank of its rollouts' s_x (scale-free, unlike the variance) is below COLLAPSED_RANK for at least
# COLLAPSED_SHARE of its updates after the first COLLAPSE_GRACE_STEPS steps. It ESCAPES at the first update after
# its last collapsed one, if that is not the end. The paper's criterion (variance < jc.COLLAPSE_THRESHOLD) is beside it.
COLLAPSED_RANK = 1.5        # an effective rank of s_x below it means (about) one direction
COLLAPSED_SHARE = 0.9
COLLAPSE_GRACE_STEPS = 10_000


# ---- 2. gymnasium's own renderer, to check ours (a test compares them) and to time it -----------------------------
def start_envs(num_envs, seed, height=None, width=None, render=None):
    """N Cart Poles reset from `seed` as jc.train() starts them, with their renderer (Part 1's at height x width unless
    `render` is given): (envs, render, frame_stack (N, 3, H, W), physics (N, 4))."""
    render = render or (lambda physics: jc.render_frames(physics, height, width))
    envs = jc.make_envs(num_envs)
    return envs, render, *jc.reset_pixels(envs, seed, render)


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
        pixel = jc.SCREEN_WIDTH / width
        # Screen row r covers screen y in [399 - r, 400 - r) (gymnasium flips y before returning the image).
        top, bottom = jc.SCREEN_HEIGHT - (jc.CROP_BOTTOM + height * pixel), jc.SCREEN_HEIGHT - jc.CROP_BOTTOM
        self.rows = (int(round(top)), int(round(bottom)))
        self.down_rows = self.box_downsample_matrix(self.rows[1] - self.rows[0], height)  # (H, rows)
        self.down_cols = self.box_downsample_matrix(int(jc.SCREEN_WIDTH), width)             # (W, 600)

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
    ours = timeit.timeit(lambda: jc.render_frames(states, height, width), number=repeats) / (repeats * num_envs)
    gymnasium_renderer, slow_repeats = GymnasiumRenderer(height, width), max(1, repeats // 20)   # slow: fewer
    theirs = timeit.timeit(lambda: gymnasium_renderer(states), number=slow_repeats) / (slow_repeats * num_envs)
    print(f"{num_envs} envs, {height}x{width} frames: numpy {ours * 1e6:.1f} us/frame, gymnasium "
          f"{theirs * 1e6:.0f} us/frame -> numpy is {theirs / ours:.0f}x faster")
    return ours, theirs


# ---- 3. The state-based reference: PPO on the true 4-number state (not in the paper) -----------------------------
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
        jc.layer_init(linear, gain)
    return nn.Sequential(*layers)


def train_state_reference(seed, total_steps, out, window=20):
    """PPO on the true 4-number state, into a run folder: Part 1's rollout (start_envs, jc.step_pixels; the 4 numbers as
    the "frame") and episode accounting (jc.ConsoleLog); the networks, update and settings are its own."""
    cfg = argparse.Namespace(**STATE_REFERENCE, seed=seed, total_steps=total_steps)
    N, T = cfg.num_envs, cfg.num_steps
    _, num_updates = jc.rollout_sizes(N, T, total_steps)
    torch.manual_seed(seed)
    np.random.seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(vars(cfg), indent=2))
    episodes_file, updates_file = (open(out / n, "w", newline="", buffering=1) for n in ("episodes.csv", "updates.csv"))
    episodes_log, updates_log = csv.writer(episodes_file), csv.writer(updates_file)
    episodes_log.writerow(["step", "return", "length"])             # line-buffered files: each row flushed at once
    updates_log.writerow(["step", "mean_return", "learning_rate", "clip_coef", "policy_loss", "value_loss",
                          "approx_kl"])
    envs, the_state, stack, physics = start_envs(N, seed, render=lambda physics: physics)   # (N, 3, 4): 3 states
    actor = state_mlp(envs.single_action_space.n, 0.01, cfg.hidden)           # near-uniform first policy
    critic = state_mlp(1, 1.0, cfg.hidden)
    params = [*actor.parameters(), *critic.parameters()]
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, eps=1e-5)
    observations = torch.zeros((T + 1, N, 4))
    actions = torch.zeros((T, N), dtype=torch.long)
    logprobs, rewards, terminated, episode_end = (torch.zeros((T, N)) for _ in range(4))
    valid = torch.zeros((T, N), dtype=torch.bool)
    log = jc.ConsoleLog(window)                             # counts the episodes; its clock starts here
    previous_episode_end, global_step = np.zeros(N, dtype=bool), 0
    for update in range(num_updates):
        episodes = []
        fraction_left = 1.0 - update / num_updates      # RL Zoo's lin_1e-3 and lin_0.2 schedules
        optimizer.param_groups[0]["lr"] = cfg.learning_rate * fraction_left
        observations[0] = torch.as_tensor(physics, dtype=torch.float32)
        for t in range(T):                              # ---- rollout
            with torch.no_grad():
                dist = torch.distributions.Categorical(logits=actor(observations[t]))   # (N, 2)
                actions[t] = dist.sample()
                logprobs[t] = dist.log_prob(actions[t])
            stack, physics, reward, term, ended, is_valid, info = jc.step_pixels(envs, actions[t].numpy(), stack,
                                                                              previous_episode_end, the_state)
            global_step += N
            observations[t + 1] = torch.as_tensor(physics, dtype=torch.float32)
            rewards[t], terminated[t] = torch.as_tensor(reward), torch.as_tensor(term * 1.0)
            valid[t], episode_end[t] = torch.as_tensor(is_valid), torch.as_tensor(ended * 1.0)
            previous_episode_end, episodes = ended, episodes + jc.ended_episodes(info, global_step)
        row = log.record(global_step, {}, dict(episodes=episodes))
        episodes_log.writerows(episodes)
        with torch.no_grad():                           # ---- advantages, with Part 1's GAE
            values = critic(observations).squeeze(-1)   # (T+1, N)
            advantages, returns = jc.compute_gae(rewards, values, terminated, episode_end, cfg.gamma, cfg.gae_lambda)
        batch = {"observations": observations[:T][valid], "actions": actions[valid], "logprobs": logprobs[valid],
                 "advantages": advantages[valid], "returns": returns[valid]}          # the valid steps only
        for epoch in range(cfg.update_epochs):          # ---- update: the whole rollout is one minibatch
            policy_loss, value_loss, entropy, approx_kl = jc.ppo_losses(
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
               "machine": jc.machine()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done: {global_step} steps in {wall:.0f}s; return (last {window} episodes) {mean_return:.1f}; logs in {out}")
    return summary



# ---- 4. Sweeps: one process per run, a lock, resume, and the commands for a scheduler -----------------------------
COLORS = {1: "tab:purple", 2: "tab:blue", 3: "tab:red", 4: "tab:green", "state": "black", "JEPA only": "tab:red",
          "JEPA + RL gradients": "tab:blue", "JEPA + regulariser": "tab:green", "JEPA + regulariser x100": "tab:olive"}
# The method's flags (Part 1 of jepa_cartpole.py): the settings a sweep's runs share, but for those one run sets.
METHOD_FLAGS = [a.dest for a in jc.build_parser()._actions if a.dest != "help"]
PER_RUN_FLAGS = {"seed", "jepa", "rl_grad", "reg", "device"}
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
              else {a.dest for a in jc.build_parser()._actions} - {"help"})
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


def check_same_settings(out, job):
    """Refuse to reuse or plot a finished run that was made with other method settings than this command's."""
    saved = read_config(out)
    compared = ["total_steps"] if out.name.startswith("state-") else [k for k in METHOD_FLAGS if k not in PER_RUN_FLAGS]
    different = {k: (saved.get(k), getattr(job, k)) for k in compared if saved.get(k) != getattr(job, k)}
    if different:
        listed = ", ".join(f"--{k.replace('_', '-')}: run {a} vs now {b}" for k, (a, b) in different.items())
        fail(f"{out} was made with other settings ({listed}); use another --sweep-dir or the same flags")


def sweep_groups(kind):
    """{group: its runs' folder name without the seed}: Figure 3's configurations and the reference, the collapse
    demonstration's arms, the lab's runs, or the class's four configurations."""
    if kind == "figure3":
        return {**{c: jc.run_name(j, g, r) for c, (j, g, r, _) in FIGURE3_CONFIGS.items()}, "state": "state"}
    if kind == "lab":
        return {name: name for name in LAB}
    if kind == "class":
        return {c: jc.run_name(j, g, r) for c, (j, g, r, _) in FIGURE3_CONFIGS.items()}
    return {arm: jc.run_name(j, g, r) + "".join(f"-{k.replace('_', '')}{v:g}" for k, v in changes.items())
            for arm, (j, g, r, changes) in COLLAPSE_ARMS.items()}              # e.g. jepa-norlgrad-reg-regcoef100


def method_flags(settings):
    """Part 1's flags that give `settings` (a dict of every method flag): those that differ from the defaults, and
    the three switches always."""
    flags = []
    for action in jc.build_parser()._actions:
        value = settings.get(action.dest)
        if isinstance(action, argparse.BooleanOptionalAction):
            if action.dest in ("jepa", "rl_grad", "reg") or value != action.default:
                flags.append(action.option_strings[0 if value else 1])
        elif action.dest not in ("help", "seed") and value != action.default:
            flags += [action.option_strings[0], str(value)]
    return flags


def run_flags(settings, seed, window, out):
    """The whole flag list of one sweep run: its method flags, then one thread, its folder and the window."""
    window = ["--window", str(window)] if window != 20 else []
    return [*method_flags(settings), "--seed", str(seed), "--threads", "1", *window, "--out", str(out), "--overwrite"]


def is_state_reference(job):
    return getattr(job, "state_reference", False)              # the reference's jobs have their own few flags


def sweep_job(args, kind, group, seed):
    """One run of a sweep: the flags of `python jepa_cartpole.py` that make it, parsed as that command parses them
    (so a run made by the sweep and one made by its printed command have the same config.json). For a Figure 3
    run the sweep's method flags with the configuration's switches; for the collapse demonstration also its setting;
    for the lab Part 1's defaults with the run's flags, whatever the sweep's flags are."""
    out = args.sweep_dir / kind / f"{sweep_groups(kind)[group]}-seed{seed}"
    if group == "state":
        return argparse.Namespace(state_reference=True, seed=seed, total_steps=args.total_steps, window=args.window,
                                  out=out)
    if kind == "lab":
        settings = {**DEFAULTS, "device": args.device, **LAB[group]}
    else:
        j, g, r, changes = COLLAPSE_ARMS[group] if kind == "collapse" else (*FIGURE3_CONFIGS[group][:3], {})
        setting = {**COLLAPSE_SETTING, **changes} if kind == "collapse" else {}
        settings = {**{k: getattr(args, k) for k in METHOD_FLAGS}, **setting, "jepa": j, "rl_grad": g, "reg": r}
    return jc.add_run_flags(jc.build_parser()).parse_args(run_flags(settings, seed, args.window, out))


def command_line(job):
    """One run of a sweep as a shell command (from the repository's root) that writes the same run folder as the
    sweep would, then inspects it."""
    if is_state_reference(job):
        return (f"python plots/experiments.py state-reference --seed {job.seed} --total-steps {job.total_steps}"
                + (f" --window {job.window}" if job.window != 20 else "") + f" --out {job.out}")
    flags = run_flags(vars(job), job.seed, job.window, job.out)
    return f"python jepa_cartpole.py {' '.join(flags)} && python plots/experiments.py inspect {job.out}"


def _sweep_worker(job):
    """One run of a sweep, in its own process; its console lines go to console.log in its folder."""
    torch.set_num_threads(1)
    job.out.mkdir(parents=True, exist_ok=True)
    with open(job.out / "console.log", "w") as console:
        sys.stdout = console
        if is_state_reference(job):
            train_state_reference(job.seed, job.total_steps, job.out, window=job.window)
        else:
            log = jc.RunLog(job)
            jc.train(job, render=log.render, log=log)
            jc.plot_training(job.out)
            inspect_run(job.out)                      # the final encoder's probes, while its weights are here


def planned_steps(job):
    """The env steps one run of a sweep will make: whole rollouts up to --stop-after or --total-steps."""
    if is_state_reference(job):
        return math.prod(jc.rollout_sizes(STATE_REFERENCE["num_envs"], STATE_REFERENCE["num_steps"], job.total_steps))
    return math.prod(jc.rollout_sizes(job.num_envs, job.num_steps, job.stop_after or job.total_steps))


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


def sweep_seeds(args, kind):
    """The seeds of a sweep: --seeds of them from 1 (Figure 3, collapse) or LAB_SEED (the lab); a class run's one."""
    if kind == "class":
        return [args.seed]
    first = LAB_SEED if kind == "lab" else 1
    return list(range(first, first + args.seeds))


def unfinished_jobs(args, kind):
    """The sweep's runs still to do: not finished, or finished but damaged (redone, with a warning)."""
    jobs = []
    for group in sweep_groups(kind):
        for job in (sweep_job(args, kind, group, seed) for seed in sweep_seeds(args, kind)):
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
    for run in finished_runs(args.sweep_dir / kind):      # trained, but stopped before its `inspect`: inspect it now
        if (run / "model.pt").exists() and not (run / "inspect.json").exists() and not run.name.startswith("state-"):
            inspect_run(run)
    total = len(sweep_groups(kind)) * len(sweep_seeds(args, kind))
    steps_per_run = [planned_steps(job) for job in jobs]
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
    if kind == "class":                                    # the class's runs are pooled, not plotted one by one
        print(f"done: your runs are in {args.sweep_dir / kind}; give that folder to your teacher for `pool`")
    else:
        plot(args)
    lock.close()
    if failed:
        fail(f"{len(failed)} run(s) failed; the others are kept:\n" + "\n".join(failed))


# ---- 5. Statistics: rliable's interval estimates (Agarwal et al. 2021) and a power estimate (Colas et al. 2019) ---
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


# ---- 6. Figures and tables: Figure 3, the collapse figure, the lab's tables -------------------------------------
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
        if (run / "inspect.json").exists():                # `inspect`'s probes of the final encoder, if made
            for key, value in json.loads((run / "inspect.json").read_text()).items():
                runs.setdefault(f"inspect_{key}", []).append(value)
        updates = read_csv(run / "updates.csv")
        for column in jc.UPDATE_COLUMNS[2:-2]:
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
                    "var_below_1e-7_seeds": int((runs["embedding_var"] < jc.COLLAPSE_THRESHOLD).any(1).sum()),
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


def lab_rows(args):
    """One row per finished run of the lab (whatever its seed): its numbers at its last update, the collapse
    criterion over its own updates, `inspect`'s report and its time."""
    rows = []
    for name in LAB:
        for seed, run in group_runs(args, "lab", name):
            u, summary = read_csv(run / "updates.csv"), json.loads((run / "summary.json").read_text())
            share, collapsed, _ = collapse_dynamics(u["step"], u["effective_rank"])
            last = {c: u[c][np.isfinite(u[c])][-1] for c in jc.UPDATE_COLUMNS if np.isfinite(u[c]).any()}
            row = {"run": name, "seed": seed, "steps": int(u["step"][-1]), "return": f"{last['mean_return']:.1f}",
                   "jepa_loss": f"{last['jepa_loss']:.3g}", "var": f"{last['embedding_var']:.2g}",
                   "lowest_var": f"{np.nanmin(u['embedding_var']):.2g}", "rank": f"{last['effective_rank']:.2f}",
                   "collapsed_share": f"{share:.2f}", "collapsed": collapsed if np.isfinite(share) else "",
                   "probe_r2_theta": f"{last['probe_r2_theta']:.2f}"}
            if (run / "inspect.json").exists():                   # the final encoder, where its agent goes
                report = json.loads((run / "inspect.json").read_text())
                row.update({f"onpolicy_r2_{v}": f"{report[f'onpolicy_r2_{v}']:.2f}" for v in jc.STATE_NAMES},
                           probe_r2_theta_dot=f"{report['probe_r2_theta_dot']:.2f}",
                           s_x_norm=f"{report['s_x_norm']:.3g}")
            rows.append({**row, "wall_s": f"{summary['wall_s']:.0f}", "machine": machine_label(summary.get("machine"))})
    return rows


def span(values, digits):
    """'low to high' of some numbers, as the README's answers quote a range over seeds: `digits` significant digits,
    whole numbers from 10^digits to 10^4 and powers of ten beyond."""
    def number(v):
        return f"{v:.0f}" if 10 ** digits <= abs(v) < 1e4 else f"{v:.{digits}g}"
    low, high = number(min(values)), number(max(values))
    return low if low == high else f"{low} to {high}"


def write_lab_tables(args):
    """plots/lab_runs.csv, a row per run; plots/lab_summary.csv, a row per lab run over its seeds (collapsed seeds,
    ranges); plots/lab_pairs.csv, a row per comparison of LAB_PAIRS: on how many seeds A's measure beats B's."""
    rows = lab_rows(args)
    if not rows:
        return
    write_csv(args.plots_dir / "lab_runs.csv", rows)
    by_name = {name: [r for r in rows if r["run"] == name] for name in LAB}
    summary = []
    for name, runs in by_name.items():
        if not runs:
            continue
        values = {k: [float(r[k]) for r in runs if r.get(k, "") != ""] for k in
                  ("return", "var", "lowest_var", "rank", "jepa_loss", "probe_r2_theta", "onpolicy_r2_theta",
                   "onpolicy_r2_theta_dot", "onpolicy_r2_x_dot", "probe_r2_theta_dot", "s_x_norm", "wall_s")}
        judged = [r["collapsed"] for r in runs if r["collapsed"] != ""]
        summary.append({"run": name, "seeds": len(runs), "steps": runs[0]["steps"],
                        "collapsed": f"{sum(judged)} of {len(judged)}" if judged else "",
                        "var_below_1e-7": f"{sum(v < jc.COLLAPSE_THRESHOLD for v in values['lowest_var'])} of "
                                          f"{len(runs)}",
                        **{k: span(v, 3 if k in ("return", "wall_s") else 2) for k, v in values.items() if v}})
    write_csv(args.plots_dir / "lab_summary.csv", summary)
    pairs = []
    for lesson, a, b, measure in LAB_PAIRS:
        seeds = sorted({r["seed"] for r in by_name[a]} & {r["seed"] for r in by_name[b]})
        if seeds:
            value = {(r["run"], r["seed"]): float(r[measure]) for r in by_name[a] + by_name[b]}
            wins = sum(value[a, seed] > value[b, seed] for seed in seeds)
            pairs.append({"lesson": lesson, "a": a, "b": b, "measure": measure, "a_above_b": f"{wins} of {len(seeds)}",
                          "a_range": span([value[a, seed] for seed in seeds], 3 if measure == "return" else 2),
                          "b_range": span([value[b, seed] for seed in seeds], 3 if measure == "return" else 2)})
    write_csv(args.plots_dir / "lab_pairs.csv", pairs)


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
    """Figure 3 and the collapse figure with their tables, and the lab's tables, from whichever sweeps have finished
    runs."""
    plt, (batch_size, num_updates) = pyplot(), jc.rollout_sizes(args.num_envs, args.num_steps, args.total_steps)
    grid = np.arange(batch_size, num_updates * batch_size + 1, batch_size)     # one point per rollout
    args.plots_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():     # before a run's first probe or episode its curves are NaN: nothing to warn
        warnings.filterwarnings("ignore", "Mean of empty slice|Degrees of freedom|All-NaN slice", RuntimeWarning)
        for kind in ("figure3", "collapse"):
            plot_sweep(args, kind, grid, plt)
    write_lab_tables(args)
    print(f"figures and tables in {args.plots_dir}")


def plot_sweep(args, kind, grid, plt, sweep=None):
    """One sweep's figure and tables: Figure 3 (with the intervals, probes and observation) or the collapse figure;
    of the sweep's finished runs, or of `sweep` when given (pool)."""
    sweep = load_sweep(args, kind, grid) if sweep is None else sweep
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
            ax.axhline(jc.COLLAPSE_THRESHOLD if variance else COLLAPSED_RANK, color="black", ls=":", lw=1.5,
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
    of the two linear probes of the final encoder: uniform (the run's probe set) and on-policy (`inspect`)."""
    rows = []
    for group, runs in sweep.items():
        for name in jc.STATE_NAMES:
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
    columns = ["return", "embedding_var", "effective_rank"] + [f"probe_r2_{n}" for n in jc.STATE_NAMES]
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
    for ax, name, title in zip(axes, jc.STATE_NAMES, ["cart position x", "cart velocity x_dot", "pole angle theta",
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



def plot_observation(args, plt):
    """plots/observation.png: one transition as the networks see it, with the patch grid, beside the scene."""
    H, W, p = args.image_height, args.image_width, args.patch_size
    envs, render, window, physics = start_envs(1, 3, H, W)
    for _ in range(8):                     # push right a few times, so the frames show motion
        x_window = window
        window, physics, *_ = jc.step_pixels(envs, np.ones(1, dtype=np.int64), window, np.zeros(1, bool), render)
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
    top = jc.SCREEN_HEIGHT - (jc.CROP_BOTTOM + H * jc.SCREEN_WIDTH / W)
    ax.add_patch(plt.Rectangle((0, top), jc.SCREEN_WIDTH - 1, H * jc.SCREEN_WIDTH / W, fill=False, ec="tab:orange",
                               lw=2))
    ax.set_title("gymnasium's 600 x 400 scene at f(t+1)\norange box: the band our frames show", fontsize=11)
    ax.set(xticks=[], yticks=[])
    tokens = (H // p) * (W // p)
    fig.text(0.36, 0.5, f"{H} x {W} pixels per frame, {p} x {p} patches (orange grid): {tokens} tokens per frame, "
             f"1 + 3 x {tokens} = {1 + 3 * tokens} with CLS", ha="center", va="center", fontsize=11)
    fig.suptitle("What the encoders see: one transition (the cart pushed right)", fontsize=14)
    fig.savefig(args.plots_dir / "observation.png", dpi=110)
    plt.close(fig)


def find_runs(folders):
    """Every finished pixel run folder under `folders`, at any depth and in any layout: a folder with summary.json,
    whose config.json has the three switches (an unreadable one is kept, for check_run to name)."""
    def pixel_run(run):
        with contextlib.suppress(OSError, ValueError, TypeError):
            return "jepa" in json.loads((run / "config.json").read_text())
        return True
    return [run for run in sorted({p.parent for folder in folders for p in folder.rglob("summary.json")})
            if pixel_run(run)]


def pool(args):
    """The class's Figure 3: every run found under args.folders, grouped by configuration. Refuses runs made with
    other settings (naming the flag) or a (configuration, seed) twice; lists the seeds that lack a configuration."""
    number = {tuple(v[:3]): c for c, v in FIGURE3_CONFIGS.items()}
    groups, first, shared = {}, None, [k for k in METHOD_FLAGS if k not in PER_RUN_FLAGS]
    for run in find_runs(args.folders):
        if (problem := check_run(run)) is not None:
            print(f"warning: {problem}: this run is left out", flush=True)
            continue
        config = read_config(run)
        if first is None:
            first = (run, config)
        elif (different := [k for k in shared if config[k] != first[1][k]]):
            fail(f"{run} was made with other settings than {first[0]}: " + ", ".join(
                f"--{k.replace('_', '-')} {config[k]} vs {first[1][k]}" for k in different) + "; pool one setting")
        if (switches := (config["jepa"], config["rl_grad"], config["reg"])) not in number:
            fail(f"{run} is none of Figure 3's configurations (--{'' if switches[0] else 'no-'}jepa "
                 f"--{'' if switches[1] else 'no-'}rl-grad --{'' if switches[2] else 'no-'}reg); leave it out")
        config_number = number[switches]
        seeds = groups.setdefault(config_number, {})
        if config["seed"] in seeds:
            fail(f"configuration {config_number}, seed {config['seed']} twice: {seeds[config['seed']]} and {run}; "
                 "keep one (two students with one seed made the same run)")
        seeds[config["seed"]] = run
    if first is None:
        fail(f"no finished run folder under {', '.join(map(str, args.folders))}")
    all_seeds = sorted({seed for seeds in groups.values() for seed in seeds})
    for seed in all_seeds:
        if (lacking := [str(c) for c in FIGURE3_CONFIGS if seed not in groups.get(c, {})]):
            print(f"seed {seed} lacks configuration {', '.join(lacking)}")
    settings = argparse.Namespace(**{k: first[1][k] for k in METHOD_FLAGS}, window=args.window, plots_dir=args.out)
    batch_size, num_updates = jc.rollout_sizes(settings.num_envs, settings.num_steps,
                                               settings.stop_after or settings.total_steps)
    grid = np.arange(batch_size, num_updates * batch_size + 1, batch_size)
    sweep = {c: load_runs([groups[c][seed] for seed in sorted(groups[c])], grid, args.window)
             for c in FIGURE3_CONFIGS if c in groups}
    args.out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Mean of empty slice|Degrees of freedom|All-NaN slice", RuntimeWarning)
        plot_sweep(settings, "figure3", grid, pyplot(), sweep)
    print(f"pooled {sum(map(len, groups.values()))} runs of seeds {', '.join(map(str, all_seeds))}: figures and "
          f"tables in {args.out}")


# ---- 7. A trained agent: load, inspect, evaluate, animate ---------------------------------------------------------
def load_run(run_dir, device="cpu"):
    """Rebuild a finished run's networks from its config.json and model.pt."""
    run_args = argparse.Namespace(**read_config(run_dir))
    nets = jc.make_networks(run_args, num_actions=2)
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
        window, physics, reward, _, episode_end, is_valid, _ = jc.step_pixels(envs, action, window, episode_end, render)
        returns += reward * ~finished            # count each env's first episode only
        finished |= episode_end
        for key, value in zip(played, (window, physics, action, is_valid)):
            played[key].append(value)
    envs.close()
    return {"returns": returns, **{key: np.stack(values) for key, values in played.items()}}


def inspect_run(run_dir):
    """What a trained encoder knows and what its JEPA loss is made of, written to RUN_DIR/inspect.json.

    The agent acts as in training in --num-envs envs for jc.ONPOLICY_ROLLOUTS rollouts, from seed 10,000 + its seed. On
    those windows: both probes, the spread of s_x, and Eq. 1 on the real transitions in parts (jepa_loss_mean_part:
    ||mean(pred) - mean(s_y)||^2, the mean prediction missing the mean target; the rest: missing how targets vary),
    and the share the action alone decides: whatever s_y is, ||pred(s_x, a) - s_y||^2 averaged over both actions is
    at least ||pred(s_x, 0) - pred(s_x, 1)||^2 / 4 (action_floor). A collapsed encoder cannot tell the actions apart.
    Also draws RUN_DIR/embedding.png (plot_embedding)."""
    run_args, nets = load_run(run_dir)
    H, W = run_args.image_height, run_args.image_width
    seed, steps = 10_000 + run_args.seed, jc.ONPOLICY_ROLLOUTS * run_args.num_steps
    torch.manual_seed(seed)
    played = play(run_args, nets, run_args.num_envs, seed, steps)
    windows, visited = torch.from_numpy(played["windows"]), torch.from_numpy(played["physics"])   # (K*T+1, N, ...)
    report = {"seed": seed, "windows": int(steps * run_args.num_envs),
              **jc.onpolicy_probe_r2(nets["x_encoder"], [(windows[:-1], visited[:-1])], "cpu"),
              **jc.probe_r2(nets["x_encoder"], jc.make_probe_set(run_args.seed, H, W), "cpu")}
    real = torch.from_numpy(played["valid"]).flatten()                                    # (K*T*N,)
    with torch.inference_mode():
        s_x = jc.encode(nets["x_encoder"], windows[:-1].flatten(0, 1)[real], "cpu").float()
        s_y = jc.encode(nets["y_encoder"], windows[1:].flatten(0, 1)[real], "cpu").float()
        a = torch.from_numpy(played["actions"]).flatten()[real]
        pred = nets["predictor"](s_x, a)
        pred_0, pred_1 = (nets["predictor"](s_x, torch.full_like(a, k)) for k in (0, 1))
        report.update(embedding_var=jc.embedding_variance(s_x).item(), effective_rank=jc.effective_rank(s_x).item(),
                      s_x_norm=s_x.norm(dim=1).mean().item(), s_y_norm=s_y.norm(dim=1).mean().item(),
                      jepa_loss=jc.jepa_loss(pred, s_y).item(),
                      jepa_loss_mean_part=(pred.mean(0) - s_y.mean(0)).pow(2).sum().item(),
                      jepa_loss_action_floor=((pred_0 - pred_1).pow(2).sum(1) / 4).mean().item())
    (run_dir / "inspect.json").write_text(json.dumps(report, indent=2))
    theta = visited[:-1].flatten(0, 1)[real][:, 2]                                       # the pole's angle at f(t)
    plot_embedding(run_dir, s_x, theta, report)
    print("\n".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in report.items()))
    print(f"written to {run_dir / 'inspect.json'}")
    return report


EMBEDDING_AXIS = 12.0   # the PCA picture's half-width, in the embedding's own units, for every run (see below)


def plot_embedding(run_dir, s_x, theta, report):
    """RUN_DIR/embedding.png: the s_x of the windows `inspect` played, on their two main directions (PCA of the
    centred s_x), each point coloured by the pole's angle. The axes are in s_x's own units and the same for every
    run (+-EMBEDDING_AXIS: wider than any spread we saw after the final LayerNorm), so a collapsed encoder shows as
    the dot it is; axes fitted to each run would blow a collapsed cloud up to look as spread as a healthy one."""
    plt = pyplot()
    centred = (s_x - s_x.mean(0)).double()
    directions = torch.linalg.svd(centred, full_matrices=False)[2][:2]                  # (2, D)
    xy = (centred @ directions.T).numpy()                                               # (n, 2)
    fig, ax = plt.subplots(figsize=(5.4, 4.6))
    dots = ax.scatter(xy[:, 0], xy[:, 1], c=theta.numpy(), cmap="coolwarm", vmin=-0.21, vmax=0.21, s=4)
    fig.colorbar(dots, ax=ax, label="pole angle θ (rad); ±0.21 ends the episode")
    ax.set(xlim=(-EMBEDDING_AXIS, EMBEDDING_AXIS), ylim=(-EMBEDDING_AXIS, EMBEDDING_AXIS), aspect="equal",
           xlabel="first principal direction of s_x", ylabel="second principal direction")
    outside = int((np.abs(xy) > EMBEDDING_AXIS).any(1).sum())                         # off the fixed axes
    ax.set_title(f"{run_dir.name}: {len(xy)} visited windows" + (f", {outside} off the axes" if outside else "")
                 + f"\nvariance {report['embedding_var']:.1e}, effective rank {report['effective_rank']:.1f}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "embedding.png", dpi=80)
    plt.close(fig)


def make_gif(run_dir, seed=1):
    """One greedy episode: gymnasium's full scene beside the three frames the encoder receives."""
    plt = pyplot()
    from matplotlib.animation import FuncAnimation, PillowWriter
    played = play(*load_run(run_dir), 1, seed=10_000 + seed)
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
        title.set_text(f"{run_dir.name}: step {i + 1} of {len(scenes)} (episode return {episode_return:.0f})")
        return [scene_image, *frame_images, title]
    FuncAnimation(fig, draw, frames=frames).save(run_dir / "agent.gif", writer=PillowWriter(fps=25), dpi=72)
    plt.close(fig)
    print(f"wrote {run_dir / 'agent.gif'}: {len(scenes)} steps, return {episode_return:.0f}")




# ---- 8. The command line: one subcommand per job ------------------------------------------------------------------
SWEEPS = ("figure3", "collapse", "lab", "class")
PLOTTED = ("figure3", "collapse", "lab")                  # the sweeps whose runs `plot` draws (the class: `pool`)
COMMANDS = {
    "figure3": "the paper's 4 configurations x --seeds seeds (1, 2, ...) x --total-steps, plus the state-based "
               "reference; each pixel run followed by `inspect`, then `plot`. Resumable: finished runs are kept",
    "collapse": f"the collapse demonstration: {', '.join(COLLAPSE_ARMS)} x --seeds seeds in the collapse setting "
                f"{COLLAPSE_SETTING}; each run followed by `inspect`, then `plot`. Resumable",
    "lab": f"the lab's runs (README: A 90-minute lab) x --seeds seeds from {LAB_SEED}, at Part 1's defaults; each "
           "run followed by `inspect`, then `plot`. Resumable",
    "class": "a student's share of the class's Figure 3: the 4 configurations on --seed, two at a time, into "
             "<sweep-dir>/class (default runs/class). Resumable",
    "pool": "pool run folders (the class's, copied in any layout) into Figure 3 with its IQM, 95% intervals and "
            "P(2 > 1), in --out; refuses runs of other settings, lists the seeds that lack a configuration",
    "plot": "redraw the figures and tables in --plots-dir from the finished runs of the sweeps",
    "state-reference": "train the state-based PPO reference (not in the paper) on the true 4-number state",
    "inspect": "what RUN's encoder knows where its agent goes (the on-policy probe) and what its JEPA loss is made "
               "of; writes RUN/inspect.json",
    "eval": "play RUN's agent greedily for --episodes episodes; report the mean return +- std",
    "gif": "write RUN/agent.gif: one greedy episode, the full scene beside the three frames the encoder receives",
    "renderer": "our numpy renderer against gymnasium's own (pygame, cropped and downsampled): the largest pixel "
                "difference on random states, and the time per frame of each",
}


def build_harness_parser(command):
    """The parser of one subcommand. Sweeps and `plot` take the method's flags too (Part 1 of jepa_cartpole.py)."""
    if command in (*SWEEPS, "plot"):
        p = jc.build_parser()
        p.add_argument("--window", type=int, default=20, help="episodes in the running average of the return")
        p.add_argument("--sweep-dir", type=Path, default=Path("runs" if command == "class" else "plots/runs"),
                       help="a sweep keeps its runs in <sweep-dir>/<sweep>; plots/runs holds our committed runs")
        p.add_argument("--plots-dir", type=Path, default=Path("plots"), help="where figures and tables go")
        if command not in ("plot", "class"):
            p.add_argument("--seeds", type=int, default=5, help="seeds per configuration (paper: 5)")
        if command != "plot":
            p.add_argument("--workers", type=int, default=2, help="runs side by side, one thread each")
            p.add_argument("--print-commands", action="store_true", help="print the runs still to do, one shell "
                           "command each, for a scheduler (GNU parallel, a SLURM array); then `plot` collects them")
    elif command == "state-reference":
        p = argparse.ArgumentParser()
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--total-steps", type=int, default=100_000)
        p.add_argument("--window", type=int, default=20, help="episodes in the running average of the return")
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
        p.add_argument("--out", type=Path, default=None, help="run folder [runs/state-seed<k>]")
    elif command == "pool":
        p = argparse.ArgumentParser()
        p.add_argument("folders", type=Path, nargs="+", metavar="FOLDER", help="folders that hold run folders, at "
                       "any depth (each run folder: config.json, summary.json, episodes.csv, updates.csv)")
        p.add_argument("--out", type=Path, default=Path("runs/pool"), help="where the figures and tables go")
        p.add_argument("--window", type=int, default=20, help="episodes in the running average of the return")
    elif command == "renderer":
        p = argparse.ArgumentParser()
        for flag, default in (("--image-height", 16), ("--image-width", 64), ("--num-envs", 16)):
            p.add_argument(flag, type=int, default=default)
    else:
        p = argparse.ArgumentParser()
        p.add_argument("run", type=Path, metavar="RUN", help="a finished run folder (config.json and model.pt)")
        if command == "eval":
            p.add_argument("--episodes", type=int, default=20, help="episodes to play")
        if command in ("eval", "gif"):
            p.add_argument("--seed", type=int, default=1, help="the episodes start from seed 10,000 + this")
    p.prog, p.description, p.epilog = f"experiments.py {command}", COMMANDS[command], None
    return p


def parse_harness_args(argv):
    """The subcommand and its checked flags: a bad value is an argparse error naming the flag (exit code 2), before
    anything is written."""
    if not argv or argv[0] not in COMMANDS:
        listed = "\n".join(f"  {name:16} {text}" for name, text in COMMANDS.items())
        print(f"usage: python plots/experiments.py COMMAND [flags]  (COMMAND -h for its flags)\n{listed}",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, parser = argv[0], build_harness_parser(argv[0])
    args = parser.parse_args(argv[1:])
    args.command = command
    if command in (*SWEEPS, "plot"):
        ranges = {**{k: v for k, v in jc.FLAG_RANGES.items() if k != "threads"},
                  **({"workers": (1, None)} if command != "plot" else {}),
                  **({"seeds": (1, None)} if command not in ("plot", "class") else {})}
        jc.check_args(parser, args, ranges)
        for name in ("sweep_dir", "plots_dir"):
            if (path := getattr(args, name)).exists() and not path.is_dir():
                parser.error(f"--{name.replace('_', '-')} {path}: is a file, not a folder")
    if command == "plot" and not any(finished_runs(args.sweep_dir / sweep) for sweep in PLOTTED):
        parser.error(f"no finished run in {args.sweep_dir}/figure3, collapse or lab; run a sweep first "
                     f"({args.plots_dir} is left as it is)")
    given = [a.option_strings[0 if getattr(args, a.dest) or len(a.option_strings) == 1 else 1]
             for a in jc.build_parser()._actions if a.dest not in ("help", "seed", "device")
             and getattr(args, a.dest, a.default) != a.default]
    if command == "lab" and given:
        parser.error(f"{' '.join(given)}: `lab` runs the README's commands as written, at the defaults")
    if command == "lab" and any(a == "--seed" or a.startswith("--seed=") for a in argv[1:]):
        parser.error(f"--seed: `lab` runs seeds {LAB_SEED} upward; choose how many with --seeds")
    if command == "class" and not any(a == "--seed" or a.startswith("--seed=") for a in argv[1:]):
        parser.error("--seed: `class` needs your own seed (600 + your number in the class)")
    if command == "pool":
        if (missing := [str(f) for f in args.folders if not f.is_dir()]):
            parser.error(f"{', '.join(missing)}: not a folder")
        if args.out.exists() and not args.out.is_dir():
            parser.error(f"--out {args.out}: is a file, not a folder")
        if args.window < 1:
            parser.error(f"--window {args.window}: must be at least 1")
    # What `collapse` sets itself: the setting of all its arms, and what one arm changes (the x100 weight). A user's
    # value would be silently overridden in one arm and not in the others, so it is refused instead.
    set_by_collapse = [*COLLAPSE_SETTING, *(k for *_, changes in COLLAPSE_ARMS.values() for k in changes)]
    flags = [f"--{k.replace('_', '-')}" for k in set_by_collapse]
    mine = [f for k, f in zip(set_by_collapse, flags) if getattr(args, k, DEFAULTS[k]) != DEFAULTS[k]]
    if command == "collapse" and mine:
        parser.error(f"{' '.join(mine)}: `collapse` sets {', '.join(flags)} itself (plots/README.md: collapse)")
    if command == "state-reference":
        for name in ("seed", "total_steps", "window", "threads"):
            if getattr(args, name) < (0 if name in ("seed", "threads") else 1):
                parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least "
                             f"{0 if name in ('seed', 'threads') else 1}")
        rollout = STATE_REFERENCE["num_envs"] * STATE_REFERENCE["num_steps"]
        if args.total_steps < rollout:
            parser.error(f"--total-steps {args.total_steps} is smaller than one rollout of the state reference "
                         f"(8 envs x 32 steps = {rollout})")
        args.out = args.out or Path("runs") / f"state-seed{args.seed}"
        if args.out.exists() and not args.out.is_dir():
            parser.error(f"--out {args.out}: is a file, not a folder")
    if command in ("inspect", "eval", "gif"):
        if not ((args.run / "config.json").is_file() and (args.run / "model.pt").is_file()):
            parser.error(f"{args.run}: not a finished run folder (it needs config.json and model.pt)")
        if args.run.name.startswith("state-"):
            parser.error(f"{args.run}: the state reference has no pixel agent to load")
        if (problem := check_run(args.run, need_model=True)):
            parser.error(f"{args.run}: {problem}")
    if command == "eval" and args.episodes < 1:
        parser.error(f"--episodes {args.episodes}: must be at least 1")
    if command == "renderer" and min(args.image_height, args.image_width, args.num_envs) < 1:
        parser.error("--image-height, --image-width and --num-envs must be at least 1")
    return args


def check_renderer(height, width, num_envs):
    """The largest difference, in gray levels, between our frames and gymnasium's own of the same random states, and
    the time per frame of each."""
    states = np.random.default_rng(0).uniform([-2.4, -1, -0.2, -1], [2.4, 1, 0.2, 1], size=(64, 4)).astype(np.float32)
    difference = np.abs(jc.render_frames(states, height, width).astype(int)
                        - GymnasiumRenderer(height, width)(states).astype(int)).max()
    print(f"{len(states)} random states, {height}x{width} frames: largest difference {difference} of 255 gray levels")
    return difference, benchmark_renderer(height, width, num_envs)


def main(argv=None):
    args = parse_harness_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    try:
        if args.command in SWEEPS:
            run_sweep(args, args.command)
        elif args.command == "plot":
            plot(args)
        elif args.command == "pool":
            pool(args)
        elif args.command == "state-reference":
            train_state_reference(args.seed, args.total_steps, args.out, args.window)
        elif args.command == "inspect":
            inspect_run(args.run)
        elif args.command == "eval":
            returns = play(*load_run(args.run), args.episodes, seed=10_000 + args.seed)["returns"]
            print(f"{args.run}: greedy return over {len(returns)} episodes: {returns.mean():.1f} +- "
                  f"{returns.std():.1f} (min {returns.min():.0f}, max {returns.max():.0f})")
        elif args.command == "gif":
            make_gif(args.run, args.seed)
        elif args.command == "renderer":
            check_renderer(args.image_height, args.image_width, args.num_envs)
    except KeyboardInterrupt:
        if args.command in SWEEPS:
            sys.exit(f"\ninterrupted: finished runs are kept in {args.sweep_dir / args.command}; unfinished ones are "
                     "redone when started again")
        sys.exit("\ninterrupted")
    except OSError as error:          # a failed write (disk full, permissions): one line, the rows so far stay
        fail(f"writing failed ({error}); the rows written so far are kept")


if __name__ == "__main__":
    main()
