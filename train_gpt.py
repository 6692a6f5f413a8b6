"""Train a 124M-parameter GPT on FineWeb with the Aurora optimizer (modded-nanoGPT optimization track).

The default configuration is, update for update, the published Aurora record: validation loss
<= 3.28 in 3175 steps (20 seeds, 8xH100). Read top to bottom: hyperparameters, data, model,
optimizers, setup, training.

    torchrun --standalone --nproc_per_node=8 train_gpt.py          # the record (or ./run.sh)
    python train_gpt.py --preset tiny                              # CPU smoke run on synthetic data

Each run appends one log, records/<date>_<run-name>/<uuid>.txt, which starts with this file's and
aurora.py's source, then the environment and every hyperparameter, then the run's output.
"""
import argparse
import dataclasses
import datetime
import glob
import json
import math
import os
import platform
import subprocess
import sys
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from aurora import Aurora

ROOT = os.path.dirname(os.path.abspath(__file__))

# =================================================================================================
# Hyperparameters: the record's, in one place. Presets and CLI flags override them; every value
# used is printed into the log.
# =================================================================================================


@dataclasses.dataclass
class Hyperparameters:
    # data
    data_dir: str = os.path.join(ROOT, "data", "fineweb10B")
    batch_tokens: int = 8 * 64 * 1024        # global batch per step: 524,288 tokens
    seq_len: int = 1024
    micro_batch_seqs: int = 64               # sequences per forward/backward (shrunk if a rank has fewer)
    val_tokens: int = 20 * 8 * 64 * 1024     # 10,485,760 tokens of the validation shards
    # model
    vocab_size: int = 50304
    n_layer: int = 12
    d_model: int = 768
    head_dim: int = 128
    mlp_ratio: int = 4
    attn_scale: float = 0.12
    logit_softcap: float = 15.0
    rope_base: float = 1024.0
    init_var: float = 0.33                   # weights ~ N(0, init_var / fan_in), except *proj* = 0
    # schedule
    train_steps: int = 3200
    cooldown_frac: float = 0.7               # lr x1 for the first 30% of steps, then linear to 0
    val_every: int = 125
    val_every_late: int = 25                 # cadence once step/train_steps >= late_frac
    late_frac: float = 0.9
    # Adam (AdamW with weight_decay 0) for embedding, head, and every <2-D parameter
    adam_betas: tuple = (0.8, 0.95)
    adam_eps: float = 1e-10
    lr_embed: float = 0.3
    lr_head: float = 1 / 320
    lr_scalar: float = 0.01
    # Aurora for the 72 block matrices
    optimizer: str = "aurora"                # ablations: "muon" (plain polar), "normuon"
    aurora_on: str = "nonsquare"             # "tall": square and wide matrices get plain polar
    polar: str = "quintic12"                 # "cans12": the float32 cubic iteration
    lr_matrix: float = 0.0375
    momentum: float = 0.95
    nesterov: bool = True
    pp_iterations: int = 2
    pp_beta: float = 0.5
    contra: float = 0.4
    uw_floor: float = 0.35
    weight_decay: float = 0.0
    # neuron-health diagnostics at validation steps (MLP fc rows = hidden neurons)
    diagnostics: bool = True
    diag_tokens: int = 64 * 1024             # rank 0's first val tokens used for `dead`
    dead_threshold: float = 0.001            # dead: positive pre-activation on < 0.1% of tokens
    starved_threshold: float = 0.1           # starved: row leverage < 0.1 of uniform
    frozen_threshold: float = 0.1            # frozen: moved < 10% of the median row movement
    # run
    seed: int = 0
    trials: int = 1
    val_loss_target: float = 3.28


# A few-million-parameter model on the synthetic shards (data/synthetic.py): about two minutes on
# 2 CPU cores. Same code path, optimizer and schedule shape as the record; only sizes change.
PRESETS = {
    "record": {},
    "tiny": dict(data_dir=os.path.join(ROOT, "data", "synthetic"), batch_tokens=32 * 128,
                 seq_len=128, micro_batch_seqs=16, val_tokens=8 * 32 * 128, vocab_size=1024,
                 n_layer=4, d_model=192, head_dim=32, train_steps=200, val_every=25,
                 val_every_late=10, diag_tokens=8 * 32 * 128),
    # The record's model with a quarter of the batch: ablations at 124M scale on one GPU.
    "small": dict(batch_tokens=2 * 64 * 1024, val_tokens=4 * 2 * 64 * 1024, train_steps=400,
                  val_every=50, val_every_late=25),
}

# =================================================================================================
# Data: FineWeb shards (256 int32 header values, then uint16 tokens) and the per-rank loader
# =================================================================================================

SHARD_MAGIC, SHARD_VERSION, HEADER_BYTES = 20240520, 1, 256 * 4


class DataError(Exception):
    """Missing, corrupt or insufficient data; the message says how to fix it."""


def read_shard_header(path):
    """Validate a shard's header and size; return its number of tokens."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise DataError(f"cannot read shard {path}: {e}") from None
    header = np.frombuffer(raw[:len(raw) // 4 * 4], dtype="<i4")
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: file is shorter than the {HEADER_BYTES}-byte header; "
                        "delete it and download/generate it again")
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic number {header[0]} (expected {SHARD_MAGIC}); "
                        "not a FineWeb token shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    n_tokens = int(header[2])
    expected, actual = HEADER_BYTES + 2 * n_tokens, os.path.getsize(path)
    if actual != expected:
        raise DataError(f"{path}: size is {actual} bytes but its header promises {n_tokens} tokens "
                        f"({expected} bytes); the file is truncated or corrupt: delete it and "
                        "download/generate it again")
    return n_tokens


def load_shard(path, vocab_size):
    n_tokens = read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=n_tokens, offset=HEADER_BYTES)
    if tokens.size != n_tokens:
        raise DataError(f"{path}: read {tokens.size} tokens, header says {n_tokens}")
    if n_tokens and int(tokens.max()) >= vocab_size:
        raise DataError(f"{path}: token id {int(tokens.max())} >= the model's vocab_size "
                        f"{vocab_size}; use a preset whose vocabulary matches these shards")
    return torch.from_numpy(tokens.astype(np.int32))


def find_shards(data_dir, split):
    files = sorted(glob.glob(os.path.join(data_dir, f"fineweb_{split}_*.bin")))
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


def check_enough_tokens(files, batch, steps, what):
    """Fail before training, not hours in, if the shards cannot feed `steps` batches."""
    sizes = [read_shard_header(f) for f in files]
    per_shard = [batches_per_shard(n, batch) for n in sizes]
    if sum(per_shard) >= steps:
        return
    typical = max(per_shard) or 1
    missing = math.ceil((steps - sum(per_shard)) / typical)
    raise DataError(
        f"{what}: {len(files)} shard(s) hold {sum(sizes):,} tokens = {sum(per_shard)} batches of "
        f"{batch:,} tokens, but {steps} are needed (about {missing} more shard(s) of this size). "
        "Download more with `python data/cached_fineweb10B.py N` (N = number of train shards) "
        "or generate more synthetic ones")


class TokenLoader:
    """Each step, rank r reads tokens [pos + r*L, pos + r*L + L + 1) of the current shard
    (L = batch / world): inputs are the first L, targets the last L. Then pos += batch; a shard
    whose remaining tokens cannot hold another batch (+1) is left for the next one."""

    def __init__(self, files, batch, rank, world, vocab_size, device):
        self.files, self.batch, self.rank, self.world = files, batch, rank, world
        self.local = batch // world
        self.vocab_size, self.device = vocab_size, device
        self.cache = {}
        self.reset()

    def reset(self):
        self.shard, self.pos = 0, 0
        self.tokens = self._load(0)

    def _load(self, i):
        if i >= len(self.files):
            raise DataError(f"ran out of data after {len(self.files)} shard(s)")
        if i not in self.cache:
            self.cache = {i: load_shard(self.files[i], self.vocab_size)}  # keep one shard in memory
        return self.cache[i]

    def next_batch(self):
        if self.pos + self.batch + 1 > len(self.tokens):
            self.shard, self.pos = self.shard + 1, 0
            self.tokens = self._load(self.shard)
        start = self.pos + self.rank * self.local
        buf = self.tokens[start:start + self.local + 1]
        self.pos += self.batch
        if self.pos + self.batch + 1 >= len(self.tokens):
            self.pos = len(self.tokens)  # skip the tail: the next call opens the next shard
        buf = buf.to(self.device, dtype=torch.int64, non_blocking=True)
        return buf[:-1], buf[1:]


# =================================================================================================
# Model: GPT with RMSNorm, half-truncated rotary, QK-norm, relu^2 MLP, soft-capped logits
# =================================================================================================


class Linear(nn.Linear):
    """nn.Linear (with bias) whose float32 weights are cast to the activation dtype."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype))


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
        self.norm1, self.attn = RMSNorm(hp.d_model), Attention(hp)
        self.norm2, self.mlp = RMSNorm(hp.d_model), MLP(hp)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, hp, act_dtype):
        super().__init__()
        self.act_dtype, self.softcap = act_dtype, hp.logit_softcap
        self.embed = nn.Embedding(hp.vocab_size, hp.d_model).bfloat16()  # stored in bf16
        self.norm1 = RMSNorm(hp.d_model)
        self.blocks = nn.ModuleList(Block(hp) for _ in range(hp.n_layer))
        self.norm2 = RMSNorm(hp.d_model)
        # Named *proj because the record zero-initializes every weight whose name contains "proj",
        # the LM head included.
        self.lm_head_proj = Linear(hp.d_model, hp.vocab_size)
        self.init_weights(hp.init_var)

    @torch.no_grad()
    def init_weights(self, init_var):
        for name, p in self.named_parameters():
            if p.ndim < 2:  # 1-D parameters are biases (0) and norm gains (1)
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            elif "proj" in name:
                p.zero_()
            elif p is self.embed.weight:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, math.sqrt(init_var / p.size(1)))

    def trunk(self, idx):
        """Hidden states after the last block (before the final norm and the head)."""
        x = self.norm1(self.embed(idx).to(self.act_dtype))
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, idx, targets):
        """Summed (not mean) cross-entropy of the soft-capped logits."""
        logits = self.lm_head_proj(self.norm2(self.trunk(idx))).float()
        logits = self.softcap * logits / torch.sqrt(logits.square() + self.softcap ** 2)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")


# =================================================================================================
# Optimizers: Adam for embedding, head and every <2-D parameter; Aurora for the block matrices
# =================================================================================================


def build_optimizers(model, hp):
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    scalars = [p for p in model.parameters() if p.ndim < 2]
    adam = torch.optim.AdamW(
        [dict(params=[model.embed.weight], lr=hp.lr_embed),
         dict(params=[model.lm_head_proj.weight], lr=hp.lr_head),
         dict(params=scalars, lr=hp.lr_scalar)],
        betas=hp.adam_betas, eps=hp.adam_eps, weight_decay=0.0)
    aurora = Aurora(matrices, lr=hp.lr_matrix, mu=hp.momentum, nesterov=hp.nesterov,
                    pp_iterations=hp.pp_iterations, pp_beta=hp.pp_beta, contra=hp.contra,
                    uw_floor=hp.uw_floor, weight_decay=hp.weight_decay, rule=hp.optimizer,
                    aurora_on=hp.aurora_on, polar_kind=hp.polar)
    optimizers = [adam, aurora]
    assigned = sum(len(g["params"]) for opt in optimizers for g in opt.param_groups)
    assert assigned == len(list(model.parameters())), "every parameter must have one optimizer"
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


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
# Setup: command line, distributed, logging
# =================================================================================================


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Train GPT with Aurora (default: the 3175-step record).")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="record",
                    help="record: the published configuration (default); tiny: a small model on "
                         "synthetic shards for a ~2 minute CPU smoke run")
    ap.add_argument("--train-steps", type=int, help="number of optimizer steps (record: 3200); "
                    "the lr schedule and validation cadence scale with it")
    ap.add_argument("--trials", type=int, default=1, help="independent runs in this process; "
                    "trial i re-initializes the model with seed+i (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of trial 0 (default 0)")
    ap.add_argument("--data-dir", help="folder of fineweb_{train,val}_*.bin shards "
                    "(record: data/fineweb10B, tiny: data/synthetic)")
    ap.add_argument("--run-name", help="record directory name: records/<date>_<run-name>/ "
                    "(default: <optimizer>_<preset>)")
    ap.add_argument("--optimizer", choices=["aurora", "muon", "normuon"], default="aurora",
                    help="aurora (record); for ablations, the same pipeline with plain polar (muon) "
                         "or polar plus NorMuon's per-row normalization (normuon)")
    ap.add_argument("--aurora-on", choices=["nonsquare", "tall"],
                    help="matrices that get aurora_polar: nonsquare (record; wide ones via "
                         "transpose) or tall only (the authors' later release)")
    ap.add_argument("--polar", choices=["quintic12", "cans12"],
                    help="Newton-Schulz iteration: quintic12 (record, bf16) or cans12 (float32 cubic)")
    ap.add_argument("--pp-iterations", type=int, help="aurora_polar iterations of D (record 2; "
                    "1 = row-normalize then polar, the MuonEq baseline)")
    ap.add_argument("--pp-beta", type=float, help="exponent of the D update (record 0.5)")
    ap.add_argument("--diagnostics", choices=["on", "off"], default="on",
                    help="neuron-health diagnostics at validation steps (default on)")
    ap.add_argument("--val-tokens", type=int, help="validation tokens (record: 10,485,760); "
                    "a multiple of the batch size")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="torch.compile the model (auto: on with CUDA, off on CPU)")
    ap.add_argument("--records-dir", default=os.path.join(ROOT, "records"),
                    help="where record directories are created (default: records/)")
    ap.add_argument("--append", action="store_true",
                    help="add this run's log to an existing record directory of the same "
                         "configuration (e.g. more seeds) instead of refusing")
    args = ap.parse_args(argv)
    if args.pp_beta is not None and not 0 < args.pp_beta <= 1:
        ap.error(f"--pp-beta must be in (0, 1], got {args.pp_beta}")
    for name in ("train_steps", "trials", "val_tokens", "pp_iterations"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.run_name is not None and (not args.run_name or "/" in args.run_name
                                      or args.run_name.startswith(".")):
        ap.error(f"--run-name must be a plain folder name, got {args.run_name!r}")
    return args


def hyperparameters_from(args):
    hp = Hyperparameters(**PRESETS[args.preset])
    overrides = dict(train_steps=args.train_steps, data_dir=args.data_dir, val_tokens=args.val_tokens,
                     trials=args.trials, seed=args.seed, optimizer=args.optimizer,
                     aurora_on=args.aurora_on, polar=args.polar, pp_iterations=args.pp_iterations,
                     pp_beta=args.pp_beta, diagnostics=args.diagnostics == "on")
    return dataclasses.replace(hp, **{k: v for k, v in overrides.items() if v is not None})


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (multi-node too); plain `python` is one process."""
    if "RANK" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} has no GPU: this node shows "
                             f"{torch.cuda.device_count()} GPU(s); start at most that many "
                             "processes per node (--nproc_per_node), or set "
                             "CUDA_VISIBLE_DEVICES= to train on the CPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


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
    if hp.val_tokens % hp.batch_tokens:
        raise ValueError(f"val_tokens ({hp.val_tokens:,}) must be a multiple of the batch "
                         f"({hp.batch_tokens:,} tokens)")
    return micro, local_seqs // micro


def config_for_record(hp):
    """The hyperparameters that must agree between logs of one record (not seeds or trials)."""
    cfg = {k: v for k, v in dataclasses.asdict(hp).items() if k not in ("seed", "trials", "data_dir")}
    return json.loads(json.dumps(cfg))  # tuples -> lists, as they come back from config.json


def open_record(hp, args):
    """Create records/<date>_<run-name>/ and a new <uuid>.txt in it; never touch an older log."""
    run_name = args.run_name or f"{hp.optimizer}_{args.preset}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    record_dir = os.path.join(args.records_dir, f"{date}_{run_name}")
    config_path = os.path.join(record_dir, "config.json")
    logs = glob.glob(os.path.join(record_dir, "*.txt"))
    if logs and not args.append:
        raise FileExistsError(f"{record_dir} already holds {len(logs)} log(s). Pass --append to add "
                              "this run to that record (same configuration, more seeds), or choose "
                              "another --run-name")
    if logs and os.path.exists(config_path):
        with open(config_path) as f:
            old = json.load(f)
        new = config_for_record(hp)
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise ValueError(f"--append: this run's configuration differs from {config_path} in "
                             f"{diff}; use another --run-name")
    os.makedirs(record_dir, exist_ok=True)
    if not os.path.exists(config_path):
        with open(config_path, "w") as f:
            json.dump(config_for_record(hp), f, indent=2)
    log_path = os.path.join(record_dir, f"{uuid.uuid4()}.txt")
    return record_dir, log_path, open(log_path, "x")  # "x": fail rather than overwrite


def environment_lines(hp, world, device, micro, accum):
    lines = [f"python {platform.python_version()}  torch {torch.__version__}  "
             f"cuda {torch.version.cuda}  platform {platform.platform()}"]
    if device.type == "cuda":
        lines.append(f"device {torch.cuda.get_device_name(device)}  world_size {world}")
    else:
        lines.append(f"device cpu ({platform.processor() or platform.machine()}, "
                     f"{torch.get_num_threads()} threads)  world_size {world}")
    try:
        git = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=5)
        commit = git.stdout.strip() if git.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    lines.append(f"git_commit {commit}")
    lines.append(f"micro_batch_seqs_used {micro}  grad_accum_steps {accum}")
    lines.append(f"seeds {[hp.seed + i for i in range(hp.trials)]}")
    lines += [f"{k}: {v}" for k, v in dataclasses.asdict(hp).items()]
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=10).stdout
        lines += smi.rstrip().splitlines() if smi else []
    except (OSError, subprocess.SubprocessError):
        pass
    return lines


class Logger:
    """Rank 0 writes to stdout and the log file; errors go to stderr (every rank) and the log."""

    def __init__(self, file=None, quiet=False):
        self.file, self.quiet = file, quiet

    def __call__(self, msg, error=False):
        if error or not self.quiet:
            print(msg, file=sys.stderr if error else sys.stdout, flush=True)
        if self.file:
            self.file.write(msg + "\n")
            self.file.flush()


# =================================================================================================
# Training
# =================================================================================================


def all_reduce_sum(t, world):
    if world > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model, loader, hp, micro, world):
    """Summed loss over the first val_tokens tokens (all ranks) divided by val_tokens."""
    loader.reset()
    total = torch.zeros((), device=loader.device, dtype=torch.float32)
    for _ in range(hp.val_tokens // hp.batch_tokens):
        x, y = loader.next_batch()
        for xm, ym in zip(x.view(-1, micro, hp.seq_len), y.view(-1, micro, hp.seq_len)):
            total += model(xm, ym).float()
    return all_reduce_sum(total, world).item() / hp.val_tokens


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, compiled, optimizers, x, y, hp, micro, world, step):
    """One optimizer step on this rank's tokens: gradients summed over micro-batches and ranks,
    lr set from the schedule, Adam and Aurora stepped. Returns the mean train loss per token."""
    loss = torch.zeros((), device=x.device, dtype=torch.float32)
    for xm, ym in zip(x.view(-1, micro, hp.seq_len), y.view(-1, micro, hp.seq_len)):
        micro_loss = compiled(xm, ym)
        micro_loss.backward()
        loss += micro_loss.detach().float()
    if world > 1:
        # Sum (not average) over ranks: the record's losses and grads are sums.
        grads = [p.grad for p in model.parameters()]
        flat = torch.cat([g.flatten().float() for g in grads] + [loss.view(1)])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        loss = flat[-1]
    train_loss = loss.item() / hp.batch_tokens  # also the NaN check, on every rank alike
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"non-finite train loss ({train_loss}) at step {step + 1}")
    mult = lr_multiplier(step, hp)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * mult
        try:
            opt.step()
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} (optimizer step {step + 1})") from None
    model.zero_grad(set_to_none=True)
    return train_loss


@torch.no_grad()
def mlp_diagnostics(model, fc_init, aurora, x, hp, micro, world, rank):
    """Neuron health of every block's MLP (fc rows = hidden neurons), one dict per layer:
    dead     fraction of neurons whose pre-activation is positive on < dead_threshold of the
             tokens of `x` (relu^2 then outputs zero almost always);
    leverage row leverage r_i = ||U_i||^2 / (cols/rows) of the fc update direction U of the last
             step, after the polar step (1 = uniform): its coefficient of variation and min, and
             starved = fraction of rows with r_i < starved_threshold;
    frozen   fraction of neurons whose fc row moved since initialization by less than
             frozen_threshold of the median row movement.
    Collective (leverage lives on the rank that owns each matrix): call on every rank. Only
    rank 0 measures the rest and returns the rows; other ranks may pass fc_init = x = None."""
    fcs = [block.mlp.fc for block in model.blocks]
    hidden = fcs[0].weight.size(0)
    device = fcs[0].weight.device
    lev = torch.zeros(len(fcs), hidden, device=device)
    have = torch.zeros(len(fcs), device=device)
    for i, fc in enumerate(fcs):
        if fc.weight in aurora.leverage:
            lev[i], have[i] = aurora.leverage[fc.weight], 1
    aurora.leverage.clear()
    if world > 1:
        dist.all_reduce(lev)
        dist.all_reduce(have)
    if rank != 0:
        return None
    # dead: count positive pre-activations with hooks on the eager (uncompiled) model
    positive = torch.zeros(len(fcs), hidden, device=device)

    def count_positive(i):
        def hook(module, args, out):
            positive[i] += (out > 0).flatten(0, -2).sum(0)
            # returns None: a forward hook that returns a value replaces the module's output
        return hook

    hooks = [fc.register_forward_hook(count_positive(i)) for i, fc in enumerate(fcs)]
    n_micro = max(1, min(hp.diag_tokens, x.numel()) // (micro * hp.seq_len))
    try:
        for xm in x.view(-1, micro, hp.seq_len)[:n_micro]:
            model.trunk(xm)  # eager, and no logits: the hooks need only the MLP pre-activations
    finally:
        for h in hooks:
            h.remove()
    n_tokens = n_micro * micro * hp.seq_len
    rows = []
    for i, fc in enumerate(fcs):
        moved = (fc.weight.float() - fc_init[i]).norm(dim=1)
        median = moved.median()
        row = dict(layer=i, tokens=n_tokens,
                   dead=(positive[i] < hp.dead_threshold * n_tokens).float().mean().item(),
                   frozen=(moved < hp.frozen_threshold * median).float().mean().item()
                   if median > 0 else None)
        if have[i]:
            r = lev[i]
            row.update(leverage_cv=(r.std() / r.mean()).item(), leverage_min=r.min().item(),
                       starved=(r < hp.starved_threshold).float().mean().item())
        else:  # no update yet (step 0)
            row.update(leverage_cv=None, leverage_min=None, starved=None)
        rows.append(row)
    return rows


def diagnostics_line(rows):
    """One log line: each diagnostic's mean over layers."""
    def mean(key):
        values = [r[key] for r in rows if r[key] is not None]
        return f"{sum(values) / len(values):.4f}" if values else "nan"
    return (f"diagnostics: dead:{mean('dead')} starved:{mean('starved')} "
            f"leverage_cv:{mean('leverage_cv')} leverage_min:{mean('leverage_min')} "
            f"frozen:{mean('frozen')} (mean over {len(rows)} MLP layers)")


def train_trial(trial, hp, model, compiled, train_loader, val_loader, micro, world, rank, device,
                log, diag_file=None):
    """One seed: re-initialize, train hp.train_steps steps, validate on schedule. Returns the
    final val loss. Raises FloatingPointError (naming the step) on a non-finite loss."""
    seed = hp.seed + trial
    torch.manual_seed(seed)
    model.init_weights(hp.init_var)
    optimizers = build_optimizers(model, hp)
    aurora = optimizers[1]
    # Only rank 0 measures neuron health (frozen needs the initial fc rows, dead some val tokens).
    diag_rank0 = hp.diagnostics and rank == 0
    fc_init = ([block.mlp.fc.weight.detach().float().clone() for block in model.blocks]
               if diag_rank0 else None)
    train_loader.reset()
    log(f"trial:{trial} seed:{seed}")
    train_time, last_val_time, last_val_step = 0.0, 0.0, 0
    sync(device)
    t0 = time.perf_counter()
    for step in range(hp.train_steps + 1):
        if is_val_step(step, hp):
            sync(device)
            train_time += time.perf_counter() - t0
            aurora.check_finite()  # Aurora checks its updates lazily; do it now
            val_loss = evaluate(compiled, val_loader, hp, micro, world)
            step_avg = (1000 * (train_time - last_val_time) / (step - last_val_step)
                        if step > last_val_step else float("nan"))
            log(f"step:{step}/{hp.train_steps} val_loss:{val_loss:.5f} "
                f"train_time:{train_time:.3f}s step_avg:{step_avg:.2f}ms")
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"non-finite val loss ({val_loss}) at step {step}")
            if hp.diagnostics:
                x = None
                if diag_rank0:  # rank 0's first diag_tokens validation tokens
                    val_loader.reset()
                    n_batches = min(math.ceil(hp.diag_tokens * world / hp.batch_tokens),
                                    hp.val_tokens // hp.batch_tokens)
                    x = torch.cat([val_loader.next_batch()[0] for _ in range(n_batches)])
                rows = mlp_diagnostics(model, fc_init, aurora, x, hp, micro, world, rank)
                if rows:
                    log(diagnostics_line(rows))
                    for row in rows:
                        diag_file.write(json.dumps(dict(trial=trial, step=step, **row)) + "\n")
                    diag_file.flush()
            last_val_time, last_val_step = train_time, step
            sync(device)
            t0 = time.perf_counter()
        if step == hp.train_steps:
            if device.type == "cuda":
                log(f"peak memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
            return val_loss
        aurora.collect_leverage = hp.diagnostics and is_val_step(step + 1, hp)
        train_loss = train_step(model, compiled, optimizers, *train_loader.next_batch(), hp, micro,
                                world, step)
        elapsed = train_time + time.perf_counter() - t0
        log(f"step:{step + 1}/{hp.train_steps} train_loss:{train_loss:.4f} "
            f"train_time:{elapsed:.3f}s step_avg:{1000 * elapsed / (step + 1):.2f}ms")


def run(args, hp, rank, world, device, log):
    micro, accum = micro_batch_plan(hp, world)
    train_files, val_files = find_shards(hp.data_dir, "train"), find_shards(hp.data_dir, "val")
    check_enough_tokens(train_files, hp.batch_tokens, hp.train_steps, f"train data in {hp.data_dir}")
    check_enough_tokens(val_files, hp.batch_tokens, hp.val_tokens // hp.batch_tokens,
                        f"validation data in {hp.data_dir}")
    if rank == 0:
        record_dir, log_path, log_file = open_record(hp, args)
        log.file = log_file
        for path in (os.path.abspath(__file__), os.path.join(ROOT, "aurora.py")):
            with open(path) as f:  # the benchmark requires every log to hold all code that ran
                log_file.write(f"#### {os.path.basename(path)} ####\n{f.read()}\n")
        log_file.write("=" * 100 + "\n")
        env = environment_lines(hp, world, device, micro, accum)
        for line in env + ["=" * 100, f"log: {log_path}"]:
            log(line)

    act_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU: fp32 is faster
    model = GPT(hp, act_dtype).to(device)
    log(f"parameters: {sum(p.numel() for p in model.parameters()):,}  activations: {act_dtype}")
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    compiled = torch.compile(model, dynamic=False) if use_compile else model
    train_loader = TokenLoader(train_files, hp.batch_tokens, rank, world, hp.vocab_size, device)
    val_loader = TokenLoader(val_files, hp.batch_tokens, rank, world, hp.vocab_size, device)
    finals = []
    diag_file = None
    if rank == 0 and hp.diagnostics:  # one JSON object per (step, layer), next to the log
        diag_file = open(os.path.splitext(log_path)[0] + ".jsonl", "x")
        log(f"diagnostics file: {diag_file.name}")
    try:
        for trial in range(hp.trials):
            try:
                finals.append(train_trial(trial, hp, model, compiled, train_loader, val_loader,
                                          micro, world, rank, device, log, diag_file))
            except FloatingPointError as e:
                raise FloatingPointError(f"trial {trial} (seed {hp.seed + trial}): {e}") from None
    finally:
        if diag_file:
            diag_file.close()
    if rank == 0:
        log(f"final val losses: {' '.join(f'{v:.5f}' for v in finals)}")
        from tools.records import write_summary  # post-processing only: reads the logs back
        summary = write_summary(record_dir, target=hp.val_loss_target,
                                extra=dict(torch=torch.__version__, device=env[1], world_size=world))
        step = summary["step"]
        print(f"summary: {os.path.join(record_dir, 'summary.json')}: n={summary['n']} record "
              f"step={step if step is not None else 'not reached'} mean={summary['mean']:.5f}")
    if world > 1:
        dist.barrier()  # leave together: a gloo rank that exits while a peer still talks can abort
    return 0


def main(argv=None):
    args = parse_args(argv)
    hp = hyperparameters_from(args)
    try:
        rank, world, device = setup_distributed()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = Logger(quiet=rank != 0)
    try:
        return run(args, hp, rank, world, device, log)
    except (DataError, ValueError, FileExistsError) as e:  # bad input or configuration
        log(f"error: {e}", error=True)
        return 2
    except FloatingPointError as e:  # NaN/inf loss or update: stop, keep the log
        kept = f"; the log so far is kept in {log.file.name}" if log.file else ""
        log(f"error: {e}. Training stopped{kept}", error=True)
        return 1
    finally:
        if log.file:
            log.file.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
