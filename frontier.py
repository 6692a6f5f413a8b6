"""The SOAP-Muon frontier (results #44, #45, #46 of the optimization track; spec/soap-frontier.md):
what its scripts compute beyond the Aurora lineage, as plain functions and small classes.

#44 keeps the lineage's machinery around the matrices (momentum with a Nesterov look-ahead, SOAP,
the radial brake, the u/w floor, the radius pin; aurora.py and soap.py have those) and changes the
rest: SOAP on every hidden matrix, refreshed every step, with a trust gate on attn.proj; plain
Newton-Schulz (no Aurora, no Contra-Muon); a bias-correction-free Adam for the biases and gains;
a Rademacher gain split whose last blocks come in antithetic, head-balanced pairs. #45 blends the
weights once towards their tail EMA before its last validation; #46 reads the validation loss at
such a blend (leaving the weights as they are), floors the update row by row, and decays
cautiously after the radius pin. aurora_on puts Aurora's leverage-uniform polar step back.

Nothing here is wired into the trainer yet; tests/test_frontier.py proves each piece against the
rule written out from the spec (tests/frontier_reference.py), bit for bit.
"""
import contextlib
import functools

import torch

from aurora import apply_uw_floor, aurora_polar
from lineage import pinned_step, polar_schatten4, radial_brake
from soap import SoapPreconditioner, schatten4

# The frontier's rule, as #44's script sets it; row_floor and cwd are #46's, aurora_on the modifiers'.
RULE = dict(radial_brake=0.5, uw_floor=0.3825, row_floor=False, row_floor_rho=1.0, cwd=0.0,
            aurora_on="off", pp_iterations=3, pp_beta=0.25,
            trust_floor=0.45, trust_cap=0.85, trust_floor_end=1375, trust_fade_end=1625,
            trust_min_agree=0.20, trust_min_grad_align=0.0)

# What SOAP does with each hidden matrix ("all_hidden"): the MLP's plainly; q, k, v blended with the
# raw look-ahead at gate 1 and renormalized ("attn"); attn.proj through the trust gate.
SOAP_KIND = {"mlp.fc": "mlp", "mlp.proj": "mlp", "attn.q": "attn", "attn.k": "attn", "attn.v": "attn",
             "attn.proj": "attn_proj"}


def cosine(a, b, eps=1e-8):
    a, b = a.float(), b.float()
    return (a * b).sum() / (a.norm() * b.norm()).clamp_min(eps)


def trust_bounds(step, rule=RULE):
    """(floor, cap) of attn.proj's gate at `step`: the floor trust_floor until trust_floor_end,
    then linearly to 0 at trust_fade_end; the cap trust_cap until trust_fade_end, then 1."""
    floor, end, fade = rule["trust_floor"], rule["trust_floor_end"], rule["trust_fade_end"]
    cap = rule["trust_cap"] if step < fade else 1.0
    if fade <= end:
        return (0.0 if step >= fade else floor), cap
    if step < end:
        return floor, cap
    if step >= fade:
        return 0.0, cap
    return floor * (fade - step) / (fade - end), cap


def trust_gate(raw, soap, grad, step, rule=RULE):
    """How far attn.proj moves from its raw look-ahead towards SOAP's direction: SOAP is trusted
    as far as it agrees with the raw momentum and is as gradient-aligned as it; bounded below by
    trust_bounds."""
    agree_min, align_min = rule["trust_min_agree"], rule["trust_min_grad_align"]
    raw_grad, soap_grad, soap_raw = cosine(raw, grad), cosine(soap, grad), cosine(soap, raw)
    agree = ((soap_raw - agree_min) / (1 - agree_min)).clamp(0, 1)
    aligned = ((soap_grad - align_min) / (raw_grad - align_min).clamp_min(1e-8)).clamp(0, 1)
    floor, cap = trust_bounds(step, rule)
    return (agree * aligned).clamp(0, 1).clamp(min=floor, max=cap)


def norm_preserving_blend(raw, soap, gate, eps=1e-8):
    """raw + gate (soap - raw), rescaled to raw's Schatten-4 norm."""
    blended = raw + (soap - raw) * gate.to(raw.dtype)
    return (blended * (schatten4(raw, eps) / schatten4(blended, eps)).to(blended.dtype)).to(raw.dtype)


def orthogonalize(u, dtype, rule=RULE):
    """Newton-Schulz with the Schatten-4 input scale (the scripts' "AURORA_K=0 path"), or with
    aurora_on Aurora's leverage-uniform polar step on the wide ("wide_only") or every non-square
    ("nonsquare") matrix, on the look-ahead rounded to the Newton-Schulz dtype as #30 had it. Then
    the aspect scale sqrt(rows/cols) of tall matrices, in the Newton-Schulz dtype as the scripts do."""
    rows, cols = u.shape
    polar_s4 = polar_schatten4
    if {"off": False, "wide_only": rows < cols, "nonsquare": rows != cols}[rule["aurora_on"]]:
        O = aurora_polar(u.to(dtype), rule["pp_iterations"], rule["pp_beta"], polar_fn=polar_s4, dtype=dtype)
    else:
        O = polar_s4(u, dtype=dtype)
    O *= max(1, rows / cols) ** 0.5
    return O


@torch.no_grad()
def row_floor(U, weight, floor, rho=1.0):
    """RowFloor: lift every row of U whose norm is below floor x its weight row's norm to that
    (norms in float32 clamped at 1e-8; factors >= 1 raised to rho); no renormalization after."""
    r = weight.float().norm(dim=1, keepdim=True).clamp_min(1e-8)
    s = U.float().norm(dim=1, keepdim=True).clamp_min(1e-8)
    return (U.float() * torch.clamp(floor * r / s, min=1.0).pow(rho)).to(U.dtype)


def cautious_mask(U, weight):
    """1 where the step -lr U shrinks the weight's magnitude (U and W agree in sign), else 0."""
    return (U.float() * weight.float() > 0).to(weight.dtype)


class SoapMuonMatrix:
    """One hidden matrix's state and step under the frontier's rule. kind: "mlp", "attn",
    "attn_proj" (SOAP_KIND) or "plain" (no SOAP)."""

    def __init__(self, shape, device, kind, soap_every=1, soap_beta2=0.9):
        self.kind = kind
        self.momentum = torch.zeros(shape, dtype=torch.float32, device=device)
        self.soap = None if kind == "plain" else SoapPreconditioner(
            shape, device, soap_beta2, soap_every, renorm="lerp" if kind == "attn" else "none")

    @torch.no_grad()
    def step(self, weight, grad, lr, mu, step, dtype, rule=RULE):
        """One optimizer step of `weight` (float32, in place) from its summed gradient."""
        self.momentum.lerp_(grad, 1 - mu)
        u = grad.lerp(self.momentum, mu)
        if self.soap is not None:
            z = self.soap.precondition(u)
            u = norm_preserving_blend(u, z, trust_gate(u, z, grad, step, rule)) if self.kind == "attn_proj" else z
        U = radial_brake(orthogonalize(u, dtype, rule), weight, rule["radial_brake"])
        if rule["row_floor"]:
            U = row_floor(U, weight, rule["uw_floor"], rule["row_floor_rho"])
        else:
            U = apply_uw_floor(U, weight, rule["uw_floor"])
        mask = cautious_mask(U, weight) if rule["cwd"] else None
        pinned_step(weight, U, lr)
        if mask is not None:  # after the pin, so that the pin does not undo the shape it gives
            weight.mul_(1.0 - (lr * rule["cwd"]) * mask)
        if self.soap is not None:
            self.soap.observe(grad)


@torch.no_grad()
def raw_adam_step(p, grad, state, lr, betas, eps=1e-10):
    """#44's Adam for biases and gains: no bias correction (the first steps move by the raw
    EMA ratio), second moment in float32."""
    if not state:
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
    state["exp_avg"].lerp_(grad, 1 - betas[0])
    state["exp_avg_sq"].lerp_(grad.float().square(), 1 - betas[1])
    p.add_((state["exp_avg"].float() / (state["exp_avg_sq"].sqrt() + eps)).to(p.dtype), alpha=-lr)


def pair_seed(seed, layer):
    """The seed of the generator that draws block `layer`'s antithetic pair."""
    return 0xA9170000 + seed * 1009 + layer * 9176


def antithetic_pair(width, head_dim, seed, layer, device, shrink=0.5):
    """Two +-1 sign vectors for two blocks: per head, s0 has its count of +1 pulled halfway
    (shrink) towards head_dim/2 from a Rademacher draw (Python's round, half to even), s1 the
    complementary count, each in its own random order; from a generator of its own. A width
    that is no multiple of head_dim draws s0 from the default generator instead, s1 = -s0."""
    if width % head_dim:
        s0 = torch.randint(0, 2, (width,), device=device, dtype=torch.float32) * 2 - 1
        return s0, -s0
    gen = torch.Generator(device=device)
    gen.manual_seed(pair_seed(seed, layer))
    heads0, heads1 = [], []
    ones = functools.partial(torch.ones, device=device, dtype=torch.float32)
    for _ in range(width // head_dim):
        drawn = (torch.randint(0, 2, (head_dim,), device=device, generator=gen, dtype=torch.int64) * 2 - 1).float()
        plus = int((drawn > 0).sum().item())
        plus = max(0, min(head_dim, int(round(head_dim / 2 + shrink * (plus - head_dim / 2)))))
        h0 = torch.cat([ones(plus), -ones(head_dim - plus)])[torch.randperm(head_dim, device=device, generator=gen)]
        h1 = torch.cat([ones(head_dim - plus), -ones(plus)])[torch.randperm(head_dim, device=device, generator=gen)]
        heads0.append(h0)
        heads1.append(h1)
    return torch.cat(heads0), torch.cat(heads1)


def gain_split_signs(n_layer, width, head_dim, seed, device, pairs_from=6):
    """Each block's signs s of the gain split (norm1 = 1 - a s, norm2 = 1 + a s): blocks before
    pairs_from draw Rademacher signs from the default generator of `device`, in order; from there
    on, blocks come in pairs (pairs_from, pairs_from + 1), ... sharing an antithetic_pair (the
    second block of a pair takes the pair's second vector; a last unpaired block its first)."""
    signs, partner = [], None
    for layer in range(n_layer):
        if layer >= pairs_from and (layer - pairs_from) % 2 == 1:
            s, partner = partner, None
        elif layer >= pairs_from:
            s, partner = antithetic_pair(width, head_dim, seed, layer, device)
        else:
            s = torch.randint(0, 2, (width,), device=device, dtype=torch.float32) * 2 - 1
        signs.append(s)
    return signs


class TailEMA:
    """An EMA of the weights over the tail of training, in the forms of #45 and #46.

    #45 ("lerp"): from the end of step `start` (the weights after `start` optimizer steps) the
    buffer is a copy in the parameter's dtype, then ema.lerp_(w, 1/tau) after every later step;
    before the validation at its claimed step the weights are blended in for good, w.lerp_(ema,
    lam) (blend_into). #46 ("add"): float32 buffers over start <= steps done < stop, updated as
    ema += (w - ema) / tau; at every validation once it exists the loss is read at
    ((1 - lam) w + lam ema) and the weights are restored exactly (readout). Parameters given as
    None (the token embedding) are left out."""

    def __init__(self, params, tau, start, stop=None, form="lerp"):
        self.params, self.tau, self.start, self.stop, self.form = params, tau, start, stop, form
        self.ema = None

    @torch.no_grad()
    def after_step(self, steps_done):
        if steps_done < self.start or (self.stop is not None and steps_done >= self.stop):
            return
        if self.ema is None:
            copy = (lambda p: p.detach().clone()) if self.form == "lerp" else (lambda p: p.detach().float().clone())
            self.ema = [None if p is None else copy(p) for p in self.params]
            return
        for p, e in zip(self.params, self.ema):
            if p is None:
                continue
            if self.form == "lerp":
                e.lerp_(p.detach(), 1.0 / self.tau)
            else:
                e.add_(p.detach().float() - e, alpha=1.0 / self.tau)

    @torch.no_grad()
    def blend_into(self, lam):
        for p, e in zip(self.params, self.ema or ()):
            if p is not None:
                p.lerp_(e, lam)

    @contextlib.contextmanager
    def readout(self, lam, every_param):
        """The weights at the blend while the block runs (all of `every_param` stashed and put back
        exactly after); as they are while there is no EMA yet."""
        if self.ema is None:
            yield
            return
        with torch.no_grad():
            stash = [p.detach().clone() for p in every_param]
            for p, e in zip(self.params, self.ema):
                if p is not None:
                    p.copy_(((1.0 - lam) * p.float() + lam * e).to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(every_param, stash):
                    p.copy_(s)


# --- the proposed presets (not in the trainer yet): overrides on top of aurora_2890 -------------

# #44's validation steps beyond every 125th: its script's extra set, up to its 2900 trained steps
VAL_2750 = (*range(2700, 2810, 5), 2810, 2820, 2830, 2840, 2850, 2860, 2870, 2880, 2890, 2895, 2900)
PRESETS = {
    "soap_2750": dict(
        train_steps=2900, schedule_steps=2900, momentum_cooldown=200, val_extra=VAL_2750,
        rule="muon", soap_muon=True, soap="all_hidden", soap_every=1, soap_v_blend=1.0, soap_v_floor=0.0,
        soap_trust_gate=True, trust_floor_end=1375, trust_fade_end=1625, contra=0.0, contra_fade=0,
        lineage_rounding="none", scalar_adam="raw", aux_beta2=(0.99, 0.997, 0.9965),
        gain_split=0.125, gain_split_pairs=6),
}
PRESETS["soap_2720"] = dict(PRESETS["soap_2750"], train_steps=2720, momentum_horizon=2900,
                            val_extra=(2700, 2705, 2710, 2715, 2720), final_ema_blend=0.6, final_ema_tau=150,
                            final_ema_start=2000, final_ema_step=2720)
PRESETS["soap_2690"] = dict(PRESETS["soap_2750"], val_extra=tuple(sorted({2690, *VAL_2750})),
                            tail_ema_readout=0.6, tail_ema_tau=150, tail_ema_start=2400, tail_ema_stop=2900,
                            row_floor=True, cwd=0.025)
# The Aurora modifiers (soap_2690+aurora_proj, ...+aurora_nonsquare): #30's placement, iterations
# and exponent; the record's placement, iterations and exponent.
PRESETS["aurora_proj"] = dict(rule="aurora", aurora_on="wide_only", pp_iterations=3, pp_beta=0.25)
PRESETS["aurora_nonsquare"] = dict(rule="aurora", aurora_on="nonsquare", pp_iterations=2, pp_beta=0.5)
