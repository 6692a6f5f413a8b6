"""The record's configuration, as literals: every default of train_gpt.py's Hyperparameters is
written out here by hand (the record's values from the record's script; the lineage's switches
off, or at the record's value), so that changing a default fails a test. Nothing is read from
outside the repository."""
import dataclasses
import os
import re

import pytest
import torch

import train_gpt
from aurora import Aurora, ns_dtype_for
from train_gpt import GPT, Context, Hyperparameters, build_optimizers, is_val_step, lr_multiplier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECORD = dict(
    # data: 8 x 64 sequences of 1024 tokens per step; 20 such batches of validation tokens
    batch_tokens=524288, seq_len=1024, micro_batch_seqs=64, val_tokens=10485760,
    # model
    vocab_size=50304, n_layer=12, d_model=768, head_dim=128, mlp_ratio=4, attn_scale=0.12,
    logit_softcap=15.0, rope_base=1024.0, init_var=0.33,
    # schedule
    train_steps=3200, cooldown_frac=0.7, val_every=125, val_every_late=25, late_frac=0.9,
    # Adam (AdamW, weight decay 0) for the embedding, the head and every parameter of < 2 dims
    adam_betas=(0.8, 0.95), adam_eps=1e-10, lr_embed=0.3, lr_head=1 / 320, lr_scalar=0.01,
    # Aurora for the 72 block matrices
    rule="aurora", lr_matrix=0.0375, momentum=0.95, nesterov=True, pp_iterations=2, pp_beta=0.5,
    contra=0.4, uw_floor=0.35, weight_decay=0.0, aurora_on="nonsquare", ns_iteration="quintic12",
    ns_dtype="auto", aurora_batched=False,
    # run: no seed given (each trial's seed is drawn), one trial, compiled on CUDA, no checkpoints
    preset="record", seed=None, trials=1, compile="auto", save_every=0,
    # where data and records are (inside the repository), and the rest of a run's settings
    data_dir=os.path.join(ROOT, "data", "fineweb10B"), records_dir=os.path.join(ROOT, "records"),
    run_name=None, append=False, allow_cpu=False, resume=None, val_loss_target=3.28, stop_below=None,
    # neuron-health diagnostics at validation steps (they change no training arithmetic)
    diagnostics=True, diag_tokens=65536, dead_threshold=0.001, starved_threshold=0.1,
    frozen_threshold=0.1,
    # the lineage's switches (spec/aurora-lineage.md), off or at the record's value; the values they
    # use when switched on stay as they are, so a changed default shows here too
    norm_in_fp32=False, cudnn_attention=True, init="record", zero_biases=True, fc_depth_scale=0.0,
    gain_split=0.0, val_first=True, val_extra=(), lr_schedule="linear", schedule_steps=None,
    lr_power=1.2, power_c=(4.976805410800738e-05, 5.184172302917436e-07, 1.6589351369335795e-06,
                           3.3169534699576625e-06),
    momentum_warmup=0, momentum_cooldown=0, momentum_min=0.85, momentum_horizon=None,
    norm_estimate="record", contra_fade=0, soap="none", soap_beta2=0.9, soap_every=10,
    soap_v_blend=0.95, soap_v_floor=0.55, radial_brake=1.0, radius_pin=False, lineage_rounding="none",
    ema_nesterov=0.0, ema_nesterov_beta=0.99, ema_nesterov_start=300, ema_nesterov_stop=1950,
    ref_gamma=0.0, ref_capture=2375, ref_start=2850,
    # the SOAP-Muon frontier's switches (spec/soap-frontier.md), off; the values they use when on
    soap_muon=False, soap_trust_gate=False, trust_floor_end=1375, trust_fade_end=1625, row_floor=False, cwd=0.0,
    scalar_adam="torch", aux_beta2=None, gain_split_pairs=0, final_ema_blend=0.0, final_ema_tau=150.0,
    final_ema_start=2000, final_ema_step=None, tail_ema_readout=0.0, tail_ema_tau=150.0, tail_ema_start=2400,
    tail_ema_stop=None,
)
# The Aurora group's values, as the record's Muon(..., lr=0.0375, weight_decay=0, pp_iterations=2,
# pp_beta=0.5) and its defaults (momentum 0.95, Nesterov, contra 0.4, floor 0.35) carry them.
AURORA_GROUP = dict(lr=0.0375, momentum=0.95, nesterov=True, pp_iterations=2, pp_beta=0.5, contra=0.4,
                    uw_floor=0.35, weight_decay=0.0, rule="aurora", aurora_on="nonsquare",
                    ns_iteration="quintic12", ns_dtype="auto")
CUDA = Context(rank=0, world=8, device=torch.device("cuda", 0), micro=64, accum=1)  # needs no GPU


def test_the_defaults_are_the_records_values():
    hp = Hyperparameters()
    # every field is here: a new one needs its record value written out above
    assert sorted(f.name for f in dataclasses.fields(hp)) == sorted(RECORD)
    assert {k: getattr(hp, k) for k in RECORD} == RECORD
    assert train_gpt.PRESETS["record"] == {}
    from_flags, _ = train_gpt.parse_args([])  # the command line's default is the same
    assert {k: getattr(from_flags, k) for k in RECORD} == RECORD
    # on a GPU: compiled, bfloat16 activations and Newton-Schulz
    assert train_gpt.use_compile(hp, CUDA) and train_gpt.activation_dtype(CUDA) == torch.bfloat16
    assert ns_dtype_for(hp.ns_dtype, CUDA.device) == torch.bfloat16
    assert train_gpt.micro_batch_plan(hp, 8) == (64, 1) and train_gpt.micro_batch_plan(hp, 1) == (64, 8)


def test_the_record_model():
    with torch.device("meta"):
        model = GPT(Hyperparameters(), torch.bfloat16)
    assert len(model.blocks) == 12 and model.softcap == 15.0
    attn = model.blocks[0].attn
    assert (attn.n_head, attn.head_dim, attn.scale) == (6, 128, 0.12)
    assert tuple(model.embed.weight.shape) == (50304, 768) and model.embed.weight.dtype == torch.bfloat16
    assert tuple(model.blocks[0].mlp.fc.weight.shape) == (3072, 768)
    n_blocks = sum(p.numel() for p in model.blocks.parameters())
    assert n_blocks == 12 * (4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768 + 2 * 768)
    assert sum(p.numel() for p in model.parameters()) == n_blocks + 2 * 50304 * 768 + 50304 + 2 * 768
    rotary = train_gpt.Rotary(128, Hyperparameters().rope_base)  # frequencies 1 .. 1/1024, then zeros
    expected = torch.cat([(1 / 1024) ** torch.linspace(0, 1, 32), torch.zeros(32)])
    assert torch.equal(rotary.freqs, expected)


def test_the_record_optimizers():
    hp = Hyperparameters()
    with torch.device("meta"):
        model = GPT(hp, torch.bfloat16)
    adam, aurora = build_optimizers(model, hp, CUDA.device)
    # Adam: torch.optim.AdamW(..., betas=(0.8, 0.95), eps=1e-10, weight_decay=0, fused=True)
    assert type(adam) is torch.optim.AdamW and adam.defaults["fused"] is True
    assert build_optimizers(model, hp, torch.device("cpu"))[0].defaults["fused"] is True
    for group in adam.param_groups:
        assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-10, 0.0)
    assert [g["lr"] for g in adam.param_groups] == [0.3, 1 / 320, 0.01]
    assert adam.param_groups[0]["params"] == [model.embed.weight]
    assert adam.param_groups[1]["params"] == [model.proj.weight]
    assert all(p.ndim < 2 for p in adam.param_groups[2]["params"])
    # Aurora: the 72 block matrices, one group with the record's values, the per-matrix path
    assert len(aurora.param_groups) == 1
    group = aurora.param_groups[0]
    assert len(group["params"]) == 72
    assert sorted({tuple(p.shape) for p in group["params"]}) == [(768, 768), (768, 3072), (3072, 768)]
    assert {k: group[k] for k in AURORA_GROUP} == AURORA_GROUP
    assert type(aurora) is Aurora and aurora.compile == "auto"  # the record's class: per-matrix only
    assert [g["initial_lr"] for g in adam.param_groups + aurora.param_groups] == [0.3, 1 / 320, 0.01, 0.0375]


def test_the_record_schedule():
    hp = Hyperparameters()
    # validation at 0, every 125 steps while step/3200 < 0.9, every 25 after, and at 3200
    assert [s for s in range(3201) if is_val_step(s, hp)] == list(range(0, 2876, 125)) + list(range(2900, 3201, 25))
    assert [is_val_step(s, hp) for s in (125, 130, 2850, 2875, 2880, 2900, 3175, 3199, 3200)] == [
        True, False, False, True, False, True, True, False, True]
    # lr: x1 while step/3200 < 0.3, then (1 - step/3200) / 0.7
    assert lr_multiplier(0, hp) == 1.0 and lr_multiplier(959, hp) == 1.0
    assert lr_multiplier(960, hp) == pytest.approx(1.0)
    assert lr_multiplier(961, hp) == pytest.approx((1 - 961 / 3200) / 0.7) and lr_multiplier(961, hp) < 1
    assert lr_multiplier(2080, hp) == pytest.approx(0.5)
    assert lr_multiplier(3199, hp) == pytest.approx(1 / 3200 / 0.7)


def test_validation_steps_are_the_published_logs():
    ours = [s for s in range(3201) if is_val_step(s, Hyperparameters())]
    first_trial = []
    with open(train_gpt.os.path.join(train_gpt.ROOT, "records", "published_aurora_3175",
                                     "track3_aurora_3175_n20.txt")) as f:
        for line in f:
            m = re.match(r"step:(\d+)/3200 val_loss", line)
            if m:
                if first_trial and int(m.group(1)) <= first_trial[-1]:
                    break
                first_trial.append(int(m.group(1)))
    assert ours == first_trial
