"""The SOAP-Muon frontier's rules (results #44, #45, #46), written out here from
spec/soap-frontier.md, step by step and independently of frontier.py, aurora.py and soap.py: the
oracle that tests/test_frontier.py proves our implementation against, bit for bit. The polar
factor is conftest's written-out Newton-Schulz, SOAP's statistics test_lineage's written-out
rule (the same in the lineage and here)."""
import math

import torch

from conftest import reference_polar
from test_lineage import s4, spec_soap_observe, spec_soap_state

__all__ = ["spec_soap_state", "trust_bounds", "matrix_step", "adam_step", "gain_signs", "ema_45", "ema_46",
           "lr_at", "momentum_at", "validates"]


# --- the per-matrix rule (#44; RowFloor and CWD #46; Aurora for the modifiers) ---

def soap_precondition(u, st):
    """SOAP's direction for u (no bases yet: u itself): Adam in the eigenbases, beta2 0.9, the
    denominator's square clamped at 1e-16, rescaled to u's S4 norm."""
    if st["QL"] is None:
        return u
    P = st["QL"].T @ u @ st["QR"]
    st["exp"] = torch.add(st["exp"] * 0.9, P.square(), alpha=1 - 0.9)
    Z = st["QL"] @ (P / st["exp"].clamp(min=1e-16).pow(0.5)) @ st["QR"].T
    return Z * (s4(u, 1e-8) / s4(Z, 1e-8))


def cos(a, b):
    return (a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-8)


def trust_bounds(step, floor_end=1375, fade_end=1625):
    """The gate's floor (0.45, fading linearly to 0 between floor_end and fade_end) and cap
    (0.85 before fade_end, 1 from there)."""
    if step < floor_end:
        floor = 0.45
    elif step >= fade_end:
        floor = 0.0
    else:
        floor = 0.45 * (fade_end - step) / (fade_end - floor_end)
    return floor, 0.85 if step < fade_end else 1.0


def gate_of(raw, soap, grad, step, floor_end, fade_end):
    """attn.proj's trust gate: agreement (min 0.2) x relative gradient alignment (min 0.0), in
    [0, 1], then within trust_bounds."""
    agree = ((cos(soap, raw) - 0.2) / 0.8).clamp(0, 1)
    aligned = (cos(soap, grad) / cos(raw, grad).clamp(min=1e-8)).clamp(0, 1)
    floor, cap = trust_bounds(step, floor_end, fade_end)
    return (agree * aligned).clamp(0, 1).clamp(min=floor, max=cap)


def blend(raw, soap, gate):
    B = raw + (soap - raw) * gate
    return B * (s4(raw, 1e-8) / s4(B, 1e-8))


def polar_s4(X, dtype):
    """The frontier's Newton-Schulz: the record's 12 quintic steps, input over its S4 norm."""
    return reference_polar(X, dtype, scale=lambda Y: s4(Y, 1e-7).to(dtype))


def aurora(u, dtype, iterations, beta):
    """Aurora's leverage-uniform polar step on u rounded to dtype, in the tall orientation."""
    X = u.to(dtype)
    T = (X if X.shape[0] > X.shape[1] else X.T).float()
    m, n = T.shape
    D = 1 / T.norm(dim=1, keepdim=True).clamp(min=1e-7)
    for k in range(iterations):
        U = polar_s4((D * T).to(dtype), dtype)
        if k < iterations - 1:
            D = D * ((n / m) / U.float().pow(2).sum(1, keepdim=True).clamp(min=1e-14)).pow(beta)
    return U if u.shape[0] > u.shape[1] else U.T


def matrix_step(W, G, M, st, kind, step, lr, mu, dtype, row_floor=False, cwd=0.0, aurora_on="off",
                floor_end=1375, fade_end=1625):
    """One step of one float32 matrix; returns (W, M). kind: mlp, attn, attn_proj or plain."""
    M = torch.lerp(M, G, 1 - mu)
    u = torch.lerp(G, M, mu)
    if kind != "plain":
        z = soap_precondition(u, st)
        if kind == "attn":
            u = blend(u, z, torch.tensor(1.0))
        elif kind == "attn_proj":
            u = blend(u, z, gate_of(u, z, G, step, floor_end, fade_end))
        else:
            u = z
    rows, cols = u.shape
    if aurora_on == "wide_only" and rows < cols:
        O = aurora(u, dtype, 3, 0.25)
    elif aurora_on == "nonsquare" and rows != cols:
        O = aurora(u, dtype, 2, 0.5)
    else:
        O = polar_s4(u, dtype)
    O = O * math.sqrt(max(1, rows / cols))  # stays in the Newton-Schulz dtype
    V = O.float()  # radial brake: the outward radial part halved, back in O's dtype
    c = (V * W).sum() / (W * W).sum().clamp(min=1e-12)
    V = ((V - c * W) + (0.5 if c < 0 else 1.0) * (c * W)).to(O.dtype)
    if row_floor:  # every row at least 0.3825 x its weight row
        r, s = W.norm(dim=1, keepdim=True).clamp(min=1e-8), V.float().norm(dim=1, keepdim=True).clamp(min=1e-8)
        V = (V.float() * (0.3825 * r / s).clamp(min=1.0)).to(V.dtype)
    else:  # the whole update at least 0.3825 x the weight
        pf, uf = W.norm().clamp(min=1e-8), V.float().norm().clamp(min=1e-8)
        if uf / pf < 0.3825:
            V = V * (0.3825 * pf / uf).to(V.dtype)
    mask = (V.float() * W > 0).float()
    b = W.norm().clamp(min=1e-8)  # radius pin
    target = (b + (-lr * (V.float() * W).sum()) / b).clamp(min=1e-8)
    W = torch.add(W, V.float(), alpha=-lr)
    W = W * (target / W.norm().clamp(min=1e-8))
    if cwd:
        W = W * (1.0 - (lr * cwd) * mask)
    if kind != "plain":
        spec_soap_observe(G, st, 1)
    return W, M


# --- Adam for biases and gains (#44): no bias correction ---

def adam_step(p, g, m, v, lr, b1, b2):
    m = torch.lerp(m, g, 1 - b1)
    v = torch.lerp(v, g * g, 1 - b2)
    return torch.add(p, m / (v.sqrt() + 1e-10), alpha=-lr), m, v


# --- the gain split's signs (#44) ---

def half_to_even(twice):
    """round(twice / 2) with ties to the even integer, for an integer `twice`."""
    if twice % 2 == 0:
        return twice // 2
    lo = (twice - 1) // 2
    return lo if lo % 2 == 0 else lo + 1


def gain_signs(n_layer, width, head_dim, seed):
    """Blocks 0-5: Rademacher signs from the default generator, block by block. Blocks 6 and 7,
    8 and 9, ...: one pair from a generator seeded 0xA9170000 + 1009 seed + 9176 l (l the pair's
    first block): per head, count the +1 of a Rademacher draw (int64), pull the count halfway to
    head_dim/2 (half to even), first vector: that many +1 then -1, permuted; second vector: the
    complementary count, permuted (each permutation the generator's next randperm)."""
    out, second = [], None
    for l in range(n_layer):
        if l < 6:
            out.append(torch.randint(0, 2, (width,), dtype=torch.float32) * 2 - 1)
            continue
        if (l - 6) % 2:
            out.append(second)
            continue
        if width % head_dim:
            first = torch.randint(0, 2, (width,), dtype=torch.float32) * 2 - 1
            out.append(first)
            second = -first
            continue
        gen = torch.Generator().manual_seed(2836856832 + 1009 * seed + 9176 * l)
        firsts, seconds = [], []
        for _ in range(width // head_dim):
            drawn = torch.randint(0, 2, (head_dim,), generator=gen)
            k = half_to_even(head_dim // 2 + int(drawn.sum()))  # (head_dim/2 + count) / 2, head_dim even
            signs = torch.tensor([1.0] * k + [-1.0] * (head_dim - k))
            firsts.append(signs[torch.randperm(head_dim, generator=gen)])
            signs = torch.tensor([1.0] * (head_dim - k) + [-1.0] * k)
            seconds.append(signs[torch.randperm(head_dim, generator=gen)])
        out.append(torch.cat(firsts))
        second = torch.cat(seconds)
    return out


# --- the tail EMA: #45's final blend, #46's readout ---

def ema_45(emas, weights, steps_done, start=2000, tau=150):
    """After the step that makes `steps_done`: from `start` on, a copy, then lerp towards w by 1/tau."""
    if steps_done < start:
        return emas
    if emas is None:
        return [w.clone() for w in weights]
    return [torch.lerp(e, w, 1 / tau) for e, w in zip(emas, weights)]


def ema_46(emas, weights, steps_done, start=2400, stop=2900, tau=150):
    """The same over start <= steps_done < stop, in float32, as e + (w - e) / tau."""
    if not start <= steps_done < stop:
        return emas
    if emas is None:
        return [w.float().clone() for w in weights]
    return [torch.add(e, w.float() - e, alpha=1 / tau) for e, w in zip(emas, weights)]


# --- schedules and validation steps (the scripts' set_hparams and should_validate) ---

POWER_C = (4.976805410800738e-05, 5.184172302917436e-07, 1.6589351369335795e-06, 3.3169534699576625e-06)


def lr_at(step, lr0, c, horizon=2900):
    return min(lr0, c * max(0.0, horizon - step) ** 1.2)


def momentum_at(step, horizon=2900, warmup=300, cooldown=200):
    start = horizon - cooldown
    if step < warmup:
        return 0.85 + step / warmup * (0.95 - 0.85)
    if step > start:
        return 0.95 - (step - start) / cooldown * (0.95 - 0.85)
    return 0.95


EXTRA_44 = ({2700, 2705, 2710, 2715, 2720, 2725, 2730, 2735, 2740, 2745, 2750, 2755, 2760, 2765, 2770, 2775,
             2780, 2785, 2790, 2795, 2800, 2805, 2810, 2820, 2830, 2840, 2850, 2860, 2870, 2880, 2890, 2895,
             2900, 2910, 2920, 2930, 2940, 2950, 2960, 2965, 2970, 2975, 2980, 2985, 2990, 2995, 2999, 3000,
             3010, 3020})


def validates(step, stop, claimed):
    """The scripts' rule (train_steps 2900, STOP_STEP `stop`), plus the claimed step."""
    return step in (2900, stop, claimed) or (step > 0 and step % 125 == 0) or step in EXTRA_44
