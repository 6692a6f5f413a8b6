"""Train a 124M-parameter GPT on FineWeb with the Aurora optimizer (modded-nanoGPT optimization track).

The default configuration is the published Aurora record (validation loss <= 3.28 in 3175 steps,
20 trials on 8xH100): the same model, initialization calls, data order, optimizer rule and
schedule. Each trial has an integer seed, logged: `--seed S` gives trial i the seed S + i; without
it the process draws S from the OS entropy (the record seeded nothing: its initializations cannot
be reproduced), and `--seed <a trial's seed> --trials 1` runs that trial again. Read top to bottom: hyperparameters, data, model, optimizers, setup, training.

    torchrun --standalone --nproc_per_node=8 train_gpt.py          # the record (or ./run.sh)
    python train_gpt.py --preset tiny                              # CPU smoke run on synthetic data
    python train_gpt.py --help                                     # every hyperparameter as a flag

Each run writes one log, records/<date>_<run-name>/<uuid>.txt. Its code part (everything before
the first line of 100 '=') is this file with the local modules it imports inlined: a script that
runs on its own. Then come the environment, every hyperparameter, and the run's output.

With --save-every N the running trial's state is kept in <uuid>.ckpt beside the log (every N steps
and on SIGTERM); the same command with --resume <uuid>.ckpt continues it, bit for bit, in that log.
"""
import argparse
import dataclasses
import datetime
import fcntl
import glob
import json
import math
import os
import pickle
import platform
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from aurora import Aurora, ns_dtype_for
from data.shards import DataError, read_shard_header, read_shard_tokens
from diagnostics import NeuronHealth

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
    # schedule
    train_steps: int = hparam(3200, "optimizer steps; the lr schedule and validation cadence scale with it")
    cooldown_frac: float = hparam(0.7, "lr x1 for the first 1 - cooldown_frac of steps, then linear to 0")
    val_every: int = hparam(125, "validation cadence")
    val_every_late: int = hparam(25, "validation cadence once step/train_steps >= late_frac")
    late_frac: float = hparam(0.9, "where the late cadence starts")
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
    pp_iterations: int = hparam(2, "aurora_polar's D iterations (1 = row-normalize, then polar)")
    pp_beta: float = hparam(0.5, "exponent of aurora_polar's D update, in (0, 1]")
    contra: float = hparam(0.4, "Contra-Muon strength (subtracts contra/2 of the spectral-normalized momentum)")
    uw_floor: float = hparam(0.35, "smallest update/weight Frobenius ratio")
    weight_decay: float = hparam(0.0, "decoupled weight decay of the matrices")
    aurora_on: str = hparam("nonsquare", "matrices that get aurora_polar: nonsquare (record) or tall")
    ns_iteration: str = hparam("quintic12", "Newton-Schulz: quintic12 (record) or cans12 (float32 cubic)")
    ns_dtype: str = hparam("auto", "Newton-Schulz dtype: auto = bfloat16 on CUDA (record), float32 on CPU")
    aurora_batched: bool = hparam(False, "stack same-shape matrices (fast path; same rule up to rounding)")
    # neuron-health diagnostics at validation steps (diagnostics.py)
    diagnostics: bool = hparam(True, "measure dead/starved/frozen MLP neurons at validation steps")
    diag_tokens: int = hparam(64 * 1024, "rank 0's first validation tokens used for `dead`")
    dead_threshold: float = hparam(0.001, "dead: positive pre-activation on < this fraction of tokens")
    starved_threshold: float = hparam(0.1, "starved: row leverage < this fraction of uniform")
    frozen_threshold: float = hparam(0.1, "frozen: moved < this fraction of the median row movement")
    # run
    preset: str = hparam("record", "record (default), tiny (CPU smoke run), small (124M, quarter batch)")
    seed: int = hparam(None, "seed of trial 0 (trial i: seed+i); default: drawn from the OS entropy "
                             "and logged (rerun a trial with --seed <its seed> --trials 1)")
    trials: int = hparam(1, "independent trials in this process, each re-initialized")
    compile: str = hparam("auto", "torch.compile the model and Aurora's per-matrix step: auto (on with CUDA), on, off")
    allow_cpu: bool = hparam(False, "let the record or small preset run without CUDA (slow: hours to days)")
    run_name: str = hparam(None, "record folder records/<date>_<run_name>/ (default <rule>_<preset>)")
    records_dir: str = hparam(os.path.join(ROOT, "records"), "parent of the record folders")
    append: bool = hparam(False, "add this run to an existing record folder of the same configuration")
    val_loss_target: float = hparam(3.28, "target of the record summary")
    save_every: int = hparam(0, "write a checkpoint of the running trial every N steps and on SIGTERM, "
                                "beside the log (<uuid>.ckpt); 0 = off (the record)")
    resume: str = hparam(None, "continue the run of this checkpoint (same flags and code): appends "
                               "to its log, then finishes its trials")


CHOICES = dict(rule=("aurora", "muon", "normuon"), aurora_on=("nonsquare", "tall"),
               ns_iteration=("quintic12", "cans12"), ns_dtype=("auto", "bfloat16", "float32"),
               compile=("auto", "on", "off"), preset=("record", "tiny", "small"))
# Hyperparameters that may differ between the logs of one record folder.
PER_RUN = ("seed", "trials", "data_dir", "records_dir", "run_name", "append", "allow_cpu",
           "save_every", "resume")

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


def check_hyperparameters(hp):
    """Every range and choice, in one place; raises ValueError naming the flag."""
    def bad(name, why):
        raise ValueError(f"--{name.replace('_', '-')} {why}, got {getattr(hp, name)!r}")
    for name, allowed in CHOICES.items():
        if getattr(hp, name) not in allowed:
            bad(name, f"must be one of {', '.join(allowed)}")
    for name in ("batch_tokens", "seq_len", "micro_batch_seqs", "val_tokens", "vocab_size", "n_layer",
                 "d_model", "head_dim", "mlp_ratio", "train_steps", "val_every", "val_every_late",
                 "pp_iterations", "trials", "diag_tokens"):
        if getattr(hp, name) < 1:
            bad(name, "must be >= 1")
    if not 0 < hp.pp_beta <= 1:
        bad("pp_beta", "must be in (0, 1]")
    if not 0 < hp.momentum < 1:
        bad("momentum", "must be in (0, 1)")
    for name in ("lr_embed", "lr_head", "lr_scalar", "lr_matrix"):
        if not getattr(hp, name) > 0:
            bad(name, "must be > 0")
    for name in ("contra", "uw_floor", "weight_decay"):
        if getattr(hp, name) < 0:
            bad(name, "must be >= 0")
    if not 0 <= hp.cooldown_frac <= 1:
        bad("cooldown_frac", "must be in [0, 1]")
    if hp.d_model % hp.head_dim or hp.head_dim % 4:
        raise ValueError(f"--d-model ({hp.d_model}) must be a multiple of --head-dim ({hp.head_dim}), "
                         "itself a multiple of 4 (rotary)")
    if hp.val_tokens % hp.batch_tokens:
        raise ValueError(f"--val-tokens ({hp.val_tokens:,}) must be a multiple of the batch "
                         f"({hp.batch_tokens:,} tokens)")
    if hp.seed is not None and not 0 <= hp.seed <= 2**63 - hp.trials:
        bad("seed", "must be in [0, 2^63 - trials] (torch.manual_seed's range)")
    if hp.save_every < 0:
        bad("save_every", "must be >= 0 (0: no checkpoints)")
    if hp.run_name is not None and (not hp.run_name or "/" in hp.run_name or hp.run_name.startswith(".")):
        bad("run_name", "must be a plain folder name")


def check_hardware(hp, cuda):
    """The record and small presets are GPU runs: refuse to start them on a CPU by accident."""
    if hp.preset in ("record", "small") and not cuda and not hp.allow_cpu:
        raise ValueError(
            f"the {hp.preset} preset trains the 124M model and needs CUDA GPUs, and none is "
            "available: on a CPU it would take days (or run out of memory). Use --preset tiny for "
            "a CPU smoke run, or pass --allow-cpu to start it anyway")


def parse_args(argv=None):
    """(hyperparameters, dry_run) from the command line: one flag per Hyperparameters field."""
    ap = argparse.ArgumentParser(allow_abbrev=False,  # run.sh must see the same flag names
                                 description="Train GPT with Aurora (default: the 3175-step record). "
                                 "Defaults are the record's (or the chosen preset's).")
    ap.add_argument("--dry-run", action="store_true", help="check the flags and the configuration "
                    "(world size from $WORLD_SIZE, default 1) and exit; touches no data or records")
    for f in dataclasses.fields(Hyperparameters):
        flag = "--" + f.name.replace("_", "-")
        kw = dict(default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default {f.default})")
        if f.type is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.type is tuple:
            ap.add_argument(flag, type=float, nargs=len(f.default), **kw)
        else:
            ap.add_argument(flag, type=f.type, choices=CHOICES.get(f.name), **kw)
    args = vars(ap.parse_args(argv))
    dry_run = args.pop("dry_run")
    if "adam_betas" in args:
        args["adam_betas"] = tuple(args["adam_betas"])
    preset = args.get("preset", "record")
    hp = Hyperparameters(**{**PRESETS.get(preset, {}), **args})
    try:
        check_hyperparameters(hp)
    except ValueError as e:
        ap.error(str(e))
    return hp, dry_run


# =================================================================================================
# Data: FineWeb shards (data/shards.py has the format) and the per-rank loaders
# =================================================================================================


def find_shards(data_dir, split):
    files = sorted(glob.glob(os.path.join(glob.escape(data_dir), f"fineweb_{split}_*.bin")))
    if not files:
        raise DataError(
            f"no {split} shards (fineweb_{split}_*.bin) in {data_dir}. Download FineWeb with "
            "`python data/cached_fineweb10B.py` or write synthetic shards with "
            f"`python data/synthetic.py --out {data_dir}`")
    return files


def batches_per_shard(n_tokens, batch):
    """How many global batches the loader reads from a shard before skipping its tail."""
    if n_tokens < batch + 1:
        return 0
    count, pos = 1, batch
    while pos + batch + 1 < n_tokens:
        count, pos = count + 1, pos + batch
    return count


def shards_needed(files, batch, steps, what):
    """The train shards `steps` batches read; fails before training, not hours in, if too few."""
    sizes, total = [], 0
    for f in files:
        sizes.append(read_shard_header(f))
        total += batches_per_shard(sizes[-1], batch)
        if total >= steps:
            return files[:len(sizes)]
    typical = max(batches_per_shard(n, batch) for n in sizes) or 1
    missing = math.ceil((steps - total) / typical)
    raise DataError(
        f"{what}: {len(files)} shard(s) hold {sum(sizes):,} tokens = {total} batches of "
        f"{batch:,} tokens, but {steps} are needed (about {missing} more shard(s) of this size). "
        "Download more with `python data/cached_fineweb10B.py N` (N = number of train shards) "
        "or generate more synthetic ones")


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
    def __init__(self, dim):
        super().__init__()
        self.gains = nn.Parameter(torch.ones(dim))

    def forward(self, x):
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
        self.norm1, self.norm2 = RMSNorm(hp.d_model), RMSNorm(hp.d_model)

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
        self.norm1, self.norm2 = RMSNorm(hp.d_model), RMSNorm(hp.d_model)

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
                    batched=hp.aurora_batched, compile={"on": True, "off": False}.get(hp.compile, "auto"))
    assigned = sum(len(g["params"]) for opt in (adam, aurora) for g in opt.param_groups)
    assert assigned == len(list(model.parameters())), "every parameter must have one optimizer"
    for opt in (adam, aurora):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return adam, aurora


def lr_multiplier(step, hp):
    """1 for the first (1 - cooldown_frac) of training, then linear decay to 0."""
    frac = step / hp.train_steps
    return 1.0 if frac < 1 - hp.cooldown_frac else (1 - frac) / hp.cooldown_frac


def is_val_step(step, hp):
    if step == hp.train_steps:
        return True
    every = hp.val_every if step / hp.train_steps < hp.late_frac else hp.val_every_late
    return step % every == 0


# =================================================================================================
# Setup: distributed context, record folder, log
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


def check_setup(hp, world):
    """What --dry-run checks, and every rank before it starts: the batch split and the hardware."""
    check_hardware(hp, torch.cuda.is_available())
    return micro_batch_plan(hp, world)


def setup_distributed(hp):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (multi-node too); plain `python` is one process."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    micro, accum = check_setup(hp, world)  # before any process group: fail fast on every rank
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
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


class Logger:
    """Rank 0 writes to stdout and the log file; errors go to stderr (every rank) and the log."""

    def __init__(self, rank):
        self.rank, self.file = rank, None

    def __call__(self, msg, error=False):
        if error or self.rank == 0:
            print(msg, file=sys.stderr if error else sys.stdout, flush=True)
        if self.file:
            self.file.write(msg + "\n")
            self.file.flush()


LOCAL_IMPORT = re.compile(r"^from (aurora|data\.shards|diagnostics) import .*$", re.M)


def runnable_source():
    """This file with each local module it imports inlined in place of the import line: the
    benchmark wants all code a run used in its log, as one script that runs on its own. (A script
    cut from a log has nothing left to inline, so its own logs carry it byte for byte.)"""
    with open(os.path.abspath(__file__)) as f:
        source = f.read()

    def inline(match):
        path = os.path.join(ROOT, *match.group(1).split(".")) + ".py"
        with open(path) as f:
            module = f.read().rstrip("\n")
        name = os.path.relpath(path, ROOT)
        return f"# {'-' * 40} {name} (inlined) {'-' * 40}\n{module}\n# {'-' * 40} end of {name} {'-' * 40}"
    return LOCAL_IMPORT.sub(inline, source)


def record_config(hp):
    """The hyperparameters every log of one record folder must share, as the log prints them."""
    return {k: json.dumps(v) for k, v in dataclasses.asdict(hp).items() if k not in PER_RUN}


def header_config(log_path):
    """The `name: value` hyperparameter lines of an existing log's header."""
    with open(log_path, errors="replace") as f:
        text = f.read()
    sections = text.split("\n" + "=" * 100 + "\n")
    header = sections[1] if len(sections) > 2 else ""
    fields = {f.name for f in dataclasses.fields(Hyperparameters)} - set(PER_RUN)
    return {k: v for k, v in (line.split(": ", 1) for line in header.splitlines() if ": " in line)
            if k in fields}


SEED_LINE = re.compile(r"^trial:\d+ seed:(\S+)", re.M)


def seeds_in(record_dir):
    """Seeds (as logged: strings) of every trial already in a record folder."""
    seeds = set()
    for log in glob.glob(os.path.join(glob.escape(record_dir), "*.txt")):
        with open(log, errors="replace") as f:
            seeds |= set(SEED_LINE.findall(f.read().split("=" * 100, 1)[-1]))
    return seeds


# Seeds drawn from the OS entropy lie in [0, 2^32): short to type, and S + trials stays far inside
# torch.manual_seed's range.
DRAWN_SEEDS = 2 ** 32


def draw_seed():
    return secrets.randbelow(DRAWN_SEEDS)


def trial_seeds(hp):
    return [hp.seed + t for t in range(hp.trials)]


def open_record(hp):
    """Find or create the record folder and open a new <uuid>.txt in it, under a lock so that two
    runs started together cannot both create or join a folder with different configurations.
    Refuses (ValueError/FileExistsError) without writing anything; never touches an older log.
    Without --seed (hp.seed None) the seed is drawn here, from the OS entropy. Returns (folder,
    log path, open log file, hp with the seed actually used)."""
    drawn = hp.seed is None
    if drawn:
        hp = dataclasses.replace(hp, seed=draw_seed())
    run_name = hp.run_name or f"{hp.rule}_{hp.preset}"
    os.makedirs(hp.records_dir, exist_ok=True)
    with open(os.path.join(hp.records_dir, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        record_dir = os.path.join(hp.records_dir, f"{today}_{run_name}")
        earlier = sorted(glob.glob(os.path.join(glob.escape(hp.records_dir), f"*_{glob.escape(run_name)}")))
        if hp.append and earlier and not os.path.exists(record_dir):
            record_dir = earlier[-1]  # --append after midnight joins the run's latest folder
        logs = sorted(glob.glob(os.path.join(glob.escape(record_dir), "*.txt")))
        if logs and not hp.append:
            raise FileExistsError(f"{record_dir} already holds {len(logs)} log(s). Pass --append to "
                                  "add this run to that record (same configuration, more seeds), "
                                  "or choose another --run-name")
        config_path = os.path.join(record_dir, "config.json")
        if logs:
            if os.path.exists(config_path):
                with open(config_path) as f:
                    old = {k: json.dumps(v) for k, v in json.load(f).items()}
            else:  # never take the configuration from the newcomer
                old = header_config(logs[0])
            new = record_config(hp)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff:
                raise ValueError(f"--append: this run's configuration differs from the record in "
                                 f"{record_dir}: " + ", ".join(f"{k} {old.get(k)} -> {new.get(k)}"
                                                                for k in diff) + "; use another --run-name")
            hp = choose_seeds(hp, seeds_in(record_dir), drawn)
        os.makedirs(record_dir, exist_ok=True)
        if not os.path.exists(config_path):
            with open(config_path, "w") as f:
                json.dump({k: json.loads(v) for k, v in record_config(hp).items()}, f, indent=2)
            os.chmod(config_path, 0o644)
        log_path = os.path.join(record_dir, f"{uuid.uuid4()}.txt")
        return record_dir, log_path, open(log_path, "x"), hp  # "x": fail rather than overwrite


def choose_seeds(hp, taken, drawn):
    """A trial seed already in the folder (`taken`: as logged) is refused when it was given with
    --seed; a drawn one is drawn again."""
    while True:
        clash = sorted(s for s in trial_seeds(hp) if str(s) in taken)
        if not clash:
            return hp
        if not drawn:
            raise ValueError(f"--append: seed(s) {clash} already in this record; choose another "
                             "--seed, or leave it out to draw one")
        hp = dataclasses.replace(hp, seed=draw_seed())


def environment_lines(hp, ctx, drawn=False):
    lines = [f"python {platform.python_version()}  torch {torch.__version__}  "
             f"cuda {torch.version.cuda}  platform {platform.platform()}"]
    if ctx.device.type == "cuda":
        lines.append(f"device {torch.cuda.get_device_name(ctx.device)}  world_size {ctx.world}")
    else:
        lines.append(f"device cpu ({platform.processor() or platform.machine()}, "
                     f"{torch.get_num_threads()} threads)  world_size {ctx.world}")
    try:
        git = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=5)
        commit = git.stdout.strip() if git.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    lines.append(f"git_commit {commit}")
    lines.append(f"micro_batch_seqs_used {ctx.micro}  grad_accum_steps {ctx.accum}  "
                 f"ns_dtype_used {str(ns_dtype_for(hp.ns_dtype, ctx.device)).removeprefix('torch.')}  "
                 f"activations {str(activation_dtype(ctx)).removeprefix('torch.')}  "
                 f"compile_used {use_compile(hp, ctx)}")
    lines.append(f"seeds {trial_seeds(hp)}" + (" (drawn from the OS entropy; run trial i again with "
                                               "--seed <its seed> --trials 1)" if drawn else ""))
    lines += [f"{k}: {json.dumps(v)}" for k, v in dataclasses.asdict(hp).items()]
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=10).stdout
        lines += smi.rstrip().splitlines() if smi else []
    except (OSError, subprocess.SubprocessError):
        pass
    return lines


def activation_dtype(ctx):
    return torch.bfloat16 if ctx.device.type == "cuda" else torch.float32  # CPU: fp32 is faster


def use_compile(hp, ctx):
    return hp.compile == "on" or (hp.compile == "auto" and ctx.device.type == "cuda")


# =================================================================================================
# Training
# =================================================================================================


@dataclasses.dataclass
class Run:
    """What every trial of this process shares."""
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
    finals: list = dataclasses.field(default_factory=list)  # final val loss of each trial so far
    # Checkpoints (--save-every, --resume): the code the log holds, where rank 0 writes them, the
    # signal handler, the checkpoint to continue (until its trial has taken it), and the running
    # trial's (adam, aurora), diagnostics probe, clock and unread train losses.
    code: str = None
    checkpoint: str = None
    stop: object = None
    resume: dict = None
    optimizers: tuple = None
    probe: object = None
    clock: object = None
    losses: object = None


class Clock:
    """Training time with validation excluded. It stops and starts where the record's does: at a
    dist.barrier() when distributed (with NCCL the barrier returns once the GPU work queued before
    it is done), at torch.cuda.synchronize() on one GPU. Nothing between a start and a stop waits
    for the device: elapsed() is host time, the record's approx_training_time."""

    def __init__(self, ctx):
        self.ctx, self.total, self.started = ctx, 0.0, None
        self.last_val_time, self.last_val_step = 0.0, 0

    def _sync(self):
        if self.ctx.world > 1:
            dist.barrier()
        elif self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)

    def start(self):
        self._sync()
        self.started = time.perf_counter()

    def stop(self):
        self._sync()
        self.total += time.perf_counter() - self.started
        self.started = None

    def elapsed(self):
        return self.total + (time.perf_counter() - self.started if self.started else 0.0)

    def val_fields(self, step):
        """train_time and step_avg (mean step time since the previous validation) of a val line."""
        steps = step - self.last_val_step
        avg = 1000 * (self.total - self.last_val_time) / steps if steps else float("nan")
        self.last_val_time, self.last_val_step = self.total, step
        return f"train_time:{self.total:.3f}s step_avg:{avg:.2f}ms"


class TrainLosses:
    """Each step's train loss, read without stalling the device. The step's summed loss (already
    all-reduced) is copied with non_blocking=True into a host buffer (pinned on CUDA, where an
    event marks the copy's arrival) and read one step later, when the device is past it, or with
    the clock stopped. Two buffers: a step's copy never overwrites the unread loss before it."""

    def __init__(self, device):
        cuda = device.type == "cuda"
        self.buffers = [torch.zeros((), dtype=torch.float32, pin_memory=cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.pending = []  # (buffer, step, train time after the step), oldest first

    def put(self, loss, step, elapsed):
        i = step % 2
        assert all(j != i for j, _, _ in self.pending), "read the step before first"
        self.buffers[i].copy_(loss, non_blocking=True)
        if self.events[i] is not None:
            self.events[i].record()
        self.pending.append((i, step, elapsed))

    def take(self):
        """(step, summed loss, train time) of the oldest unread step; waits for its copy only."""
        i, step, elapsed = self.pending.pop(0)
        if self.events[i] is not None:
            self.events[i].synchronize()
        return step, self.buffers[i].item(), elapsed  # a host tensor: no device sync


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
    """One optimizer step, queued without waiting for the device: gradients summed over
    micro-batches and ranks (each parameter's in its own dtype, as the record), lr from the
    schedule, Adam and Aurora. Returns the step's loss summed over ranks, on the device."""
    hp, ctx, model = run.hp, run.ctx, run.model
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
    mult = lr_multiplier(step, hp)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * mult
    for opt in optimizers:
        opt.step()
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
    except FloatingPointError as e:
        first = re.search(r"at step (\d+)", str(e))
        if before is None or first is None or int(first.group(1)) < before:
            raise


def train_trial(run, trial):
    """One trial (one seed of a record): seed and re-initialize (or take the state of the
    checkpoint being resumed), then the record's loop: validate (clock paused) on schedule, stop
    after the last validation, else train one step. No host sync while the clock runs: the train
    loss is read a step late, updates are checked at validations. Checkpoints are taken between a
    step's validation and the next training step."""
    hp, ctx, log, model = run.hp, run.ctx, run.log, run.model
    run.trial, run.step = trial, 0
    ckpt, run.resume = run.resume, None
    if ckpt is None:
        torch.manual_seed(hp.seed + trial)  # then draws where the record's do: on the device
        model.init_weights(hp.init_var)
        if ctx.world > 1:  # the ranks' weights must agree whatever their generators hold
            for p in model.parameters():
                dist.broadcast(p.data, 0)
    adam, aurora = build_optimizers(model, hp, ctx.device)
    probe = NeuronHealth(model, aurora, run.val[0][:hp.diag_tokens // hp.seq_len * hp.seq_len]
                         .view(-1, hp.seq_len) if ctx.rank == 0 else None, hp, ctx, run.jsonl)
    clock = Clock(ctx)
    run.optimizers, run.probe, run.clock, run.losses = (adam, aurora), probe, clock, TrainLosses(ctx.device)
    if ckpt is None:
        run.train_loader.reset()
        log(f"trial:{trial} seed:{hp.seed + trial}")
        start = 0
    else:  # every rank reads the same checkpoint: no broadcast
        start = restore_trial(run, ckpt)
    resumed, ckpt = ckpt is not None, None  # (the checkpoint's memory goes)
    clock.start()
    for step in range(start, hp.train_steps + 1):
        run.step = step
        if is_val_step(step, hp) and not (resumed and step == start):  # that one is in the log
            clock.stop()
            log_train_losses(run)
            check_updates(aurora)
            val_loss = evaluate(run)
            log(f"step:{step}/{hp.train_steps} val_loss:{val_loss:.5f} {clock.val_fields(step)}")
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"non-finite val loss ({val_loss}) at step {step}")
            probe.report(trial, step, log)
            clock.start()
        if step == hp.train_steps:
            break
        if hp.save_every:
            checkpoint_boundary(run, step, start)
        probe.before_step(is_val_step(step + 1, hp))
        loss = train_step(run, (adam, aurora), step)
        run.losses.put(loss, step, clock.elapsed())
        log_train_losses(run, keep=1)  # the step before's: its copy has long arrived
    if ctx.device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated(ctx.device) / 2**30:.2f} GiB")
    return val_loss


def build_model(hp, ctx):
    """The model as the record builds it: default PyTorch init, then moved to the device (each
    trial re-initializes it there, from its seed)."""
    return GPT(hp, activation_dtype(ctx)).to(ctx.device)


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


# =================================================================================================
# Checkpoints (--save-every, --resume): the running trial's whole state in one file beside the log,
# written atomically by rank 0; a resumed run continues bit for bit, with any world size that splits
# the batch (Aurora's momentum is gathered from the ranks that hold it, so no file is per-rank).
# =================================================================================================

CHECKPOINT_FORMAT = "train_gpt.py checkpoint 1"
CHECKPOINT_KEYS = ("config", "code", "trial", "seed", "step", "finals", "world_size", "torch", "model",
                   "adam", "aurora", "loader", "rng", "clock", "fc_init", "log", "log_bytes", "jsonl_bytes")
# Lines of an interrupted run's log that stay as they are when a resumed run marks the lines it
# wrote after the checkpoint: they say what happened to it (or were marked by an earlier resume);
# everything else is redone.
EVENT_LINE = re.compile(r"^(checkpoint|checkpoint not written|interrupted|failed|error|resumed|lost):")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (exit status 2, before anything is written)."""


def checkpoint_boundary(run, step, start):
    """Between the validation of `step` and the next training step: write a checkpoint every
    save_every steps (not at the step the trial started or resumed at: nothing new), and when a
    signal asked to stop, save, then raise Interrupted. Every rank takes the same decisions."""
    stop = stop_requested(run)
    if stop or (step % run.hp.save_every == 0 and step != start):
        save_checkpoint(run)
    if stop:
        raise Interrupted(stop)


def stop_requested(run):
    """The signal that asks this run to stop, or None. Any rank's counts: all ranks must stop at
    the same step, so with several ranks this is a one-number all-reduce per step (only when
    checkpointing)."""
    signum = (run.stop.signum or 0) if run.stop else 0
    if run.ctx.world > 1:
        flag = torch.tensor([signum], device=run.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
    return signal.Signals(signum).name if signum else None


def save_checkpoint(run):
    """Write the running trial's state at run.step (clock paused). Every rank takes part (Aurora's
    momentum is gathered); rank 0 writes. A failed write is reported and training goes on: the
    previous checkpoint is still whole."""
    hp, ctx, log = run.hp, run.ctx, run.log
    run.clock.stop()
    started = time.perf_counter()
    adam, aurora = run.optimizers
    log_train_losses(run)  # in the log before the checkpoint: a resumed run does not redo them
    check_updates(aurora)  # never save a non-finite state
    aurora_state = aurora.state_dict()  # collective
    if ctx.rank == 0:
        state = dict(
            format=CHECKPOINT_FORMAT, config=resume_config(hp, ctx, run.train_loader.files),
            code=run.code, trial=run.trial, seed=hp.seed + run.trial, step=run.step,
            finals=list(run.finals), world_size=ctx.world, torch=str(torch.__version__),
            model=run.model.state_dict(), adam=adam.state_dict(), aurora=aurora_state,
            loader=dict(shard=run.train_loader.shard, pos=run.train_loader.pos),
            rng=dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(ctx.device)
                     if ctx.device.type == "cuda" else None),
            clock=dict(total=run.clock.total, last_val_time=run.clock.last_val_time,
                       last_val_step=run.clock.last_val_step),
            fc_init=run.probe.fc_init if hp.diagnostics else None,
            # how far the log and the diagnostics file were written: a resumed run redoes the rest
            log=os.path.abspath(log.file.name), log_bytes=os.fstat(log.file.fileno()).st_size,
            jsonl_bytes=os.fstat(run.jsonl.fileno()).st_size if run.jsonl else None)
        try:
            write_atomic(run.checkpoint, lambda f: torch.save(state, f))
            log(f"checkpoint: step {run.step} of trial {run.trial} saved to {run.checkpoint} "
                f"({os.path.getsize(run.checkpoint) / 1e6:.1f} MB in {time.perf_counter() - started:.2f}s)")
        except OSError as e:
            log(f"checkpoint not written: step {run.step} of trial {run.trial}: {e}; training goes "
                "on, the previous checkpoint (if any) is whole", error=True)
    run.clock.start()


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


def remove_checkpoint(run):
    """A complete run needs no checkpoint (the model's final weights are not what a record keeps),
    nor the temporary file of a write that a kill cut short."""
    if run.checkpoint and os.path.exists(run.checkpoint + ".tmp"):
        os.remove(run.checkpoint + ".tmp")
    if run.checkpoint and os.path.exists(run.checkpoint):
        os.remove(run.checkpoint)
        run.log(f"checkpoint: removed {run.checkpoint}: the run is complete")


def load_checkpoint(path):
    """The checkpoint at `path`, whole (each part's CRC32, which torch.load does not check: a
    flipped or zeroed block would load silently) and of this trainer, or CheckpointError."""
    what = (f"--resume {path}: the file is not a whole checkpoint of train_gpt.py (truncated by a copy "
            "or a full disk, or corrupt?)")
    todo = ("resume from an intact copy of the checkpoint, or start the run again without --resume "
            "(a run killed while writing a checkpoint keeps the previous one whole: <uuid>.ckpt, not "
            "<uuid>.ckpt.tmp)")
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
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or missing:
        raise CheckpointError(f"{what}: it lacks {', '.join(missing) or 'the format mark'}; {todo}")
    return ckpt


def resume_config(hp, ctx, train_files):
    """What a resumed run must share with the checkpoint's run to continue it bit for bit: the
    record's configuration, the trials (seed, count), the device type (activation and
    Newton-Schulz dtypes follow it) and the train shards (names and sizes). Not the world size."""
    config = record_config(hp)
    config.update({k: json.dumps(getattr(hp, k)) for k in ("seed", "trials")})
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


def reopen_record(ckpt_path, ckpt):
    """The log (and diagnostics file) of the checkpoint's run, reopened to append: found beside
    the checkpoint (a record folder copied or moved), else where the run wrote it. The lines the
    interrupted run wrote after the checkpoint were about steps this run redoes: each gets `lost: `
    in front (kept, but no longer read as steps or trials by the records toolkit), except its
    event lines (EVENT_LINE); the diagnostics file is cut back to the checkpoint. Checks
    everything before it writes. Returns (folder, log path, log, diagnostics file, lost lines)."""
    name = os.path.basename(ckpt["log"])
    beside = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), name)
    log_path = beside if os.path.exists(beside) else ckpt["log"]
    jsonl_path = os.path.splitext(log_path)[0] + ".jsonl"
    for path, size in ((log_path, ckpt["log_bytes"]), (jsonl_path, ckpt["jsonl_bytes"])):
        if size is None:
            continue
        if not os.path.exists(path):
            raise CheckpointError(f"--resume {ckpt_path}: its run's {os.path.basename(path)} is "
                                  f"neither beside it nor in {os.path.dirname(ckpt['log'])}; a "
                                  "resumed run continues it: keep the record folder together")
        if os.path.getsize(path) < size:
            raise CheckpointError(f"--resume {ckpt_path}: {path} holds {os.path.getsize(path):,} "
                                  f"bytes, fewer than the {size:,} it had when the checkpoint was "
                                  "written: not the file of this checkpoint's run")
    with open(log_path, "rb") as f:
        text = f.read()
    tail = text[ckpt["log_bytes"]:].decode(errors="replace").splitlines()
    marked = [line if EVENT_LINE.match(line) else "lost: " + line for line in tail]
    lost = sum(not EVENT_LINE.match(line) for line in tail)
    if tail:
        head = text[:ckpt["log_bytes"]]
        write_atomic(log_path, lambda f: f.write(head + "".join(m + "\n" for m in marked).encode()))
    jsonl = None
    if ckpt["jsonl_bytes"] is not None:
        os.truncate(jsonl_path, ckpt["jsonl_bytes"])
        jsonl = open(jsonl_path, "a")
    return os.path.dirname(log_path), log_path, open(log_path, "a"), jsonl, lost


def resumed_line(hp, ctx, ckpt, lost):
    """The log's line where a resumed run starts (no new `trial:` line: the trial goes on)."""
    torch_note = f" (checkpoint: {ckpt['torch']})" if ckpt["torch"] != torch.__version__ else ""
    lost_note = (f"; {lost} line(s) the interrupted run wrote after the checkpoint are marked "
                 "'lost:' and redone below" if lost else "")
    return (f"resumed: from {os.path.abspath(hp.resume)} at step {ckpt['step']}, trial {ckpt['trial']} "
            f"(seed {ckpt['seed']}): world_size {ctx.world} (checkpoint: {ckpt['world_size']}), torch "
            f"{torch.__version__}{torch_note}{lost_note}")


def restore_trial(run, ckpt):
    """Put the running trial where the checkpoint left it: weights, optimizer states (each rank
    keeps its share of Aurora's), data position, random generators (the next trial's
    initialization draws from them), clock, diagnostics' initial rows. Returns the step."""
    adam, aurora = run.optimizers
    run.model.load_state_dict(ckpt["model"])
    adam.load_state_dict(ckpt["adam"])
    aurora.load_state_dict(ckpt["aurora"])
    run.train_loader.reset(**ckpt["loader"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if run.ctx.device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], run.ctx.device)
    clock = ckpt["clock"]
    run.clock.total, run.clock.last_val_time, run.clock.last_val_step = (
        clock["total"], clock["last_val_time"], clock["last_val_step"])
    if run.probe.enabled and run.ctx.rank == 0:
        run.probe.fc_init = [t.to(run.ctx.device) for t in ckpt["fc_init"]]
    run.step = aurora.step_index = ckpt["step"]  # Aurora names a non-finite update by its step
    return ckpt["step"]


def prepare(hp, ctx, log):
    """Everything that can fail before the first step is checked before the record folder is
    created (so a bad input never leaves a stub log); then the log, the model and the data.
    With --resume, the checkpoint is read and checked first, and its log is reopened instead."""
    train_files = shards_needed(find_shards(hp.data_dir, "train"), hp.batch_tokens, hp.train_steps,
                                f"train data in {hp.data_dir}")
    for f in train_files:  # token ids of every shard the run will read
        read_shard_tokens(f, hp.vocab_size)
    val = load_val_tokens(find_shards(hp.data_dir, "val"), hp, ctx)
    code, ckpt = runnable_source(), None
    if hp.resume:  # every rank reads and checks it (same file, same verdict): nothing written yet
        ckpt = load_checkpoint(hp.resume)
        hp = check_resume(ckpt, hp, ctx, train_files, code)
    record_dir = jsonl = checkpoint = failure = None
    if ctx.rank == 0:
        try:
            if ckpt:
                record_dir, log_path, log.file, jsonl, lost = reopen_record(hp.resume, ckpt)
                log(resumed_line(hp, ctx, ckpt, lost))
            else:
                drawn = hp.seed is None
                record_dir, log_path, log.file, hp = open_record(hp)
                log.file.write(code + "=" * 100 + "\n")
                for line in environment_lines(hp, ctx, drawn) + ["=" * 100, f"log: {log_path}"]:
                    log(line)
                if hp.diagnostics:  # one JSON object per (step, layer), next to the log
                    jsonl = open(os.path.splitext(log_path)[0] + ".jsonl", "x")
                    log(f"diagnostics file: {jsonl.name}")
            checkpoint = os.path.splitext(log_path)[0] + ".ckpt"
        except (ValueError, FileExistsError) as e:
            failure = e
    if ctx.world > 1:  # every rank uses the seed rank 0 drew or checked for this folder, or stops
        shared = [hp.seed, None if failure is None else str(failure)]
        dist.broadcast_object_list(shared, 0)
        hp = dataclasses.replace(hp, seed=shared[0])
        failure = failure or (shared[1] and ValueError(f"rank 0: {shared[1]}"))
    if failure:
        raise failure
    model = build_model(hp, ctx)
    log(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    compiled = torch.compile(model, dynamic=False) if use_compile(hp, ctx) else model
    loader = TokenLoader(train_files, hp.batch_tokens, ctx, hp.vocab_size)
    return Run(hp, ctx, log, model, compiled, loader, val, jsonl, code=code, checkpoint=checkpoint,
               resume=ckpt, finals=list(ckpt["finals"]) if ckpt else []), record_dir


def refresh_summary(record_dir, log):
    """Post-processing, when the records toolkit sits beside this script: rewrite summary.json."""
    tool = os.path.join(ROOT, "tools", "records.py")
    if os.path.exists(tool):
        proc = subprocess.run([sys.executable, tool, "summary", record_dir, "--write"],
                              capture_output=True, text=True)
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        log(f"summary: {os.path.join(record_dir, 'summary.json')}: {last}" if proc.returncode == 0
            else f"summary not written: {proc.stderr.strip()}", error=proc.returncode != 0)


def main(argv=None):
    hp, dry_run = parse_args(argv)
    try:
        if dry_run:
            world = int(os.environ.get("WORLD_SIZE", 1))
            micro, accum = check_setup(hp, world)
            print(f"dry run: configuration ok (preset {hp.preset}, world size {world}, "
                  f"{accum} micro-batch(es) of {micro} sequences per rank)")
            return 0
        ctx = setup_distributed(hp)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log, run, stop = Logger(ctx.rank), None, StopRequest()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        run, record_dir = prepare(hp, ctx, log)
        run.stop, stop.defer = stop, run.hp.save_every > 0  # a signal now: save, then stop
        for trial in range(run.resume["trial"] if run.resume else 0, run.hp.trials):
            run.finals.append(train_trial(run, trial))
        stop.defer = False
        if ctx.rank == 0:
            log(f"final val losses: {' '.join(f'{v:.5f}' for v in run.finals)}")
            remove_checkpoint(run)
            refresh_summary(record_dir, log)
        if ctx.world > 1:
            dist.barrier()  # leave together: a gloo rank that exits while a peer still talks can abort
        return 0
    except (DataError, ValueError, FileExistsError) as e:  # bad input or configuration
        log(f"error: {e}", error=True)
        return 2
    except (FloatingPointError, Interrupted) as e:  # NaN/inf, or killed: stop, keep the log
        trial = f"trial {run.trial} (seed {run.hp.seed + run.trial})" if run else "setup"
        if isinstance(e, Interrupted):  # a line the records toolkit reads: this trial is incomplete
            log(f"interrupted: {e} at step {run.step if run else 0}, {trial}", error=True)
        else:
            log(f"failed: {trial}: {e}", error=True)
        kept = f"; the log so far is kept in {log.file.name}" if log.file else ""
        if isinstance(e, Interrupted) and run and run.checkpoint and os.path.exists(run.checkpoint):
            kept += f"; continue with the same flags and --resume {run.checkpoint}"
        log(f"error: {trial}: {e}. Training stopped{kept}", error=True)
        return 130 if isinstance(e, Interrupted) else 1
    finally:
        if log.file:
            log.file.close()
        if run and run.jsonl:
            run.jsonl.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
