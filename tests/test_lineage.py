"""The Aurora lineage presets (aurora_2930, aurora_2890, aurora_2860): each preset's optimizer,
schedules, initialization, EMA-Nesterov and reference interpolation against the published rule
written out here from spec/aurora-lineage.md (not calling aurora.py, soap.py or train_gpt.py's
code), bit for bit; and a tiny run of each preset, whose log's code part runs on its own."""
import glob
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import plugins
import train_gpt
from lineage import EMANesterov, LineageAurora, contra_strength, init_lineage, reference_interpolation, scale_init
from train_gpt import GPT, Hyperparameters, is_val_step, lr_at, momentum_at, parse_args
from conftest import GRADIENT_SCALES, reference_polar, training_gradient
from test_train import (NOT_IN_THE_RECORD, SEPARATOR, code_part, computation_flags, only_log, redefined,
                        runs_alone, val_losses)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("aurora_2930", "aurora_2890", "aurora_2860")
ROUNDING = dict(aurora_2930="2930", aurora_2890="2930", aurora_2860="2860")


# One thread (tests/conftest.py): small matrices gain nothing from threads, and the subprocess
# below runs with one too, so that both runs round alike.
pytestmark = pytest.mark.usefixtures("one_thread")


def assert_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert (a.double() - b.double()).abs().max().item() == 0.0  # bit for bit (up to the sign of 0)


# --- the published rule, written out from the spec ---

def s4(X, eps):
    """Schatten-4 norm estimate: sqrt(||Gram||_F), Gram on the small side, float32, clamped."""
    X = X.float()
    gram = X.T @ X if X.shape[0] > X.shape[1] else X @ X.T
    return gram.norm().sqrt().clamp(min=eps)


def spec_polar(X, dtype):
    """The lineage's plain polar of X (already in dtype): the record's written out
    (conftest.reference_polar), the input scaled by its S4 norm instead of its Frobenius norm."""
    return reference_polar(X, dtype, scale=lambda Y: s4(Y, 1e-7).to(dtype))


def spec_orthogonalize(u, dtype):
    """Step 4: u rounded to dtype; Aurora (3 iterations, beta 0.25) on wide matrices only."""
    X = u.to(dtype)
    if X.shape[0] >= X.shape[1]:
        return spec_polar(X, dtype)
    T = X.T.float()
    m, n = T.shape
    D = 1 / T.norm(dim=1, keepdim=True).clamp(min=1e-7)
    for k in range(3):
        U = spec_polar((D * T).to(dtype), dtype)
        if k < 2:
            D = D * ((n / m) / U.float().pow(2).sum(1, keepdim=True).clamp(min=1e-14)).pow(0.25)
    return U.T


def spec_soap_state(m, n):
    return dict(exp=torch.zeros(m, n), L=torch.zeros(m, m), R=torch.zeros(n, n), QL=None, QR=None, count=0)


def spec_soap_precondition(u, st, kind, rounding):
    """SOAP's step 2 on u for kind "mlp" or "v" (blend 0.95, floor 0.55, the last renormalization)."""
    if st["QL"] is None:
        Z = u
    else:
        P = st["QL"].T @ u @ st["QR"]
        st["exp"] = torch.add(st["exp"] * 0.9, P.square(), alpha=1 - 0.9)
        den = st["exp"].clamp(min=1e-16).pow(0.5)
        if kind == "v":
            den = den.clamp(min=(den.square().mean().sqrt() * 0.55).clamp(min=1e-8))
        Z = st["QL"] @ (P / den) @ st["QR"].T
        if kind == "v":
            Z = 0.95 * Z + (1 - 0.95) * u
        Z = Z * (s4(u, 1e-8) / s4(Z, 1e-8))
    if kind == "v":
        if rounding == "2930":  # the trust-gate blend with gate 1
            Z = u + (Z - u)
        Z = Z * (s4(u, 1e-8) / s4(Z, 1e-8))
    return Z


def spec_eig(A):
    return torch.flip(torch.linalg.eigh(A + 1e-30 * torch.eye(A.shape[0]))[1], [1])


def spec_soap_observe(G, st, every):
    st["L"] = torch.lerp(st["L"], G @ G.T, 1 - 0.9)
    st["R"] = torch.lerp(st["R"], G.T @ G, 1 - 0.9)
    if st["QL"] is None:
        st["QL"], st["QR"] = spec_eig(st["L"]), spec_eig(st["R"])
    elif st["count"] > 0 and st["count"] % every == 0:
        order = torch.argsort(torch.diag(st["QL"].T @ st["L"] @ st["QL"]), descending=True)
        st["exp"] = st["exp"][order, :]
        st["QL"] = torch.linalg.qr(st["L"] @ st["QL"][:, order]).Q
        order = torch.argsort(torch.diag(st["QR"].T @ st["R"] @ st["QR"]), descending=True)
        st["exp"] = st["exp"][:, order]
        st["QR"] = torch.linalg.qr(st["R"] @ st["QR"][:, order]).Q
    st["count"] += 1


def spec_step(W, G, M, st, kind, step, lr, mu, rounding, dtype, fade, every):
    """Steps 1-12 of the lineage's matrix rule; returns (W, M)."""
    M = torch.lerp(M, G, 1 - mu)
    u = torch.lerp(G, M, mu)
    if kind != "plain":
        u = spec_soap_precondition(u, st, kind, rounding)
    n = u / s4(u, 1e-10)
    O = spec_orthogonalize(u, dtype)
    k = -0.2 * (1.0 - min(1.0, max(0.0, step / fade)))
    f = s4(O, 1e-10)
    V = O + k * n
    V = V * f / s4(V, 1e-10)
    if rounding == "2930":
        V = V * f / s4(V, 1e-10)
    V = V * max(1, V.shape[0] / V.shape[1]) ** 0.5
    a = s4(V, 1e-10)
    V = V * torch.tensor(1e-10).rsqrt()
    V = V * (a / s4(V, 1e-10))
    c = (V * W).sum() / (W * W).sum().clamp(min=1e-12)  # radial brake
    V = (V - c * W) + (0.5 if c < 0 else 1.0) * (c * W)
    pf, uf = W.norm().clamp(min=1e-8), V.norm().clamp(min=1e-8)  # u/w floor
    if uf / pf < 0.3825:
        V = V * (0.3825 * pf / uf)
    b = W.norm().clamp(min=1e-8)  # radius pin
    target = (b + (-lr * (V * W).sum()) / b).clamp(min=1e-8)
    W = torch.add(W, V, alpha=-lr)
    W = W * (target / W.norm().clamp(min=1e-8))
    if kind != "plain":
        spec_soap_observe(G, st, every)
    return W, M


# --- (a) the optimizer, from the same weights and gradients ---

# shapes of one block at width 16: mlp.fc (tall, SOAP), mlp.proj (wide: Aurora, SOAP), attn.v
# (square, SOAP with its blend), attn.q (square, no SOAP); one starts at 0 like the *proj* weights
MATRICES = (("fc", (64, 16), "mlp"), ("proj", (16, 64), "mlp"), ("v", (16, 16), "v"), ("q", (16, 16), "plain"))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", list(GRADIENT_SCALES))
def test_the_matrix_rule_is_the_published_one(preset, dtype, scale):
    """Our Aurora with the preset's settings (every=3 and fade=4 so that 6 steps see a QR refresh
    and the Contra-Muon strength reach 0) against spec_step, 6 steps with a changing lr and
    momentum: max abs diff 0 in float32 and in bfloat16 Newton-Schulz. Gradients of order 1, and
    at the scales where SOAP's, the norms' and the floors' epsilons act (conftest's
    GRADIENT_SCALES): there step 0's gradients are zero, as behind a zero-initialized *proj*
    weight, and later ones training_gradient()s."""
    hp, _ = parse_args(["--preset", preset, "--ns-dtype", "float32" if dtype == torch.float32 else "bfloat16"])
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=g) * (0 if name == "proj" else 0.1) for name, shape, _ in MATRICES]
    params = [nn.Parameter(w.clone()) for w in weights]
    soap = dict(blend=hp.soap_v_blend, floor=hp.soap_v_floor, renorm="lerp" if ROUNDING[preset] == "2930" else "scale")
    opt = LineageAurora(params, lr=hp.lr_matrix, momentum=hp.momentum, pp_iterations=hp.pp_iterations, pp_beta=hp.pp_beta,
                 contra=hp.contra, uw_floor=hp.uw_floor, aurora_on=hp.aurora_on, ns_dtype=hp.ns_dtype,
                 norm_estimate=hp.norm_estimate, contra_fade=4, radial_brake=hp.radial_brake,
                 radius_pin=hp.radius_pin, lineage_rounding=hp.lineage_rounding, soap_every=3,
                 soap={p: ({} if kind == "mlp" else soap) for p, (_, _, kind) in zip(params, MATRICES)
                       if kind != "plain"})
    momenta = [torch.zeros_like(w) for w in weights]
    states = [spec_soap_state(*shape) for _, shape, _ in MATRICES]
    for step in range(6):
        lr, mu = 0.0375 * (1 - step / 10), 0.85 + step / 100
        opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"] = lr, mu
        grads = [torch.randn(shape, generator=g) if scale == "unit" else
                 training_gradient(shape, 10 * step + i, GRADIENT_SCALES[scale] * (step > 0))
                 for i, (_, shape, _) in enumerate(MATRICES)]
        for p, G in zip(params, grads):
            p.grad = G.clone()
        opt.step()
        for i, (_, _, kind) in enumerate(MATRICES):
            weights[i], momenta[i] = spec_step(weights[i], grads[i], momenta[i], states[i], kind, step, lr, mu,
                                               ROUNDING[preset], dtype, 4, 3)
            assert_equal(params[i].data, weights[i])
            assert_equal(params[i].grad, grads[i])  # the raw gradient stays (SOAP reads it)


def test_ema_nesterov_and_reference_interpolation_are_the_published_ones():
    """EMA-Nesterov (#40, #42) over 6 steps with an active window [2, 5) and the reference
    interpolation (#42) around a validation, against the spec's steps."""
    g = torch.Generator().manual_seed(1)
    ps = [nn.Parameter(torch.randn(5, 3, generator=g)), nn.Parameter(torch.randn(7, generator=g).bfloat16())]
    ws = [p.detach().clone() for p in ps]
    prev, buf = [w.clone() for w in ws], [torch.zeros_like(w) for w in ws]
    ema = EMANesterov(ps, 0.3, 0.99, 2, 5)
    for step in range(6):
        ratio = 1 - step / 7
        ema.look_ahead(step, ratio)
        if 2 <= step < 5:
            ws = [w.add(b, alpha=0.3 * ratio) for w, b in zip(ws, buf)]
        deltas = [torch.randn(w.shape, generator=g).to(w.dtype) * 0.01 for w in ws]  # the optimizers' step
        with torch.no_grad():
            for p, d in zip(ps, deltas):
                p.sub_(d)
        ws = [w - d for w, d in zip(ws, deltas)]
        ema.after_step()
        buf = [torch.lerp(b, w - q, 1 - 0.99) for b, w, q in zip(buf, ws, prev)]
        prev = [w.clone() for w in ws]
        for p, w in zip(ps, ws):
            assert_equal(p.data, w)
    # reference interpolation: W + (-0.075)(W - W_ref) while validating, then (W + d) - d
    model = nn.Module()
    model.a, model.b = ps
    refs = [w + 0.5 for w in ws]
    run = types.SimpleNamespace(hp=types.SimpleNamespace(ref_gamma=-0.075, ref_start=4), model=model, reference=refs)
    with reference_interpolation(run, 3):  # before ref_start: the weights as they are
        for p, w in zip(ps, ws):
            assert_equal(p.data, w)
    with reference_interpolation(run, 4):
        ds = [(w - r) * -0.075 for w, r in zip(ws, refs)]
        for p, w, d in zip(ps, ws, ds):
            assert_equal(p.data, w + d)
    for p, w, d in zip(ps, ws, ds):
        assert_equal(p.data, (w + d) - d)


def test_the_init_and_norms_are_the_published_ones():
    """Each preset's initialization from seed 5 on a 2-block model (width 32), against the spec's:
    the default init of the modules built in order on the CPU, *proj* zeroed (all biases for
    #42), fc scaled by depth, the Rademacher gain split (#30, #40); and the float32 RMSNorm."""
    for preset in PRESETS:
        hp, _ = parse_args(["--preset", preset + "+tiny", "--n-layer", "2", "--d-model", "32", "--head-dim", "8"])
        model = GPT(hp, torch.float32)
        torch.manual_seed(5)
        init_lineage(model, hp)
        scale_init(model, hp)
        torch.manual_seed(5)  # the spec: modules built in construction order draw the default init
        d, vocab = 32, hp.vocab_size
        expected = {"embed.weight": nn.Embedding(vocab, d).bfloat16().weight}
        for i in range(2):
            for name, (fan_in, fan_out) in (("attn.q", (d, d)), ("attn.k", (d, d)), ("attn.v", (d, d)),
                                            ("attn.proj", (d, d)), ("mlp.fc", (d, 4 * d)), ("mlp.proj", (4 * d, d))):
                lin = nn.Linear(fan_in, fan_out)
                expected[f"blocks.{i}.{name}.weight"], expected[f"blocks.{i}.{name}.bias"] = lin.weight, lin.bias
        head = nn.Linear(d, vocab)
        expected["proj.weight"], expected["proj.bias"] = head.weight, head.bias
        with torch.no_grad():
            for name, p in expected.items():
                if "proj" in name or (preset == "aurora_2860" and name.endswith("bias")):
                    p.zero_()
            for i in range(2):
                expected[f"blocks.{i}.mlp.fc.weight"].mul_(1.0 - 0.3 * (i / 1))
        gains = {}
        for i in range(2):
            s = torch.randint(0, 2, (d,), dtype=torch.float32) * 2 - 1 if preset != "aurora_2860" else torch.zeros(d)
            gains[f"blocks.{i}.norm1.gains"], gains[f"blocks.{i}.norm2.gains"] = 1.0 - 0.14 * s, 1.0 + 0.14 * s
        for name, p in model.named_parameters():
            want = expected.get(name, gains.get(name, torch.ones(d)))
            assert_equal(p.data, want.data)
        x = torch.randn(2, 3, d).bfloat16()
        norm = model.blocks[0].norm1
        assert_equal(norm(x), (F.rms_norm(x.float(), (d,)) * norm.gains).to(torch.bfloat16))


# --- (b) the schedules at every step, from the published constants ---

PUBLISHED = dict(  # (steps trained, lr horizon, momentum horizon, extra validation steps)
    aurora_2930=(3020, 3050, 3020, {2820, 2830, 2840, 2850, 2860, 2870, 2880, 2890, 2895, 2900, 2910, 2920, 2930,
                                    2940, 2950, 2960, 2965, 2970, 2975, 2980, 2985, 2990, 2995, 2999, 3000, 3010,
                                    3020}),
    aurora_2860=(2860, 2980, 2900, {2850, 2860}))
PUBLISHED["aurora_2890"] = (2900, 2980, 2900, PUBLISHED["aurora_2930"][3])
POWER_C = (4.976805410800738e-05, 5.184172302917436e-07, 1.6589351369335795e-06, 3.3169534699576625e-06)


@pytest.mark.parametrize("preset", PRESETS)
def test_the_schedules_are_the_published_ones_at_every_step(preset):
    hp, _ = parse_args(["--preset", preset])
    steps, horizon, mu_horizon, extra = PUBLISHED[preset]
    assert (hp.train_steps, hp.schedule_steps, hp.momentum_horizon or hp.train_steps) == (steps, horizon, mu_horizon)
    groups = [dict(initial_lr=lr, power_c=c) for lr, c in zip((0.3, 1 / 320, 0.01, 0.0375), POWER_C)]
    for step in range(steps):
        for g in groups:
            assert lr_at(step, g, hp) == min(g["initial_lr"], g["power_c"] * max(0.0, horizon - step) ** 1.2)
        cd = mu_horizon - 100
        mu = (0.85 + step / 300 * (0.95 - 0.85) if step < 300 else
              0.95 - (step - cd) / 100 * (0.95 - 0.85) if step > cd else 0.95)
        assert momentum_at(step, hp) == mu
        ramp = min(1.0, max(0.0, (step - 0) / (2500 - 0)))
        assert -hp.contra / 2 * contra_strength(step, hp.contra_fade) == -0.2 * (1.0 - ramp)
    assert [s for s in range(steps + 1) if is_val_step(s, hp)] == sorted(
        {s for s in range(1, steps + 1) if s % 125 == 0} | (extra & set(range(steps + 1))) | {steps})
    # EMA-Nesterov's window (#40, #42: it + 1 > 300 and it < 2900 - 950) and the reference (#42)
    assert (hp.ema_nesterov, hp.ema_nesterov_beta) == ((0.0, 0.99) if preset == "aurora_2930" else (0.3, 0.99))
    assert (hp.ema_nesterov_start, hp.ema_nesterov_stop) == (300, 2900 - 950)
    assert (hp.ref_gamma, hp.ref_capture, hp.ref_start) == ((-0.075, 2375, 2850) if preset == "aurora_2860"
                                                             else (0.0, 2375, 2850))
    # the other literals of the script
    assert (hp.adam_betas, hp.adam_eps, hp.lr_embed, hp.lr_head, hp.lr_scalar, hp.lr_matrix) == (
        (0.8, 0.99), 1e-10, 0.3, 1 / 320, 0.01, 0.0375)
    assert (hp.pp_iterations, hp.pp_beta, hp.aurora_on, hp.contra, hp.contra_fade, hp.uw_floor) == (
        3, 0.25, "wide_only", 0.4, 2500, 0.3825)
    assert (hp.soap, hp.soap_beta2, hp.soap_every, hp.soap_v_blend, hp.soap_v_floor) == ("mlp_v", 0.9, 10, 0.95, 0.55)
    assert (hp.radial_brake, hp.radius_pin, hp.norm_estimate, hp.weight_decay) == (0.5, True, "schatten4", 0.0)
    assert (hp.init, hp.zero_biases, hp.fc_depth_scale, hp.gain_split) == (
        ("torch", True, 0.3, 0.0) if preset == "aurora_2860" else ("torch", False, 0.3, 0.14))
    assert (hp.norm_in_fp32, hp.cudnn_attention, hp.lineage_rounding) == (True, False, ROUNDING[preset])


def test_a_preset_scales_its_steps_with_the_run_and_flags_switch_techniques_off():
    hp, _ = parse_args(["--preset", "aurora_2860+tiny"])  # the tiny preset's sizes and 200 steps
    r = 200 / 2860
    assert (hp.train_steps, hp.d_model, hp.schedule_steps, hp.ref_capture, hp.ema_nesterov_stop) == (
        200, 192, round(2980 * r), round(2375 * r), round(1950 * r))
    assert hp.power_c == tuple(c / r ** 1.2 for c in POWER_C)
    off, _ = parse_args(["--preset", "aurora_2860", "--ema-nesterov", "0", "--no-radius-pin", "--soap", "none"])
    assert (off.ema_nesterov, off.radius_pin, off.soap, off.ref_gamma) == (0.0, False, "none", -0.075)
    assert parse_args(["--preset", "aurora_2930", "--train-steps", "100", "--contra-fade", "7"])[0].contra_fade == 7
    assert Hyperparameters().preset == "record" and plugins.preset_overrides("record", {}, train_gpt.PRESETS, 3200) == {}
    parse_args(["--preset", "tiny", "--aurora-batched", "--rule", "normuon"])  # the record's rule: no lineage
    with pytest.raises(SystemExit):  # the lineage's rule runs per matrix
        parse_args(["--preset", "aurora_2930", "--aurora-batched"])


# --- (c) a tiny run of each preset, and its log's code part on its own ---

TINY = ["--n-layer", "1", "--d-model", "64", "--head-dim", "16", "--train-steps", "4", "--val-every", "2",
        "--val-every-late", "2", "--val-tokens", "4096", "--seed", "0", "--no-diagnostics"]


def test_a_tiny_run_of_each_preset_trains_and_its_code_part_runs_alone(data_dir, tmp_path):
    """4 steps of each preset at tiny sizes (its step counts scaled: EMA-Nesterov on for steps
    0-2, the reference captured after step 3 and interpolated at the step-4 validation); then each
    log's code part, run as a script of its own (one process runs the three), reproduces its run's
    code part and validation losses."""
    logs, runs = {}, []
    for preset in PRESETS:
        args = ["--preset", preset + "+tiny", "--data-dir", data_dir, *TINY]
        assert train_gpt.main(args + ["--records-dir", str(tmp_path / preset)]) == 0
        logs[preset] = open(only_log(glob.glob(str(tmp_path / preset / "*"))[0])).read()
        losses = val_losses(logs[preset])
        assert [s for s, _ in losses] == [2, 4] and all(math.isfinite(v) for _, v in losses)
        assert losses[-1][1] < math.log(1024)  # it learns
        alone = tmp_path / "alone" / preset
        alone.mkdir(parents=True)
        (alone / f"train_{preset}.py").write_text(code_part(logs[preset]))
        runs.append((str(alone / f"train_{preset}.py"), computation_flags(args)))
        code = code_part(logs[preset])  # the lineage's module, and nothing of the harness or the variants
        assert "lineage.py (inlined)" in code and "soap.py (inlined)" in code and "VARIANTS = None" in code
        assert redefined(code) == ["Hyperparameters"]
        assert not [m for m in NOT_IN_THE_RECORD["harness"] + NOT_IN_THE_RECORD["variants"] if m in code]
    for preset, log_b in zip(PRESETS, runs_alone(runs, tmp_path)):
        assert log_b.split(SEPARATOR, 1)[0] == logs[preset].split(SEPARATOR, 1)[0]
        assert val_losses(log_b) == val_losses(logs[preset]), preset
