"""frontier.py (the SOAP-Muon frontier, results #44-#46: spec/soap-frontier.md) against the rules
written out in tests/frontier_reference.py, bit for bit: the per-matrix rule over steps that cross
SOAP refreshes (every step) and the trust gate's phases, in float32 and bfloat16 Newton-Schulz,
with RowFloor, Cautious Weight Decay and the Aurora modifiers; the Adam of biases and gains; the
gain split's signs from a seed; the tail EMA's final blend (#45) and readout (#46); and the
presets' schedules and validation steps at every step. Then the same through the trainer: the
optimizers train_gpt.py builds for each preset, its init from a seed, the blend and the readout
in a run, a tiny run of each preset whose log's code part runs alone. (Checkpoints: test_checkpoint.py.)"""
import dataclasses
import glob
import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

import frontier
import frontier_reference as ref
import harness
import train_gpt
from frontier import (FRONTIER_PRESETS as PRESETS, FrontierAdam, FrontierAurora, SoapMuonMatrix, TailEMA,
                      gain_split_signs, raw_adam_step, trust_bounds)
from lineage import LINEAGE
from test_train import NOT_IN_THE_RECORD, ROOT, SEPARATOR, code_part, computation_flags, only_log, redefined, runs_alone
from train_gpt import (GPT, PRESETS as TRAINER_PRESETS, Hyperparameters, build_optimizers, is_val_step, lr_at,
                       momentum_at, parse_args)

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert (a.double() - b.double()).abs().max().item() == 0.0  # bit for bit (up to the sign of 0)


# --- the per-matrix rule ---

# One block at width 16: mlp.fc (tall), mlp.proj (wide), attn.q and attn.v (square, gate 1),
# attn.proj (square, trust gate, zero at the start like every *proj* weight).
MATRICES = (("fc", (64, 16), "mlp"), ("proj", (16, 64), "mlp"), ("q", (16, 16), "attn"),
            ("v", (16, 16), "attn"), ("attn_proj", (16, 16), "attn_proj"))
VARIANTS = dict(soap_2750={}, soap_2690=dict(row_floor=True, cwd=0.025),
                aurora_proj=dict(aurora_on="wide_only"), aurora_nonsquare=dict(aurora_on="nonsquare"))
MODIFIERS = dict(aurora_proj=dict(pp_iterations=3, pp_beta=0.25), aurora_nonsquare=dict(pp_iterations=2, pp_beta=0.5))


def weights_and_gradients(steps):
    """Weights whose rows span two decades (so the scalar floor acts on some matrices and the
    row floor on some rows), gradients at a realistic small scale with one row 1e-6 of the rest
    (so SOAP's denominator clamp acts)."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=g) * torch.logspace(-1.3, 0.7, shape[0])[:, None] * (name != "attn_proj")
               for name, shape, _ in MATRICES]
    grads = []
    for _ in range(steps):
        step = []
        for _, shape, _ in MATRICES:
            G = torch.randn(shape, generator=g) * 1e-4
            G[0] *= 1e-6
            step.append(G)
        grads.append(step)
    return weights, grads


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_matrix_rule_is_the_published_one(variant, dtype):
    """6 steps of each matrix (the trust gate's floor ends at step 2 and fades out by step 4, so
    all its phases occur; SOAP refreshes its bases after every step from the second), with a
    changing lr and momentum: our step against the reference's, max abs diff 0."""
    rule = dict(frontier.RULE, trust_floor_end=2, trust_fade_end=4, **VARIANTS[variant], **MODIFIERS.get(variant, {}))
    weights, grads = weights_and_gradients(6)
    ours = [(w.clone(), SoapMuonMatrix(shape, "cpu", kind)) for w, (_, shape, kind) in zip(weights, MATRICES)]
    momenta = [torch.zeros_like(w) for w in weights]
    states = [ref.spec_soap_state(*shape) for _, shape, _ in MATRICES]
    clamped = False
    for step in range(6):
        lr, mu = 0.0375 * (1 - step / 10), 0.85 + step / 100
        for i, (_, _, kind) in enumerate(MATRICES):
            W, matrix = ours[i]
            matrix.step(W, grads[step][i].clone(), lr, mu, step, dtype, rule)
            weights[i], momenta[i] = ref.matrix_step(
                weights[i], grads[step][i], momenta[i], states[i], kind, step, lr, mu, dtype,
                rule["row_floor"], rule["cwd"], rule["aurora_on"], floor_end=2, fade_end=4)
            assert_equal(W, weights[i])
            assert_equal(matrix.momentum, momenta[i])
            clamped |= bool((matrix.soap.exp_avg_sq[matrix.soap.exp_avg_sq > 0] < 1e-16).any())
    assert clamped  # the gradients are small enough that SOAP's clamp acts


def test_the_trust_gate_bounds_and_the_presets_rule_constants():
    """The gate's floor and cap at every step of a run with the published steps (1375, 1625)."""
    for step in range(2000):
        assert trust_bounds(step) == ref.trust_bounds(step)
    assert {k: frontier.RULE[k] for k in ("radial_brake", "uw_floor", "row_floor_rho", "trust_min_agree",
                                          "trust_min_grad_align")} == dict(
        radial_brake=0.5, uw_floor=0.3825, row_floor_rho=1.0, trust_min_agree=0.2, trust_min_grad_align=0.0)


# --- Adam of biases and gains ---

def test_the_adam_of_biases_and_gains_has_no_bias_correction():
    g = torch.Generator().manual_seed(2)
    for b2 in (0.99, 0.997, 0.9965):
        p = torch.randn(24, generator=g)
        q, m, v, state = p.clone(), torch.zeros(24), torch.zeros(24), {}
        for step in range(5):
            grad = torch.randn(24, generator=g) * 1e-3
            grad[:3] = 0.0  # eps acts where the second moment is 0
            lr = 0.01 * (1 - step / 10)
            raw_adam_step(p, grad, state, lr, (0.8, b2))
            q, m, v = ref.adam_step(q, grad, m, v, lr, 0.8, b2)
            assert_equal(p, q)


# --- the gain split's signs from a seed ---

@pytest.mark.parametrize("n_layer, width, head_dim", [(12, 64, 16), (9, 32, 8), (10, 48, 32)])
def test_the_gain_split_signs_are_the_published_ones(n_layer, width, head_dim):
    """Rademacher signs for the first 6 blocks, antithetic head-balanced pairs after (an odd block
    count leaves the last one unpaired; a width that is no multiple of head_dim draws plain signs)."""
    for seed in (0, 7):
        torch.manual_seed(seed)
        ours = gain_split_signs(n_layer, width, head_dim, seed, torch.device("cpu"))
        torch.manual_seed(seed)
        expected = ref.gain_signs(n_layer, width, head_dim, seed)
        for s, e in zip(ours, expected, strict=True):
            assert_equal(s, e)
        if width % head_dim == 0:  # a pair's heads carry complementary counts of +1
            for a, b in zip(ours[6::2], ours[7::2]):
                assert ((a.view(-1, head_dim) > 0).sum(1) + (b.view(-1, head_dim) > 0).sum(1) == head_dim).all()


def test_the_pair_count_rounds_half_to_even():
    assert [ref.half_to_even(t) for t in (4, 5, 7, 9)] == [round(t / 2) for t in (4, 5, 7, 9)] == [2, 2, 4, 4]


# --- the tail EMA ---

def train_with_ema(form, reference, **spans):
    """8 steps of parameters (a bfloat16 embedding, left out of the EMA, and float32 ones) with
    our TailEMA (tau 4) beside the reference's EMA, equal after every step: (params, the weights
    by the reference, its EMA, ours)."""
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(6, 4, generator=g).bfloat16(), torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    ema = TailEMA([None, *params[1:]], tau=4, form=form, **spans)
    with ema.readout(0.6, params):  # no EMA yet: the weights as they are
        pass
    ws, emas = [p.clone() for p in params[1:]], None
    for steps_done in range(1, 9):
        delta = [torch.randn(p.shape, generator=g).to(p.dtype) * 0.01 for p in params]  # the optimizers' step
        for p, d in zip(params, delta):
            p.sub_(d)
        ws = [w - d for w, d in zip(ws, delta[1:])]
        ema.after_step(steps_done)
        emas = reference(emas, ws, steps_done, tau=4, **spans)
        for e, r in zip(ema.ema[1:] if ema.ema else [], emas or [], strict=True):
            assert_equal(e, r)
    return params, ws, emas, ema


def test_the_final_ema_blend_is_the_published_one():
    """#45: the EMA from the end of step 3, blended in (lam 0.6) before step 8's validation, for good."""
    params, ws, emas, ema = train_with_ema("lerp", ref.ema_45, start=3)
    ema.blend_into(0.6)
    for p, w, e in zip(params[1:], ws, emas):
        assert_equal(p, torch.lerp(w, e, 0.6))


def test_the_tail_ema_readout_is_the_published_one():
    """#46: the EMA over start 3 <= steps done < stop 6 in float32; a readout evaluates
    (1 - 0.6) w + 0.6 ema and puts every weight back exactly."""
    params, ws, emas, ema = train_with_ema("add", ref.ema_46, start=3, stop=6)
    before = [p.clone() for p in params]
    with ema.readout(0.6, params):
        assert_equal(params[0], before[0])  # the embedding is not blended
        for p, w, e in zip(params[1:], ws, emas):
            assert_equal(p, ((1.0 - 0.6) * w.float() + 0.6 * e).to(w.dtype))
    for p, b in zip(params, before):
        assert_equal(p, b)


# --- the presets: schedules and validation steps at every step ---

CLAIM = dict(soap_2750=(2750, 2900), soap_2720=(2720, 2720), soap_2690=(2690, 2900))  # (claimed, stops at)


def preset_hp(name):
    """The trainer's hyperparameters that exist today, as aurora_2890 + the proposed overrides set them."""
    merged = dict(TRAINER_PRESETS["aurora_2890"], **PRESETS[name])
    fields = {f.name for f in dataclasses.fields(Hyperparameters)}
    return Hyperparameters(**{k: v for k, v in merged.items() if k in fields})


@pytest.mark.parametrize("name", CLAIM)
def test_the_schedules_and_validation_steps_are_the_published_ones_at_every_step(name):
    hp, (claimed, stop) = preset_hp(name), CLAIM[name]
    assert hp.train_steps == stop
    groups = [dict(initial_lr=lr, power_c=c) for lr, c in zip((0.3, 1 / 320, 0.01, 0.0375), ref.POWER_C)]
    for step in range(stop + 1):
        for g in groups:
            assert lr_at(step, g, hp) == ref.lr_at(step, g["initial_lr"], g["power_c"])
        assert momentum_at(step, hp) == ref.momentum_at(step)
        assert is_val_step(step, hp) == ref.validates(step, stop, claimed), step
    assert (hp.ema_nesterov, hp.ema_nesterov_beta, hp.ema_nesterov_start, hp.ema_nesterov_stop) == (
        0.3, 0.99, 300, 1950)
    assert (hp.adam_betas, hp.adam_eps, hp.lr_embed, hp.lr_head, hp.lr_scalar, hp.lr_matrix) == (
        (0.8, 0.99), 1e-10, 0.3, 1 / 320, 0.01, 0.0375)
    assert (hp.uw_floor, hp.radial_brake, hp.radius_pin, hp.norm_estimate, hp.contra) == (
        0.3825, 0.5, True, "schatten4", 0.0)
    assert (hp.init, hp.zero_biases, hp.fc_depth_scale, hp.gain_split, hp.norm_in_fp32) == (
        "torch", False, 0.3, 0.125, True)
    assert (hp.soap_every, hp.soap_beta2, hp.soap_v_blend, hp.soap_v_floor, hp.rule) == (1, 0.9, 1.0, 0.0, "muon")


def test_the_presets_new_settings():
    """What each preset adds, with the values of its script (flags the trainer does not have yet)."""
    base = dict(soap="all_hidden", soap_muon=True, soap_trust_gate=True, trust_floor_end=1375, trust_fade_end=1625,
                scalar_adam="raw", aux_beta2=(0.99, 0.997, 0.9965), gain_split_pairs=6)
    for name in CLAIM:
        assert {k: PRESETS[name][k] for k in base} == base
    assert {k: PRESETS["soap_2720"][k] for k in ("final_ema_blend", "final_ema_tau", "final_ema_start",
                                                  "final_ema_step")} == dict(
        final_ema_blend=0.6, final_ema_tau=150, final_ema_start=2000, final_ema_step=2720)
    assert {k: PRESETS["soap_2690"][k] for k in ("tail_ema_readout", "tail_ema_tau", "tail_ema_start",
                                                  "tail_ema_stop", "row_floor", "cwd")} == dict(
        tail_ema_readout=0.6, tail_ema_tau=150, tail_ema_start=2400, tail_ema_stop=2900, row_floor=True, cwd=0.025)
    assert "final_ema_blend" not in PRESETS["soap_2690"] and "row_floor" not in PRESETS["soap_2720"]
    assert PRESETS["aurora_proj"] == dict(rule="aurora", aurora_on="wide_only", pp_iterations=3, pp_beta=0.25)
    assert PRESETS["aurora_nonsquare"] == dict(rule="aurora", aurora_on="nonsquare", pp_iterations=2, pp_beta=0.5)


# --- through the trainer: the optimizers it builds for each preset ---

SMALLEST = ["--n-layer", "1", "--d-model", "16", "--head-dim", "8"]  # the shapes of MATRICES above
PLACE_KIND = {"mlp.fc": "mlp", "mlp.proj": "mlp", "attn.q": "attn", "attn.k": "attn", "attn.v": "attn",
              "attn.proj": "attn_proj"}
TRAINER_VARIANTS = {"soap_2750": {}, "soap_2690": dict(row_floor=True, cwd=0.025),
                    "soap_2690+aurora_proj": dict(row_floor=True, cwd=0.025, aurora_on="wide_only"),
                    "soap_2690+aurora_nonsquare": dict(row_floor=True, cwd=0.025, aurora_on="nonsquare")}


@pytest.mark.parametrize("preset", TRAINER_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_trainers_optimizer_for_a_preset_is_the_published_rule(preset, dtype):
    """The matrix optimizer train_gpt.py builds for the preset (one block at width 16: every kind
    of matrix), 6 steps with a changing lr and momentum (SOAP refreshes after every step from the
    second; the trust gate's floor ends at step 2 and fades out by 4), against the reference's
    rule per matrix: max abs diff 0, in float32 and bfloat16 Newton-Schulz; p.grad keeps the raw
    gradient."""
    hp, _ = parse_args(["--preset", preset + "+tiny", *SMALLEST, "--trust-floor-end", "2", "--trust-fade-end", "4",
                        "--ns-dtype", "float32" if dtype == torch.float32 else "bfloat16"])
    model = GPT(hp, torch.float32)
    names = {p: ".".join(name.split(".")[2:4]) for name, p in model.named_parameters()}
    _, aurora = build_optimizers(model, hp, torch.device("cpu"))
    assert type(aurora) is FrontierAurora and len(aurora.param_groups) == 1
    (group,) = aurora.param_groups
    matrices = group["params"]
    assert sorted(names[p] for p in matrices) == sorted(PLACE_KIND)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # rows over two decades (floors act); attn.proj at 0, as the init leaves it
        for p in matrices:
            p.copy_(torch.randn(p.shape, generator=g) * torch.logspace(-1.3, 0.7, p.shape[0])[:, None]
                    * (names[p] != "attn.proj"))
    weights = {p: p.detach().clone() for p in matrices}
    momenta = {p: torch.zeros_like(p) for p in matrices}
    states = {p: ref.spec_soap_state(*p.shape) for p in matrices}
    settings = TRAINER_VARIANTS[preset]
    for step in range(6):
        lr, mu = 0.0375 * (1 - step / 10), 0.85 + step / 100
        group["lr"], group["momentum"] = lr, mu
        grads = {}
        for p in matrices:
            grads[p] = torch.randn(p.shape, generator=g) * 1e-4
            grads[p][0] *= 1e-6  # SOAP's denominator clamp acts
            p.grad = grads[p].clone()
        aurora.step()
        for p in matrices:
            weights[p], momenta[p] = ref.matrix_step(
                weights[p], grads[p], momenta[p], states[p], PLACE_KIND[names[p]], step, lr, mu, dtype,
                settings.get("row_floor", False), settings.get("cwd", 0.0), settings.get("aurora_on", "off"),
                floor_end=2, fade_end=4)
            assert_equal(p.data, weights[p])
            assert_equal(p.grad, grads[p])


def test_the_trainers_adam_is_the_published_one():
    """The Adam train_gpt.py builds for soap_2750: torch's fused AdamW for the embedding and the
    head; for the gains, the biases and the attn.proj biases (betas 0.8 and 0.99, 0.997, 0.9965)
    Adam without bias correction, 4 steps against the reference's; PowerCool's c of the scalars
    on all three groups."""
    hp, _ = parse_args(["--preset", "soap_2750+tiny", *SMALLEST])
    model = GPT(hp, torch.float32)
    adam, _ = build_optimizers(model, hp, torch.device("cpu"))
    assert type(adam) is FrontierAdam
    names = {p: name for name, p in model.named_parameters()}
    groups = adam.param_groups
    assert [g["params"] for g in groups[:2]] == [[model.embed.weight], [model.proj.weight]]
    assert [sorted(names[p] for p in g["params"]) for g in groups[2:]] == [
        sorted(n for n in names.values() if n.endswith("gains")),
        sorted(n for n in names.values() if n.endswith("bias") and not n.endswith("attn.proj.bias")),
        ["blocks.0.attn.proj.bias"]]
    assert [g["betas"] for g in groups] == [(0.8, 0.99), (0.8, 0.99), (0.8, 0.99), (0.8, 0.997), (0.8, 0.9965)]
    c = hp.power_c
    assert [g["power_c"] for g in groups] == [c[0], c[1], c[2], c[2], c[2]]
    twin = GPT(hp, torch.float32)  # the embedding and head's reference: torch's fused AdamW
    twin.load_state_dict(model.state_dict())
    torch_adam = torch.optim.AdamW([dict(params=[twin.embed.weight], lr=0.3), dict(params=[twin.proj.weight], lr=0.01)],
                                   betas=(0.8, 0.99), eps=1e-10, weight_decay=0.0, fused=True)
    g = torch.Generator().manual_seed(4)
    expected = {p: (p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)) for grp in groups[2:]
                for p in grp["params"]}
    for step in range(4):
        for grp, twin_grp in zip(groups, torch_adam.param_groups + [None] * 3):
            grp["lr"] = grp["initial_lr"] * (1 - step / 8)
            if twin_grp:
                twin_grp["lr"] = grp["lr"]
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(p.dtype)
            q.grad = p.grad.clone()
        adam.step()
        torch_adam.step()
        for grp in groups[2:]:
            for p in grp["params"]:
                w, m, v = expected[p]
                expected[p] = ref.adam_step(w, p.grad, m, v, grp["lr"], 0.8, grp["betas"][1])
                assert_equal(p.data, expected[p][0])
        assert_equal(model.embed.weight.data, twin.embed.weight.data)
        assert_equal(model.proj.weight.data, twin.proj.weight.data)


@pytest.mark.parametrize("name", CLAIM)
def test_the_trainers_presets_are_aurora_2890_with_the_overrides(name):
    """--preset NAME gives aurora_2890's settings with the overrides above (so the schedules and
    validation steps above are the trainer's), its techniques (frontier and lineage) in use."""
    hp, _ = parse_args(["--preset", name])
    assert hp == dataclasses.replace(preset_hp(name), preset=name)
    assert [t.name for t in train_gpt.techniques(hp)] == ["frontier.py", "lineage.py"]
    with pytest.raises(SystemExit):  # a soap preset holds aurora_2890's settings already
        parse_args(["--preset", "aurora_2890+" + name])


def test_the_blend_comes_before_a_validation_and_the_flags_are_checked(capsys):
    """--final-ema-step is a validation step (the blend comes before it); settings that have no
    place in the frontier's rule, or that cannot act, are refused naming the flag."""
    hp, _ = parse_args(["--preset", "soap_2720", "--final-ema-step", "2600"])
    assert is_val_step(2600, hp) and not is_val_step(2601, hp)
    for flags, named in ((["--contra", "0.4"], "--contra"), (["--no-radius-pin"], "--radius-pin"),
                         (["--final-ema-start", "2800"], "--final-ema-step"), (["--aux-beta2", "0.9", "1", "0.9"],
                                                                               "--aux-beta2"),
                         (["--tail-ema-readout", "0.5"], "--tail-ema-readout"), (["--no-soap-muon"], "--soap")):
        with pytest.raises(SystemExit):
            parse_args(["--preset", "soap_2720", *flags])
        assert f"error: {named} " in capsys.readouterr().err, flags
    with pytest.raises(SystemExit):  # RowFloor and CWD act within the frontier's rule
        parse_args(["--preset", "aurora_2890", "--row-floor"])
    assert "error: --row-floor acts within --soap-muon's rule" in capsys.readouterr().err


# --- through the trainer: the init from a seed ---

def test_the_trainers_init_is_the_published_one():
    """The init train_gpt.py draws for soap_2750 from seed 5 (9 blocks of width 32, head_dim 8):
    the lineage's (PyTorch's default init on the CPU, *proj* zeroed, mlp.fc scaled by depth), and
    the gain split 0.125 with the reference's signs: Rademacher for blocks 0-5 from the default
    generator, antithetic head-balanced pairs for blocks 6 and 7 and the first vector of a pair
    for the unpaired block 8."""
    hp, _ = parse_args(["--preset", "soap_2750+tiny", "--n-layer", "9", "--d-model", "32", "--head-dim", "8"])
    model = GPT(hp, torch.float32)
    torch.manual_seed(5)
    assert train_gpt.choice(hp, "init_weights", model, hp) is True
    lineage = GPT(hp, torch.float32)  # the lineage's init without a gain split, from the same seed
    torch.manual_seed(5)
    LINEAGE.init_weights(lineage, dataclasses.replace(hp, gain_split=0.0, gain_split_pairs=0))
    torch.manual_seed(5)
    GPT(hp, torch.float32)  # the default init's draws on the CPU, as the lineage's init makes them
    signs = ref.gain_signs(9, 32, 8, 5)
    expected = dict(lineage.named_parameters())
    for i, s in enumerate(signs):
        expected[f"blocks.{i}.norm1.gains"], expected[f"blocks.{i}.norm2.gains"] = 1.0 - 0.125 * s, 1.0 + 0.125 * s
    for name, p in model.named_parameters():
        assert_equal(p.data, expected[name].data)
    assert not torch.equal(signs[6], signs[7]) and not torch.equal(signs[6], -signs[7])  # a pair, not a copy


# --- through the trainer: the final blend (#45) and the readout (#46) in a run ---

TINY = ["--n-layer", "1", "--d-model", "64", "--head-dim", "16", "--val-every", "2", "--val-every-late", "2",
        "--val-tokens", "4096", "--seed", "0", "--no-diagnostics"]
VAL_LINE = re.compile(r"^step:(\d+)/\d+ val_loss:(\d+\.\d{5})(?: val_ema_loss:(\d+\.\d{5}))? train_time:")


def val_lines(log_text):
    """[(step, val_loss, val_ema_loss or None)] of a log."""
    return [(int(m.group(1)), float(m.group(2)), m.group(3) and float(m.group(3)))
            for m in map(VAL_LINE.match, log_text.splitlines()) if m]


TRAINER_POINTS = (train_gpt.train_step, train_gpt.evaluate)  # before any test wraps them


def recorded_run(preset, flags, data_dir, records, monkeypatch):
    """A tiny run of train_gpt.main, recording the weights after every step and at every
    evaluation (with its loss): (after, evaluations, log text)."""
    after, seen = [], []
    real_step, real_evaluate = TRAINER_POINTS

    def train_step(run, optimizers, step):
        loss = real_step(run, optimizers, step)
        after.append([p.detach().clone() for p in run.model.parameters()])
        return loss

    def evaluate(run):
        weights = [p.detach().clone() for p in run.model.parameters()]
        loss = real_evaluate(run)
        seen.append((run.step, weights, loss))
        return loss
    monkeypatch.setattr(train_gpt, "train_step", train_step)
    monkeypatch.setattr(train_gpt, "evaluate", evaluate)
    assert train_gpt.main(["--preset", preset + "+tiny", "--data-dir", data_dir, "--records-dir", str(records),
                           "--train-steps", "8", *TINY, *flags]) == 0
    return after, seen, open(only_log(glob.glob(str(records / "*"))[0])).read()


def test_the_final_ema_blend_in_a_run(data_dir, tmp_path, monkeypatch):
    """soap_2720 over 8 steps (its EMA from the end of step round(2000 * 8/2720) = 6, tau 2 here):
    the validations before step 8 see the trained weights; the one at 8 the weights blended
    towards the reference's EMA (lerp 0.6), the embedding as trained; the log notes both."""
    after, seen, log = recorded_run("soap_2720", ["--final-ema-tau", "2"], data_dir, tmp_path, monkeypatch)
    emas = None
    for steps_done, weights in enumerate(after, 1):
        emas = ref.ema_45(emas, weights[1:], steps_done, start=6, tau=2)
    assert [s for s, _, _ in seen] == [2, 4, 6, 8]
    for step, weights, _ in seen[:-1]:
        for w, a in zip(weights, after[step - 1]):
            assert_equal(w, a)
    final = seen[-1][1]
    assert_equal(final[0], after[-1][0])  # the embedding (the model's first parameter) is not blended
    for w, a, e in zip(final[1:], after[-1][1:], emas, strict=True):
        assert_equal(w, torch.lerp(a, e, 0.6))
    assert "tail_ema initialized step:6 tau:2\n" in log and "tail_ema applied step:8 tau:2 lambda:0.6\n" in log


def test_the_tail_ema_readout_in_a_run(data_dir, tmp_path, monkeypatch):
    """soap_2690 over 8 steps, its EMA over 3 <= steps done < 7 (tau 2 here): at every validation
    once the EMA exists a second evaluation sees ((1 - 0.6) w + 0.6 EMA) (the embedding as it
    is), logged as val_ema_loss beside val_loss (before: val_ema_loss = val_loss); the readout
    leaves the weights exactly as they were: a run without it trains the same weights."""
    flags = ["--tail-ema-start", "3", "--tail-ema-stop", "7", "--tail-ema-tau", "2"]
    after, seen, log = recorded_run("soap_2690", flags, data_dir, tmp_path / "a", monkeypatch)
    emas, at = None, {}
    for steps_done, weights in enumerate(after, 1):
        emas = ref.ema_46(emas, weights[1:], steps_done, start=3, stop=7, tau=2)
        at[steps_done] = emas
    lines = val_lines(log)
    assert [s for s, _, _ in lines] == [2, 4, 6, 7, 8] and [s for s, _, _ in seen] == [2, 4, 4, 6, 6, 7, 7, 8, 8]
    readouts = iter(seen)
    for step, val_loss, val_ema_loss in lines:
        plain = next(readouts)
        for w, a in zip(plain[1], after[step - 1]):
            assert_equal(w, a)
        assert f"{plain[2]:.5f}" == f"{val_loss:.5f}"
        if step < 3:
            assert val_ema_loss == val_loss
            continue
        blended = next(readouts)
        assert_equal(blended[1][0], after[step - 1][0])
        for w, a, e in zip(blended[1][1:], after[step - 1][1:], at[step], strict=True):
            assert_equal(w, ((1.0 - 0.6) * a.float() + 0.6 * e).to(a.dtype))
        assert f"{blended[2]:.5f}" == f"{val_ema_loss:.5f}" and val_ema_loss != val_loss
    plain_after, _, plain_log = recorded_run("soap_2690", ["--tail-ema-readout", "0"], data_dir, tmp_path / "b",
                                             monkeypatch)
    for a, b in zip(after, plain_after, strict=True):
        for x, y in zip(a, b):
            assert_equal(x, y)
    assert [(s, v) for s, v, _ in val_lines(plain_log)] == [(s, v) for s, v, _ in lines]
    assert all(e is None for _, _, e in val_lines(plain_log))


# --- a tiny run of each preset; its log's code part runs alone ---

def test_a_tiny_run_of_each_preset_trains_and_its_code_part_runs_alone(data_dir, tmp_path):
    """4 steps of each preset at tiny sizes (its step counts scaled: the blend of soap_2720 and
    the readout of soap_2690 act at step 4); each log's code part carries frontier.py, lineage.py
    and soap.py, nothing of the harness or the variants, and run as a script of its own (one
    process runs them all) writes the same code part and the same val_loss and val_ema_loss. The
    record's code part and a lineage preset's carry nothing of the frontier."""
    logs, runs = {}, []
    for preset in ("soap_2750", "soap_2720", "soap_2690", "soap_2690+aurora_proj"):
        args = ["--preset", preset + "+tiny", "--data-dir", data_dir, "--train-steps", "4", *TINY]
        assert train_gpt.main(args + ["--records-dir", str(tmp_path / preset)]) == 0
        logs[preset] = open(only_log(glob.glob(str(tmp_path / preset / "*"))[0])).read()
        lines = val_lines(logs[preset])
        assert [s for s, _, _ in lines] == [2, 4] and all(math.isfinite(v) for _, v, _ in lines)
        assert lines[-1][1] < math.log(1024)  # it learns
        assert all((e is not None) == preset.startswith("soap_2690") for _, _, e in lines)
        code = code_part(logs[preset])
        for module in ("frontier.py", "lineage.py", "soap.py"):
            assert f"{module} (inlined)" in code
        assert "VARIANTS = None" in code and redefined(code) == ["Hyperparameters"]
        assert not [m for m in NOT_IN_THE_RECORD["harness"] + NOT_IN_THE_RECORD["variants"] if m in code]
        alone = tmp_path / "alone" / preset
        alone.mkdir(parents=True)
        (alone / "train.py").write_text(code)
        runs.append((str(alone / "train.py"), computation_flags(args)))
    assert "tail_ema applied step:4" in logs["soap_2720"]
    assert val_lines(logs["soap_2690"])[-1][2] != val_lines(logs["soap_2690"])[-1][1]
    for preset, log_b in zip(logs, runs_alone(runs, tmp_path)):
        assert log_b.split(SEPARATOR, 1)[0] == logs[preset].split(SEPARATOR, 1)[0]
        assert val_lines(log_b) == val_lines(logs[preset]), preset
    alone_frontier = harness.code_part(parse_args(["--preset", "tiny", "--scalar-adam", "raw"])[0])
    assert "lineage.py (inlined)" in alone_frontier  # frontier.py imports it, even with the lineage unused
    for hp in (Hyperparameters(), parse_args(["--preset", "aurora_2860"])[0]):
        code = harness.code_part(hp)
        assert "FRONTIER = None  # frontier.py: not used by this run" in code
        assert not [m for m in NOT_IN_THE_RECORD["frontier"] if m in code]


def test_the_records_tools_reproduce_a_frontier_run(data_dir, tmp_path):
    """submit's reproduce command for a soap_2690 ablation's record (flags of the frontier and the
    lineage changed) gives the trainer the run's configuration: every hyperparameter its log lists."""
    args = ["--preset", "soap_2690+tiny", "--data-dir", data_dir, "--train-steps", "2", *TINY, "--cwd", "0.01",
            "--tail-ema-tau", "2", "--no-soap-trust-gate", "--ema-nesterov", "0.2"]
    assert train_gpt.main(args + ["--records-dir", str(tmp_path / "rec"), "--run-name", "ablation"]) == 0
    folder = glob.glob(str(tmp_path / "rec" / "*_ablation"))[0]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "records.py"), "submit", folder, "--name",
                           "ablation", "--out", str(tmp_path / "out"), "--target", "7"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    readme = (tmp_path / "out" / "README.md").read_text()
    (command,) = [line for line in readme.split("## Reproduce")[1].splitlines() if line.startswith("./run.sh")]
    hp, _ = parse_args(shlex.split(command)[1:] + ["--data-dir", data_dir])
    header = harness.header_lines(only_log(folder))
    for name, value in harness.printed(hp).items():
        if name not in harness.PER_RUN:  # the seeds, the data's path, the harness's flags: per run
            assert json.loads(header[name]) == (list(value) if isinstance(value, tuple) else value), name

