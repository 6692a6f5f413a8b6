"""The run harness of train_gpt.py: everything around training that a speedrunner does not change.

It keeps the record folder (and its lock), the log (code part, environment header), the seeds of
the trials, checkpoints (--save-every, --resume), the neuron-health diagnostics (diagnostics.py),
the checks of the flags and the data, and the record's summary. A run holds a lock on its log while
it runs: meanwhile its seeds stay its own and its checkpoint cannot be resumed.

train_gpt.py imports it when it lies beside it (plugins.py), and it is not part of a log's code
part: the code part runs alone with train_gpt.py's plain Driver. Its flags (Hyperparameters below)
join the trainer's. train_gpt.py calls:

    check_hyperparameters(hp, ...)    after parsing the flags (a ValueError: exit status 2)
    check_setup(hp, gpu_presets)      before setup (and --dry-run): the GPU presets need CUDA
    code_part(hp)                     the log's code part: the trainer with its modules inlined
    Harness(hp, ctx, log)             the run's Driver: installs the SIGTERM/SIGINT handler
    harness.check_data(hp)            the shards, before anything is read or written
    harness.open(hp, setup)           before the first trial: opens (or, resuming, reopens) the log
    harness.first_trial               0, or the trial a checkpoint continues
    harness.resumes(trial)            does this trial continue a checkpoint? (then no init)
    harness.trial_started(run)        after a trial is built: diagnostics; restores a checkpoint's
                                      state; returns the step the trial starts at
    harness.validated(run, step)      after a validation: diagnostics
    harness.step_ended(run, step)     between a step's validation and the next training step
    harness.trial_ended(val_loss)     a trial's final validation loss, and the campaign's chance so
                                      far (--trials N); False: a futility stop (--stop-below) ends it
    harness.run_ended()               every trial done: final losses, summary
    harness.stopped(error, run)       a NaN or a signal stopped training: the log says so
    harness.close()                   closes the log: its lock is released

`run` is train_gpt.py's Run (model, optimizers, train_loader, clock, trial, step, the
techniques it uses): what a checkpoint saves and restores. Of its own flags, stop_below (--trials N) is the campaign's
futility stop (tools/campaign.py).
"""

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import glob
import hashlib
import json
import math
import os
import pickle
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zipfile

import torch
import torch.distributed as dist

from aurora import _collective_device
from data.shards import (DataError, read_shard_header, read_shard_tokens, shard_set_problems,
                         shards_needed)
from diagnostics import DiagnosticsHyperparameters, LeverageProbe, NeuronHealth

HARNESS_ROOT = os.path.dirname(os.path.abspath(__file__))
SEPARATOR = "=" * 100
# Flags that do not exist on purpose, and why (said instead of argparse's "unrecognized").
REFUSED_FLAGS = {
    "--stop-above": "--stop-above is refused: stopping a campaign because its claim passes chooses "
                    "the number of trials by the result, which inflates the chance of a false claim "
                    "(the rules ask for non-cherry-picked runs); only a futility stop, --stop-below P, "
                    "is offered: it can only drop claims"}


@dataclasses.dataclass
class Hyperparameters(DiagnosticsHyperparameters):
    """The harness's flags (after the diagnostics'): where records go, checkpoints, the CPU guard."""
    allow_cpu: bool = dataclasses.field(default=False, metadata=dict(help=(
        "let the record, small or aurora_* presets run without CUDA (slow: hours to days); a preset "
        "combined with +tiny needs no flag")))
    run_name: str = dataclasses.field(default=None, metadata=dict(help=(
        "record folder records/<date>_<run_name>/ (default <rule>_<preset>)")))
    records_dir: str = dataclasses.field(default=os.path.join(HARNESS_ROOT, "records"),
                                         metadata=dict(help="parent of the record folders"))
    append: bool = dataclasses.field(default=False, metadata=dict(help=(
        "add this run to an existing record folder of the same configuration")))
    save_every: int = dataclasses.field(default=0, metadata=dict(help=(
        "write a checkpoint of the running trial every N steps and on SIGTERM, beside the log "
        "(<uuid>.ckpt); 0 = off (the record)")))
    resume: str = dataclasses.field(default=None, metadata=dict(help=(
        "continue the run of this checkpoint (same flags and code): appends to its log, then "
        "finishes its trials")))
    stop_below: float = dataclasses.field(default=None, metadata=dict(help=(
        "futility stop: end the campaign after a complete trial when its chance of passing with "
        "--trials N falls below this (0 < P < 1; default off; docs/campaign.md)")))


def trainer():
    """train_gpt.py's module (imported, or the script being run): its presets and schedules."""
    return sys.modules.get("train_gpt") or sys.modules["__main__"]


def trainer_presets(name, flags):
    """The trainer's overrides of --preset `name` under `flags` (plugins.py's preset_overrides)."""
    t = trainer()
    return t.preset_overrides(name, flags, t.PRESETS, t.Hyperparameters.train_steps)


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
    # the frontier's (frontier.py): step counts, decay, betas, EMA blends and time constants
    trust_floor_end="[0, inf)", trust_fade_end="[0, inf)", gain_split_pairs="[0, inf)", final_ema_start="[0, inf)",
    final_ema_step="[1, inf)", tail_ema_start="[0, inf)", tail_ema_stop="[1, inf)", cwd="[0, inf)",
    aux_beta2="[0, 1)", final_ema_blend="[0, 1]", tail_ema_readout="[0, 1]", final_ema_tau="[1, inf)",
    tail_ema_tau="[1, inf)",
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
    (("aurora_on", "pp_iterations", "pp_beta"), lambda hp: hp.rule == "aurora",
     "--rule aurora (Aurora's polar step; muon and normuon orthogonalize plainly)"),
    # the frontier's (frontier.py)
    (("trust_floor_end", "trust_fade_end"), lambda hp: hp.soap_trust_gate, "--soap-trust-gate"),
    (("gain_split_pairs",), lambda hp: hp.gain_split, "--gain-split > 0"),
    (("final_ema_tau", "final_ema_start", "final_ema_step"), lambda hp: hp.final_ema_blend, "--final-ema-blend > 0"),
    (("tail_ema_tau", "tail_ema_start", "tail_ema_stop"), lambda hp: hp.tail_ema_readout, "--tail-ema-readout > 0"),
]


BY_DEPTH = ("gain_split_pairs",)  # never_acting's techniques that a shallower model, not a shorter run, leaves out


def never_acting(hp):
    """[(field, the fields that decide it, why)] of the techniques switched on whose steps all lie
    outside this run (steps 0..train_steps-1 train, validations run up to train_steps), whose
    blocks lie outside the model (BY_DEPTH), or whose EMA cannot differ from the weights."""
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
    if hp.gain_split and hp.gain_split_pairs >= hp.n_layer:
        out.append(("gain_split_pairs", ("gain_split_pairs",), f"it pairs the blocks from block {hp.gain_split_pairs} "
                    f"on, and the model's are 0..{hp.n_layer - 1} (n_layer {hp.n_layer}): the signs are the plain "
                    "gain split's"))
    blend_step = hp.final_ema_step or steps
    if hp.final_ema_blend and hp.final_ema_start >= blend_step:
        out.append(("final_ema_blend", ("final_ema_blend", "final_ema_start", "final_ema_step"),
                    f"its EMA begins after {hp.final_ema_start} steps (final_ema_start), at the blend's step "
                    f"{blend_step}: a copy of the weights, blended into themselves"))
    elif hp.final_ema_blend and hp.final_ema_tau == 1:
        out.append(("final_ema_blend", ("final_ema_blend", "final_ema_tau"),
                    "an EMA of time constant 1 (final_ema_tau) is the weights themselves"))
    if hp.tail_ema_readout and (hp.tail_ema_start >= steps or hp.tail_ema_start >= (hp.tail_ema_stop or steps + 1)):
        when = (f"it stops from {hp.tail_ema_stop} (tail_ema_stop): it never exists" if hp.tail_ema_start < steps
                else f"the run trains {steps}: at most a copy of the final weights")
        out.append(("tail_ema_readout", ("tail_ema_readout", "tail_ema_start", "tail_ema_stop"),
                    f"its EMA would begin after {hp.tail_ema_start} steps (tail_ema_start) and {when}"))
    elif hp.tail_ema_readout and hp.tail_ema_tau == 1:
        out.append(("tail_ema_readout", ("tail_ema_readout", "tail_ema_tau"),
                    "an EMA of time constant 1 (tail_ema_tau) is the weights themselves"))
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
        stated.update(trainer().PRESETS.get(part, {}))
    scaled = trainer_presets(hp.preset, {"train_steps": hp.train_steps})
    return [(k, stated[k]) for k in STEP_COUNTS_OFF_AT_0
            if stated.get(k, 0) > 0 and scaled.get(k) == 0 == getattr(hp, k)]


def inert_notes(hp):
    """The log header's (and the dry run's) lines on what a preset switched on that does nothing in
    this run (a shorter run than the preset's): the header still lists the value, the line says
    why it does nothing."""
    return ([f"no effect in this run: {name} {getattr(hp, name)!r}: {why}" for name, _, why in never_acting(hp)]
            + [f"no effect in this run: {name}: the preset's {value} steps round to 0 in this run of "
               f"{hp.train_steps} steps (off)" for name, value in scaled_off(hp)])


def setup_lines(hp, setup):
    """The header's lines of what this process uses: the trainer's setup line, then inert_notes."""
    return "\n".join([setup] + inert_notes(hp))


def changed_by_flags(hp, given):
    """The fields of `given` (set on the command line) whose value differs from the one the preset
    (or the default) gives this run: a flag that restates it changes nothing (e.g. a record's
    reproduce command listing a scaled preset's values)."""
    flags = {k: getattr(hp, k) for k in ("train_steps", "lr_power") if k in given}  # what scaling reads
    base = {**{f.name: f.default for f in dataclasses.fields(trainer().Hyperparameters)},
            **trainer_presets(hp.preset, flags)}
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
            run, size = ((f"model of {hp.n_layer} blocks", "its depth (--n-layer)") if name in BY_DEPTH
                         else (f"run of {hp.train_steps} steps", "the run's length"))
            raise ValueError(f"--{name.replace('_', '-')} {getattr(hp, name)!r} never acts in this {run}: "
                             f"{why}. Change {flags}, or {size}")


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
        mu = trainer().momentum_at(step, hp)
        if not lo - 1e-12 <= mu <= hi + 1e-12:
            raise ValueError(
                f"the momentum schedule leaves [{lo}, {hi}] (--momentum-min, --momentum): {mu:.4g} at step "
                f"{step} of {hp.train_steps}, from --momentum-warmup {hp.momentum_warmup}, --momentum-cooldown "
                f"{hp.momentum_cooldown} and --momentum-horizon {horizon}; the cool-down must end at or after "
                f"the last step: --momentum-horizon >= {hp.train_steps - 1}")
        for name, group in groups:
            lr = trainer().lr_at(step, group, hp)
            if not 0 <= lr <= group["initial_lr"]:
                flags = ("--cooldown-frac" if hp.lr_schedule == "linear" else
                         "--power-c, --lr-power, --schedule-steps")
                raise ValueError(f"the lr schedule gives {name} = {lr!r} at step {step}, outside [0, "
                                 f"{group['initial_lr']}]: check {flags}")


def check_hyperparameters(hp, choices, techniques=(), given=frozenset()):
    """Every choice, range and combination, in one place (a technique's own checks too); raises
    ValueError naming the flag. `given`: the fields set on the command line (a setting there that
    cannot act is refused)."""
    def bad(name, why):
        raise ValueError(f"--{name.replace('_', '-')} {why}, got {getattr(hp, name)!r}")
    for name, allowed in choices.items():
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
    for t in techniques:
        if hasattr(t, "check"):
            t.check(hp, bad)
    check_schedules(hp)
    check_inert(hp, set(given))


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


def check_setup(hp, gpu_presets, cuda=None):
    """Before setup (and --dry-run): a rank's GPU; the record, small and lineage presets are GPU
    runs (unless combined with tiny): refuse to start them on a CPU by accident."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    local_rank = distributed_env()[2]
    if cuda and local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} has no GPU: this node shows "
                         f"{torch.cuda.device_count()} GPU(s); start at most that many "
                         "processes per node (--nproc_per_node), or set "
                         "CUDA_VISIBLE_DEVICES= to train on the CPU")
    parts = hp.preset.split("+")
    if "tiny" not in parts and any(p in gpu_presets for p in parts) and not cuda and not hp.allow_cpu:
        raise ValueError(
            f"the {hp.preset} preset trains the 124M model and needs CUDA GPUs, and none is "
            "available: on a CPU it would take days (or run out of memory). Use --preset tiny for "
            "a CPU smoke run, or pass --allow-cpu to start it anyway")


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


def printed(hp):
    """The hyperparameters a log lists: all but those of the techniques the run does not use."""
    return {f.name: getattr(hp, f.name) for f in dataclasses.fields(hp)
            if f.metadata.get("used") is None or f.metadata["used"](hp)}


# --- the code part of a log -------------------------------------------------------------------

# A local module's import (one line, or a parenthesized list over several).
LOCAL_IMPORT = re.compile(r"^from (aurora|aurora_variants|frontier|lineage|measure|plugins|soap) import (\([^)]*\)|.*)$",
                          re.M)


def local_imports(root, name):
    """The local modules module `name` imports."""
    with open(os.path.join(root, name)) as f:
        return {m.group(1) + ".py" for m in LOCAL_IMPORT.finditer(f.read())}


def needed_modules(root, script, unused):
    """The modules of `unused` that a module the code part inlines imports itself (frontier.py the
    lineage's): they are inlined too. (plugins.py, which imports every technique, does not count.)"""
    unused, needed = set(unused), set()
    while True:
        inlined, todo = set(), [os.path.basename(script)]
        while todo:
            for name in local_imports(root, todo.pop()) - unused - inlined:
                inlined.add(name)
                todo.append(name)
        wanted = {m for name in inlined - {"plugins.py"} for m in local_imports(root, name)} & unused
        if not wanted:
            return needed
        unused, needed = unused - wanted, needed | wanted


def code_part(hp=None):
    """A log's code part: the trainer with the modules the run (default: the record) uses inlined."""
    import plugins  # (it imports this module)
    unused = [t.name for t in plugins.TECHNIQUES if t not in plugins.techniques(hp or trainer().Hyperparameters())]
    return runnable_source(os.path.abspath(trainer().__file__), unused)


def runnable_source(script, unused=()):
    """The trainer (`script`) with each local module it imports inlined in place of the import
    line, and the local imports of those inlined in turn, each module once: the benchmark wants
    all code a run used in its log, as one script that runs on its own. The import of a module
    in `unused` (a technique the run does not use, e.g. "lineage.py") becomes `NAME = None`. A
    script cut from a log has nothing left to inline: its logs carry it byte for byte."""
    with open(script) as f:
        source = f.read()
    root, done = os.path.dirname(script), set()
    unused = set(unused) - needed_modules(root, script, unused)  # e.g. the lineage, which frontier.py needs

    def inline(match):
        name = match.group(1).replace(".", "/") + ".py"
        if name in unused:
            names = match.group(2).strip("()").split("#")[0].replace(",", " ").split()
            return f"{' = '.join(names)} = None  # {name}: not used by this run"
        if name in done:
            return "\n".join(f"# {line}" for line in match.group(0).splitlines()) + "  (inlined above)"
        done.add(name)
        with open(os.path.join(root, name)) as f:
            module = LOCAL_IMPORT.sub(inline, f.read().rstrip("\n"))
        return f"# {'-' * 40} {name} (inlined) {'-' * 40}\n{module}\n# {'-' * 40} end of {name} {'-' * 40}"
    return LOCAL_IMPORT.sub(inline, source)


# --- record folders, seeds, the log's header ----------------------------------------------------

# Hyperparameters that may differ between the logs of one record folder: the seeds, the data's
# path, and the harness's own (train_gpt.py's PER_RUN says the same to the records toolkit).
PER_RUN = ("seed", "trials", "data_dir") + tuple(f.name for f in dataclasses.fields(Hyperparameters))


def record_config(hp):
    """The hyperparameters every log of one record folder must share, as the log prints them."""
    return {k: json.dumps(v) for k, v in printed(hp).items() if k not in PER_RUN}


def header_lines(log_path):
    """The `name: value` lines of an existing log's header (between its first two '=' lines)."""
    with open(log_path, errors="replace") as f:
        sections = f.read().split("\n" + SEPARATOR + "\n")
    header = sections[1] if len(sections) > 2 else ""
    return dict(line.split(": ", 1) for line in header.splitlines() if ": " in line)


def header_config(log_path, fields):
    """The `name: value` lines of an existing log's header for the hyperparameters `fields`."""
    fields = set(fields) - set(PER_RUN)
    return {k: v for k, v in header_lines(log_path).items() if k in fields}


def config_problem(path):
    """(a record folder's config.json at `path` as a dict, None) or (None, why it cannot be used).
    tools/logs.py's read_config words the same checks for the summary (the toolkit runs without
    torch, so it does not import this module)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        config = json.loads(text) if text.strip() else None
        if config is None:
            return None, "empty" if not text.strip() else "not a JSON object (null)"
        if not isinstance(config, dict):
            return None, f"not a JSON object (a {type(config).__name__})"
        return config, None
    except IsADirectoryError:
        return None, "a directory, not a file"
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    except ValueError as e:
        return None, f"not valid JSON ({e})"


def read_config(path):
    """A record folder's config.json, or ValueError naming it and what to do."""
    config, why = config_problem(path)
    if why:
        raise ValueError(f"--append: {path} is {why}; delete it to have the logs' headers used "
                         "as the record's configuration")
    return config


SEED_LINE = re.compile(r"^trial:\d+ seed:(\S+)", re.M)


def complete_seeds(text):
    """Seeds (as logged: strings) of the trials of a log's text that reached their final
    validation (`step:N/N val_loss`, not marked `lost:`), as the records toolkit counts them."""
    starts = list(SEED_LINE.finditer(text)) + [None]
    return {m.group(1) for m, end in zip(starts, starts[1:])
            if re.search(r"^step:(\d+)/\1 val_loss:", text[m.end():end.start() if end else None], re.M)}


def log_in_use(path):
    """Is the log at `path` held by a running run? Each run holds a lock (flock) on its log from
    its creation (or its resume's claim) until it exits, even by kill -9. Ask under records_lock:
    runs take their log's lock only under it."""
    try:
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released when f closes
        return False
    except BlockingIOError:
        return True
    except FileNotFoundError:
        return False


def lock_holder(path):
    """' (process P)', P holding the lock on `path` as /proc/locks (Linux) shows it, or ''."""
    try:
        inode = str(os.stat(path).st_ino)
        with open("/proc/locks") as f:
            for fields in map(str.split, f):
                if "FLOCK" in fields and fields[-3].rsplit(":", 1)[-1] == inode:
                    return f" (process {int(fields[-4])})"
    except (OSError, ValueError, IndexError):
        pass
    return ""


def seeds_in(record_dir):
    """Seeds (as logged: strings) a new run of a record folder may not take: those of every
    complete trial, and every seed of a run still going (its log in use) or that a checkpoint
    beside its log can resume (its header's seed and trials). A seed of a run that died without
    finishing its trial or leaving a checkpoint is free again."""
    seeds = set()
    for log in glob.glob(os.path.join(glob.escape(record_dir), "*.txt")):
        with open(log, errors="replace") as f:
            output = f.read().split(SEPARATOR, 1)[-1]
        seeds |= complete_seeds(output)
        if log_in_use(log) or os.path.exists(os.path.splitext(log)[0] + ".ckpt"):
            header = header_lines(log)
            try:
                first, trials = json.loads(header["seed"]), json.loads(header["trials"])
                seeds |= {str(first + t) for t in range(trials)}
            except (KeyError, TypeError, ValueError):  # a header cut short: the seeds it logged
                seeds |= set(SEED_LINE.findall(output))
    return seeds


# Seeds drawn from the OS entropy lie in [0, 2^32): short to type, and S + trials stays far inside
# torch.manual_seed's range.
DRAWN_SEEDS = 2 ** 32


def draw_seed():
    return secrets.randbelow(DRAWN_SEEDS)


def trial_seeds(hp):
    return [hp.seed + t for t in range(hp.trials)]


def usable_records_dir(path):
    """--records-dir created if needed and writable, or ValueError saying why not."""
    try:
        os.makedirs(path, exist_ok=True)
        if not os.path.isdir(path):
            raise NotADirectoryError(f"{path} is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not writable")
        with open(os.path.join(path, ".lock"), "a"):
            pass
    except OSError as e:
        raise ValueError(f"cannot use --records-dir {path}: {e.strerror or e}") from None


@contextlib.contextmanager
def records_lock(records_dir):
    """The lock (flock on its .lock file) of a records folder: a run creates or joins a record
    folder in it, chooses its seeds, writes its log's header and claims its log only under it."""
    try:
        lock = open(os.path.join(records_dir, ".lock"), "a")
    except OSError as e:
        raise ValueError(f"cannot open the lock of the records folder {records_dir}: "
                         f"{e.strerror or e}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# A record folder's name: <date>_<run name>.
RECORD_FOLDER = re.compile(r"(\d{4}-\d{2}-\d{2})_(.+)")


def open_record(hp, start_log):
    """Find or create the record folder and open a new <uuid>.txt in it, under the records
    folder's lock so that two runs started together cannot both create or join a folder with
    different configurations, nor take the same seeds: start_log(log file, hp) writes the log's
    code part and header (its seeds) before the lock is released, and the run holds its log's
    lock (log_in_use) until it exits. Refuses (ValueError/FileExistsError) without writing
    anything; never touches an older log. Without --seed (hp.seed None) the seed is drawn here,
    from the OS entropy. Returns (folder, log path, open log file, hp with the seed used)."""
    drawn = hp.seed is None
    if drawn:
        hp = dataclasses.replace(hp, seed=draw_seed())
    run_name = hp.run_name or f"{hp.rule}_{hp.preset}"
    usable_records_dir(hp.records_dir)
    with records_lock(hp.records_dir):
        today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        record_dir = os.path.join(hp.records_dir, f"{today}_{run_name}")
        earlier = sorted(name for name in os.listdir(hp.records_dir)
                         if (m := RECORD_FOLDER.fullmatch(name)) and m.group(2) == run_name
                         and os.path.isdir(os.path.join(hp.records_dir, name)))
        if os.path.lexists(record_dir) and not os.path.isdir(record_dir):
            raise ValueError(f"the record folder {record_dir} is a file, not a folder: move it away, or "
                             "choose another --run-name")
        if hp.append and earlier and not os.path.exists(record_dir):
            record_dir = os.path.join(hp.records_dir, earlier[-1])  # --append after midnight joins the latest
        logs = sorted(glob.glob(os.path.join(glob.escape(record_dir), "*.txt")))
        if logs and not hp.append:
            raise FileExistsError(f"{record_dir} already holds {len(logs)} log(s). Pass --append to "
                                  "add this run to that record (same configuration, more seeds), "
                                  "or choose another --run-name")
        config_path, new = os.path.join(record_dir, "config.json"), record_config(hp)
        if logs:
            if os.path.lexists(config_path):
                old = {k: json.dumps(v) for k, v in read_config(config_path).items()}
            else:  # never take the configuration from the newcomer
                old = header_config(logs[0], [f.name for f in dataclasses.fields(hp)])
            diff = config_diff(old, new)
            if diff:
                raise ValueError(f"--append: this run's configuration differs from the record in "
                                 f"{record_dir}: {diff}; use another --run-name")
            hp = choose_seeds(hp, seeds_in(record_dir), drawn)
        elif os.path.lexists(config_path):  # its logs were deleted: the record has no run left
            old, why = config_problem(config_path)
            diff = why or config_diff({k: json.dumps(v) for k, v in old.items()}, new)
            if diff:
                print(f"note: {config_path} held another configuration ({diff}) but {record_dir} "
                      "holds no log: it now holds this run's", file=sys.stderr)
        created, begun, log = not os.path.isdir(record_dir), [], None
        log_path = os.path.join(record_dir, f"{uuid.uuid4()}.txt")
        try:
            os.makedirs(record_dir, exist_ok=True)
            if not (logs and os.path.lexists(config_path)):
                write_atomic(config_path, lambda f: f.write(json.dumps(
                    {k: json.loads(v) for k, v in new.items()}, indent=2).encode()))
                begun.append(config_path)
                os.chmod(config_path, 0o644)
            log = open(log_path, "x")  # "x": fail rather than overwrite
            fcntl.flock(log, fcntl.LOCK_EX)  # held until the run exits: its seeds are taken meanwhile
            start_log(log, hp)
        except OSError as e:  # a full disk, a read-only folder: nothing of this run stays behind
            if log:
                log.close()
            discard_begun(record_dir, created, begun + [log_path])
            raise ValueError(f"cannot start this run's log in {record_dir}: {e.strerror or e}"
                             f"{WRITE_FAILURE_HINTS.get(e.errno, '')}; what this run had begun there "
                             "is removed") from None
        return record_dir, log_path, log, hp


WRITE_FAILURE_HINTS = {errno.ENOSPC: " (the disk is full: free space on it, or use another --records-dir)",
                       errno.EDQUOT: " (over the disk quota: free space, or use another --records-dir)",
                       errno.EROFS: " (a read-only file system: use another --records-dir or --run-name)",
                       errno.EACCES: " (no permission to write there: use another --records-dir or --run-name)",
                       errno.EPERM: " (no permission to write there: use another --records-dir or --run-name)"}


def discard_begun(record_dir, created, paths):
    """Remove what a run that could not start its log wrote: the folder if it created it, else
    `paths` and the files beside its log that share the log's name (<uuid>.jsonl)."""
    if created:
        shutil.rmtree(record_dir, ignore_errors=True)
        return
    log_path = paths[-1]
    for path in paths + glob.glob(glob.escape(os.path.splitext(log_path)[0]) + ".*"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def config_diff(old, new):
    """'name old -> new, ...' for the configuration values (as the log prints them) that differ."""
    return ", ".join(f"{k} {old.get(k)} -> {new.get(k)}"
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


def choose_seeds(hp, taken, drawn):
    """A trial seed already taken in the folder (`taken`: as logged; see seeds_in) is refused when
    it was given with --seed; a drawn one is drawn again."""
    while True:
        clash = sorted(s for s in trial_seeds(hp) if str(s) in taken)
        if not clash:
            return hp
        if not drawn:
            raise ValueError(f"--append: seed(s) {clash} already in this record (a complete trial's, "
                             "or taken by a run still going or by a checkpoint that can resume it); "
                             "choose another --seed, or leave it out to draw one")
        hp = dataclasses.replace(hp, seed=draw_seed())


def environment_lines(hp, ctx, setup, drawn=False):
    """The log's header: versions, device, commit, the setup line the trainer gives (`setup`), the
    trials' seeds, every hyperparameter, nvidia-smi."""
    lines = [f"python {platform.python_version()}  torch {torch.__version__}  "
             f"cuda {torch.version.cuda}  platform {platform.platform()}"]
    if ctx.device.type == "cuda":
        lines.append(f"device {torch.cuda.get_device_name(ctx.device)}  world_size {ctx.world}")
    else:
        lines.append(f"device cpu ({platform.processor() or platform.machine()}, "
                     f"{torch.get_num_threads()} threads)  world_size {ctx.world}")
    try:
        git = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=HARNESS_ROOT,
                             capture_output=True, text=True, timeout=5)
        commit = git.stdout.strip() if git.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    lines.append(f"git_commit {commit}")
    lines.append(setup)
    lines.append(f"seeds {trial_seeds(hp)}" + (" (drawn from the OS entropy; run trial i again with "
                                               "--seed <its seed> --trials 1)" if drawn else ""))
    lines += [f"{k}: {json.dumps(v)}" for k, v in printed(hp).items()]
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=10).stdout
        lines += smi.rstrip().splitlines() if smi else []
    except (OSError, subprocess.SubprocessError):
        pass
    return lines


def campaign_tools():
    """tools/campaign.py, when the records toolkit sits beside this script; else None."""
    if not os.path.exists(os.path.join(HARNESS_ROOT, "tools", "campaign.py")):
        return None
    if HARNESS_ROOT not in sys.path:
        sys.path.insert(0, HARNESS_ROOT)
    import tools.campaign
    return tools.campaign


def campaign_report(log, hp):
    """After a complete trial of a --trials N run (rank 0): log the claim so far, computed from this
    run's log as `python tools/records.py campaign LOG --trials N` computes it; return the
    `campaign stopped:` line when --stop-below ends the campaign here, else None."""
    campaign = campaign_tools()
    if campaign is None:
        return None
    try:
        c = campaign.campaign_of(log.file.name, hp.trials)
    except (campaign.RecordsError, ValueError, OSError) as e:  # a report: the run goes on
        log(f"campaign: not estimated: {e}")
        return None
    log(campaign.campaign_line(c))
    stop = campaign.campaign_decision(c, hp.stop_below)
    if stop:
        log(stop)
    return stop


def refresh_summary(record_dir, log):
    """Post-processing, when the records toolkit sits beside this script: rewrite summary.json."""
    tool = os.path.join(HARNESS_ROOT, "tools", "records.py")
    if os.path.exists(tool):
        proc = subprocess.run([sys.executable, tool, "summary", record_dir, "--write"],
                              capture_output=True, text=True)
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        log(f"summary: {os.path.join(record_dir, 'summary.json')}: {last}" if proc.returncode == 0
            else f"summary not written: {proc.stderr.strip()}", error=proc.returncode != 0)


# --- signals ----------------------------------------------------------------------------------


class Interrupted(Exception):
    """SIGTERM (preemption, a kill) or SIGINT while training."""


class StopRequest:
    """The SIGTERM/SIGINT handler. It raises Interrupted at once, except while a run that writes
    checkpoints trains (`defer`): then it notes the signal, and the trial saves a checkpoint and
    stops at its next step boundary, a step later at most (raising in the middle of a step would
    leave nothing consistent to save). More signals change nothing: torchrun forwards the one its
    workers often got too, and a supervisor's SIGKILL follows anyway if a step hangs."""

    def __init__(self):
        self.defer, self.signum = False, None

    def __call__(self, signum, frame):
        if not self.defer:
            raise Interrupted(signal.Signals(signum).name)
        self.signum = self.signum or signum


# --- checkpoints (--save-every, --resume): the running trial's whole state in one file beside the
# log, written atomically by rank 0; a resumed run continues bit for bit, with any world size that
# splits the batch (Aurora's momentum is gathered from the ranks that hold it: no per-rank files).

CHECKPOINT_FORMAT = "train_gpt.py checkpoint 3"  # 2: the sha256 of the log (and jsonl) it continues;
# 3: the techniques' state under "techniques"
CHECKPOINT_KEYS = ("config", "code", "trial", "seed", "step", "finals", "world_size", "torch", "model",
                   "adam", "aurora", "loader", "rng", "clock", "fc_init", "techniques", "log", "log_bytes", "log_sha256",
                   "jsonl_bytes", "jsonl_sha256")
# Lines of an interrupted run's log that stay as they are when a resumed run marks the lines it
# wrote after the checkpoint: they say what happened to it (or were marked by an earlier resume);
# everything else is redone.
EVENT_LINE = re.compile(r"^(checkpoint|checkpoint not written|interrupted|failed|error|resumed|lost):")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (exit status 2, before anything is written)."""


def write_atomic(path, write):
    """Replace `path` by what write(f) writes, all or nothing: a temporary file in the same folder,
    flushed to the disk, then renamed over `path` (a kill or a full disk mid-write leaves the old
    file whole, and at most a stale `path`.tmp)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself, on the disk
    finally:
        os.close(folder)


def write_failure(e):
    """What made a write fail, in words: torch.save reports a failed write of its file (a full
    disk) as a RuntimeError of its own ("[enforce fail at inline_container.cc:…] …"), with the
    file's OSError as the exception it was raised in; that OSError says what happened."""
    cause = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    return str(cause if cause is not None else e)


def load_checkpoint(path):
    """The checkpoint at `path`, whole (each part's CRC32, which torch.load does not check: a
    flipped or zeroed block would load silently) and of this trainer, or CheckpointError."""
    what = (f"--resume {path}: the file is not a whole checkpoint of train_gpt.py (truncated by a copy "
            "or a full disk, or corrupt?)")
    todo = ("resume from an intact copy of the checkpoint, or start the run again without --resume "
            "(a run killed while writing a checkpoint keeps the previous one whole: <uuid>.ckpt, not "
            "<uuid>.ckpt.tmp)")
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(glob.escape(path), "*.ckpt")))
        raise CheckpointError(f"--resume {path}: a folder; --resume takes a checkpoint file, "
                              "<record folder>/<uuid>.ckpt" + (f" ({path} holds {', '.join(found)})"
                                                              if found else ""))
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume {path}: no such file")
    try:
        with zipfile.ZipFile(path) as z:
            broken = z.testzip()
        if broken:
            raise CheckpointError(f"{what}: its part {broken} fails its checksum; {todo}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: runs no code
    except CheckpointError:
        raise
    except Exception as e:  # zipfile, torch and the unpickler raise many kinds: all mean unreadable
        first = (str(e).splitlines() or [""])[0][:200]
        detail = ("it holds more than tensors and plain values" if isinstance(e, pickle.UnpicklingError)
                  else first)
        raise CheckpointError(f"{what}: {type(e).__name__}: {detail}; {todo}") from None
    missing = ([k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else
               list(CHECKPOINT_KEYS))
    if isinstance(ckpt, dict) and str(ckpt.get("format")).startswith("train_gpt.py checkpoint ") and \
            ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"--resume {path}: a checkpoint of another version of train_gpt.py "
                              f"({ckpt['format']!r}, this one reads {CHECKPOINT_FORMAT!r}); resume it "
                              "with the code that wrote it (its log's code part runs on its own)")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or missing:
        raise CheckpointError(f"{what}: it lacks {', '.join(missing) or 'the format mark'}; {todo}")
    return ckpt


# Aurora's state in a checkpoint: the same whatever the world size or path. A variant says what it
# keeps (STATE_KEYS, _state_shape, _held_state, _load_held, _check_saved); owners() who holds it.

def owners(aurora, group, world):
    """The rank that updates each matrix of `group`: matrix j of the record's order goes to rank
    j % world (Aurora._step_group); the batched path deals each shape's matrices in turn
    (VariantAurora._shape_stacks)."""
    if getattr(aurora, "batched", False):
        owner = {p: r for _, same, ranks in aurora._shape_stacks(group["params"], world) for p, r in zip(same, ranks)}
    else:
        owner = {p: j % world for j, p in enumerate(aurora._record_order(group["params"]))}
    return [owner[p] for p in group["params"]]


@torch.no_grad()
def state_keys(aurora):
    """What a checkpoint keeps of each matrix: the momentum, and a variant's own (its STATE_KEYS)."""
    return getattr(aurora, "STATE_KEYS", ("momentum",))


def state_shape(aurora, p, key):
    """(shape, dtype) of matrix p's saved state `key`."""
    return aurora._state_shape(p, key) if hasattr(aurora, "_state_shape") else (tuple(p.shape), torch.float32)


def held_state(aurora, p):
    """This rank's state of matrix p, by state key (empty if it has not stepped it)."""
    if hasattr(aurora, "_held_state"):
        return aurora._held_state(p)
    return {key: aurora.state[p][key] for key in state_keys(aurora) if key in aurora.state[p]}


def load_held(aurora, i, p, state):
    """Put matrix p's saved state (matrix i of the saved groups) back on this rank."""
    if hasattr(aurora, "_load_held"):
        return aurora._load_held(i, p, state)
    for key in state_keys(aurora):
        if key in state:
            aurora.state[p][key] = state[key].to(device=p.device, dtype=torch.float32, copy=True)


def aurora_state_dict(aurora):
    """Aurora's (or a variant's) state, every matrix's as CPU copies, in torch's format (state by parameter index, then the
    groups' hyperparameters), the same whatever the world size or path: checkpoints resume with
    another world size. Under torch.distributed a rank holds only the matrices it updates, so
    this is a collective: every rank calls it, and every rank gets the whole state."""
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    params = [p for group in aurora.param_groups for p in group["params"]]
    held = [held_state(aurora, p) for p in params]
    # who holds what: rank + 1 where this rank has the state, 0 elsewhere; summed over ranks
    holder = torch.tensor([[rank + 1 if key in mine else 0 for key in state_keys(aurora)] for mine in held],
                          dtype=torch.int64).reshape(len(params), len(state_keys(aurora)))
    if distributed:
        holder = holder.to(_collective_device())
        dist.all_reduce(holder)
    state = {}
    for i, (p, mine, holders) in enumerate(zip(params, held, holder.tolist())):
        for key, h in zip(state_keys(aurora), holders):
            if not h:
                continue  # not stepped yet: no state, as in a fresh optimizer
            shape, dtype = state_shape(aurora, p, key)
            buf = mine[key] if h == rank + 1 else torch.empty(shape, dtype=dtype, device=p.device)
            if distributed:  # contiguous: a collective sends the storage as it lies (QR's Q is
                buf = buf.to(_collective_device()).contiguous()  # column-major)
                dist.broadcast(buf, h - 1)
            state.setdefault(i, {})[key] = buf.to("cpu", copy=True)  # a copy, never a view
    groups, start = [], 0
    for group in aurora.param_groups:
        n = len(group["params"])
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": list(range(start, start + n))})
        start += n
    return dict(state=state, param_groups=groups)

def load_aurora_state_dict(aurora, state_dict):
    """The inverse of aurora_state_dict() for this process's world size and path: this rank keeps the
    state of the matrices it updates; the groups' hyperparameters are the saved ones. Raises
    ValueError if the state does not fit."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    saved_groups = state_dict["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in aurora.param_groups]:
        raise ValueError("Aurora.load_state_dict: the saved groups hold "
                         f"{[len(g['params']) for g in saved_groups]} matrices, this optimizer "
                         f"{[len(g['params']) for g in aurora.param_groups]}")
    aurora.state.clear()
    aurora._first_bad = {}
    i, keys = 0, state_keys(aurora)
    for group, saved in zip(aurora.param_groups, saved_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})
        for p, owner in zip(group["params"], owners(aurora, group, world)):
            state = state_dict["state"].get(i, {})
            for key, value in state.items():
                where = f"Aurora.load_state_dict: matrix {i} ({tuple(p.shape)}) has saved"
                kind = key.split("_")[0].upper()  # a variant's state: its keys start with its name
                if key not in keys:
                    raise ValueError(f"{where} {kind} state, and this optimizer does not run {kind} on it")
                if tuple(value.shape) != state_shape(aurora, p, key)[0]:
                    raise ValueError(f"{where} {key!r} of shape {tuple(value.shape)}")
                missing = [k for k in keys if k.split("_")[0].upper() == kind and k not in state]
                if missing:  # all of a variant's state or none (every rank checks: the owner alone would fail)
                    raise ValueError(f"{where} {kind} state without {', '.join(missing)}")
            if hasattr(aurora, "_check_saved"):  # e.g. the lineage's: SOAP state where SOAP runs
                aurora._check_saved(i, p, state)
            if owner == rank:
                load_held(aurora, i, p, state)
            i += 1


def resume_config(hp, ctx, train_files):
    """What a resumed run must share with the checkpoint's run to continue it bit for bit: the
    record's configuration, the trials (seed, count), the device type (activation and
    Newton-Schulz dtypes follow it) and the train shards (names and sizes). Not the world size."""
    config = record_config(hp)
    config.update({k: json.dumps(getattr(hp, k)) for k in ("seed", "trials", "diagnostics")})
    config["device"] = json.dumps(ctx.device.type)
    config["train_shards"] = json.dumps([f"{os.path.basename(f)}:{read_shard_header(f)}"
                                         for f in train_files])
    return config


def check_resume(ckpt, hp, ctx, train_files, code):
    """Refuse (CheckpointError) a checkpoint of another configuration or code than this run's;
    returns hp with the checkpoint's seed unless the command line sets one (it must then be the
    checkpoint's)."""
    if hp.seed is None:
        hp = dataclasses.replace(hp, seed=json.loads(ckpt["config"].get("seed", "null")))
    old, new = ckpt["config"], resume_config(hp, ctx, train_files)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise CheckpointError(
            f"--resume {hp.resume}: this run's configuration differs from the checkpoint's in "
            + ", ".join(f"{k} {old.get(k, 'absent')} (checkpoint) vs {new.get(k, 'absent')}" for k in diff)
            + ". Resume with the flags of the run that wrote it (its log's header lists them)")
    if ckpt["code"] != code:
        a, b = ckpt["code"].splitlines(), code.splitlines()
        line = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        show = (lambda lines: repr(lines[line][:100]) if line < len(lines) else "the end")
        raise CheckpointError(
            f"--resume {hp.resume}: the code differs from the code of the run that wrote the "
            f"checkpoint (its log's code part), first at line {line + 1} of the one-file source: "
            f"{show(a)} (checkpoint) vs {show(b)}. Resume with the code that wrote it (e.g. the "
            "log's code part, which runs on its own)")
    return hp


def file_digest(path, size):
    """The sha256 (hex) of the first `size` bytes of the file at `path`."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def reopen_record(ckpt_path, ckpt):
    """The log (and diagnostics file) of the checkpoint's run, reopened to append: those beside
    the checkpoint (a record folder may be copied or moved, as a whole), holding what they held
    when it was written (their sha256 up to there). The resumed run claims the log (holds its
    lock, see log_in_use): a checkpoint whose log is in use is being resumed, or still written, by
    a run going on, and is refused. The lines the interrupted run wrote after the checkpoint were
    about steps this run redoes: each gets `lost: ` in front (kept, but no longer read as steps or
    trials by the records toolkit), except its event lines (EVENT_LINE); the diagnostics file is
    cut back to the checkpoint. Checks everything before it writes. Returns (folder, log path,
    log, diagnostics file, lost lines)."""
    record_dir = os.path.dirname(os.path.abspath(ckpt_path))
    log_path = os.path.join(record_dir, os.path.basename(ckpt["log"]))
    jsonl_path = os.path.splitext(log_path)[0] + ".jsonl"
    with records_lock(os.path.dirname(record_dir)):
        if log_in_use(log_path):
            raise CheckpointError(f"--resume {ckpt_path}: the checkpoint is being resumed, or its run "
                                  f"still goes on, in another process{lock_holder(log_path)}: it holds "
                                  f"{log_path}. Let that run finish (or stop it) rather than run it twice")
        for path, size, digest in ((log_path, ckpt["log_bytes"], ckpt["log_sha256"]),
                                   (jsonl_path, ckpt["jsonl_bytes"], ckpt["jsonl_sha256"])):
            if size is not None:
                check_continued(ckpt_path, path, size, digest)
        with open(log_path, "rb") as f:
            text = f.read()
        tail = text[ckpt["log_bytes"]:].decode(errors="replace").splitlines()
        marked = [line if EVENT_LINE.match(line) else "lost: " + line for line in tail]
        lost = sum(not EVENT_LINE.match(line) for line in tail)
        if tail:
            head = text[:ckpt["log_bytes"]]
            write_atomic(log_path, lambda f: f.write(head + "".join(m + "\n" for m in marked).encode()))
        log = open(log_path, "a")
        fcntl.flock(log, fcntl.LOCK_EX)  # the claim, held until this run exits
    jsonl = None
    if ckpt["jsonl_bytes"] is not None:
        os.truncate(jsonl_path, ckpt["jsonl_bytes"])
        jsonl = open(jsonl_path, "a")
    return record_dir, log_path, log, jsonl, lost


def check_continued(ckpt_path, path, size, digest):
    """CheckpointError unless the file at `path` (the log or diagnostics file beside the
    checkpoint) starts with what it held when the checkpoint was written: `size` bytes of sha256
    `digest`."""
    name, folder = os.path.basename(path), os.path.dirname(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume {ckpt_path}: its run's {name} is not beside it in {folder}; "
                              "a resumed run continues the files beside its checkpoint: keep the record "
                              "folder together (put the file back, or resume the checkpoint where it is)")
    held = os.path.getsize(path)
    if held < size:
        raise CheckpointError(f"--resume {ckpt_path}: {path} holds {held:,} bytes, fewer than the "
                              f"{size:,} it had when the checkpoint was written: not the file of this "
                              "checkpoint's run, or cut short")
    if file_digest(path, size) != digest:
        raise CheckpointError(f"--resume {ckpt_path}: the first {size:,} bytes of {path} differ from "
                              "what it held when the checkpoint was written (edited since?): a resumed "
                              "run continues it from there. Restore that file as it was, or start the "
                              "run again without --resume")


def resumed_line(hp, ctx, ckpt, lost):
    """The log's line where a resumed run starts (no new `trial:` line: the trial goes on)."""
    torch_note = f" (checkpoint: {ckpt['torch']})" if ckpt["torch"] != torch.__version__ else ""
    lost_note = (f"; {lost} line(s) the interrupted run wrote after the checkpoint are marked "
                 "'lost:' and redone below" if lost else "")
    return (f"resumed: from {os.path.abspath(hp.resume)} at step {ckpt['step']}, trial {ckpt['trial']} "
            f"(seed {ckpt['seed']}): world_size {ctx.world} (checkpoint: {ckpt['world_size']}), torch "
            f"{torch.__version__}{torch_note}{lost_note}")


# --- the harness: what the training loop calls ---------------------------------------------------


class Harness:
    """One run's harness (every trial of the process), train_gpt.py's Driver; see the module's
    docstring for the calls."""
    BAD_INPUT = (DataError, ValueError, FileExistsError)  # exit status 2, before anything is written
    STOPPED = (FloatingPointError, Interrupted)  # a NaN/inf, or killed: stop, keep the log

    def __init__(self, hp, ctx, log):
        self.hp, self.ctx, self.log = hp, ctx, log
        self.code = self.record_dir = self.jsonl = self.checkpoint = self.resume = None
        self.train_files, self.finals, self.start = [], [], 0
        self.stop = StopRequest()
        # the handlers before ours come back at close(): a caller of train_gpt.main() (a test, a
        # notebook) gets its own SIGTERM/SIGINT behaviour back when the run is over
        self.previous = {s: signal.signal(s, self.stop) for s in (signal.SIGTERM, signal.SIGINT)}

    def check_data(self, hp):
        """Every shard the run will read, before anything is read or written: the sets (train and
        val), enough train tokens, every train token id below the vocabulary."""
        self.train_files = shards_needed(find_shards(hp.data_dir, "train"), hp.batch_tokens, hp.train_steps,
                                         f"train data in {hp.data_dir}")
        for f in self.train_files:
            read_shard_tokens(f, hp.vocab_size)
        find_shards(hp.data_dir, "val")

    def open(self, hp, setup):
        """Before the first trial, after the data was checked: with --resume, read and check the
        checkpoint, and reopen its log; else open the record folder and write the log's code part
        (code_part) and header (`setup`: the trainer's line of what it uses, then inert_notes).
        Nothing is written before every check passed; every rank gets the seed rank 0 drew.
        Returns hp with that seed."""
        ctx, log, train_files = self.ctx, self.log, self.train_files
        code = self.code = code_part(hp)
        setup = setup_lines(hp, setup)
        if hp.stop_below is not None and campaign_tools() is None:
            raise ValueError("--stop-below needs the records toolkit (tools/campaign.py) beside "
                             f"{os.path.join(HARNESS_ROOT, 'harness.py')}: run from a checkout")
        if hp.resume:  # every rank reads and checks it (same file, same verdict): nothing written yet
            self.resume = load_checkpoint(hp.resume)
            hp = check_resume(self.resume, hp, ctx, train_files, code)
            self.finals = list(self.resume["finals"])
        failure = None
        if ctx.rank == 0:
            try:
                if self.resume:
                    self.record_dir, log_path, log.file, self.jsonl, lost = reopen_record(hp.resume, self.resume)
                    log(resumed_line(hp, ctx, self.resume, lost))
                else:
                    drawn = hp.seed is None

                    def start_log(f, hp):  # under the records folder's lock: the header's seeds are taken
                        log.file = f
                        f.write(code + SEPARATOR + "\n")
                        for line in environment_lines(hp, ctx, setup, drawn) + [SEPARATOR, f"log: {f.name}"]:
                            log(line)
                        if hp.diagnostics:  # one JSON object per (step, layer), next to the log
                            self.jsonl = open(os.path.splitext(f.name)[0] + ".jsonl", "x")
                            log(f"diagnostics file: {self.jsonl.name}")
                    self.record_dir, log_path, log.file, hp = open_record(hp, start_log)
                self.checkpoint = os.path.splitext(log_path)[0] + ".ckpt"
            except (ValueError, FileExistsError) as e:
                failure = e
                if self.jsonl:  # begun, then removed with the log (open_record)
                    self.jsonl.close()
                log.file = self.jsonl = None
        if ctx.world > 1:  # every rank uses the seed rank 0 drew or checked for this folder, or stops
            shared = [hp.seed, None if failure is None else str(failure)]
            dist.broadcast_object_list(shared, 0)
            hp = dataclasses.replace(hp, seed=shared[0])
            failure = failure or (shared[1] and ValueError(f"rank 0: {shared[1]}"))
        if failure:
            raise failure
        self.hp = hp
        self.stop.defer = hp.save_every > 0  # a signal now: save, then stop
        return hp

    @property
    def first_trial(self):
        return self.resume["trial"] if self.resume else 0

    def resumes(self, trial):
        """Does `trial` continue the checkpoint being resumed (its weights come from it)?"""
        return self.resume is not None and self.resume["trial"] == trial

    def trial_started(self, run):
        """The step `run`'s trial starts at: 0, or, resuming, the checkpoint's, with the trial's
        state put back where the checkpoint left it: weights, optimizer states (each rank keeps
        its share of Aurora's), data position, random generators (the next trial's initialization
        draws from them), clock, diagnostics' initial rows, the techniques' state (the lineage's
        EMA-Nesterov state and reference weights). First the diagnostics' probe of the trial."""
        hp, ctx = self.hp, run.ctx
        tokens = run.val[0][:hp.diag_tokens // hp.seq_len * hp.seq_len].view(-1, hp.seq_len) if ctx.rank == 0 else None
        leverage = LeverageProbe(run.optimizers[1]) if hp.diagnostics else None
        self.health = NeuronHealth(run.model, leverage, tokens, hp, ctx, self.jsonl)
        ckpt, self.resume = self.resume, None  # (the checkpoint's memory goes with the trial)
        if ckpt is None:
            self.start = 0
            return 0
        adam, aurora = run.optimizers
        run.model.load_state_dict(ckpt["model"])
        adam.load_state_dict(ckpt["adam"])
        load_aurora_state_dict(aurora, ckpt["aurora"])
        run.train_loader.reset(**ckpt["loader"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if run.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], run.ctx.device)
        clock = ckpt["clock"]
        run.clock.total, run.clock.last_val_time, run.clock.last_val_step = (
            clock["total"], clock["last_val_time"], clock["last_val_step"])
        if self.health.enabled and run.ctx.rank == 0:
            self.health.fc_init = [t.to(run.ctx.device) for t in ckpt["fc_init"]]
        for t in run.techniques:
            if hasattr(t, "load_checkpoint_state"):
                t.load_checkpoint_state(run, ckpt["techniques"][t.name])
        run.step = aurora.step_index = self.start = ckpt["step"]  # Aurora names a non-finite update by its step
        return self.start

    def step_ended(self, run, step):
        """Between the validation of `step` and the next training step: with --save-every, write a
        checkpoint every save_every steps (not at the step the trial started or resumed at:
        nothing new), and when a signal asked to stop, save, then raise Interrupted. Every rank
        takes the same decisions. Then the diagnostics' probe learns whether the next step's
        update is the one a validation reports."""
        if self.hp.save_every:
            stop = self.stop_requested()
            if stop or (step % self.hp.save_every == 0 and step != self.start):
                self.save_checkpoint(run)
            if stop:
                raise Interrupted(stop)
        self.health.before_step(trainer().is_val_step(step + 1, run.hp))

    def validated(self, run, step):
        """After the validation of `step`: the diagnostics (a collective)."""
        self.health.report(run.trial, step, self.log)

    def trial_ended(self, val_loss):
        """A trial is complete: its final loss, and with --trials N > 1 the campaign's line (rank 0
        reads the log). Returns False when --stop-below stops the campaign here (every rank takes
        rank 0's decision): the trials run so far end the run, complete and counted."""
        self.finals.append(val_loss)
        stop = campaign_report(self.log, self.hp) if self.hp.trials > 1 and self.ctx.rank == 0 else None
        if self.ctx.world > 1 and self.hp.stop_below is not None:
            shared = [stop]
            dist.broadcast_object_list(shared, 0)
            stop = shared[0]
        return stop is None

    def run_ended(self):
        """Every trial done: the final losses, no checkpoint left, the record's summary. The run is
        complete: a signal now is noted, not raised (the log must not say `interrupted:`)."""
        self.stop.defer = True
        if self.ctx.rank == 0:
            self.log(f"final val losses: {' '.join(f'{v:.5f}' for v in self.finals)}")
            self.remove_checkpoint()
            refresh_summary(self.record_dir, self.log)
        if self.ctx.world > 1:
            dist.barrier()  # leave together: a gloo rank that exits while a peer still talks can abort

    def stopped(self, e, run):
        """A NaN/inf (FloatingPointError) or a signal (Interrupted) stopped training: say where, in
        the log too, keeping the log. Returns the exit status."""
        log = self.log
        trial = f"trial {run.trial} (seed {self.hp.seed + run.trial})" if run else "setup"
        if isinstance(e, Interrupted):  # a line the records toolkit reads: this trial is incomplete
            log(f"interrupted: {e} at step {run.step if run else 0}, {trial}", error=True)
        else:
            log(f"failed: {trial}: {e}", error=True)
        kept = f"; the log so far is kept in {log.file.name}" if log.file else ""
        if isinstance(e, Interrupted) and run and self.checkpoint and os.path.exists(self.checkpoint):
            kept += f"; continue with the same flags and --resume {self.checkpoint}"
        log(f"error: {trial}: {e}. Training stopped{kept}", error=True)
        # a signal's exit status is 128 + its number, as a shell reports it: SIGTERM 143, SIGINT 130
        return 128 + signal.Signals[str(e)] if isinstance(e, Interrupted) else 1

    def close(self):
        if self.log.file:
            self.log.file.close()
        if self.jsonl:
            self.jsonl.close()
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    # checkpoints

    def stop_requested(self):
        """The signal that asks this run to stop, or None. Any rank's counts: all ranks must stop
        at the same step, so with several ranks this is a one-number all-reduce per step (only
        when checkpointing)."""
        signum = self.stop.signum or 0
        if self.ctx.world > 1:
            flag = torch.tensor([signum], device=self.ctx.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signal.Signals(signum).name if signum else None

    def save_checkpoint(self, run):
        """Write the running trial's state at run.step (clock paused). Every rank takes part
        (Aurora's momentum is gathered); rank 0 writes. A failed write is reported and training
        goes on: the previous checkpoint is still whole."""
        hp, ctx, log = self.hp, self.ctx, self.log
        run.clock.stop()
        started = time.perf_counter()
        adam, aurora = run.optimizers
        trainer().log_train_losses(run)  # train losses in the log before the checkpoint (a resumed
        trainer().check_updates(aurora)  # run does not redo them), and never a non-finite state saved
        aurora_state = aurora_state_dict(aurora)  # collective
        if ctx.rank == 0:
            state = dict(
                format=CHECKPOINT_FORMAT, config=resume_config(hp, ctx, self.train_files),
                code=self.code, trial=run.trial, seed=hp.seed + run.trial, step=run.step,
                finals=list(self.finals), world_size=ctx.world, torch=str(torch.__version__),
                model=run.model.state_dict(), adam=adam.state_dict(), aurora=aurora_state,
                loader=dict(shard=run.train_loader.shard, pos=run.train_loader.pos),
                rng=dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(ctx.device)
                         if ctx.device.type == "cuda" else None),
                clock=dict(total=run.clock.total, last_val_time=run.clock.last_val_time,
                           last_val_step=run.clock.last_val_step),
                fc_init=self.health.fc_init if hp.diagnostics else None,
                techniques={t.name: t.checkpoint_state(run) for t in run.techniques  # e.g. the lineage's
                            if hasattr(t, "checkpoint_state")},  # EMA-Nesterov, its reference weights
                # how far the log and the diagnostics file were written: a resumed run redoes the rest
                log=os.path.abspath(log.file.name))
            for name, f in (("log", log.file), ("jsonl", self.jsonl)):  # and what they held then
                size = os.fstat(f.fileno()).st_size if f else None
                state.update({f"{name}_bytes": size, f"{name}_sha256": file_digest(f.name, size) if f else None})
            try:
                write_atomic(self.checkpoint, lambda f: torch.save(state, f))
                log(f"checkpoint: step {run.step} of trial {run.trial} saved to {self.checkpoint} "
                    f"({os.path.getsize(self.checkpoint) / 1e6:.1f} MB in {time.perf_counter() - started:.2f}s)")
            except (OSError, RuntimeError) as e:  # write_atomic removed the partial temporary file
                log(f"checkpoint not written: step {run.step} of trial {run.trial}: {write_failure(e)}; "
                    "training goes on, the previous checkpoint (if any) is whole", error=True)
        run.clock.start()

    def remove_checkpoint(self):
        """A complete run needs no checkpoint (the model's final weights are not what a record
        keeps), nor the temporary file of a write that a kill cut short."""
        if self.checkpoint and os.path.exists(self.checkpoint + ".tmp"):
            os.remove(self.checkpoint + ".tmp")
        if self.checkpoint and os.path.exists(self.checkpoint):
            os.remove(self.checkpoint)
            self.log(f"checkpoint: removed {self.checkpoint}: the run is complete")
