"""Train a 124M-parameter GPT on FineWeb with the Aurora optimizer (modded-nanoGPT optimization track).

The default configuration is the published Aurora record (validation loss <= 3.28 in 3175 steps,
20 trials on 8xH100): the same model, initialization calls, data order, optimizer rule and
schedule. Read top to bottom, in the record's order: hyperparameters, data, model, optimizers,
setup, the training loop with its validation, main. What runs around it (record folder, log
header, seeds, checkpoints) is harness.py's, called at a few named points of the loop.

    torchrun --standalone --nproc_per_node=8 train_gpt.py          # the record (or ./run.sh)
    python train_gpt.py --preset tiny                              # CPU smoke run on synthetic data
    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset aurora_2860   # a later record
    python train_gpt.py --preset aurora_2860+tiny                  # its CPU smoke run
    python train_gpt.py --help                                     # every hyperparameter as a flag

Each run writes one log, records/<date>_<run-name>/<uuid>.txt: this file with the local modules
it imports inlined (a script that runs on its own), then the environment, every hyperparameter,
and the run's output.
"""
import contextlib
import dataclasses
import glob
import math
import os
import re
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from aurora import Aurora, NonFiniteUpdate, ns_dtype_for, uses_lineage_rule
from data.shards import DataError, read_shard_tokens, shard_set_problems, shards_needed
from diagnostics import NeuronHealth
from harness import Clock, Harness, Interrupted, Logger, TrainLosses, parse_flags, runnable_source

ROOT = os.path.dirname(os.path.abspath(__file__))

# =================================================================================================
# Hyperparameters: the record's, in one place. Every field is also a command-line flag
# (--train-steps 100 sets train_steps); presets are dicts of overrides. Every value used is
# printed into the log.
# =================================================================================================


def hparam(default, help):
    return dataclasses.field(default=default, metadata=dict(help=help))


@dataclasses.dataclass
class Hyperparameters:
    # data
    data_dir: str = hparam(os.path.join(ROOT, "data", "fineweb10B"), "folder of fineweb_{train,val}_*.bin shards")
    batch_tokens: int = hparam(8 * 64 * 1024, "global batch per step (524,288 tokens)")
    seq_len: int = hparam(1024, "sequence length")
    micro_batch_seqs: int = hparam(64, "sequences per forward/backward (shrunk if a rank has fewer)")
    val_tokens: int = hparam(20 * 8 * 64 * 1024, "validation tokens, a multiple of batch_tokens (10,485,760)")
    # model
    vocab_size: int = hparam(50304, "embedding rows (GPT-2's 50257 rounded up)")
    n_layer: int = hparam(12, "transformer blocks")
    d_model: int = hparam(768, "width")
    head_dim: int = hparam(128, "attention head dimension")
    mlp_ratio: int = hparam(4, "MLP hidden width / d_model")
    attn_scale: float = hparam(0.12, "attention logit scale")
    logit_softcap: float = hparam(15.0, "logits -> c * l / sqrt(l^2 + c^2)")
    rope_base: float = hparam(1024.0, "rotary: lowest frequency is 1/rope_base")
    init_var: float = hparam(0.33, "weights ~ N(0, init_var / fan_in), except *proj* = 0")
    norm_in_fp32: bool = hparam(False, "RMSNorm in float32 with its gain, then cast back (lineage); "
                                       "off: in the activation dtype (record)")
    cudnn_attention: bool = hparam(True, "let attention use cuDNN's SDPA kernel (the lineage turns it off)")
    # initialization (the lineage's: spec/aurora-lineage.md)
    init: str = hparam("record", "record: N(0, init_var/fan_in) drawn on the device; torch: PyTorch's "
                                 "default init of a model built on the CPU after seeding (lineage); "
                                 "both zero every *proj* parameter")
    zero_biases: bool = hparam(True, "with --init torch: zero every bias (off: keep the uniform init, #30/#40)")
    fc_depth_scale: float = hparam(0.0, "scale block l's mlp.fc init by 1 - a*l/(n_layer-1) (lineage 0.3)")
    gain_split: float = hparam(0.0, "Rademacher gain init: norm1 = 1 - a*s, norm2 = 1 + a*s per block "
                                    "channel, s = +-1 drawn on the device (#30/#40 0.14)")
    # schedule
    train_steps: int = hparam(3200, "optimizer steps; the lr schedule and validation cadence scale with it "
                                       "(and a lineage preset's step counts: SCALED_STEPS)")
    cooldown_frac: float = hparam(0.7, "lr x1 for the first 1 - cooldown_frac of steps, then linear to 0")
    val_every: int = hparam(125, "validation cadence")
    val_every_late: int = hparam(25, "validation cadence once step/train_steps >= late_frac")
    late_frac: float = hparam(0.9, "where the late cadence starts")
    val_first: bool = hparam(True, "validate at step 0 (the lineage does not)")
    val_extra: tuple = hparam((), "more validation steps (the lineage's late checkpoints)")
    lr_schedule: str = hparam("linear", "linear: x1, then linear cooldown (record); power: PowerCool, every "
                                        "group's lr = min(lr, c * (schedule_steps - step) ** lr_power)")
    schedule_steps: int = hparam(None, "PowerCool's horizon (default train_steps; the lineage trains fewer)")
    lr_power: float = hparam(1.2, "PowerCool's exponent")
    power_c: tuple = hparam((4.976805410800738e-05, 5.184172302917436e-07, 1.6589351369335795e-06,
                             3.3169534699576625e-06), "PowerCool's c of the embedding, head, scalars, matrices")
    # Adam (AdamW with weight_decay 0) for the embedding, the head and every <2-D parameter
    adam_betas: tuple = hparam((0.8, 0.95), "Adam betas")
    adam_eps: float = hparam(1e-10, "Adam eps")
    lr_embed: float = hparam(0.3, "Adam lr of the embedding")
    lr_head: float = hparam(1 / 320, "Adam lr of the LM head weight")
    lr_scalar: float = hparam(0.01, "Adam lr of biases and norm gains")
    # Aurora for the 72 block matrices
    rule: str = hparam("aurora", "orthogonalization: aurora (record), muon (plain polar), normuon (ablations)")
    lr_matrix: float = hparam(0.0375, "Aurora lr")
    momentum: float = hparam(0.95, "Aurora momentum")
    nesterov: bool = hparam(True, "Nesterov look-ahead")
    momentum_warmup: int = hparam(0, "momentum rises linearly from momentum_min over these first steps "
                                     "(lineage 300)")
    momentum_cooldown: int = hparam(0, "and falls back to momentum_min over these last steps (lineage 100)")
    momentum_min: float = hparam(0.85, "where the momentum warm-up starts and the cool-down ends")
    momentum_horizon: int = hparam(None, "step where the momentum cool-down ends (default train_steps)")
    pp_iterations: int = hparam(2, "aurora_polar's D iterations (1 = row-normalize, then polar)")
    pp_beta: float = hparam(0.5, "exponent of aurora_polar's D update, in (0, 1]")
    contra: float = hparam(0.4, "Contra-Muon strength (subtracts contra/2 of the spectral-normalized momentum)")
    uw_floor: float = hparam(0.35, "smallest update/weight Frobenius ratio")
    weight_decay: float = hparam(0.0, "decoupled weight decay of the matrices")
    aurora_on: str = hparam("nonsquare", "matrices that get aurora_polar: nonsquare (record), tall, or wide_only "
                                         "(the lineage: mlp.proj only)")
    ns_iteration: str = hparam("quintic12", "Newton-Schulz: quintic12 (record) or cans12 (float32 cubic)")
    ns_dtype: str = hparam("auto", "Newton-Schulz dtype: auto = bfloat16 on CUDA (record), float32 on CPU")
    aurora_batched: bool = hparam(False, "stack same-shape matrices (fast path; same rule up to rounding)")
    # the lineage's changes to the matrix rule (spec/aurora-lineage.md); runs per matrix, eagerly
    norm_estimate: str = hparam("record", "record, or schatten4: ||X X^T||_F^1/2 scales the Newton-Schulz "
                                          "input, the contra direction and both renormalizations (lineage)")
    contra_fade: int = hparam(0, "Contra-Muon fades linearly to 0 at this step (0: constant, record; lineage 2500)")
    soap: str = hparam("none", "SOAP-precondition the momentum of: none (record) or mlp_v (mlp.fc, mlp.proj, "
                               "attn.v: lineage)")
    soap_beta2: float = hparam(0.9, "SOAP's decay of its Gram matrices and second moment")
    soap_every: int = hparam(10, "SOAP refreshes its eigenbases (one QR step) every N steps")
    soap_v_blend: float = hparam(0.95, "attn.v: this part SOAP's direction, the rest the raw momentum")
    soap_v_floor: float = hparam(0.55, "attn.v: SOAP's denominators floored at this part of their RMS")
    radial_brake: float = hparam(1.0, "outward radial part of a matrix update x this (1: off, record; lineage 0.5)")
    radius_pin: bool = hparam(False, "rescale each matrix after its step to the norm its radial step alone "
                                     "gives (lineage)")
    lineage_rounding: str = hparam("none", "repeat the rounding of code a lineage script leaves switched off: "
                                           "2930 (#30/#40) or 2860 (#42); spec/aurora-lineage.md")
    # EMA-Nesterov around both optimizers (#40, #42)
    ema_nesterov: float = hparam(0.0, "look-ahead step along the EMA of past displacements, x the embedding's "
                                      "lr/lr0 (0: off, record; lineage 0.3)")
    ema_nesterov_beta: float = hparam(0.99, "EMA decay of the per-step displacement")
    ema_nesterov_start: int = hparam(300, "first step with a look-ahead")
    ema_nesterov_stop: int = hparam(1950, "the look-aheads end before this step")
    # reference interpolation at validation (#42)
    ref_gamma: float = hparam(0.0, "validate W + gamma (W - W_ref) from step ref_start on (0: off; #42 -0.075)")
    ref_capture: int = hparam(2375, "W_ref: the weights after this many steps")
    ref_start: int = hparam(2850, "first validation step that interpolates")
    # neuron-health diagnostics at validation steps (diagnostics.py)
    diagnostics: bool = hparam(True, "measure dead/starved/frozen MLP neurons at validation steps")
    diag_tokens: int = hparam(64 * 1024, "rank 0's first validation tokens used for `dead`")
    dead_threshold: float = hparam(0.001, "dead: positive pre-activation on < this fraction of tokens")
    starved_threshold: float = hparam(0.1, "starved: row leverage < this fraction of uniform")
    frozen_threshold: float = hparam(0.1, "frozen: moved < this fraction of the median row movement")
    # run
    preset: str = hparam("record", "record (default), tiny (CPU smoke run), small (124M, quarter batch), "
                                   "aurora_2930, aurora_2890, aurora_2860 (later records); several joined "
                                   "by + apply in order, e.g. aurora_2860+tiny: its CPU smoke run")
    seed: int = hparam(None, "seed of trial 0 (trial i: seed+i); default: drawn from the OS entropy "
                             "and logged (rerun a trial with --seed <its seed> --trials 1)")
    trials: int = hparam(1, "independent trials in this process, each re-initialized")
    compile: str = hparam("auto", "torch.compile the model and Aurora's per-matrix step: auto (on with CUDA), on, off")
    allow_cpu: bool = hparam(False, "let the record, small or aurora_* presets run without CUDA (slow: hours "
                                       "to days); a preset combined with +tiny needs no flag")
    run_name: str = hparam(None, "record folder records/<date>_<run_name>/ (default <rule>_<preset>)")
    records_dir: str = hparam(os.path.join(ROOT, "records"), "parent of the record folders")
    append: bool = hparam(False, "add this run to an existing record folder of the same configuration")
    val_loss_target: float = hparam(3.28, "target of the record summary")
    save_every: int = hparam(0, "write a checkpoint of the running trial every N steps and on SIGTERM, "
                                "beside the log (<uuid>.ckpt); 0 = off (the record)")
    resume: str = hparam(None, "continue the run of this checkpoint (same flags and code): appends "
                               "to its log, then finishes its trials")
    stop_below: float = hparam(None, "futility stop: end the campaign after a complete trial when its "
                                     "chance of passing with --trials N falls below this (0 < P < 1; "
                                     "default off; docs/campaign.md)")


CHOICES = dict(rule=("aurora", "muon", "normuon"), aurora_on=("nonsquare", "tall", "wide_only"),
               ns_iteration=("quintic12", "cans12"), ns_dtype=("auto", "bfloat16", "float32"),
               compile=("auto", "on", "off"), init=("record", "torch"), lr_schedule=("linear", "power"),
               norm_estimate=("record", "schatten4"), soap=("none", "mlp_v"),
               lineage_rounding=("none", "2930", "2860"))

PRESETS = {
    "record": {},
    # A 2.2M-parameter model on the synthetic shards (data/synthetic.py): a smoke run of about two
    # minutes on 2 CPU cores. Same code path, optimizer and schedule shape; only sizes change.
    "tiny": dict(data_dir=os.path.join(ROOT, "data", "synthetic"), batch_tokens=32 * 128,
                 seq_len=128, micro_batch_seqs=16, val_tokens=8 * 32 * 128, vocab_size=1024,
                 n_layer=4, d_model=192, head_dim=32, train_steps=200, val_every=25,
                 val_every_late=10, diag_tokens=8 * 32 * 128),
    # The record's model with a quarter of the batch: ablations at 124M scale on one GPU.
    "small": dict(batch_tokens=2 * 64 * 1024, val_tokens=4 * 2 * 64 * 1024, train_steps=400,
                  val_every=50, val_every_late=25),
}
# The Aurora lineage (spec/aurora-lineage.md): #30, 2930 steps. Aurora on mlp.proj only, inside
# SOAP-preconditioned momentum, Schatten-4 norms, a fading Contra-Muon, radial brake and radius
# pin, PowerCool, momentum warm-up and cool-down; the lineage's init and float32 norms.
PRESETS["aurora_2930"] = dict(
    train_steps=3020, schedule_steps=3050, val_first=False, val_every=125, val_every_late=125,
    val_extra=(2820, 2830, 2840, 2850, 2860, 2870, 2880, 2890, 2895, 2900, 2910, 2920, 2930, 2940, 2950,
               2960, 2965, 2970, 2975, 2980, 2985, 2990, 2995, 2999, 3000, 3010, 3020),
    norm_in_fp32=True, cudnn_attention=False, init="torch", zero_biases=False, fc_depth_scale=0.3,
    gain_split=0.14, adam_betas=(0.8, 0.99), lr_schedule="power", momentum_warmup=300,
    momentum_cooldown=100, aurora_on="wide_only", pp_iterations=3, pp_beta=0.25, norm_estimate="schatten4",
    contra_fade=2500, soap="mlp_v", radial_brake=0.5, radius_pin=True, uw_floor=0.3825,
    lineage_rounding="2930")
# #40, 2890 steps: #30 in EMA-Nesterov, on a 2900-step run of a 2980-step lr schedule.
PRESETS["aurora_2890"] = dict(PRESETS["aurora_2930"], train_steps=2900, schedule_steps=2980,
                              ema_nesterov=0.3, ema_nesterov_start=300, ema_nesterov_stop=1950)
# #42, 2860 steps: #40 stopped at 2860 (its schedules still end at 2900 and 2980), zero biases, no
# gain split, reference interpolation at the last validations.
PRESETS["aurora_2860"] = dict(PRESETS["aurora_2890"], train_steps=2860, momentum_horizon=2900,
                              val_extra=(2850,), zero_biases=True, gain_split=0.0, lineage_rounding="2860",
                              ref_gamma=-0.075, ref_capture=2375, ref_start=2850)
GPU_PRESETS = ("record", "small", "aurora_2930", "aurora_2890", "aurora_2860")
# Step counts a preset states for its own train_steps. A run of another length (--train-steps, or
# a later preset in a + list, like +tiny) scales them in proportion, and PowerCool's constants
# with them, as the record's fractional schedule scales; values given as flags are used as given.
SCALED_STEPS = ("schedule_steps", "momentum_warmup", "momentum_cooldown", "momentum_horizon", "contra_fade",
                "ema_nesterov_start", "ema_nesterov_stop", "ref_capture", "ref_start", "val_extra")


def preset_overrides(name, flags):
    """The overrides of --preset `name` under the command line's `flags`: one preset, or several
    joined by + (later ones win), with SCALED_STEPS scaled to the run's length. Scaled steps stay
    within the run (a preset's steps are at most its train_steps); the extra validation steps that
    round to the same step of a shorter run are one step (a step that validates anyway, like the
    last, validates once); a step count that rounds to 0 switches its technique off."""
    merged, stated = {}, None
    for part in name.split("+"):
        if part not in PRESETS:
            raise ValueError(f"--preset: invalid choice: {part!r} (choose from {', '.join(PRESETS)}, "
                             "or several joined by +)")
        merged.update(PRESETS[part])
        if any(k in PRESETS[part] for k in SCALED_STEPS):
            stated = PRESETS[part]["train_steps"]
    steps = flags.get("train_steps", merged.get("train_steps", Hyperparameters.train_steps))
    if stated and steps != stated:
        r = steps / stated
        for k in SCALED_STEPS:
            if k in merged:  # steps that round to one step of this run (val_extra) count once
                merged[k] = (tuple(sorted({round(v * r) for v in merged[k]})) if isinstance(merged[k], tuple)
                             else round(merged[k] * r))
        if "power_c" not in flags:  # c (H - s)^p keeps its shape when H - s scales by r
            power = flags.get("lr_power", merged.get("lr_power", Hyperparameters.lr_power))
            merged["power_c"] = tuple(c / r ** power for c in merged.get("power_c", Hyperparameters.power_c))
    return merged


# The valid values of every numeric hyperparameter, as intervals. A float must also be finite (nan
# and inf are outside every interval), every value of a tuple is checked, and None (a default that
# follows train_steps) passes. seed's range depends on trials (check_hyperparameters).
RANGES = dict(
    # sizes and counts
    batch_tokens="[1, inf)", seq_len="[1, inf)", micro_batch_seqs="[1, inf)", val_tokens="[1, inf)",
    vocab_size="[1, inf)", n_layer="[1, inf)", d_model="[1, inf)", head_dim="[1, inf)", mlp_ratio="[1, inf)",
    train_steps="[1, inf)", val_every="[1, inf)", val_every_late="[1, inf)", pp_iterations="[1, inf)",
    trials="[1, inf)", diag_tokens="[1, inf)", soap_every="[1, inf)", schedule_steps="[1, inf)",
    momentum_horizon="[1, inf)", ref_capture="[1, inf)",
    # step counts that may be 0 (off, or from the first step)
    momentum_warmup="[0, inf)", momentum_cooldown="[0, inf)", contra_fade="[0, inf)",
    ema_nesterov_start="[0, inf)", ema_nesterov_stop="[0, inf)", ref_start="[0, inf)", save_every="[0, inf)",
    val_extra="[0, inf)",
    # model and init: fc_depth_scale 1 would zero the last block's fc, gain_split 1 half the gains
    attn_scale="(0, inf)", logit_softcap="(0, inf)", rope_base="(0, inf)", init_var="(0, inf)",
    fc_depth_scale="[0, 1)", gain_split="[0, 1)",
    # schedules (their values over the steps: check_schedules)
    cooldown_frac="[0, 1]", late_frac="[0, 1]", lr_power="(0, inf)", power_c="(0, inf)",
    # optimizers
    adam_betas="[0, 1)", adam_eps="(0, inf)", lr_embed="(0, inf)", lr_head="(0, inf)", lr_scalar="(0, inf)",
    lr_matrix="(0, inf)", momentum="(0, 1)", momentum_min="(0, 1)", pp_beta="(0, 1]", contra="[0, inf)",
    uw_floor="[0, inf)", weight_decay="[0, inf)", soap_beta2="[0, 1)", soap_v_blend="(0, 1]",
    soap_v_floor="[0, inf)", radial_brake="[0, inf)", ema_nesterov="[0, inf)", ema_nesterov_beta="[0, 1)",
    ref_gamma="(-inf, inf)",
    # diagnostics and the summary
    dead_threshold="[0, 1]", starved_threshold="[0, inf)", frozen_threshold="[0, inf)",
    val_loss_target="(0, inf)", stop_below="(0, 1)")


def in_interval(value, interval):
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    return (lo < value if interval[0] == "(" else lo <= value) and (value < hi if interval[-1] == ")" else value <= hi)


def interval_words(interval):
    """'>= 1', '> 0', 'in [0, 1)' or 'finite'."""
    lo, hi = interval[1:-1].split(", ")
    if hi == "inf":
        return "finite" if lo == "-inf" else f"{'>' if interval[0] == '(' else '>='} {lo}"
    return f"in {interval}"


def check_ranges(hp, bad):
    """Every numeric hyperparameter in its RANGES interval."""
    for name, interval in RANGES.items():
        value = getattr(hp, name)
        values = value if isinstance(value, tuple) else () if value is None else (value,)
        if not all(in_interval(v, interval) for v in values):
            each = " (each value)" if isinstance(value, tuple) else ""
            finite = "" if all(math.isfinite(v) for v in values) or interval_words(interval) == "finite" \
                else ", a finite number"
            bad(name, f"must be {interval_words(interval)}{each}{finite}")


# Settings that act only with a technique on: changed on the command line while it is off, they
# are refused (they would change nothing, yet the log's header would show them). Set by a preset
# (or restated as the preset gives them), they are left as they are: the header shows the
# technique off.
NEEDS = [
    (("schedule_steps", "lr_power", "power_c"), lambda hp: hp.lr_schedule == "power", "--lr-schedule power"),
    (("cooldown_frac",), lambda hp: hp.lr_schedule == "linear", "--lr-schedule linear"),
    (("momentum_min",), lambda hp: hp.momentum_warmup or hp.momentum_cooldown,
     "--momentum-warmup or --momentum-cooldown > 0"),
    (("momentum_horizon",), lambda hp: hp.momentum_cooldown, "--momentum-cooldown > 0"),
    (("contra_fade",), lambda hp: hp.contra, "--contra > 0"),
    (("soap_beta2", "soap_every", "soap_v_blend", "soap_v_floor"), lambda hp: hp.soap != "none", "--soap mlp_v"),
    (("ema_nesterov_beta", "ema_nesterov_start", "ema_nesterov_stop"), lambda hp: hp.ema_nesterov,
     "--ema-nesterov > 0"),
    (("ref_capture", "ref_start"), lambda hp: hp.ref_gamma, "--ref-gamma other than 0"),
    (("zero_biases",), lambda hp: hp.init == "torch", "--init torch (the record's init zeroes every bias)"),
    (("diag_tokens", "dead_threshold", "starved_threshold", "frozen_threshold"), lambda hp: hp.diagnostics,
     "--diagnostics"),
]


def never_acting(hp):
    """[(field, the fields that decide it, why)] of the techniques switched on whose steps all lie
    outside this run (steps 0..train_steps-1 train, validations run up to train_steps)."""
    steps, out = hp.train_steps, []
    if hp.ref_gamma and hp.ref_start > steps:
        out.append(("ref_gamma", ("ref_gamma", "ref_start", "ref_capture"),
                    f"its first interpolated validation, ref_start {hp.ref_start}, is after the last step {steps}"))
    if hp.ema_nesterov and hp.ema_nesterov_start >= steps:
        out.append(("ema_nesterov", ("ema_nesterov", "ema_nesterov_start", "ema_nesterov_stop"),
                    f"its first look-ahead, at ema_nesterov_start {hp.ema_nesterov_start}, is after the last "
                    f"step that trains ({steps - 1})"))
    cooldown_start = (hp.momentum_horizon or steps) - hp.momentum_cooldown
    if hp.momentum_cooldown and cooldown_start >= steps - 1:
        out.append(("momentum_cooldown", ("momentum_cooldown", "momentum_horizon"),
                    f"it starts after step {cooldown_start} (momentum_horizon {hp.momentum_horizon or steps} - "
                    f"momentum_cooldown {hp.momentum_cooldown}), and the last step that trains is {steps - 1}"))
    late = [s for s in hp.val_extra if s > steps]
    if late:
        out.append(("val_extra", ("val_extra",), f"step(s) {', '.join(map(str, late))} are after the last "
                                                 f"step {steps}"))
    return out


# The scaled step counts whose 0 means off (the others are steps: 0 is the first).
STEP_COUNTS_OFF_AT_0 = ("momentum_warmup", "momentum_cooldown", "contra_fade")


def scaled_off(hp):
    """[(field, the preset's value)] of the preset's step counts that round to 0 in this shorter
    run, switching their technique off."""
    stated = {}
    for part in hp.preset.split("+"):
        stated.update(PRESETS.get(part, {}))
    scaled = preset_overrides(hp.preset, {"train_steps": hp.train_steps})
    return [(k, stated[k]) for k in STEP_COUNTS_OFF_AT_0
            if stated.get(k, 0) > 0 and scaled.get(k) == 0 == getattr(hp, k)]


def inert_notes(hp):
    """The log header's (and the dry run's) lines on what a preset switched on that does nothing in
    this run (a shorter run than the preset's): the header still lists the value, the line says
    why it does nothing."""
    return ([f"no effect in this run: {name} {getattr(hp, name)!r}: {why}" for name, _, why in never_acting(hp)]
            + [f"no effect in this run: {name}: the preset's {value} steps round to 0 in this run of "
               f"{hp.train_steps} steps (off)" for name, value in scaled_off(hp)])


def changed_by_flags(hp, given):
    """The fields of `given` (set on the command line) whose value differs from the one the preset
    (or the default) gives this run: a flag that restates it changes nothing (e.g. a record's
    reproduce command listing a scaled preset's values)."""
    flags = {k: getattr(hp, k) for k in ("train_steps", "lr_power") if k in given}  # what scaling reads
    base = {**{f.name: f.default for f in dataclasses.fields(Hyperparameters)},
            **preset_overrides(hp.preset, flags)}
    return {k for k in given if getattr(hp, k) != base.get(k)}


def check_inert(hp, given):
    """Refuse a setting changed on the command line (`given`: the fields set there) that cannot act
    in this run."""
    given = changed_by_flags(hp, given)
    for fields, acts, what in NEEDS:
        for name in fields:
            if name in given and not acts(hp):
                raise ValueError(f"--{name.replace('_', '-')} has no effect without {what}; drop it, "
                                 "or switch the technique on")
    for name, fields, why in never_acting(hp):
        if given & set(fields):
            flags = ", ".join(f"--{f.replace('_', '-')}" for f in fields if f in given)
            raise ValueError(f"--{name.replace('_', '-')} {getattr(hp, name)!r} never acts in this run of "
                             f"{hp.train_steps} steps: {why}. Change {flags}, or the run's length")


def schedule_marks(hp):
    """The steps that train (0..train_steps-1) where a piece of the lr or momentum schedule begins
    or ends, and their neighbours: between them each schedule is linear or monotone, so its
    smallest and largest values over the run are at these steps."""
    steps = hp.train_steps
    marks = (0, steps - 1, hp.momentum_warmup, (hp.momentum_horizon or steps) - hp.momentum_cooldown,
             hp.momentum_horizon or steps, math.floor((1 - hp.cooldown_frac) * steps), hp.schedule_steps or steps)
    return sorted({m + d for m in marks for d in (-1, 0, 1) if 0 <= m + d < steps})


def check_schedules(hp):
    """Every group's lr in [0, its initial lr] and Aurora's momentum between momentum_min and
    momentum, at every step that trains (evaluated at schedule_marks)."""
    lo, hi = sorted((hp.momentum_min, hp.momentum))
    horizon = hp.momentum_horizon or hp.train_steps
    groups = [(name, dict(initial_lr=lr, power_c=c)) for name, lr, c in zip(
        ("lr_embed", "lr_head", "lr_scalar", "lr_matrix"),
        (hp.lr_embed, hp.lr_head, hp.lr_scalar, hp.lr_matrix), hp.power_c)]
    for step in schedule_marks(hp):
        mu = momentum_at(step, hp)
        if not lo - 1e-12 <= mu <= hi + 1e-12:
            raise ValueError(
                f"the momentum schedule leaves [{lo}, {hi}] (--momentum-min, --momentum): {mu:.4g} at step "
                f"{step} of {hp.train_steps}, from --momentum-warmup {hp.momentum_warmup}, --momentum-cooldown "
                f"{hp.momentum_cooldown} and --momentum-horizon {horizon}; the cool-down must end at or after "
                f"the last step: --momentum-horizon >= {hp.train_steps - 1}")
        for name, group in groups:
            lr = lr_at(step, group, hp)
            if not 0 <= lr <= group["initial_lr"]:
                flags = ("--cooldown-frac" if hp.lr_schedule == "linear" else
                         "--power-c, --lr-power, --schedule-steps")
                raise ValueError(f"the lr schedule gives {name} = {lr!r} at step {step}, outside [0, "
                                 f"{group['initial_lr']}]: check {flags}")


def check_hyperparameters(hp, given=frozenset()):
    """Every choice, range and combination, in one place; raises ValueError naming the flag.
    `given`: the fields set on the command line (a setting there that cannot act is refused)."""
    def bad(name, why):
        raise ValueError(f"--{name.replace('_', '-')} {why}, got {getattr(hp, name)!r}")
    for name, allowed in CHOICES.items():
        if getattr(hp, name) not in allowed:
            bad(name, f"must be one of {', '.join(allowed)}")
    check_ranges(hp, bad)
    if hp.d_model % hp.head_dim or hp.head_dim % 4:
        raise ValueError(f"--d-model ({hp.d_model}) must be a multiple of --head-dim ({hp.head_dim}), "
                         "itself a multiple of 4 (rotary)")
    if hp.val_tokens % hp.batch_tokens:
        raise ValueError(f"--val-tokens ({hp.val_tokens:,}) must be a multiple of the batch "
                         f"({hp.batch_tokens:,} tokens)")
    if hp.diagnostics and hp.diag_tokens < hp.seq_len:
        bad("diag_tokens", f"must be >= --seq-len ({hp.seq_len}): the probe uses whole sequences")
    if hp.seed is not None and not 0 <= hp.seed <= 2**63 - hp.trials:
        bad("seed", "must be in [0, 2^63 - trials] (torch.manual_seed's range)")
    if hp.run_name is not None and (not hp.run_name or "/" in hp.run_name or hp.run_name.startswith(".")):
        bad("run_name", "must be a plain folder name")
    if hp.stop_below is not None and hp.trials < 2:
        bad("stop_below", "stops a campaign of --trials >= 2 (it acts after a trial, before the next)")
    check_lineage(hp, bad)
    check_schedules(hp)
    check_inert(hp, set(given))


def check_lineage(hp, bad):
    """The lineage's settings: what they need, and what they do not combine with (yet)."""
    if hp.lr_schedule == "power" and (hp.schedule_steps or hp.train_steps) < hp.train_steps:
        bad("schedule_steps", f"must be >= --train-steps ({hp.train_steps}): PowerCool's lr is 0 from there")
    if hp.ref_gamma and hp.ref_capture > hp.ref_start:
        bad("ref_capture", f"must be <= --ref-start ({hp.ref_start}): the reference comes first")
    if hp.ema_nesterov and hp.ema_nesterov_start >= hp.ema_nesterov_stop:
        bad("ema_nesterov_start", f"must be < --ema-nesterov-stop ({hp.ema_nesterov_stop}): the look-aheads "
                                  "run from start to before stop")
    if any(not isinstance(s, int) or s < 0 for s in hp.val_extra):
        bad("val_extra", "must be steps (integers >= 0)")
    if uses_lineage_rule({**dataclasses.asdict(hp), "soap": hp.soap != "none"}) and (
            hp.aurora_batched or hp.rule == "normuon" or hp.ns_iteration != "quintic12"):
        raise ValueError("the lineage's matrix rule (--norm-estimate, --contra-fade, --soap, --radial-brake, "
                         "--radius-pin, --lineage-rounding) runs per matrix with --rule aurora or muon and "
                         "--ns-iteration quintic12: drop --aurora-batched, normuon or cans12")


def check_hardware(hp, cuda):
    """The record, small and lineage presets are GPU runs (unless combined with tiny): refuse to
    start them on a CPU by accident."""
    parts = hp.preset.split("+")
    if "tiny" not in parts and any(p in GPU_PRESETS for p in parts) and not cuda and not hp.allow_cpu:
        raise ValueError(
            f"the {hp.preset} preset trains the 124M model and needs CUDA GPUs, and none is "
            "available: on a CPU it would take days (or run out of memory). Use --preset tiny for "
            "a CPU smoke run, or pass --allow-cpu to start it anyway")


def parse_args(argv=None):
    """(hyperparameters, dry_run) from the command line: one flag per Hyperparameters field."""
    return parse_flags(Hyperparameters, preset_overrides, CHOICES, check_hyperparameters, argv)


# =================================================================================================
# Data: FineWeb shards (data/shards.py has the format) and the per-rank loaders
# =================================================================================================


def find_shards(data_dir, split):
    """The split's shards, or DataError: none, or a set that is not the one written (a gap, a
    shard missing from or not in meta.json: data/shards.py's shard_set_problems)."""
    files = sorted(glob.glob(os.path.join(glob.escape(data_dir), f"fineweb_{split}_*.bin")))
    problems = shard_set_problems(data_dir) if files else []
    if not files:
        raise DataError(
            f"no {split} shards (fineweb_{split}_*.bin) in {data_dir}. Download FineWeb with "
            "`python data/cached_fineweb10B.py` or write synthetic shards with "
            f"`python data/synthetic.py --out {data_dir}`")
    if problems:
        meta = os.path.join(data_dir, "meta.json")
        synthetic = os.path.isfile(meta) and "entropy_nats_per_token" in open(meta).read()
        raise DataError(f"the shards in {data_dir} are not the set that was written: {'; '.join(problems)}. "
                        "Write it again: " + (f"`python data/synthetic.py --out {data_dir} --if-needed`"
                                              if synthetic else "`python data/cached_fineweb10B.py`"))
    return files


def load_shard(path, vocab_size):
    return torch.from_numpy(read_shard_tokens(path, vocab_size).astype(np.int32))


class TokenLoader:
    """Each step, rank r reads tokens [pos + r*L, pos + r*L + L + 1) of the current shard
    (L = batch / world): inputs (int32) are the first L, targets (int64) the last L. Then
    pos += batch; a shard whose remaining tokens cannot hold another batch (+1) is skipped."""

    def __init__(self, files, batch, ctx, vocab_size):
        self.files, self.batch, self.ctx, self.vocab_size = files, batch, ctx, vocab_size
        self.local = batch // ctx.world
        self.reset()

    def reset(self, shard=0, pos=0):
        """Start of the data, or (resuming) where a checkpoint left it."""
        self.shard, self.pos = shard, pos
        self.tokens = load_shard(self.files[shard], self.vocab_size)

    def next_batch(self):
        if self.pos + self.batch + 1 > len(self.tokens):
            self.shard, self.pos = self.shard + 1, 0
            if self.shard >= len(self.files):
                raise DataError(f"ran out of data after {len(self.files)} shard(s)")
            self.tokens = load_shard(self.files[self.shard], self.vocab_size)
        start = self.pos + self.ctx.rank * self.local
        buf = self.tokens[start:start + self.local + 1].to(self.ctx.device, non_blocking=True)
        self.pos += self.batch
        if self.pos + self.batch + 1 >= len(self.tokens):
            self.pos = len(self.tokens)  # skip the tail: the next call opens the next shard
        return buf[:-1], buf[1:].long()


def load_val_tokens(files, hp, ctx):
    """This rank's validation slice, read once: the first val_tokens (+1) tokens of the val shards
    are ONE batch, and rank r holds [r*V/W, (r+1)*V/W + 1). Returns (inputs int32, targets int64)."""
    need, parts = hp.val_tokens + 1, []
    for f in files:
        parts.append(load_shard(f, hp.vocab_size)[:need])
        need -= len(parts[-1])
        if need == 0:
            break
    tokens = torch.cat(parts)
    if need:
        raise DataError(f"validation shards in {hp.data_dir} hold {len(tokens) - 1:,} tokens, "
                        f"val_tokens needs {hp.val_tokens:,}: lower --val-tokens or add shards")
    local = hp.val_tokens // ctx.world
    buf = tokens[ctx.rank * local:(ctx.rank + 1) * local + 1].to(ctx.device)
    return buf[:-1], buf[1:].long()


def micro_batches(x, y, ctx, seq_len):
    """A rank's tokens as (inputs, targets) micro-batches of ctx.micro sequences."""
    return zip(x.view(-1, ctx.micro, seq_len), y.view(-1, ctx.micro, seq_len))


# =================================================================================================
# Model: GPT with RMSNorm, half-truncated rotary, QK-norm, relu^2 MLP, soft-capped logits.
# Modules are registered in the record's order, so named_parameters() visits the parameters as
# the record's initialization does.
# =================================================================================================


class Linear(nn.Linear):
    """nn.Linear (with bias) whose float32 weights are cast to the activation dtype."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim, in_fp32=False):
        super().__init__()
        self.gains = nn.Parameter(torch.ones(dim))
        self.in_fp32 = in_fp32

    def forward(self, x):
        if self.in_fp32:  # the lineage's: normalized and scaled in float32, rounded once
            return (F.rms_norm(x.float(), (x.size(-1),)) * self.gains).to(x.dtype)
        return F.rms_norm(x, (x.size(-1),), self.gains.to(x.dtype))


class Rotary(nn.Module):
    """Half-truncated rotary: head_dim/4 frequencies from 1 down to 1/base, then head_dim/4 zeros
    (those dimensions are not rotated and can carry position-free content)."""

    def __init__(self, head_dim, base):
        super().__init__()
        quarter = head_dim // 4
        freqs = (1 / base) ** torch.linspace(0, 1, quarter, dtype=torch.float32)
        self.register_buffer("freqs", torch.cat([freqs, freqs.new_zeros(quarter)]), persistent=False)

    def forward(self, x):  # x: (B, T, H, D)
        angle = torch.arange(x.size(1), device=x.device, dtype=torch.float32)[:, None] * self.freqs
        cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        y = torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)
        return y.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, hp):
        super().__init__()
        self.n_head, self.head_dim, self.scale = hp.d_model // hp.head_dim, hp.head_dim, hp.attn_scale
        self.q, self.k, self.v = (Linear(hp.d_model, hp.d_model) for _ in range(3))
        self.proj = Linear(hp.d_model, hp.d_model)
        self.rotary = Rotary(hp.head_dim, hp.rope_base)

    def forward(self, x):
        B, T, C = x.shape
        shape = (B, T, self.n_head, self.head_dim)
        q, k, v = self.q(x).view(shape), self.k(x).view(shape), self.v(x).view(shape)
        q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))  # QK-norm, no gain
        q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, hp):
        super().__init__()
        self.fc = Linear(hp.d_model, hp.mlp_ratio * hp.d_model)  # tall: one row per hidden neuron
        self.proj = Linear(hp.mlp_ratio * hp.d_model, hp.d_model)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, hp):
        super().__init__()
        self.attn, self.mlp = Attention(hp), MLP(hp)
        self.norm1, self.norm2 = RMSNorm(hp.d_model, hp.norm_in_fp32), RMSNorm(hp.d_model, hp.norm_in_fp32)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, hp, act_dtype):
        super().__init__()
        self.act_dtype, self.softcap = act_dtype, hp.logit_softcap
        self.embed = nn.Embedding(hp.vocab_size, hp.d_model).bfloat16()  # stored in bf16
        self.blocks = nn.ModuleList(Block(hp) for _ in range(hp.n_layer))
        # The LM head is named `proj` because the record zero-initializes every weight whose name
        # contains "proj", the head included.
        self.proj = Linear(hp.d_model, hp.vocab_size)
        self.norm1, self.norm2 = RMSNorm(hp.d_model, hp.norm_in_fp32), RMSNorm(hp.d_model, hp.norm_in_fp32)

    @torch.no_grad()
    def init_weights(self, init_var):
        """The record's re-initialization, in named_parameters() order. Each call draws from the
        default generator exactly as the record's does (the gains' normal_(1, 0) is 1 but still
        draws), so the same generator state gives the record's weights."""
        for name, p in self.named_parameters():
            if name.endswith("gains"):
                p.normal_(mean=1.0, std=0.0)
            elif name.endswith("bias") or "proj" in name:
                p.zero_()
            elif p is self.embed.weight:
                p.normal_()
            else:
                p.normal_(std=math.sqrt(init_var) / math.sqrt(p.size(1)))

    @torch.no_grad()
    def init_lineage(self, hp):
        """The lineage's initialization (spec/aurora-lineage.md): PyTorch's default init as a fresh
        model built on the CPU draws it (the lineage's scripts seed, then build the model on the
        CPU and move it to the GPU: the CPU generator decides), then every *proj* parameter
        zeroed, and with zero_biases every bias."""
        with torch.device("cpu"):
            fresh = GPT(hp, self.act_dtype)
        for (name, p), q in zip(self.named_parameters(), fresh.parameters()):
            p.copy_(q)
            if "proj" in name or (hp.zero_biases and name.endswith("bias")):
                p.zero_()

    @torch.no_grad()
    def scale_init(self, hp):
        """The lineage's changes on top of an init: mlp.fc shrinks with depth, from x1 in the first
        block to x(1 - fc_depth_scale) in the last; and the gain split, s = +-1 per channel drawn on
        the device block by block, norm1 = 1 - a s and norm2 = 1 + a s (the product stays ~1)."""
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            if hp.fc_depth_scale:
                block.mlp.fc.weight.mul_(1.0 - hp.fc_depth_scale * (i / (n - 1) if n > 1 else 0.0))
        for block in self.blocks:
            if hp.gain_split:
                gains = block.norm1.gains
                s = torch.randint(0, 2, gains.shape, device=gains.device, dtype=torch.float32) * 2 - 1
                block.norm1.gains.copy_(1.0 - hp.gain_split * s)
                block.norm2.gains.copy_(1.0 + hp.gain_split * s)

    def trunk(self, idx):
        """Hidden states after the last block (before the final norm and the head)."""
        x = self.norm1(self.embed(idx).to(self.act_dtype))
        for block in self.blocks:
            x = block(x)
        return x

    def logits(self, idx):
        logits = self.proj(self.norm2(self.trunk(idx))).float()
        return self.softcap * logits * torch.rsqrt(logits.square() + self.softcap ** 2)

    def forward(self, idx, targets):
        """Summed (not mean) cross-entropy of the soft-capped logits."""
        logits = self.logits(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")


# =================================================================================================
# Optimizers: Adam for embedding, head and every <2-D parameter; Aurora for the block matrices
# =================================================================================================


def build_optimizers(model, hp, device):
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    scalars = [p for p in model.parameters() if p.ndim < 2]
    adam = torch.optim.AdamW(
        [dict(params=[model.embed.weight], lr=hp.lr_embed),
         dict(params=[model.proj.weight], lr=hp.lr_head),
         dict(params=scalars, lr=hp.lr_scalar)],
        betas=hp.adam_betas, eps=hp.adam_eps, weight_decay=0.0,
        fused=device.type in ("cuda", "cpu"))  # the record's fused kernel where torch has one
    aurora = Aurora(matrices, lr=hp.lr_matrix, momentum=hp.momentum, nesterov=hp.nesterov,
                    pp_iterations=hp.pp_iterations, pp_beta=hp.pp_beta, contra=hp.contra,
                    uw_floor=hp.uw_floor, weight_decay=hp.weight_decay, rule=hp.rule,
                    aurora_on=hp.aurora_on, ns_iteration=hp.ns_iteration, ns_dtype=hp.ns_dtype,
                    batched=hp.aurora_batched, compile={"on": True, "off": False}.get(hp.compile, "auto"),
                    norm_estimate=hp.norm_estimate, contra_fade=hp.contra_fade, radial_brake=hp.radial_brake,
                    radius_pin=hp.radius_pin, lineage_rounding=hp.lineage_rounding,
                    soap=soap_matrices(model, hp), soap_beta2=hp.soap_beta2, soap_every=hp.soap_every)
    assigned = sum(len(g["params"]) for opt in (adam, aurora) for g in opt.param_groups)
    assert assigned == len(list(model.parameters())), "every parameter must have one optimizer"
    for opt in (adam, aurora):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    if hp.lr_schedule == "power":
        for group, c in zip(adam.param_groups + aurora.param_groups, hp.power_c):
            group["power_c"] = c
    return adam, aurora


def soap_matrices(model, hp):
    """{matrix: SoapPreconditioner options} of the matrices SOAP preconditions (--soap mlp_v):
    mlp.fc and mlp.proj as they are; attn.v partly (blend), with floored denominators and a last
    renormalization in the form of the script whose rounding is repeated."""
    if hp.soap == "none":
        return {}
    v = dict(blend=hp.soap_v_blend, floor=hp.soap_v_floor,
             renorm="lerp" if hp.lineage_rounding == "2930" else "scale")
    return {m: opts for block in model.blocks
            for m, opts in ((block.mlp.fc.weight, {}), (block.mlp.proj.weight, {}), (block.attn.v.weight, v))}


def lr_multiplier(step, hp):
    """1 for the first (1 - cooldown_frac) of training, then linear decay to 0."""
    frac = step / hp.train_steps
    return 1.0 if frac < 1 - hp.cooldown_frac else (1 - frac) / hp.cooldown_frac


def lr_at(step, group, hp):
    """A group's lr at `step`: the record's initial_lr x lr_multiplier, or PowerCool's
    min(lr0, c (H - step)^p): flat, then a power-law fall to 0 at the horizon H."""
    if hp.lr_schedule == "linear":
        return group["initial_lr"] * lr_multiplier(step, hp)
    horizon = hp.schedule_steps or hp.train_steps
    return min(group["initial_lr"], group["power_c"] * max(0.0, horizon - step) ** hp.lr_power)


def momentum_at(step, hp):
    """Aurora's momentum at `step`: hp.momentum, or (lineage) rising linearly from momentum_min over
    the first momentum_warmup steps and falling back over the momentum_cooldown steps before
    momentum_horizon."""
    lo, hi = hp.momentum_min, hp.momentum
    cooldown_start = (hp.momentum_horizon or hp.train_steps) - hp.momentum_cooldown
    if step < hp.momentum_warmup:
        return lo + step / hp.momentum_warmup * (hi - lo)
    if hp.momentum_cooldown and step > cooldown_start:
        return hi - (step - cooldown_start) / hp.momentum_cooldown * (hi - lo)
    return hi


class EMANesterov:
    """EMA-Nesterov around Adam and Aurora (#40, #42): keep an EMA of each parameter's per-step
    displacement, and before the forward of each step in [start, stop) jump along it by stepsize
    x (the embedding's lr / its initial lr). The jump is not undone: the next displacement
    includes it, so the EMA tracks the whole path. Each tensor in its parameter's dtype."""

    def __init__(self, params, stepsize, beta, start, stop):
        self.params = list(params)
        self.stepsize, self.beta, self.start, self.stop = stepsize, beta, start, stop
        self.prev = [p.detach().clone() for p in self.params]
        self.ema = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def look_ahead(self, step, lr_ratio):
        if self.start <= step < self.stop:
            for p, d in zip(self.params, self.ema):
                p.add_(d, alpha=self.stepsize * lr_ratio)

    @torch.no_grad()
    def after_step(self):
        for p, prev, d in zip(self.params, self.prev, self.ema):
            d.lerp_(p - prev, 1 - self.beta)
            prev.copy_(p)

    def state(self):
        """For a checkpoint: the EMA and the weights it measures the next displacement from (not
        always the weights at a checkpoint: the reference interpolation's add and subtract round)."""
        return dict(prev=[t.cpu() for t in self.prev], ema=[t.cpu() for t in self.ema])

    def load(self, state):
        for mine, saved in ((self.prev, state["prev"]), (self.ema, state["ema"])):
            for t, s in zip(mine, saved, strict=True):
                t.copy_(s)


def is_val_step(step, hp):
    if step == hp.train_steps or step in hp.val_extra:
        return True
    if step == 0 and not hp.val_first:
        return False
    every = hp.val_every if step / hp.train_steps < hp.late_frac else hp.val_every_late
    return step % every == 0

# =================================================================================================
# Setup: distributed context (the record folder, the log and checkpoints are harness.py's)
# =================================================================================================


@dataclasses.dataclass
class Context:
    """Where this process runs: its rank, the world size, its device, and its micro-batching."""
    rank: int
    world: int
    device: torch.device
    micro: int   # sequences per micro-batch
    accum: int   # micro-batches per step


def micro_batch_plan(hp, world):
    """(sequences per micro-batch, micro-batches per step) for one rank, or a clear error."""
    if hp.batch_tokens % (world * hp.seq_len):
        raise ValueError(f"world size {world} cannot split the batch of {hp.batch_tokens:,} tokens "
                         f"into whole sequences of {hp.seq_len}; use 1, 2, 4 or 8 GPUs per node")
    local_seqs = hp.batch_tokens // world // hp.seq_len
    micro = min(hp.micro_batch_seqs, local_seqs)  # more ranks than 8: smaller micro-batches
    if local_seqs % micro:
        raise ValueError(f"world size {world}: {local_seqs} sequences per rank do not split into "
                         f"micro-batches of {micro}")
    return micro, local_seqs // micro


def distributed_env():
    """(rank, world size, local rank) from torchrun's RANK, WORLD_SIZE and LOCAL_RANK (unset: 0, 1,
    0), or ValueError naming the variable that is not a whole number in its range."""
    def read(name, default, what):
        text = os.environ.get(name)
        if text is None:
            return default
        if not re.fullmatch(r"[0-9]{1,9}", text.strip()):
            raise ValueError(f"{name} must be {what}, got {text!r}")
        return int(text)
    world = read("WORLD_SIZE", 1, "a positive integer (the number of processes; torchrun sets it)")
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be a positive integer (the number of processes; torchrun sets "
                         f"it), got {os.environ['WORLD_SIZE']!r}")
    rank = read("RANK", 0, f"an integer from 0 to WORLD_SIZE-1 = {world - 1}")
    local_rank = read("LOCAL_RANK", 0, f"an integer from 0 to WORLD_SIZE-1 = {world - 1}")
    for name, value in (("RANK", rank), ("LOCAL_RANK", local_rank)):
        if value >= world:
            raise ValueError(f"{name} must be an integer from 0 to WORLD_SIZE-1 = {world - 1}, got {value}")
    return rank, world, local_rank


def check_setup(hp, world):
    """What --dry-run checks, and every rank before it starts: the batch split and the hardware."""
    check_hardware(hp, torch.cuda.is_available())
    return micro_batch_plan(hp, world)


def setup_distributed(hp):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (multi-node too); plain `python` is one process."""
    rank, world, local_rank = distributed_env()
    micro, accum = check_setup(hp, world)  # before any process group: fail fast on every rank
    if not hp.cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} has no GPU: this node shows "
                             f"{torch.cuda.device_count()} GPU(s); start at most that many "
                             "processes per node (--nproc_per_node), or set "
                             "CUDA_VISIBLE_DEVICES= to train on the CPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Context(rank, world, device, micro, accum)


def activation_dtype(ctx):
    return torch.bfloat16 if ctx.device.type == "cuda" else torch.float32  # CPU: fp32 is faster


def use_compile(hp, ctx):
    return hp.compile == "on" or (hp.compile == "auto" and ctx.device.type == "cuda")



def setup_line(hp, ctx):
    """The log header's line of what this process uses (the harness writes the rest), and a line
    for each setting a preset gave that does nothing in this run (inert_notes)."""
    return "\n".join([f"micro_batch_seqs_used {ctx.micro}  grad_accum_steps {ctx.accum}  "
                      f"ns_dtype_used {str(ns_dtype_for(hp.ns_dtype, ctx.device)).removeprefix('torch.')}  "
                      f"activations {str(activation_dtype(ctx)).removeprefix('torch.')}  "
                      f"compile_used {use_compile(hp, ctx)}"] + inert_notes(hp))


# =================================================================================================
# Training and validation
# =================================================================================================


@dataclasses.dataclass
class Run:
    """What every trial of this process shares, and the running trial's parts."""
    hp: Hyperparameters
    ctx: Context
    log: Logger
    model: GPT
    compiled: nn.Module            # the model as called for training and validation
    train_loader: TokenLoader
    val: tuple                     # this rank's validation (inputs, targets)
    jsonl: object = None           # diagnostics file (rank 0)
    trial: int = 0                 # where training is, for messages and checkpoints
    step: int = 0
    optimizers: tuple = None       # the running trial's (adam, aurora), diagnostics probe, clock
    probe: object = None           # and unread train losses
    clock: object = None
    losses: object = None
    harness: object = None         # harness.py's Harness: the loop calls it at its named points
    ema: object = None             # the running trial's EMANesterov, if on
    reference: list = None         # the running trial's reference weights (--ref-gamma), once captured

    def settle(self):
        """With the clock stopped: log the train losses not yet read, check Aurora's updates."""
        log_train_losses(self)
        check_updates(self.optimizers[1])


@contextlib.contextmanager
def reference_interpolation(run, step):
    """Around a validation from ref_start on (#42): the weights W + gamma (W - W_ref), then back
    by subtracting the same delta (not bit for bit the weights before: training goes on from
    (W + d) - d, as in the script)."""
    if not run.hp.ref_gamma or step < run.hp.ref_start:
        yield
        return
    if run.reference is None:
        raise ValueError(f"--ref-gamma: no reference weights at step {step} (--ref-capture "
                         f"{run.hp.ref_capture} was not reached)")
    params = list(run.model.parameters())
    with torch.no_grad():
        deltas = [(p - ref) * run.hp.ref_gamma for p, ref in zip(params, run.reference)]
        for p, d in zip(params, deltas):
            p.add_(d)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, d in reversed(list(zip(params, deltas))):
                p.sub_(d)


@torch.no_grad()
def evaluate(run):
    """Summed loss of this rank's validation slice, summed over ranks, / val_tokens (float32)."""
    total = torch.zeros((), device=run.ctx.device, dtype=torch.float32)
    for xm, ym in micro_batches(*run.val, run.ctx, run.hp.seq_len):
        total += run.compiled(xm, ym)
    if run.ctx.world > 1:
        dist.all_reduce(total)
    return (total / run.hp.val_tokens).item()


def train_step(run, optimizers, step):
    """One optimizer step, queued without waiting for the device: (EMA-Nesterov's look-ahead),
    gradients summed over micro-batches and ranks (each parameter's in its own dtype, as the
    record), lr and momentum from the schedules, Adam and Aurora (then EMA-Nesterov's EMA).
    Returns the step's loss summed over ranks, on the device."""
    hp, ctx, model = run.hp, run.ctx, run.model
    if run.ema:  # the look-ahead scales with the embedding's lr as the last step left it
        embed = optimizers[0].param_groups[0]
        run.ema.look_ahead(step, embed["lr"] / embed["initial_lr"])
    loss = torch.zeros((), device=ctx.device, dtype=torch.float32)
    for xm, ym in micro_batches(*run.train_loader.next_batch(), ctx, hp.seq_len):
        micro_loss = run.compiled(xm, ym)
        micro_loss.backward()
        loss += micro_loss.detach()
    if ctx.world > 1:  # SUM, not average: the record's losses and gradients are sums
        handles = [dist.all_reduce(p.grad, async_op=True) for p in model.parameters()]
        handles.append(dist.all_reduce(loss, async_op=True))
        for h in handles:
            h.wait()
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, group, hp)
    for group in optimizers[1].param_groups:
        group["momentum"] = momentum_at(step, hp)
    for opt in optimizers:
        opt.step()
    if run.ema:
        run.ema.after_step()
    model.zero_grad(set_to_none=True)
    return loss


def log_train_losses(run, keep=0):
    """Log the train losses read so far but the last `keep` (each line with the train time as of
    its step). A non-finite loss stops the run: a non-finite update of an earlier step is its
    cause and is named first (matrix and step); otherwise the loss is, with its step."""
    hp = run.hp
    while len(run.losses.pending) > keep:
        step, total, elapsed = run.losses.take()
        loss = total / hp.batch_tokens  # the same on every rank (all-reduced): all stop alike
        if not math.isfinite(loss):
            check_updates(run.optimizers[1], before=step)
            raise FloatingPointError(f"non-finite train loss ({loss}) at step {step + 1}")
        run.log(f"step:{step + 1}/{hp.train_steps} train_loss:{loss:.4f} train_time:{elapsed:.3f}s "
                f"step_avg:{1000 * elapsed / (step + 1):.2f}ms")


def check_updates(aurora, before=None):
    """Raise if an update Aurora computed was non-finite (its check_finite(): the host sync, and a
    collective; called with the clock stopped, on every rank at the same point). With `before`
    (the step of a non-finite train loss) an update of that step or later is the loss's
    consequence, not its cause, and is not raised: the caller reports the loss."""
    try:
        aurora.check_finite()
    except NonFiniteUpdate as e:
        if before is None or e.step < before:
            raise




def train_trial(run, trial):
    """One trial (one seed of a record): seed and re-initialize (or, resuming, take the
    checkpoint's state), then the record's loop: validate (clock paused) on schedule, stop after
    the last validation, else train one step. No host sync while the clock runs: the train loss is
    read a step late, updates are checked at validations."""
    hp, ctx, log, model, harness = run.hp, run.ctx, run.log, run.model, run.harness
    run.trial, run.step = trial, 0
    resumed = harness.resumes(trial)
    if not resumed:
        log(f"trial:{trial} seed:{hp.seed + trial}")
        torch.manual_seed(hp.seed + trial)  # then draws where the record's do: on the device
        if hp.init == "record":
            model.init_weights(hp.init_var)
        else:  # the lineage's: the model's default init drawn on the CPU, as its scripts do
            model.init_lineage(hp)
        model.scale_init(hp)
        if ctx.world > 1:  # the ranks' weights must agree whatever their generators hold
            for p in model.parameters():
                dist.broadcast(p.data, 0)
        run.train_loader.reset()
    adam, aurora = run.optimizers = build_optimizers(model, hp, ctx.device)
    run.reference = None
    run.ema = EMANesterov(model.parameters(), hp.ema_nesterov, hp.ema_nesterov_beta, hp.ema_nesterov_start,
                          hp.ema_nesterov_stop) if hp.ema_nesterov else None
    probe = run.probe = NeuronHealth(model, aurora, run.val[0][:hp.diag_tokens // hp.seq_len * hp.seq_len]
                                     .view(-1, hp.seq_len) if ctx.rank == 0 else None, hp, ctx, run.jsonl)
    clock = run.clock = Clock(ctx)
    run.losses = TrainLosses(ctx.device)
    start = harness.trial_started(run)  # 0, or the step of the checkpoint it continues
    clock.start()
    for step in range(start, hp.train_steps + 1):
        run.step = step
        if is_val_step(step, hp) and not (resumed and step == start):  # that one is in the log
            clock.stop()
            run.settle()
            with reference_interpolation(run, step):
                val_loss = evaluate(run)
            log(f"step:{step}/{hp.train_steps} val_loss:{val_loss:.5f} {clock.val_fields(step)}")
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"non-finite val loss ({val_loss}) at step {step}")
            probe.report(trial, step, log)
            clock.start()
        if step == hp.train_steps:
            break
        harness.step_ended(run, step)  # checkpoints (--save-every), a signal's stop
        probe.before_step(is_val_step(step + 1, hp))
        loss = train_step(run, (adam, aurora), step)
        run.losses.put(loss, step, clock.elapsed())
        if hp.ref_gamma and step + 1 == hp.ref_capture:
            run.reference = [p.detach().clone() for p in model.parameters()]
        log_train_losses(run, keep=1)  # the step before's: its copy has long arrived
    if ctx.device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated(ctx.device) / 2**30:.2f} GiB")
    return val_loss


def build_model(hp, ctx):
    """The model as the record builds it: default PyTorch init, then moved to the device (each
    trial re-initializes it there, from its seed)."""
    return GPT(hp, activation_dtype(ctx)).to(ctx.device)


def prepare(hp, ctx, log, harness):
    """Everything that can fail before the first step is checked before the harness opens the
    record folder (so a bad input never leaves a stub log); then the model and the data."""
    train_files = shards_needed(find_shards(hp.data_dir, "train"), hp.batch_tokens, hp.train_steps,
                                f"train data in {hp.data_dir}")
    for f in train_files:  # token ids of every shard the run will read
        read_shard_tokens(f, hp.vocab_size)
    val = load_val_tokens(find_shards(hp.data_dir, "val"), hp, ctx)
    hp = harness.open(hp, runnable_source(), train_files, setup_line(hp, ctx))
    model = build_model(hp, ctx)
    log(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    compiled = torch.compile(model, dynamic=False) if use_compile(hp, ctx) else model
    loader = TokenLoader(train_files, hp.batch_tokens, ctx, hp.vocab_size)
    return Run(hp, ctx, log, model, compiled, loader, val, harness.jsonl, harness=harness)


def main(argv=None):
    hp, dry_run = parse_args(argv)
    try:
        if dry_run:
            world = distributed_env()[1]
            micro, accum = check_setup(hp, world)
            print(f"dry run: configuration ok (preset {hp.preset}, world size {world}, "
                  f"{accum} micro-batch(es) of {micro} sequences per rank)")
            for note in inert_notes(hp):
                print(note)
            return 0
        ctx = setup_distributed(hp)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log, run = Logger(ctx.rank), None
    harness = Harness(hp, ctx, log)  # record folder, log header, seeds, checkpoints, signals
    try:
        run = prepare(hp, ctx, log, harness)
        for trial in range(harness.first_trial, run.hp.trials):
            if not harness.trial_ended(train_trial(run, trial)):
                break  # a futility stop (--stop-below): the trials run are complete and counted
        harness.run_ended()
        return 0
    except (DataError, ValueError, FileExistsError) as e:  # bad input or configuration
        log(f"error: {e}", error=True)
        return 2
    except (FloatingPointError, Interrupted) as e:  # NaN/inf, or killed: stop, keep the log
        return harness.stopped(e, run)
    finally:
        harness.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
