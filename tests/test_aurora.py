"""aurora.py: polar, aurora_polar, the per-matrix rule, the optimizer (single process and 2 ranks),
and the optimizer's variants (NorMuon, aurora_on=tall, cans12) and its leverage diagnostics.

Tolerances: 0 (torch.equal / atol=rtol=0) where both sides run the same floating-point operations;
otherwise about 10x the difference measured on the development machine, noted beside each bound.
Every bfloat16 Newton-Schulz here runs on small matrices: on a CPU without native bfloat16 a bf16
matmul is hundreds of times slower than float32 (check with ONEDNN_MAX_CPU_ISA=AVX2)."""
import os

import pytest
import torch
import torch.multiprocessing as mp

import aurora
from aurora import RECORD, apply_uw_floor, aurora_polar, ns_dtype_for, polar
from aurora_variants import VariantAurora as Aurora, polar_cans12
from aurora_variants import variant_direction as aurora_direction, variant_orthogonalize as orthogonalize
from diagnostics import LeverageProbe, row_leverage
from conftest import (GRADIENT_SCALES, cv, free_port, gloo_rank, matrix, reference_polar, reference_update, rel_diff,
                      training_gradient)

DTYPES = [torch.bfloat16, torch.float32]
NS_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}  # the optimizer's names


def hp_for(dtype, **changes):
    """The record's hyperparameters with Newton-Schulz in `dtype` (and any other changes)."""
    return dict(RECORD, ns_dtype=NS_DTYPES[dtype], **changes)


def assert_equal(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected), f"max difference {(got.double() - expected.double()).abs().max():.3g}"


# --- polar and aurora_polar ---

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", [polar, polar_cans12])
@pytest.mark.parametrize("shape", [(256, 64), (64, 256), (96, 96)])
def test_polar_iterations_are_orthogonal(shape, fn, dtype):
    P = fn(matrix(*shape, seed=0), dtype=dtype)
    assert P.shape == shape
    assert P.dtype == (torch.float32 if fn is polar_cans12 else dtype)  # cans12 is always float32
    s = torch.linalg.svdvals(P.float())
    print(f"{fn.__name__} {dtype} {shape}: max |s - 1| = {(s - 1).abs().max():.2e}")
    # measured max |s - 1|: bf16 quintic 6.1e-3; float32 quintic 6.0e-7, cans12 5.4e-7
    bound = 0.05 if P.dtype == torch.bfloat16 else 6e-6
    assert (s - 1).abs().max() < bound, s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (32, 32)])
def test_polar_is_the_spec_iteration_written_out(shape, dtype):
    """Against conftest.reference_polar (12 steps, coefficients 2, -1.5, 0.5, eps 1e-7, wide
    orientation), written from the spec: bit for bit. Other coefficients or step counts that
    still orthogonalize fail here."""
    G = matrix(*shape, seed=3)
    assert_equal(polar(G, dtype=dtype), reference_polar(G, dtype))  # measured 0.0


def test_polar_default_dtype_is_the_records_bfloat16():
    assert polar(matrix(64, 32, seed=1)).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES)
def test_polar_is_batched(dtype):
    G = torch.stack([matrix(64, 32, seed=i) for i in range(3)])
    batched = polar(G, dtype=dtype)
    for i in range(3):  # measured 0.0 in both dtypes
        assert_equal(batched[i], polar(G[i], dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(256, 64), (64, 256)])
def test_aurora_polar_is_orthogonal_in_the_last_newton_schulz_dtype(shape, dtype):
    U = aurora_polar(matrix(*shape, seed=1, skew_rows=True), dtype=dtype)
    assert U.dtype == dtype  # the last Newton-Schulz output as it is, like the record
    s = torch.linalg.svdvals(U.float())
    print(f"aurora_polar {dtype} {shape}: max |s - 1| = {(s - 1).abs().max():.2e}")
    bound = 0.05 if dtype == torch.bfloat16 else 4e-6  # measured: bf16 5.7e-3, float32 3.6e-7
    assert (s - 1).abs().max() < bound, s


def test_aurora_polar_with_cans12_is_float32():
    U = aurora_polar(matrix(64, 16, seed=1, skew_rows=True), polar_fn=polar_cans12, dtype=torch.bfloat16)
    assert U.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_aurora_polar_makes_row_leverage_uniform_while_polar_does_not(dtype):
    G = matrix(256, 64, seed=2, skew_rows=True)
    lev_aurora = row_leverage(aurora_polar(G, dtype=dtype))
    lev_polar = row_leverage(polar(G, dtype=dtype))
    print(f"{dtype}: aurora cv {cv(lev_aurora):.4f} max |lev-1| {(lev_aurora - 1).abs().max():.4f}; "
          f"polar cv {cv(lev_polar):.4f} min {lev_polar.min():.4f}")
    # measured (both dtypes): aurora cv 0.041, max |lev - 1| 0.109; polar cv 1.22, min 0.0018
    assert cv(lev_aurora) < 0.05
    assert (lev_aurora - 1).abs().max() < 0.15  # every row near uniform after 2 iterations
    assert cv(lev_polar) > 1.0 and lev_polar.min() < 0.01  # plain polar starves some rows


def test_more_aurora_iterations_converge_to_exactly_uniform_leverage():
    G = matrix(256, 64, seed=2, skew_rows=True)
    lev = row_leverage(aurora_polar(G, pp_iterations=12, dtype=torch.float32))
    print(f"12 iterations, float32: max |lev - 1| {(lev - 1).abs().max():.2e}")
    assert (lev - 1).abs().max() < 1e-4  # measured 2e-6 (2 iterations: 0.11, 4: 0.0097, 8: 1.3e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_aurora_polar_wide_is_transpose_of_tall(dtype):
    G = matrix(192, 48, seed=3, skew_rows=True)
    assert_equal(aurora_polar(G.T, dtype=dtype), aurora_polar(G, dtype=dtype).T)


@pytest.mark.parametrize("dtype", DTYPES)
def test_aurora_polar_square_is_polar(dtype):
    G = matrix(64, 64, seed=4)
    assert_equal(aurora_polar(G, dtype=dtype), polar(G, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_iteration_is_row_normalized_polar(dtype):
    G = matrix(128, 32, seed=5, skew_rows=True)
    D = 1 / G.norm(dim=1, keepdim=True)  # written G / ||G_i|| it differs by 1 float32 ulp (1.2e-7)
    assert_equal(aurora_polar(G, pp_iterations=1, dtype=dtype), polar(D * G, dtype=dtype))


# --- Newton-Schulz dtype ---

def test_ns_dtype_auto_is_bfloat16_on_cuda_and_float32_elsewhere():
    assert ns_dtype_for("auto", torch.device("cuda", 0)) == torch.bfloat16  # the record's numerics
    assert ns_dtype_for("auto", torch.device("cpu")) == torch.float32
    for device in ("cpu", "cuda"):
        assert ns_dtype_for("bfloat16", torch.device(device)) == torch.bfloat16
        assert ns_dtype_for("float32", torch.device(device)) == torch.float32
    assert RECORD["ns_dtype"] == "bfloat16"


def three_matrices(seed=0):
    """A tall, a wide and a square matrix with gradients (weights large enough for no floor)."""
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(96, 32), (32, 96), (48, 48)]]
    for p in params:
        p.grad = torch.randn(p.shape)
    return params


@pytest.mark.parametrize("ns_dtype, expected", [("auto", torch.float32), ("float32", torch.float32),
                                                ("bfloat16", torch.bfloat16)])
@pytest.mark.parametrize("batched", [False, True])
def test_optimizer_newton_schulz_dtype_on_cpu(monkeypatch, ns_dtype, expected, batched):
    seen = []

    def spy(G, dtype):
        seen.append((G.dtype, dtype))
        return polar(G, dtype=dtype)

    monkeypatch.setitem(aurora.POLARS, "quintic12", spy)
    Aurora(three_matrices(), lr=0.1, ns_dtype=ns_dtype, batched=batched).step()
    assert seen == [(torch.float32, expected)] * 5  # 2 per non-square matrix, 1 for the square one


def test_cpu_default_is_float32_newton_schulz_exactly():
    runs = {}
    for ns_dtype in ("auto", "float32", "bfloat16"):
        params = three_matrices()
        Aurora(params, lr=0.1, ns_dtype=ns_dtype).step()
        runs[ns_dtype] = [p.detach() for p in params]
    for a, b, c in zip(runs["auto"], runs["float32"], runs["bfloat16"]):
        assert_equal(a, b)
        assert not torch.equal(a, c)


# --- the per-matrix rule against the rule written out (conftest.reference_update) ---

RULES = [dict(rule="aurora"), dict(rule="muon"), dict(rule="aurora", aurora_on="tall")]


def aurora_update(grad, momentum, weight, hp=RECORD):
    """The record's whole per-matrix rule, steps 1-6, as Aurora._apply runs it: U (float32) of
    W.add_(U, alpha=-lr)."""
    return apply_uw_floor(aurora.aurora_direction(grad, momentum, hp), weight, hp["uw_floor"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: "-".join(r.values()))
@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (48, 48)])
@pytest.mark.parametrize("weight_scale", [0.02, 30.0], ids=["no_floor", "floor"])
@pytest.mark.parametrize("extra", [{}, dict(nesterov=False, contra=0.0)], ids=["record", "plain"])
def test_aurora_update_is_the_rule_written_out(dtype, rule, shape, weight_scale, extra):
    torch.manual_seed(1)
    W, G, M = torch.randn(shape) * weight_scale, torch.randn(shape), torch.randn(shape) * 0.1
    hp = hp_for(dtype, **rule, **extra)
    expected, expected_M = reference_update(G, M, W, dtype, **rule, **extra)
    grad, momentum = G.clone(), M.clone()
    U = aurora_update(grad, momentum, W, hp)
    assert_equal(momentum, expected_M)  # measured 0.0: same floating-point operations
    assert_equal(U, expected)
    floored = (U.norm() / W.norm()).item()
    assert (abs(floored - 0.35) < 1e-6) == (weight_scale == 30.0), floored  # the floor was (not) hit


def test_aurora_direction_leaves_the_nesterov_look_ahead_in_grad():
    G, M = matrix(48, 16, seed=7), matrix(48, 16, seed=8)
    grad, momentum = G.clone(), M.clone()
    aurora_direction(grad, momentum, hp_for(torch.float32))
    assert_equal(momentum, torch.lerp(M, G, 0.05))
    assert_equal(grad, torch.lerp(G, momentum, 0.95))


def test_apply_uw_floor():
    U, W = torch.ones(4, 4), torch.full((4, 4), 10.0)  # ratio 0.1
    assert_equal(apply_uw_floor(U, W, 0.35), torch.full((4, 4), 3.5))
    assert_equal(apply_uw_floor(U, W, 0.05), U)  # above the floor: untouched
    assert_equal(apply_uw_floor(U, W, 0.0), U)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: "-".join(r.values()))
@pytest.mark.parametrize("batched", [False, True])
def test_optimizer_steps_match_rule_written_out(dtype, rule, batched):
    torch.manual_seed(0)
    shapes = [(96, 32), (32, 96), (48, 48), (48, 48)]
    scales = [0.02, 0.02, 0.02, 30.0]  # the last matrix's update is lifted to the u/w floor
    params = [torch.nn.Parameter(torch.randn(s) * k) for s, k in zip(shapes, scales)]
    weights = [p.detach().clone() for p in params]
    momenta = [torch.zeros(s) for s in shapes]
    lr = 0.0375
    opt = Aurora(params, lr=lr, ns_dtype=NS_DTYPES[dtype], batched=batched, **rule)
    worst = 0.0
    for step in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            U, momenta[i] = reference_update(g, momenta[i], weights[i], dtype, **rule)
            # W - lr U with one rounding, as the optimizer's add_(alpha=-lr); written W - lr * U
            # the weights differ by up to 1 float32 ulp (measured 1.1e-8)
            weights[i] = torch.add(weights[i], U, alpha=-lr)
            worst = max(worst, rel_diff(params[i], weights[i]))
            assert_equal(opt.state[params[i]]["momentum"], momenta[i])  # measured 0.0, batched too
            if not batched:  # measured 0.0: the same floating-point operations
                assert_equal(params[i].detach(), weights[i])
    print(f"{dtype} {rule} batched={batched}: largest relative weight difference {worst:.2e}")
    if batched:  # stacked matmuls and norms may round differently: measured 3.9e-8 relative
        assert worst < 4e-7


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", ["training", "tiny", "clamps"])
def test_the_rule_at_training_scale_is_the_rule_written_out(dtype, scale):
    """The optimizer (per-matrix path, the record's rule) against the rule written out, bit for
    bit, at gradient scales where every eps and clamp of the rule acts: 4 steps on a tall, a wide
    and two square matrices; step 0's gradients are zero (as behind a zero-initialized *proj*
    weight), later ones training_gradient()s; the weights at the record's init scale, the wide one
    zero (a *proj* weight) and one square one large (the u/w floor lifts its update)."""
    g = torch.Generator().manual_seed(5)
    shapes, scales = [(64, 16), (16, 64), (16, 16), (16, 16)], [1.0, 0.0, 1.0, 1000.0]
    weights = [torch.randn(s, generator=g) * (0.33 / s[1]) ** 0.5 * k for s, k in zip(shapes, scales)]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    momenta = [torch.zeros(s) for s in shapes]
    opt = aurora.Aurora(params, lr=0.0375, ns_dtype=NS_DTYPES[dtype])
    for step in range(4):
        lr = opt.param_groups[0]["lr"] = 0.0375 * (1 - step / 8)
        grads = [training_gradient(s, 10 * step + i, GRADIENT_SCALES[scale] * (step > 0))
                 for i, s in enumerate(shapes)]
        for p, G in zip(params, grads):
            p.grad = G.clone()
        opt.step()
        for i, G in enumerate(grads):
            U, momenta[i] = reference_update(G, momenta[i], weights[i], dtype)
            weights[i] = torch.add(weights[i], U, alpha=-lr)
            assert_equal(opt.state[params[i]]["momentum"], momenta[i])
            assert_equal(params[i].detach(), weights[i])


def test_uw_floor_lifts_small_updates_to_the_floor():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(64, 16) * 10)  # large weight: update ratio far below 0.35
    W.grad = torch.randn(64, 16)
    before = W.detach().clone()
    Aurora([W], lr=1.0, contra=0.0).step()
    ratio = ((before.double() - W.detach().double()).norm() / before.double().norm()).item()
    print(f"update/weight ratio - 0.35 = {ratio - 0.35:.2e}")
    assert abs(ratio - 0.35) < 5e-7  # measured 4.5e-8 (float32 rounding of W - U)


def test_plain_aurora_switches_contra_and_floor_off():
    g = matrix(64, 16, seed=6, skew_rows=True)
    W = torch.nn.Parameter(torch.zeros(64, 16))
    W.grad = g.clone()
    Aurora([W], lr=1.0, contra=0, uw_floor=0, nesterov=False).step()
    # first step: momentum = 0.05 g, no contra, no floor: W = -aspect * aurora_polar(0.05 g)
    expected = -2.0 * aurora_polar(0.05 * g, dtype=torch.float32)
    assert_equal(W.detach(), expected)  # measured 0.0


# --- variants: NorMuon, aurora_on=tall, cans12 ---

@pytest.mark.parametrize("dtype", DTYPES)
def test_normuon_update_matches_the_formula(dtype):
    u = matrix(48, 16, seed=2, skew_rows=True)
    v = torch.full((48, 1), 0.01)
    O = polar(u, dtype=dtype).float()
    v_new = 0.95 * 0.01 + 0.05 * O.square().mean(dim=1, keepdim=True)  # beta2 v + (1 - beta2) mean O^2
    N = O / (v_new.sqrt() + 1e-10)
    expected = N * (O.norm() / N.norm())  # NorMuon keeps the polar factor's Frobenius norm
    got = orthogonalize(u, hp_for(dtype, rule="normuon"), row_v=v)
    print(f"{dtype}: row_v {rel_diff(v, v_new):.2e}, update {rel_diff(got, expected):.2e}, "
          f"norm {abs(got.norm().item() / O.norm().item() - 1):.2e}")
    assert rel_diff(v, v_new) < 3e-7  # measured 3.4e-8 (lerp_ rounds differently)
    assert rel_diff(got, expected) < 2e-7  # measured 2.0e-8
    assert abs(got.norm().item() / O.norm().item() - 1) < 1e-6  # measured 1.2e-7


@pytest.mark.parametrize("batched", [False, True])
def test_normuon_optimizer_keeps_per_row_state(batched):
    grads = [matrix(32, 8, seed=3), matrix(32, 8, seed=4)]
    params = [torch.nn.Parameter(torch.zeros(32, 8)) for _ in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = Aurora(params, lr=0.1, rule="normuon", batched=batched)
    opt.step()
    for p, g in zip(params, grads):
        expected = torch.zeros(32, 1)
        aurora_direction(g.clone(), torch.zeros_like(g), hp_for(torch.float32, rule="normuon"), row_v=expected)
        assert (expected > 0).all()
        assert_equal(opt.state[p]["row_v"], expected)  # measured 0.0, batched too
    assert not torch.equal(opt.state[params[0]]["row_v"], opt.state[params[1]]["row_v"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_aurora_on_tall_leaves_wide_matrices_on_plain_polar(dtype):
    wide, tall = matrix(32, 128, seed=4, skew_rows=True), matrix(128, 32, seed=5, skew_rows=True)
    hp = hp_for(dtype, aurora_on="tall")
    assert_equal(orthogonalize(wide, hp), polar(wide, dtype=dtype))
    assert_equal(orthogonalize(tall, hp), aurora_polar(tall, dtype=dtype))
    difference = rel_diff(orthogonalize(wide, hp_for(dtype)), polar(wide, dtype=dtype))
    print(f"{dtype}: aurora_polar vs polar on the wide matrix: {difference:.3f}")
    assert difference > 0.1  # measured 0.132: the default (nonsquare) does use aurora_polar


@pytest.mark.parametrize("dtype", DTYPES)
def test_cans12_iteration_in_the_rule(dtype):
    u = matrix(96, 32, seed=9, skew_rows=True)
    got = orthogonalize(u, hp_for(dtype, ns_iteration="cans12"))
    assert_equal(got, aurora_polar(u, polar_fn=polar_cans12, dtype=torch.float32))


# --- leverage diagnostics ---

@pytest.mark.parametrize("dtype", DTYPES)
def test_leverage_of_aurora_updates_is_uniform_and_plain_polar_is_not(dtype):
    G = matrix(256, 64, seed=6, skew_rows=True)
    lev = row_leverage(orthogonalize(G, hp_for(dtype)))
    lev_muon = row_leverage(orthogonalize(G, hp_for(dtype, rule="muon")))
    print(f"{dtype}: aurora leverage cv {cv(lev):.4f}; muon cv {cv(lev_muon):.4f} "
          f"|mean - 1| {abs(lev_muon.mean().item() - 1):.2e}")
    assert lev.shape == (256,)
    assert cv(lev) < 0.05  # measured 0.044 (2 iterations)
    assert cv(lev_muon) > 1.0  # measured 1.20
    # orthogonal: leverage averages to 1 (measured |mean - 1|: 1.2e-3 in bf16, 0.0 in float32,
    # where the bound is a few float32 roundings of the mean)
    assert abs(lev_muon.mean().item() - 1) < (1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("batched", [False, True])
def test_track_leverage_reports_the_next_step_only(batched):
    params = three_matrices(seed=3) + three_matrices(seed=4)  # stacks of 2 when batched
    grads = [p.grad.clone() for p in params]
    opt = Aurora(params, lr=0.1, batched=batched)
    probe = LeverageProbe(opt)
    opt.step()
    assert probe.pop_leverage() == {}  # not asked for
    for p, g in zip(params, grads):
        p.grad = g.clone()
    probe.track_leverage()
    opt.step()
    leverage = probe.pop_leverage()
    assert sorted(map(id, leverage)) == sorted(map(id, params))
    hp = hp_for(torch.float32)
    for p, g in zip(params, grads):
        momentum = torch.lerp(torch.zeros_like(g), g, 0.05)  # the momentum after the first step
        momentum.lerp_(g, 0.05)  # ... and after the second
        lookahead = torch.lerp(g, momentum, 0.95)
        expected = row_leverage(orthogonalize(lookahead, hp))
        assert leverage[p].shape == (max(p.shape),)  # rows of the tall orientation
        assert_equal(leverage[p], expected)  # measured 0.0, batched (stacks of 2) too
    assert probe.pop_leverage() == {}  # popped
    opt.step()
    assert probe.pop_leverage() == {}  # tracking was for one step


# --- argument checks and failure modes ---

@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=0.0), "lr"), (dict(lr=0.1, momentum=1.0), "momentum"), (dict(lr=0.1, momentum=0.0), "momentum"),
    (dict(lr=0.1, pp_iterations=0), "pp_iterations"), (dict(lr=0.1, pp_iterations=1.5), "pp_iterations"),
    (dict(lr=0.1, pp_beta=0.0), "pp_beta"), (dict(lr=0.1, pp_beta=1.5), "pp_beta"),
    (dict(lr=0.1, contra=-0.1), "contra"), (dict(lr=0.1, rule="adam"), "rule"),
    (dict(lr=0.1, aurora_on="wide"), "aurora_on"), (dict(lr=0.1, ns_iteration="cubic"), "ns_iteration"),
    (dict(lr=0.1, ns_dtype="float16"), "ns_dtype"), (dict(lr=0.1, compile="yes"), "compile"),
])
def test_bad_hyperparameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Aurora([torch.nn.Parameter(torch.zeros(4, 4))], **kwargs)


def test_the_records_aurora_refuses_a_variants_keyword():
    """aurora.Aurora takes the record's keywords only: a variant's (batched, soap, ...) is refused,
    not silently dropped (VariantAurora and the lineage's optimizer take theirs)."""
    with pytest.raises(TypeError, match="batched"):
        aurora.Aurora([torch.nn.Parameter(torch.zeros(4, 4))], lr=0.1, batched=True)
    assert Aurora([torch.nn.Parameter(torch.zeros(4, 4))], lr=0.1, batched=True).batched


def test_non_matrix_parameter_is_rejected():
    with pytest.raises(ValueError, match=r"shape \(8,\) is not a 2-D matrix"):
        Aurora([torch.nn.Parameter(torch.zeros(8))], lr=0.1)


def test_missing_gradient_is_named():
    p = torch.nn.Parameter(torch.zeros(6, 3))
    with pytest.raises(RuntimeError, match=r"shape \(6, 3\) has no gradient"):
        Aurora([p], lr=0.1).step()


@pytest.mark.parametrize("batched", [True, False])
def test_non_finite_update_names_the_parameter(batched):
    torch.manual_seed(0)
    good, bad = torch.nn.Parameter(torch.ones(8, 4)), torch.nn.Parameter(torch.ones(6, 3))
    good.grad, bad.grad = torch.randn(8, 4), torch.full((6, 3), float("nan"))
    opt = Aurora([good, bad], lr=0.1, batched=batched)
    opt.step()  # no host sync in the step: the flags are noted on the device ...
    with pytest.raises(FloatingPointError, match=r"at step 0 for parameter\(s\) of shape \[\(6, 3\)\]"):
        opt.check_finite()  # ... and read here
    good.grad, bad.grad = torch.randn(8, 4), torch.randn(6, 3)
    opt.step()  # steps never raise; the first bad step stays the one named
    with pytest.raises(FloatingPointError, match=r"at step 0 for parameter\(s\) of shape \[\(6, 3\)\]"):
        opt.check_finite()


def test_non_finite_update_names_the_first_bad_step():
    params = [torch.nn.Parameter(torch.ones(8, 4)), torch.nn.Parameter(torch.ones(6, 3))]
    opt = Aurora(params, lr=0.1)
    opt.step_index = 40  # as a resumed trainer sets it
    for step in range(3):
        params[0].grad = torch.randn(8, 4)
        params[1].grad = torch.full((6, 3), float("nan")) if step >= 1 else torch.randn(6, 3)
        opt.step()
    with pytest.raises(FloatingPointError, match=r"at step 41 for parameter\(s\) of shape \[\(6, 3\)\]") as error:
        opt.check_finite()
    assert (error.value.step, error.value.shapes) == (41, [(6, 3)])  # what the trainer reads


def test_zero_gradient_gives_finite_update():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(16, 4))
    W.grad = torch.zeros(16, 4)
    Aurora([W], lr=0.1).step()
    assert torch.isfinite(W).all()


# --- the compiled update (the default on CUDA, as in the record) on the CPU ---

@pytest.fixture
def restore_compile_backend():
    yield
    aurora.COMPILE_BACKEND = "inductor"
    aurora._COMPILED.clear()


def compiled_steps(shapes, backend, steps=3, fresh=True):
    """`steps` steps of a new Aurora on `shapes` (float32 Newton-Schulz) with aurora_direction
    compiled by `backend` (None: eager); fresh: Dynamo's caches and counters emptied first.
    Returns weights, momenta, grads (the look-ahead) and the number of graphs Dynamo compiled."""
    from torch._dynamo.utils import counters
    if fresh:
        torch._dynamo.reset()
        counters.clear()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    if backend is not None and aurora.COMPILE_BACKEND != backend:
        aurora.COMPILE_BACKEND = backend  # restored by the restore_compile_backend fixture
        aurora._COMPILED.clear()
    opt = Aurora(params, lr=0.05, ns_dtype="float32", compile=backend is not None)
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    opt.check_finite()
    return ([p.detach().clone() for p in params], [opt.state[p]["momentum"] for p in params],
            [p.grad for p in params], counters["stats"]["unique_graphs"])


def test_compiled_update_is_the_eager_rule_and_compiles_once_per_shape_class(restore_compile_backend):
    """Dynamo's trace of the per-matrix rule (in-place momentum and look-ahead included), without
    the inductor kernels: exactly the eager result. A plain torch.compile, as the record's: the
    first shape compiles static, the second recompiles with dynamic sizes, square matrices
    (another branch) once more; then nothing recompiles. The first three shapes relate as the
    record's (3072x768, 768x3072, 768x768), visited in the record's order; one more wide shape
    runs in the dynamic graph (compiled with dynamic=False it would compile a fourth)."""
    shapes = [(64, 16), (16, 64), (16, 16), (16, 16), (64, 16), (16, 64), (12, 40)]
    eager = compiled_steps(shapes, None)
    traced = compiled_steps(shapes, "aot_eager")
    for a, b in zip(eager[:3], traced[:3]):
        for x, y in zip(a, b):
            assert_equal(x, y)  # measured 0.0: weights, momenta and look-aheads
    assert traced[3] == 3  # tall, wide, square: measured 3 over 3 steps
    # the next trial's optimizer (a new Aurora, as train_gpt.py makes one per trial) reuses them
    assert compiled_steps(shapes, "aot_eager", steps=1, fresh=False)[3] == 3


def test_inductor_compiled_update_matches_eager_on_the_cpu(restore_compile_backend):
    """The inductor backend (the one CUDA runs) fuses and reorders float operations: the same
    update up to rounding. One tall matrix (the Aurora branch); compiling takes ~20 s here."""
    eager, compiled = compiled_steps([(64, 16)], None, 2), compiled_steps([(64, 16)], "inductor", 2)
    difference = largest_difference(compiled[0], eager[0])
    print(f"inductor vs eager: largest weight difference {difference:.2e}")
    assert 0 < difference < 3e-7  # measured 2.6e-8; 0 would mean it did not compile
    assert compiled[3] == 1


# --- batched fast path, and two gloo ranks against one process ---

SHAPES = [(96, 32), (32, 96), (48, 48), (48, 48), (48, 48), (96, 32), (40, 20)]  # uneven shares


def run_steps(batched, steps=3):
    """3 steps of the CPU-default optimizer (float32 Newton-Schulz) on SHAPES; returns the weights
    and {index of the matrix: momentum} for the matrices whose momentum lives in this process."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in SHAPES]
    opt = Aurora(params, lr=0.05, batched=batched)
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)  # same grads on every rank
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    opt.check_finite()
    momenta = {i: opt.state[p]["momentum"].clone() for i, p in enumerate(params) if "momentum" in opt.state[p]}
    return [p.detach().clone() for p in params], momenta


def largest_difference(got, expected):
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(got, expected))


def test_batched_fast_path_matches_per_matrix_single_process(one_thread):
    (batched, m_batched), (reference, m_reference) = run_steps(batched=True), run_steps(batched=False)
    difference = largest_difference(batched, reference)
    print(f"batched vs per-matrix: largest weight difference {difference:.2e}")
    assert difference < 1e-7  # measured 7.5e-9 (stacked matmuls and norms round differently)
    assert largest_difference(m_batched.values(), m_reference.values()) == 0  # momentum: same lerp


def test_batched_momentum_state_is_per_matrix():
    p = [torch.nn.Parameter(torch.zeros(8, 4)) for _ in range(3)]
    opt = Aurora(p, lr=0.1, batched=True)
    for q in p:
        q.grad = torch.ones(8, 4)
    opt.step()
    for q in p:
        assert_equal(opt.state[q]["momentum"], torch.full((8, 4), 0.05))
    # each matrix's state is a view into the stack: the per-matrix path continues from it
    opt.batched = False
    opt.step()
    for q in p:
        assert_equal(opt.state[q]["momentum"], torch.full((8, 4), 0.05).lerp(torch.ones(8, 4), 0.05))


def _worker(rank, world, port, out_dir):
    with gloo_rank(rank, world, port):  # both paths in one process group (a spawn costs seconds)
        for batched in (False, True):
            torch.save(run_steps(batched), os.path.join(out_dir, f"rank{rank}_{batched}.pt"))


def test_two_gloo_ranks_match_single_process(tmp_path, one_thread):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for batched in (False, True):
        reference, reference_momenta = run_steps(batched)
        owned = []
        for rank in range(2):
            got, momenta = torch.load(tmp_path / f"rank{rank}_{batched}.pt")
            difference = largest_difference(got, reference)
            print(f"batched={batched} rank {rank}: largest weight difference to one process {difference:.2e}")
            if batched:  # a rank stacks only its own matrices: a stack of 1 instead of 2 rounds
                assert difference < 1e-7  # differently (measured 7.5e-9)
            else:  # the same computation, one matrix at a time: measured 0.0
                for x, y in zip(got, reference):
                    assert_equal(x, y)
            for i, m in momenta.items():  # momentum lives on the owning rank only
                assert_equal(m, reference_momenta[i])
            owned += list(momenta)
        assert sorted(owned) == list(range(len(SHAPES)))  # every matrix on exactly one rank


@pytest.mark.parametrize("shape", [(96, 32), (32, 96)])
def test_leverage_is_measured_in_the_tall_orientation(shape):
    """Wide matrices are handled through their transpose: leverage averages 1 for both."""
    G = matrix(96, 32, seed=11, skew_rows=True)  # rows of the tall orientation skewed
    G = G if shape[0] > shape[1] else G.T
    p = torch.nn.Parameter(torch.zeros(shape))
    p.grad = G.clone()
    opt = Aurora([p], lr=0.1)
    probe = LeverageProbe(opt)
    probe.track_leverage()
    opt.step()
    lev = probe.pop_leverage()[p]
    assert lev.shape == (max(shape),)
    assert abs(lev.mean().item() - 1) < 1e-5  # orthogonal: the leverage averages 1
    muon = Aurora([torch.nn.Parameter(torch.zeros(shape))], lr=0.1, rule="muon")
    muon.param_groups[0]["params"][0].grad = G.clone()
    probe = LeverageProbe(muon)
    probe.track_leverage()
    muon.step()
    lev_muon = next(iter(probe.pop_leverage().values()))
    # measured: Aurora CV 0.076 after 2 D iterations (both orientations); plain polar > 0.5
    assert cv(lev) < 0.2 and cv(lev_muon) > 0.5, (cv(lev), cv(lev_muon))
