"""frontier.py (the SOAP-Muon frontier, results #44-#46: spec/soap-frontier.md) against the rules
written out in tests/frontier_reference.py, bit for bit: the per-matrix rule over steps that cross
SOAP refreshes (every step) and the trust gate's phases, in float32 and bfloat16 Newton-Schulz,
with RowFloor, Cautious Weight Decay and the Aurora modifiers; the Adam of biases and gains; the
gain split's signs from a seed; the tail EMA's final blend (#45) and readout (#46); and the
proposed presets' schedules and validation steps at every step."""
import dataclasses

import pytest
import torch

import frontier
import frontier_reference as ref
from frontier import FRONTIER_PRESETS as PRESETS, SoapMuonMatrix, TailEMA, gain_split_signs, raw_adam_step, trust_bounds
from train_gpt import PRESETS as TRAINER_PRESETS, Hyperparameters, is_val_step, lr_at, momentum_at

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
