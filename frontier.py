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

A technique module of train_gpt.py (FRONTIER below; plugins.py): the presets soap_2750, soap_2720
and soap_2690 (aurora_2890's settings with the frontier's), and the modifiers aurora_proj and
aurora_nonsquare; every technique a flag, off by default. It builds on lineage.py (a log's code
part carries both, and soap.py, when its run uses the frontier). tests/test_frontier.py proves
each piece against the rule written out from the spec (tests/frontier_reference.py), bit for bit,
and the trainer's optimizer, schedules, init and tail EMA for the presets.
"""
import contextlib
import dataclasses
import functools

import torch

from aurora import Aurora, apply_uw_floor, aurora_polar, ns_dtype_for
from lineage import (LINEAGE, LINEAGE_PRESETS, SCALED_STEPS, LineageAurora, pinned_step, polar_schatten4,
                     radial_brake, scale_steps)
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


def frontier_polar(u, dtype, rule=RULE):
    """Newton-Schulz with the Schatten-4 input scale (the scripts' "AURORA_K=0 path"), or with
    aurora_on Aurora's leverage-uniform polar step on the wide ("wide_only") or every non-square
    ("nonsquare") matrix, on the look-ahead rounded to the Newton-Schulz dtype as #30 had it."""
    rows, cols = u.shape
    if {"off": False, "wide_only": rows < cols, "nonsquare": rows != cols}[rule["aurora_on"]]:
        return aurora_polar(u.to(dtype), rule["pp_iterations"], rule["pp_beta"], polar_fn=polar_schatten4, dtype=dtype)
    return polar_schatten4(u, dtype=dtype)


def frontier_orthogonalize(u, dtype, rule=RULE):
    """frontier_polar, then the aspect scale sqrt(rows/cols) of tall matrices, in the Newton-Schulz
    dtype as the scripts do."""
    rows, cols = u.shape
    O = frontier_polar(u, dtype, rule)
    O *= max(1, rows / cols) ** 0.5
    return O


def probed_polar(u, how):
    """frontier_polar of `how` = (dtype, rule): the direction whose row leverage diagnostics.py's
    LeverageProbe measures (the aspect scale, one number per matrix, left out)."""
    return frontier_polar(u, *how)


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

    def __init__(self, shape, device, kind, soap_every=1, soap_beta2=0.9, **soap_options):
        self.kind = kind
        self.momentum = torch.zeros(shape, dtype=torch.float32, device=device)
        self.soap = None if kind == "plain" else SoapPreconditioner(
            shape, device, soap_beta2, soap_every, renorm="lerp" if kind == "attn" else "none", **soap_options)

    @torch.no_grad()
    def step(self, weight, grad, lr, mu, step, dtype, rule=RULE, look=None):
        """One optimizer step of `weight` (float32, in place) from its summed gradient; returns
        the update U (weight -= lr U before the pin). look(u): shown the look-ahead it orthogonalizes."""
        self.momentum.lerp_(grad, 1 - mu)
        u = grad.lerp(self.momentum, mu)
        if self.soap is not None:
            z = self.soap.precondition(u)
            u = norm_preserving_blend(u, z, trust_gate(u, z, grad, step, rule)) if self.kind == "attn_proj" else z
        if look is not None:
            look(u)
        U = radial_brake(frontier_orthogonalize(u, dtype, rule), weight, rule["radial_brake"])
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
        return U


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


# --- the presets: overrides on top of aurora_2890 (spec/soap-frontier.md) ------------------------

# #44's validation steps beyond every 125th: its script's extra set, up to its 2900 trained steps
VAL_2750 = (*range(2700, 2810, 5), 2810, 2820, 2830, 2840, 2850, 2860, 2870, 2880, 2890, 2895, 2900)
FRONTIER_PRESETS = {
    "soap_2750": dict(
        train_steps=2900, schedule_steps=2900, momentum_cooldown=200, val_extra=VAL_2750,
        rule="muon", soap_muon=True, soap="all_hidden", soap_every=1, soap_v_blend=1.0, soap_v_floor=0.0,
        soap_trust_gate=True, trust_floor_end=1375, trust_fade_end=1625, contra=0.0, contra_fade=0,
        lineage_rounding="none", scalar_adam="raw", aux_beta2=(0.99, 0.997, 0.9965),
        gain_split=0.125, gain_split_pairs=6),
}
FRONTIER_PRESETS["soap_2720"] = dict(FRONTIER_PRESETS["soap_2750"], train_steps=2720, momentum_horizon=2900,
                            val_extra=(2700, 2705, 2710, 2715, 2720), final_ema_blend=0.6, final_ema_tau=150,
                            final_ema_start=2000, final_ema_step=2720)
FRONTIER_PRESETS["soap_2690"] = dict(FRONTIER_PRESETS["soap_2750"], val_extra=tuple(sorted({2690, *VAL_2750})),
                            tail_ema_readout=0.6, tail_ema_tau=150, tail_ema_start=2400, tail_ema_stop=2900,
                            row_floor=True, cwd=0.025)
# The Aurora modifiers (soap_2690+aurora_proj, ...+aurora_nonsquare): #30's placement, iterations
# and exponent; the record's placement, iterations and exponent.
FRONTIER_PRESETS["aurora_proj"] = dict(rule="aurora", aurora_on="wide_only", pp_iterations=3, pp_beta=0.25)
FRONTIER_PRESETS["aurora_nonsquare"] = dict(rule="aurora", aurora_on="nonsquare", pp_iterations=2, pp_beta=0.5)


# --- the technique: its flags, its optimizers, what train_gpt.py calls at its named points -------


def frontier_field(default, help, **metadata):
    return dataclasses.field(default=default, metadata=dict(help=help, **metadata))


@dataclasses.dataclass
class FrontierHyperparameters:
    """The frontier's hyperparameters, at their off values (the lineage's computation)."""
    soap_muon: bool = frontier_field(False, "the frontier's matrix rule (#44): momentum, SOAP (--soap), "
                                            "Newton-Schulz (Aurora with --rule aurora), aspect scale and radial "
                                            "brake in its dtype, u/w floor, radius pin; no Contra-Muon")
    soap_trust_gate: bool = frontier_field(False, "attn.proj: move from the raw look-ahead towards SOAP's "
                                                  "direction by a bounded trust gate (off: all the way, as q, k, v)")
    trust_floor_end: int = frontier_field(1375, "the trust gate's floor 0.45 until this step, then linearly "
                                                "to 0 at --trust-fade-end")
    trust_fade_end: int = frontier_field(1625, "from this step the gate's floor is 0 and its cap 1 (before: 0.85)")
    row_floor: bool = frontier_field(False, "RowFloor (#46): each update row at least --uw-floor x its weight "
                                            "row, instead of the whole update")
    cwd: float = frontier_field(0.0, "Cautious Weight Decay after the radius pin (#46 0.025): W *= 1 - lr*cwd "
                                     "where the update and W agree in sign")
    scalar_adam: str = frontier_field("torch", "Adam of biases and gains: torch (AdamW, bias-corrected) or raw "
                                               "(#44: no bias correction)")
    aux_beta2: tuple = frontier_field(None, "beta2 of the gains, the biases and the attn.proj biases (#44 0.99 "
                                            "0.997 0.9965; default: --adam-betas' second)", nargs=3)
    gain_split_pairs: int = frontier_field(0, "from this block on, the gain split's signs come in antithetic "
                                              "head-balanced pairs of their own generators (#44: 6; 0: off)")
    final_ema_blend: float = frontier_field(0.0, "#45: before the validation at --final-ema-step blend the "
                                                 "weights (not the embedding) this far towards their tail EMA, "
                                                 "for good (0: off)")
    final_ema_tau: float = frontier_field(150.0, "that EMA's time constant in steps (ema.lerp_(w, 1/tau))")
    final_ema_start: int = frontier_field(2000, "that EMA starts as a copy of the weights after this many steps")
    final_ema_step: int = frontier_field(None, "the validation step the blend comes before (default train_steps)")
    tail_ema_readout: float = frontier_field(0.0, "#46: at every validation also log val_ema_loss, the loss at "
                                                  "(1 - x) w + x EMA, the weights left as they are (0: off)")
    tail_ema_tau: float = frontier_field(150.0, "the readout's EMA time constant in steps")
    tail_ema_start: int = frontier_field(2400, "the readout's EMA (float32) starts after this many steps")
    tail_ema_stop: int = frontier_field(None, "and stops updating from this many steps (default: never)")


# The presets as the trainer takes them (aurora_2890's settings, then the frontier's), and the
# frontier's step counts that scale with the run's length (as the lineage's SCALED_STEPS do).
SOAP_PRESETS = {name: dict(LINEAGE_PRESETS["aurora_2890"], **FRONTIER_PRESETS[name])
                for name in ("soap_2750", "soap_2720", "soap_2690")}
FRONTIER_SCALED = ("trust_floor_end", "trust_fade_end", "final_ema_start", "final_ema_step", "tail_ema_start",
                   "tail_ema_stop")
# Where SOAP runs with --soap, by the matrix's place in its block.
SOAP_ON = dict(none=(), mlp_v=("mlp.fc", "mlp.proj", "attn.v"), all_hidden=tuple(SOAP_KIND))


class FrontierAurora(Aurora):
    """The block matrices under the frontier's rule (SoapMuonMatrix), dealt to the ranks as Aurora
    deals them; `matrices`: {matrix: (kind, SOAP options)}, `matrix_rule`: RULE's settings. p.grad keeps the raw gradient.
    `probe`: diagnostics.py's LeverageProbe, shown each look-ahead the rule orthogonalizes. A
    checkpoint keeps each matrix's momentum and SOAP state as the lineage's (harness.py's points)."""
    probe = None
    STATE_KEYS = LineageAurora.STATE_KEYS
    _state_shape = staticmethod(LineageAurora._state_shape)

    def __init__(self, params, lr, matrices, matrix_rule, soap_every, soap_beta2, **options):
        super().__init__(params, lr, **options)
        self.matrices, self.matrix_rule = matrices, matrix_rule
        self.soap_every, self.soap_beta2 = soap_every, soap_beta2

    def _matrix_for(self, p):
        kind, options = self.matrices[p]
        return SoapMuonMatrix(p.shape, p.device, kind, self.soap_every, self.soap_beta2, **options)

    def _held_state(self, p):
        matrix = self.state[p].get("matrix")
        held = {} if matrix is None else {"momentum": matrix.momentum}
        if matrix is not None and matrix.soap is not None:
            held.update({f"soap_{k}": v for k, v in matrix.soap.state().items()})
        return held

    _check_saved = LineageAurora._check_saved  # SOAP's state where SOAP runs (self.soap), nowhere else

    @property
    def soap(self):
        """The matrices SOAP preconditions."""
        return {p for p, (kind, _) in self.matrices.items() if kind != "plain"}

    def _load_held(self, i, p, state):
        if "momentum" in state:
            matrix = self.state[p]["matrix"] = self._matrix_for(p)
            matrix.momentum = state["momentum"].to(device=p.device, dtype=torch.float32, copy=True)
            if matrix.soap is not None:
                matrix.soap.load({k[len("soap_"):]: v for k, v in state.items() if k.startswith("soap_")})

    def _update(self, group, p):
        state = self.state[p]
        if "matrix" not in state:
            state["matrix"] = self._matrix_for(p)
        dtype, probe = ns_dtype_for(group["ns_dtype"], p.device), self.probe
        look = ((lambda u: probe.keep(p, probed_polar, u, (dtype, self.matrix_rule)))
                if probe is not None and probe.tracking else None)  # only on the step a validation reports
        U = state["matrix"].step(p, p.grad, group["lr"], group["momentum"], self.step_index, dtype,
                                 self.matrix_rule, look)
        self._step_flags.append((torch.isfinite(U).all().reshape(1), [p]))


class FrontierAdam(torch.optim.Optimizer):
    """Adam of a frontier run: torch's AdamW (fused where torch has it) for the embedding and the
    head, and for the biases and gains in groups by beta2 either the same (torch) or #44's Adam
    without bias correction (raw); groups: embedding, head, then the scalars'."""

    def __init__(self, groups, betas, eps, raw, fused):
        super().__init__(groups, dict(betas=betas, eps=eps, weight_decay=0.0))
        self.torch_adam = torch.optim.AdamW(self.param_groups[:2] if raw else self.param_groups, fused=fused)
        self.raw_groups = self.param_groups[2:] if raw else []

    def state_dict(self):
        return dict(super().state_dict(), torch_adam=self.torch_adam.state_dict())

    def load_state_dict(self, state_dict):
        """The inverse of state_dict(); then torch's AdamW and the raw Adam share the trainer's
        groups again (torch's load_state_dict puts copies of the saved groups in place)."""
        state_dict = dict(state_dict)
        self.torch_adam.load_state_dict(state_dict.pop("torch_adam"))
        super().load_state_dict(state_dict)
        n = len(self.torch_adam.param_groups)
        self.torch_adam.param_groups[:], self.raw_groups = self.param_groups[:n], self.param_groups[n:]

    @torch.no_grad()
    def step(self, closure=None):
        self.torch_adam.step()
        for group in self.raw_groups:
            for p in group["params"]:
                raw_adam_step(p, p.grad, self.state[p], group["lr"], group["betas"], group["eps"])


class Frontier:
    """The frontier as a technique of train_gpt.py (see plugins.py). It comes before the lineage
    in TECHNIQUES: its init, optimizers and validation steps take precedence, and the lineage's
    (PowerCool, the momentum schedule, EMA-Nesterov) do the rest. The running trial's tail EMA is
    `run.tail_ema`; a checkpoint keeps it (checkpoint_state), and FrontierAurora's and FrontierAdam's
    state."""
    name = "frontier.py"
    Hyperparameters = FrontierHyperparameters
    PRESETS = {**SOAP_PRESETS, "aurora_proj": FRONTIER_PRESETS["aurora_proj"],
               "aurora_nonsquare": FRONTIER_PRESETS["aurora_nonsquare"]}
    GPU_PRESETS = tuple(SOAP_PRESETS)
    CHOICES = dict(soap=("all_hidden",), scalar_adam=("torch", "raw"))
    OFF = {f.name: f.default for f in dataclasses.fields(FrontierHyperparameters)}

    def used(self, hp):
        return hp.soap == "all_hidden" or any(getattr(hp, k, v) != v for k, v in self.OFF.items())

    @staticmethod
    def preset_overrides(parts, merged, flags, train_steps):
        """Scale a soap preset's step counts (the lineage's and the frontier's) to the run's length."""
        soap = [p for p in parts if p in SOAP_PRESETS]
        if soap and any(p in LINEAGE_PRESETS for p in parts):
            raise ValueError(f"--preset: {soap[0]} holds aurora_2890's settings already: combine it with tiny, "
                             "small, aurora_proj or aurora_nonsquare, not with a lineage preset")
        return scale_steps(parts, merged, flags, train_steps, SOAP_PRESETS, SCALED_STEPS + FRONTIER_SCALED)

    @staticmethod
    def check(hp, bad):
        """What the frontier's settings need, and what they do not combine with (yet); their ranges
        are harness.py's RANGES, what cannot act in a run its NEEDS and never_acting."""
        if hp.soap == "all_hidden" and not hp.soap_muon:
            bad("soap", "all_hidden runs with --soap-muon (the frontier's rule)")
        for name in ("soap_trust_gate", "row_floor", "cwd"):
            if getattr(hp, name) and not hp.soap_muon:
                bad(name, "acts within --soap-muon's rule: add --soap-muon")
        if hp.soap_trust_gate and hp.soap != "all_hidden":
            bad("soap_trust_gate", "gates SOAP on attn.proj: needs --soap all_hidden")
        if hp.soap_trust_gate and hp.trust_floor_end > hp.trust_fade_end:
            bad("trust_floor_end", f"must be <= --trust-fade-end ({hp.trust_fade_end})")
        if hp.soap_muon:  # the settings its rule has no place for
            fixed = dict(contra=0.0, norm_estimate="schatten4", lineage_rounding="none", radius_pin=True,
                         nesterov=True, weight_decay=0.0, aurora_batched=False, ns_iteration="quintic12")
            for name, value in fixed.items():
                if getattr(hp, name) != value:
                    bad(name, f"must be {value!r} with --soap-muon (its rule has it so: spec/soap-frontier.md)")
            if hp.rule == "aurora" and hp.aurora_on not in ("wide_only", "nonsquare"):
                bad("aurora_on", "must be wide_only or nonsquare with --soap-muon --rule aurora")
        if hp.final_ema_blend and hp.tail_ema_readout:
            bad("tail_ema_readout", "and --final-ema-blend each keep a tail EMA of their own: use one")
        step = hp.final_ema_step or hp.train_steps
        if hp.final_ema_blend and not hp.final_ema_start <= step <= hp.train_steps:
            bad("final_ema_step", f"must be at or after --final-ema-start ({hp.final_ema_start}) and at most "
                                  f"--train-steps ({hp.train_steps})")
        if hp.tail_ema_readout and hp.tail_ema_stop is not None and hp.tail_ema_stop < hp.tail_ema_start:
            bad("tail_ema_stop", f"must be at or after --tail-ema-start ({hp.tail_ema_start})")

    @staticmethod
    @torch.no_grad()
    def init_weights(model, hp):
        """The lineage's init, then the gain split with antithetic pairs from block gain_split_pairs
        on, each pair's generator seeded from the trial's seed (the default generator's)."""
        if not hp.gain_split_pairs or not hp.gain_split:
            return None
        LINEAGE.init_weights(model, dataclasses.replace(hp, gain_split=0.0))
        gains = model.blocks[0].norm1.gains
        signs = gain_split_signs(len(model.blocks), gains.numel(), hp.head_dim, torch.initial_seed(),
                                 gains.device, hp.gain_split_pairs)
        for block, s in zip(model.blocks, signs):
            block.norm1.gains.copy_(1.0 - hp.gain_split * s)
            block.norm2.gains.copy_(1.0 + hp.gain_split * s)
        return True

    @staticmethod
    def make_adam(model, hp, device):
        """FrontierAdam with raw Adam or the aux betas (else None: the trainer's AdamW)."""
        if hp.scalar_adam == "torch" and hp.aux_beta2 is None:
            return None
        beta1, beta2 = hp.adam_betas
        scalars = [(name, p) for name, p in model.named_parameters() if p.ndim < 2]
        gains = [p for name, p in scalars if name.endswith("gains")]
        proj_biases = [p for name, p in scalars if name.endswith("attn.proj.bias")]
        biases = [p for name, p in scalars if not name.endswith(("gains", "attn.proj.bias"))]
        groups = [dict(params=[model.embed.weight], lr=hp.lr_embed), dict(params=[model.proj.weight], lr=hp.lr_head)]
        for params, b2 in zip((gains, biases, proj_biases), hp.aux_beta2 or (beta2,) * 3):
            if params:
                groups.append(dict(params=params, lr=hp.lr_scalar, betas=(beta1, b2)))
        return FrontierAdam(groups, hp.adam_betas, hp.adam_eps, hp.scalar_adam == "raw",
                            fused=device.type in ("cuda", "cpu"))

    @staticmethod
    def make_aurora(matrices, hp, model, options):
        """FrontierAurora with --soap-muon (else None: the lineage's or the trainer's choice)."""
        if not hp.soap_muon:
            return None
        names = {p: name for name, p in model.named_parameters()}
        kinds = {}
        for p in matrices:
            place = ".".join(names[p].split(".")[2:4])  # blocks.3.attn.q.weight -> attn.q
            kind = SOAP_KIND[place] if place in SOAP_ON[hp.soap] else "plain"
            kind = "attn" if kind == "attn_proj" and not hp.soap_trust_gate else kind
            v = place == "attn.v" and kind != "plain"
            kinds[p] = kind, (dict(blend=hp.soap_v_blend, floor=hp.soap_v_floor) if v else {})
        rule = dict(RULE, radial_brake=hp.radial_brake, uw_floor=hp.uw_floor, row_floor=hp.row_floor, cwd=hp.cwd,
                    aurora_on="off" if hp.rule == "muon" else hp.aurora_on, pp_iterations=hp.pp_iterations,
                    pp_beta=hp.pp_beta, trust_floor_end=hp.trust_floor_end, trust_fade_end=hp.trust_fade_end)
        return FrontierAurora(matrices, matrices=kinds, matrix_rule=rule, soap_every=hp.soap_every,
                              soap_beta2=hp.soap_beta2, **options)

    @staticmethod
    def optimizers_built(adam, aurora, hp):
        """PowerCool's c of FrontierAdam's groups: the scalars' for every scalar group (the lineage
        keeps what is set here)."""
        if hp.lr_schedule == "power" and isinstance(adam, FrontierAdam):
            for i, group in enumerate(adam.param_groups):
                group["power_c"] = hp.power_c[min(i, 2)]
            for group in aurora.param_groups:
                group["power_c"] = hp.power_c[3]

    @staticmethod
    def is_val_step(step, hp):
        return True if hp.final_ema_blend and step == (hp.final_ema_step or hp.train_steps) else None

    @staticmethod
    def trial_started(run):
        hp, model = run.hp, run.model
        params = [None if p is model.embed.weight else p for p in model.parameters()]
        run.tail_ema = (TailEMA(params, hp.final_ema_tau, hp.final_ema_start, form="lerp") if hp.final_ema_blend
                        else TailEMA(params, hp.tail_ema_tau, hp.tail_ema_start, hp.tail_ema_stop, form="add")
                        if hp.tail_ema_readout else None)

    @staticmethod
    def after_step(run, step):
        ema = run.tail_ema
        if ema is not None:
            fresh = ema.ema is None
            ema.after_step(step + 1)
            if fresh and ema.ema is not None:
                run.log(f"tail_ema initialized step:{step + 1} tau:{ema.tau:g}")

    @staticmethod
    @contextlib.contextmanager
    def validating(run, step):
        """#45: the blend, for good, before the validation at final_ema_step."""
        hp = run.hp
        if hp.final_ema_blend and step == (hp.final_ema_step or hp.train_steps):
            run.tail_ema.blend_into(hp.final_ema_blend)
            run.log(f"tail_ema applied step:{step} tau:{hp.final_ema_tau:g} lambda:{hp.final_ema_blend:g}")
        yield

    @staticmethod
    def checkpoint_state(run):
        ema = run.tail_ema and run.tail_ema.ema
        return dict(tail_ema=None if ema is None else [None if e is None else e.cpu() for e in ema])

    @staticmethod
    def load_checkpoint_state(run, state):
        if state["tail_ema"] is not None:
            run.tail_ema.ema = [None if e is None else e.to(run.ctx.device) for e in state["tail_ema"]]

    @staticmethod
    def val_readout(run, step, val_loss, evaluate):
        """#46: `val_ema_loss:L ` for the validation line, L the loss at the tail EMA's blend (the
        weights put back exactly after), or val_loss while there is no EMA yet."""
        if not run.hp.tail_ema_readout:
            return None
        loss = val_loss
        if run.tail_ema.ema is not None:
            with run.tail_ema.readout(run.hp.tail_ema_readout, list(run.model.parameters())):
                loss = evaluate(run)
        return f"val_ema_loss:{loss:.5f} "


FRONTIER = Frontier()
