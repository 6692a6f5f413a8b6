"""Train a 124M-parameter GPT on FineWeb with the Aurora optimizer (modded-nanoGPT optimization track).

The default configuration is the published Aurora record (validation loss <= 3.28 in 3175 steps,
20 trials on 8xH100): the same model, initialization calls, data order, optimizer rule and
schedule, in the record's order. `torchrun --standalone --nproc_per_node=8 train_gpt.py` runs it
(./run.sh too); `--preset tiny` is a CPU smoke run, `--preset aurora_2860` a later record, `--help`
lists every hyperparameter as a flag. This file is the run's computation: techniques beyond the
record (plugins.py: aurora_variants.py, lineage.py, frontier.py) plug in at the loop's named
points, and a Driver runs around it (harness.py's when it lies beside this file, else the plain
one below). A log's code part is this file with the modules the run uses inlined: a script that
runs alone, writing logs/<uuid>.txt as upstream's do.
"""
import contextlib
import dataclasses
import glob
import json
import math
import os
import secrets
import sys
import uuid

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from aurora import Aurora, NonFiniteUpdate, ns_dtype_for
from measure import Clock, Logger, TrainLosses
from plugins import call, choice, harness, parse_flags, preset_overrides, techniques, with_plugins

ROOT = os.path.dirname(os.path.abspath(__file__))
SEPARATOR = "=" * 100

# =================================================================================================
# Hyperparameters: the record's. Every field is a flag (--train-steps 100); presets override them.
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
    aurora_on: str = hparam("nonsquare", "matrices that get aurora_polar: nonsquare (record), tall, wide_only")
    ns_iteration: str = hparam("quintic12", "Newton-Schulz: quintic12 (record) or cans12 (float32 cubic)")
    ns_dtype: str = hparam("auto", "Newton-Schulz dtype: auto = bfloat16 on CUDA (record), float32 on CPU")
    aurora_batched: bool = hparam(False, "stack same-shape matrices (fast path; same rule up to rounding)")
    # run
    preset: str = hparam("record", "record, tiny (CPU smoke run), small (quarter batch), aurora_2930/2890/2860 "
                                   "(later records); A+B applies both, e.g. aurora_2860+tiny")
    seed: int = hparam(None, "seed of trial 0 (trial i: seed+i); default: drawn from the OS entropy, logged")
    trials: int = hparam(1, "independent trials in this process, each re-initialized")
    compile: str = hparam("auto", "torch.compile the model and Aurora's per-matrix step: auto (on with CUDA), on, off")
    val_loss_target: float = hparam(3.28, "the record's target (its summary's)")


CHOICES = dict(rule=("aurora", "muon"), aurora_on=("nonsquare", "tall", "wide_only"), ns_iteration=("quintic12",),
               ns_dtype=("auto", "bfloat16", "float32"), compile=("auto", "on", "off"))

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
GPU_PRESETS = ["record", "small"]
# Header lines that may differ between the logs of one record folder (the records toolkit reads
# this from a log's code part): the trials' seeds, the data's path, harness.py's flags.
PER_RUN = ("seed", "trials", "data_dir", "diagnostics", "diag_tokens", "dead_threshold", "starved_threshold",
           "frozen_threshold", "allow_cpu", "run_name", "records_dir", "append", "save_every", "resume",
           "stop_below")

Hyperparameters = with_plugins(Hyperparameters, PRESETS, CHOICES, GPU_PRESETS)  # plugins.py


def parse_args(argv=None):
    """(hyperparameters, dry_run) from the command line: one flag per Hyperparameters field."""
    return parse_flags(Hyperparameters, PRESETS, CHOICES, argv)


# =================================================================================================
# Data: FineWeb shards (data/shards.py: the format; harness.py checks them) and per-rank loaders
# =================================================================================================


def find_shards(data_dir, split):
    files = sorted(glob.glob(os.path.join(glob.escape(data_dir), f"fineweb_{split}_*.bin")))
    if not files:
        raise ValueError(f"no {split} shards (fineweb_{split}_*.bin) in {data_dir}")
    return files


def load_shard(path):
    """A shard's tokens (int32): a header of 256 int32 (its third the token count), then uint16 tokens."""
    n_tokens = int(np.fromfile(path, dtype="<i4", count=256)[2])
    return torch.from_numpy(np.fromfile(path, dtype="<u2", count=n_tokens, offset=1024).astype(np.int32))


class TokenLoader:
    """Each step rank r reads tokens [pos + r*L, pos + r*L + L + 1) of the current shard (L =
    batch / world), then pos += batch; a shard tail shorter than a batch (+1) is skipped."""

    def __init__(self, files, batch, ctx, vocab_size):
        self.files, self.batch, self.ctx, self.vocab_size = files, batch, ctx, vocab_size
        self.local = batch // ctx.world
        self.reset()

    def reset(self, shard=0, pos=0):
        self.shard, self.pos = shard, pos
        self.tokens = load_shard(self.files[shard])

    def next_batch(self):
        if self.pos + self.batch + 1 > len(self.tokens):
            self.shard, self.pos = self.shard + 1, 0
            if self.shard >= len(self.files):
                raise ValueError(f"ran out of data after {len(self.files)} shard(s)")
            self.tokens = load_shard(self.files[self.shard])
        start = self.pos + self.ctx.rank * self.local
        buf = self.tokens[start:start + self.local + 1].to(self.ctx.device, non_blocking=True)
        self.pos += self.batch
        if self.pos + self.batch + 1 >= len(self.tokens):
            self.pos = len(self.tokens)  # skip the tail: the next call opens the next shard
        return buf[:-1], buf[1:].long()


def load_val_tokens(files, hp, ctx):
    """This rank's slice [r*V/W, (r+1)*V/W + 1) of the first val_tokens (+1) validation tokens."""
    need, parts = hp.val_tokens + 1, []
    for f in files:
        parts.append(load_shard(f)[:need])
        need -= len(parts[-1])
        if need == 0:
            break
    tokens = torch.cat(parts)
    if need:
        raise ValueError(f"validation shards in {hp.data_dir} hold {len(tokens) - 1:,} tokens, "
                         f"val_tokens needs {hp.val_tokens:,}: lower --val-tokens or add shards")
    local = hp.val_tokens // ctx.world
    buf = tokens[ctx.rank * local:(ctx.rank + 1) * local + 1].to(ctx.device)
    return buf[:-1], buf[1:].long()


def micro_batches(x, y, ctx, seq_len):
    """A rank's tokens as (inputs, targets) micro-batches of ctx.micro sequences."""
    return zip(x.view(-1, ctx.micro, seq_len), y.view(-1, ctx.micro, seq_len))


# =================================================================================================
# Model: GPT with RMSNorm, half-truncated rotary, QK-norm, relu^2 MLP, soft-capped logits; modules
# registered in the record's order (its initialization visits them so)
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
        call(techniques(hp), "model_built", self, hp)  # e.g. the lineage's float32 norms

    @torch.no_grad()
    def init_weights(self, init_var):
        """The record's re-initialization, drawing from the default generator exactly as its calls
        do (the gains' normal_(1, 0) is 1 but still draws)."""
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
    adam = choice(hp, "make_adam", model, hp, device) or torch.optim.AdamW(  # e.g. the frontier's raw Adam
        [dict(params=[model.embed.weight], lr=hp.lr_embed),
         dict(params=[model.proj.weight], lr=hp.lr_head),
         dict(params=scalars, lr=hp.lr_scalar)],
        betas=hp.adam_betas, eps=hp.adam_eps, weight_decay=0.0,
        fused=device.type in ("cuda", "cpu"))  # the record's fused kernel where torch has one
    options = dict(lr=hp.lr_matrix, momentum=hp.momentum, nesterov=hp.nesterov, pp_iterations=hp.pp_iterations,
                   pp_beta=hp.pp_beta, contra=hp.contra, uw_floor=hp.uw_floor, weight_decay=hp.weight_decay,
                   rule=hp.rule, aurora_on=hp.aurora_on, ns_iteration=hp.ns_iteration, ns_dtype=hp.ns_dtype,
                   compile={"on": True, "off": False}.get(hp.compile, "auto"))
    aurora = choice(hp, "make_aurora", matrices, hp, model, options) or Aurora(matrices, **options)
    assigned = sum(len(g["params"]) for opt in (adam, aurora) for g in opt.param_groups)
    assert assigned == len(list(model.parameters())), "every parameter must have one optimizer"
    for opt in (adam, aurora):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    call(techniques(hp), "optimizers_built", adam, aurora, hp)
    return adam, aurora


def lr_multiplier(step, hp):
    """1 for the first (1 - cooldown_frac) of training, then linear decay to 0."""
    frac = step / hp.train_steps
    return 1.0 if frac < 1 - hp.cooldown_frac else (1 - frac) / hp.cooldown_frac


def lr_at(step, group, hp):
    """A group's lr at `step`: the record's initial_lr x lr_multiplier (or a technique's schedule)."""
    lr = choice(hp, "lr_at", step, group, hp)
    return group["initial_lr"] * lr_multiplier(step, hp) if lr is None else lr


def momentum_at(step, hp):
    """Aurora's momentum at `step`: hp.momentum (or a technique's schedule)."""
    momentum = choice(hp, "momentum_at", step, hp)
    return hp.momentum if momentum is None else momentum


def is_val_step(step, hp):
    """Validation at 0, every val_every steps, every val_every_late from late_frac on, and at the end."""
    chosen = choice(hp, "is_val_step", step, hp)
    if chosen is not None:
        return chosen
    if step == hp.train_steps:
        return True
    every = hp.val_every if step / hp.train_steps < hp.late_frac else hp.val_every_late
    return step % every == 0

# =================================================================================================
# Setup: distributed context, the log, the clock; the Driver (what runs around training)
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


def setup_distributed(hp):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (multi-node too); plain `python` is one process."""
    rank, world, local_rank = harness.distributed_env() if harness else (
        int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    micro, accum = micro_batch_plan(hp, world)  # before any process group: fail fast on every rank
    call(techniques(hp), "setup", hp)
    if torch.cuda.is_available():  # (harness.py checks LOCAL_RANK has a GPU)
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
    """The log header's line of what this process uses."""
    return (f"micro_batch_seqs_used {ctx.micro}  grad_accum_steps {ctx.accum}  "
            f"ns_dtype_used {str(ns_dtype_for(hp.ns_dtype, ctx.device)).removeprefix('torch.')}  "
            f"activations {str(activation_dtype(ctx)).removeprefix('torch.')}  compile_used {use_compile(hp, ctx)}")


class Driver:
    """What runs around the computation, called at the loop's named points; this one when the
    script runs alone (a log's code part): it writes logs/<uuid>.txt, the code then the output,
    as upstream's scripts do. harness.py's Harness has the same points."""
    BAD_INPUT, STOPPED = (ValueError,), (FloatingPointError,)
    first_trial = 0

    def __init__(self, hp, ctx, log):
        self.hp, self.ctx, self.log = hp, ctx, log

    def open(self, hp, setup):
        """Before the first trial: draw the seed (rank 0's for every rank), write the log's head:
        this file (a log's code part, run alone), the setup line, the hyperparameters."""
        seed = [secrets.randbelow(2 ** 32) if hp.seed is None else hp.seed]
        if self.ctx.world > 1:
            dist.broadcast_object_list(seed, 0)
        hp = self.hp = dataclasses.replace(hp, seed=seed[0])
        if self.ctx.rank == 0:
            os.makedirs("logs", exist_ok=True)
            self.log.file = open(os.path.join("logs", f"{uuid.uuid4()}.txt"), "x")
            with open(os.path.abspath(__file__)) as f:
                self.log.file.write(f.read() + SEPARATOR + "\n")
            for line in [setup, *(f"{k}: {json.dumps(v)}" for k, v in dataclasses.asdict(hp).items()), SEPARATOR]:
                self.log(line)
        return hp

    check_data = validated = step_ended = trial_ended = run_ended = lambda self, *args: None
    resumes = trial_started = lambda self, *args: 0  # no checkpoints: no trial resumes, each starts at 0

    def stopped(self, e, run):
        self.log(f"failed: trial {run.trial if run else 'setup'}: {e}", error=True)
        return 1

    def close(self):
        if self.log.file:
            self.log.file.close()


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
    trial: int = 0                 # where training is, for messages and checkpoints
    step: int = 0
    optimizers: tuple = None       # the running trial's (adam, aurora), clock and unread train losses
    clock: object = None
    losses: object = None
    driver: object = None          # the Driver: the loop calls it at its named points
    techniques: list = dataclasses.field(default_factory=list)  # those the run uses


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
    micro-batches and ranks, lr and momentum from the schedules, Adam and Aurora (a technique's
    before_step and after_step around them). Returns the step's summed loss, on the device."""
    hp, ctx, model = run.hp, run.ctx, run.model
    call(run.techniques, "before_step", run, step)
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
    call(run.techniques, "after_step", run, step)
    model.zero_grad(set_to_none=True)
    return loss


def log_train_losses(run, keep=0):
    """Log the train losses read so far but the last `keep`. A non-finite loss stops the run,
    naming a non-finite update of an earlier step (its cause) first, else the loss."""
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
    """Raise if an update Aurora computed was non-finite (a host sync and a collective: with the
    clock stopped, on every rank); with `before`, only one of an earlier step (the loss's cause)."""
    try:
        aurora.check_finite()
    except NonFiniteUpdate as e:
        if before is None or e.step < before:
            raise


def train_trial(run, trial):
    """One trial (one seed of a record): seed and re-initialize (unless the driver restores the
    trial), then the record's loop: validate (clock paused) on schedule, stop after the last
    validation, else train one step. No host sync while the clock runs."""
    hp, ctx, log, model, driver = run.hp, run.ctx, run.log, run.model, run.driver
    run.trial, run.step = trial, 0
    resumed = driver.resumes(trial)
    if not resumed:
        log(f"trial:{trial} seed:{hp.seed + trial}")
        torch.manual_seed(hp.seed + trial)  # then draws where the record's do: on the device
        if not choice(hp, "init_weights", model, hp):
            model.init_weights(hp.init_var)
        if ctx.world > 1:  # the ranks' weights must agree whatever their generators hold
            for p in model.parameters():
                dist.broadcast(p.data, 0)
        run.train_loader.reset()
    adam, aurora = run.optimizers = build_optimizers(model, hp, ctx.device)
    call(run.techniques, "trial_started", run)
    clock = run.clock = Clock(ctx)
    run.losses = TrainLosses(ctx.device)
    start = driver.trial_started(run)  # 0, or the step where the driver restored the trial
    clock.start()
    for step in range(start, hp.train_steps + 1):
        run.step = step
        if is_val_step(step, hp) and not (resumed and step == start):  # that one is in the log
            clock.stop()
            log_train_losses(run)  # with the clock stopped: the losses not yet read, and a host sync
            check_updates(aurora)  # (and a collective) to check Aurora's updates
            with contextlib.ExitStack() as around:  # e.g. the lineage's reference interpolation
                for t in [t for t in run.techniques if hasattr(t, "validating")]:
                    around.enter_context(t.validating(run, step))
                val_loss = evaluate(run)
            readout = choice(hp, "val_readout", run, step, val_loss, evaluate) or ""  # e.g. val_ema_loss
            log(f"step:{step}/{hp.train_steps} val_loss:{val_loss:.5f} {readout}{clock.val_fields(step)}")
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"non-finite val loss ({val_loss}) at step {step}")
            driver.validated(run, step)  # the harness's diagnostics
            clock.start()
        if step == hp.train_steps:
            break
        driver.step_ended(run, step)  # the harness's checkpoints (--save-every), a signal's stop
        loss = train_step(run, (adam, aurora), step)
        run.losses.put(loss, step, clock.elapsed())
        log_train_losses(run, keep=1)  # the step before's: its copy has long arrived
    if ctx.device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated(ctx.device) / 2**30:.2f} GiB")
    return val_loss


def prepare(hp, ctx, log, driver):
    """The data (checked first by the harness: a bad input leaves no stub log), the log, the model."""
    driver.check_data(hp)
    train_files = find_shards(hp.data_dir, "train")
    val = load_val_tokens(find_shards(hp.data_dir, "val"), hp, ctx)
    hp = driver.open(hp, setup_line(hp, ctx))
    model = GPT(hp, activation_dtype(ctx)).to(ctx.device)  # as the record: each trial re-initializes it there
    log(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    compiled = torch.compile(model, dynamic=False) if use_compile(hp, ctx) else model
    loader = TokenLoader(train_files, hp.batch_tokens, ctx, hp.vocab_size)
    return Run(hp, ctx, log, model, compiled, loader, val, driver=driver, techniques=techniques(hp))


def main(argv=None):
    hp, dry_run = parse_args(argv)
    try:
        if harness:  # the GPU presets refuse to start on a CPU by accident; a rank without a GPU
            harness.check_setup(hp, GPU_PRESETS)
        world = int(os.environ.get("WORLD_SIZE", 1))
        micro, accum = micro_batch_plan(hp, world)
        if dry_run:
            print(f"dry run: configuration ok (preset {hp.preset}, world size {world}, "
                  f"{accum} micro-batch(es) of {micro} sequences per rank)")
            for note in harness.inert_notes(hp) if harness else []:
                print(note)
            return 0
        ctx = setup_distributed(hp)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log, run = Logger(ctx.rank), None
    driver = (harness.Harness if harness else Driver)(hp, ctx, log)
    try:
        run = prepare(hp, ctx, log, driver)
        for trial in range(driver.first_trial, run.hp.trials):
            if driver.trial_ended(train_trial(run, trial)) is False:
                break  # the harness's futility stop (--stop-below): the trials run are complete
        driver.run_ended()
        return 0
    except driver.BAD_INPUT as e:  # bad input or configuration
        log(f"error: {e}", error=True)
        return 2
    except driver.STOPPED as e:  # NaN/inf, or (harness) killed: stop, keep the log
        return driver.stopped(e, run)
    finally:
        driver.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
