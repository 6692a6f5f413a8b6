"""The Aurora lineage: the later records #30 (aurora_2930), #40 (aurora_2890) and #42 (aurora_2860)
as presets of train_gpt.py, from the facts of their published scripts (spec/aurora-lineage.md).

What they change, all here: the hyperparameters (LineageHyperparameters: flags of train_gpt.py
whenever this file is beside it), the initialization (PyTorch's default init drawn on the CPU, fc
scaled by depth, a Rademacher gain split, float32 norms), PowerCool's lr schedule, the momentum
warm-up and cool-down, the matrix rule (LineageAurora: SOAP-preconditioned momentum, Schatten-4
norms, a fading Contra-Muon, a radial brake and a radius pin, per matrix and eagerly, as the
scripts run it), EMA-Nesterov around both optimizers, and the reference interpolation at the last
validations.

A technique module of train_gpt.py (LINEAGE below; see TECHNIQUES there): the trainer calls it at
its named points, and a log's code part carries this file (and soap.py) only when its run uses the
lineage. Nothing here imports the trainer: it gets the model and the run as arguments.
"""
import contextlib
import dataclasses
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from aurora import (RECORD, Aurora, apply_uw_floor, frobenius, ns_dtype_for, orthogonalize, polar,
                    unit_spectral)
from soap import SoapPreconditioner, schatten4


def lineage_field(default, help):
    return dataclasses.field(default=default, metadata=dict(help=help))


@dataclasses.dataclass
class LineageHyperparameters:
    """The lineage's hyperparameters, at their off values (the record's computation)."""
    norm_in_fp32: bool = lineage_field(False, "RMSNorm in float32 with its gain, then cast back (lineage); "
                                              "off: in the activation dtype (record)")
    cudnn_attention: bool = lineage_field(True, "let attention use cuDNN's SDPA kernel (the lineage turns it off)")
    init: str = lineage_field("record", "record: N(0, init_var/fan_in) drawn on the device; torch: PyTorch's "
                                        "default init of a model built on the CPU after seeding (lineage); "
                                        "both zero every *proj* parameter")
    zero_biases: bool = lineage_field(True, "with --init torch: zero every bias (off: keep the uniform init, #30/#40)")
    fc_depth_scale: float = lineage_field(0.0, "scale block l's mlp.fc init by 1 - a*l/(n_layer-1) (lineage 0.3)")
    gain_split: float = lineage_field(0.0, "Rademacher gain init: norm1 = 1 - a*s, norm2 = 1 + a*s per block "
                                           "channel, s = +-1 drawn on the device (#30/#40 0.14)")
    val_first: bool = lineage_field(True, "validate at step 0 (the lineage does not)")
    val_extra: tuple = lineage_field((), "more validation steps (the lineage's late checkpoints)")
    lr_schedule: str = lineage_field("linear", "linear: x1, then linear cooldown (record); power: PowerCool, "
                                               "every group's lr = min(lr, c * (schedule_steps - step) ** lr_power)")
    schedule_steps: int = lineage_field(None, "PowerCool's horizon (default train_steps; the lineage trains fewer)")
    lr_power: float = lineage_field(1.2, "PowerCool's exponent")
    power_c: tuple = lineage_field((4.976805410800738e-05, 5.184172302917436e-07, 1.6589351369335795e-06,
                                    3.3169534699576625e-06), "PowerCool's c of the embedding, head, scalars, matrices")
    momentum_warmup: int = lineage_field(0, "momentum rises linearly from momentum_min over these first steps "
                                            "(lineage 300)")
    momentum_cooldown: int = lineage_field(0, "and falls back to momentum_min over these last steps (lineage 100)")
    momentum_min: float = lineage_field(0.85, "where the momentum warm-up starts and the cool-down ends")
    momentum_horizon: int = lineage_field(None, "step where the momentum cool-down ends (default train_steps)")
    # the lineage's changes to the matrix rule; runs per matrix, eagerly
    norm_estimate: str = lineage_field("record", "record, or schatten4: ||X X^T||_F^1/2 scales the Newton-Schulz "
                                                 "input, the contra direction and both renormalizations (lineage)")
    contra_fade: int = lineage_field(0, "Contra-Muon fades linearly to 0 at this step (0: constant, record; "
                                        "lineage 2500)")
    soap: str = lineage_field("none", "SOAP-precondition the momentum of: none (record) or mlp_v (mlp.fc, "
                                      "mlp.proj, attn.v: lineage)")
    soap_beta2: float = lineage_field(0.9, "SOAP's decay of its Gram matrices and second moment")
    soap_every: int = lineage_field(10, "SOAP refreshes its eigenbases (one QR step) every N steps")
    soap_v_blend: float = lineage_field(0.95, "attn.v: this part SOAP's direction, the rest the raw momentum")
    soap_v_floor: float = lineage_field(0.55, "attn.v: SOAP's denominators floored at this part of their RMS")
    radial_brake: float = lineage_field(1.0, "outward radial part of a matrix update x this (1: off, record; "
                                             "lineage 0.5)")
    radius_pin: bool = lineage_field(False, "rescale each matrix after its step to the norm its radial step "
                                            "alone gives (lineage)")
    lineage_rounding: str = lineage_field("none", "repeat the rounding of code a lineage script leaves switched "
                                                  "off: 2930 (#30/#40) or 2860 (#42); spec/aurora-lineage.md")
    # EMA-Nesterov around both optimizers (#40, #42)
    ema_nesterov: float = lineage_field(0.0, "look-ahead step along the EMA of past displacements, x the "
                                             "embedding's lr/lr0 (0: off, record; lineage 0.3)")
    ema_nesterov_beta: float = lineage_field(0.99, "EMA decay of the per-step displacement")
    ema_nesterov_start: int = lineage_field(300, "first step with a look-ahead")
    ema_nesterov_stop: int = lineage_field(1950, "the look-aheads end before this step")
    # reference interpolation at validation (#42)
    ref_gamma: float = lineage_field(0.0, "validate W + gamma (W - W_ref) from step ref_start on (0: off; "
                                          "#42 -0.075)")
    ref_capture: int = lineage_field(2375, "W_ref: the weights after this many steps")
    ref_start: int = lineage_field(2850, "first validation step that interpolates")


# #30, 2930 steps. Aurora on mlp.proj only, inside SOAP-preconditioned momentum, Schatten-4 norms, a
# fading Contra-Muon, radial brake and radius pin, PowerCool, momentum warm-up and cool-down; the
# lineage's init and float32 norms.
LINEAGE_PRESETS = dict(aurora_2930=dict(
    train_steps=3020, schedule_steps=3050, val_first=False, val_every=125, val_every_late=125,
    val_extra=(2820, 2830, 2840, 2850, 2860, 2870, 2880, 2890, 2895, 2900, 2910, 2920, 2930, 2940, 2950,
               2960, 2965, 2970, 2975, 2980, 2985, 2990, 2995, 2999, 3000, 3010, 3020),
    norm_in_fp32=True, cudnn_attention=False, init="torch", zero_biases=False, fc_depth_scale=0.3,
    gain_split=0.14, adam_betas=(0.8, 0.99), lr_schedule="power", momentum_warmup=300,
    momentum_cooldown=100, aurora_on="wide_only", pp_iterations=3, pp_beta=0.25, norm_estimate="schatten4",
    contra_fade=2500, soap="mlp_v", radial_brake=0.5, radius_pin=True, uw_floor=0.3825,
    lineage_rounding="2930"))
# #40, 2890 steps: #30 in EMA-Nesterov, on a 2900-step run of a 2980-step lr schedule.
LINEAGE_PRESETS["aurora_2890"] = dict(LINEAGE_PRESETS["aurora_2930"], train_steps=2900, schedule_steps=2980,
                              ema_nesterov=0.3, ema_nesterov_start=300, ema_nesterov_stop=1950)
# #42, 2860 steps: #40 stopped at 2860 (its schedules still end at 2900 and 2980), zero biases, no
# gain split, reference interpolation at the last validations.
LINEAGE_PRESETS["aurora_2860"] = dict(LINEAGE_PRESETS["aurora_2890"], train_steps=2860, momentum_horizon=2900,
                              val_extra=(2850,), zero_biases=True, gain_split=0.0, lineage_rounding="2860",
                              ref_gamma=-0.075, ref_capture=2375, ref_start=2850)
# Step counts a preset states for its own train_steps. A run of another length (--train-steps, or
# a later preset in a + list, like +tiny) scales them in proportion, and PowerCool's constants
# with them, as the record's fractional schedule scales; values given as flags are used as given.
SCALED_STEPS = ("schedule_steps", "momentum_warmup", "momentum_cooldown", "momentum_horizon", "contra_fade",
                "ema_nesterov_start", "ema_nesterov_stop", "ref_capture", "ref_start", "val_extra")


# --- the matrix rule -------------------------------------------------------------------------------

# The rule's hyperparameters beyond RECORD's, at their off values (the record's rule).
LINEAGE_OFF = dict(norm_estimate="record", contra_fade=0, radial_brake=1.0, radius_pin=False,
                   lineage_rounding="none")


def uses_lineage_rule(hp):
    """Whether any of the lineage's changes to the per-matrix rule is on (SOAP counts too)."""
    return any(hp.get(k, v) != v for k, v in LINEAGE_OFF.items()) or bool(hp.get("soap"))


def schatten4_scale(X):
    return schatten4(X, 1e-7).to(X.dtype)


# polar with its input scaled by the Schatten-4 norm instead of the Frobenius norm: a tighter bound
# on the spectral norm, so small singular values start larger.
polar_schatten4 = functools.partial(polar, scale=schatten4_scale)


@torch.no_grad()
def lineage_orthogonalize(u, hp):
    """aurora.py's orthogonalize, with the Schatten-4 polar when norm_estimate="schatten4"."""
    return orthogonalize(u, hp, polar_schatten4 if hp["norm_estimate"] == "schatten4" else None)


def contra_strength(step, fade):
    """Contra-Muon's strength multiplier at `step`: 1, falling linearly to 0 at step `fade`
    (fade 0: always 1, as in the record)."""
    return 1.0 if not fade else 1.0 - min(1.0, max(0.0, step / fade))


@torch.no_grad()
def lineage_direction(u, hp, step):
    """Steps 3-8 of the lineage's per-matrix rule on the (SOAP-preconditioned) look-ahead u
    (float32), eagerly, in the published operations' order. With norm_estimate="schatten4" the
    contra direction, the Newton-Schulz input and both renormalizations use the Schatten-4 norm,
    and the polar input is first rounded to the Newton-Schulz dtype (as the lineage's polar takes
    it); "record" keeps the record's power iteration and Frobenius norms. lineage_rounding repeats
    the rounding of code the scripts left switched off: "2930" (#30, #40) a second renormalization
    after Contra-Muon, "2860" (#42) not; both a scale by rsqrt(1e-10) and back to the same norm
    (NorMuon-lite with beta2 = 1, whose second moment stays 0). Returns the float32 direction."""
    s4 = hp["norm_estimate"] == "schatten4"
    if s4:
        contra_direction = u / schatten4(u, 1e-10).to(u.dtype)
        O = lineage_orthogonalize(u.to(ns_dtype_for(hp["ns_dtype"], u.device)), hp)
    else:
        contra_direction = unit_spectral(u)
        O = lineage_orthogonalize(u, hp)
    strength = hp["contra"] / 2 * contra_strength(step, hp["contra_fade"])
    if s4:  # the scripts renormalize even once the strength has faded to 0
        norm = schatten4(O, 1e-10)
        U = O - strength * contra_direction
        U = U * norm / schatten4(U, 1e-10)
        if hp["lineage_rounding"] == "2930":
            U = U * norm / schatten4(U, 1e-10)
    elif strength:
        norm = frobenius(O)
        U = O - strength * contra_direction
        U = U * norm / torch.clamp(frobenius(U), min=1e-10)
    else:
        U = O.float()
    U *= max(1, u.size(-2) / u.size(-1)) ** 0.5
    if hp["lineage_rounding"] != "none":
        before = schatten4(U, 1e-10)
        U = U * torch.zeros((), device=U.device).clamp_min(1e-10).rsqrt()
        U = U * (before / schatten4(U, 1e-10))
    return U


@torch.no_grad()
def radial_brake(U, weight, outward):
    """Scale the radial part of U (its projection on the weight) by `outward` when the step
    -lr U moves the weight away from the origin, leaving the tangential part: a matrix's norm
    then grows more slowly than Aurora's fixed-size updates would make it."""
    u, w = U.float(), weight.float()
    k = (u * w).sum() / (w * w).sum().clamp_min(1e-12)
    radial = k * w
    scale = torch.where(k < 0, u.new_tensor(outward), u.new_tensor(1.0))
    return (u - radial + scale * radial).to(U.dtype)


@torch.no_grad()
def pinned_step(weight, U, lr):
    """weight -= lr U, then rescale the weight to the norm the radial part alone would give it
    (to first order): the tangential part's finite-step growth of the norm is taken back."""
    before = weight.float().norm().clamp_min(1e-8)
    target = (before + -lr * (U.float() * weight.float()).sum() / before).clamp_min(1e-8)
    weight.add_(U, alpha=-lr)
    weight.mul_((target / weight.float().norm().clamp_min(1e-8)).to(weight.dtype))


class LineageAurora(Aurora):
    """Aurora with the lineage's rule: norm_estimate, contra_fade, radial_brake, radius_pin,
    lineage_rounding and soap ({matrix: SoapPreconditioner options}, e.g. blend/floor for attn.v)
    switch it on (`_update`, spec/aurora-lineage.md): per matrix and eager, as its scripts run it;
    p.grad then keeps the raw gradient; SOAP's statistics are in a checkpoint with the momentum.
    With all of them off it is the record's Aurora."""
    STATE_KEYS = ("momentum",) + tuple(f"soap_{k}" for k in SoapPreconditioner.STATE)
    probe = None

    def __init__(self, params, lr, norm_estimate="record", contra_fade=0, radial_brake=1.0, radius_pin=False,
                 lineage_rounding="none", soap=None, soap_beta2=0.9, soap_every=10, **kwargs):
        for name, value, allowed in (("norm_estimate", norm_estimate, ("record", "schatten4")),
                                     ("lineage_rounding", lineage_rounding, ("none", "2930", "2860"))):
            if value not in allowed:
                raise ValueError(f"Aurora: {name} must be one of {allowed}, got {value!r}")
        rule = dict(norm_estimate=norm_estimate, contra_fade=contra_fade, radial_brake=radial_brake,
                    radius_pin=radius_pin, lineage_rounding=lineage_rounding)
        super().__init__(params, lr, **kwargs)
        self.defaults.update(rule)  # each group's hyperparameters, after the record's
        for group in self.param_groups:
            group.update(rule)
        # SOAP: {matrix: SoapPreconditioner keyword arguments} for the matrices it preconditions
        self.soap, self.soap_beta2, self.soap_every = soap or {}, soap_beta2, soap_every
        self.lineage = uses_lineage_rule({**rule, "soap": self.soap})
        if self.lineage and (self.defaults["rule"] == "normuon" or self.defaults["ns_iteration"] != "quintic12"):
            raise ValueError("Aurora: the lineage's rule runs per matrix, with rule aurora or muon and "
                             "the quintic12 iteration (no batched path, NorMuon or cans12)")

    def _update(self, group, p):
        """The lineage's rule on one matrix, eagerly as the scripts run it (spec/aurora-lineage.md):
        momentum and look-ahead (p.grad keeps the raw gradient, which SOAP reads after the
        update), SOAP, lineage_direction, radial brake, u/w floor, the step (radius-pinned)."""
        if not self.lineage:
            return super()._update(group, p)
        hp = {k: group[k] for k in (*RECORD, *LINEAGE_OFF)}
        grad, momentum, mu, lr = p.grad, self._buffer(p, "momentum", p.shape), hp["momentum"], group["lr"]
        momentum.lerp_(grad, 1 - mu)
        u = grad.lerp(momentum, mu) if hp["nesterov"] else momentum
        soap = None
        if p in self.soap:
            soap = self.state[p].get("soap")
            if soap is None:
                soap = self.state[p]["soap"] = self._soap_for(p)
            u = soap.precondition(u)
        if self.probe:  # diagnostics.py's LeverageProbe: the look-ahead this step orthogonalizes
            self.probe.keep(p, lineage_orthogonalize, u, hp)
        U = lineage_direction(u, hp, self.step_index)
        if hp["radial_brake"] != 1:
            U = radial_brake(U, p, hp["radial_brake"])
        U = apply_uw_floor(U, p, hp["uw_floor"])
        self._step_flags.append((torch.isfinite(U).all().reshape(1), [p]))
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        if hp["radius_pin"]:
            pinned_step(p, U, lr)
        else:
            p.add_(U.to(p.dtype), alpha=-lr)
        if soap is not None:
            soap.observe(grad)

    def _soap_for(self, p):
        return SoapPreconditioner(p.shape, p.device, self.soap_beta2, self.soap_every, **self.soap[p])

    @staticmethod
    def _state_shape(p, key):
        """(shape, dtype) of a matrix's saved state: momentum; SOAP's second moment, Gram matrices
        and bases (L, QL: rows x rows; R, QR: columns x columns), count."""
        m, n = p.shape
        shapes = dict(momentum=(m, n), soap_exp_avg_sq=(m, n), soap_L=(m, m), soap_QL=(m, m), soap_R=(n, n),
                      soap_QR=(n, n), soap_count=())
        return shapes[key], torch.int64 if key == "soap_count" else torch.float32

    def _held_state(self, p):
        state = self.state[p]
        held = {"momentum": state["momentum"]} if "momentum" in state else {}
        if "soap" in state:
            held.update({f"soap_{k}": v for k, v in state["soap"].state().items()})
        return held

    def _check_saved(self, i, p, state):
        if (p in self.soap) != ("soap_L" in state) and "momentum" in state:
            raise ValueError(f"Aurora.load_state_dict: matrix {i} ({tuple(p.shape)}) has "
                             f"{'no ' if p in self.soap else ''}saved SOAP state, and this optimizer "
                             f"{'runs' if p in self.soap else 'does not run'} SOAP on it")

    def _load_held(self, i, p, state):
        if "momentum" in state:
            self.state[p]["momentum"] = state["momentum"].to(device=p.device, dtype=torch.float32, copy=True)
        if "soap_L" in state:
            soap = self.state[p]["soap"] = self._soap_for(p)
            soap.load({k[len("soap_"):]: v for k, v in state.items() if k.startswith("soap_")})


def soap_matrices(model, hp):
    """{matrix: SoapPreconditioner options} of the matrices SOAP preconditions (--soap mlp_v):
    mlp.fc and mlp.proj as they are; attn.v partly (blend), with floored denominators and a last
    renormalization in the form of the script whose rounding is repeated."""
    if hp.soap == "none":
        return {}
    v = dict(blend=hp.soap_v_blend, floor=hp.soap_v_floor,
             renorm="lerp" if hp.lineage_rounding == "2930" else "scale")
    return {m: opts for block in model.blocks
            for m, opts in ((block.mlp.fc.weight, {}), (block.mlp.proj.weight, {}), (block.attn.v.weight, v))}


# --- the model's initialization and norms -----------------------------------------------------------

class Float32RMSNorm(nn.Module):
    """The lineage's RMSNorm: normalized and scaled in float32, rounded once (the trainer's RMSNorm
    works in the activation dtype). Takes over an RMSNorm's gains."""

    def __init__(self, gains):
        super().__init__()
        self.gains = gains

    def forward(self, x):
        return (F.rms_norm(x.float(), (x.size(-1),)) * self.gains).to(x.dtype)


@torch.no_grad()
def init_lineage(model, hp):
    """The lineage's initialization (spec/aurora-lineage.md): PyTorch's default init as a fresh
    model built on the CPU draws it (the lineage's scripts seed, then build the model on the CPU
    and move it to the GPU: the CPU generator decides), then every *proj* parameter zeroed, and
    with zero_biases every bias."""
    with torch.device("cpu"):
        fresh = type(model)(hp, model.act_dtype)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        p.copy_(q)
        if "proj" in name or (hp.zero_biases and name.endswith("bias")):
            p.zero_()


@torch.no_grad()
def scale_init(model, hp):
    """The lineage's changes on top of an init: mlp.fc shrinks with depth, from x1 in the first
    block to x(1 - fc_depth_scale) in the last; and the gain split, s = +-1 per channel drawn on
    the device block by block, norm1 = 1 - a s and norm2 = 1 + a s (the product stays ~1)."""
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        if hp.fc_depth_scale:
            block.mlp.fc.weight.mul_(1.0 - hp.fc_depth_scale * (i / (n - 1) if n > 1 else 0.0))
    for block in model.blocks:
        if hp.gain_split:
            gains = block.norm1.gains
            s = torch.randint(0, 2, gains.shape, device=gains.device, dtype=torch.float32) * 2 - 1
            block.norm1.gains.copy_(1.0 - hp.gain_split * s)
            block.norm2.gains.copy_(1.0 + hp.gain_split * s)


# --- EMA-Nesterov and the reference interpolation ---------------------------------------------------

class EMANesterov:
    """EMA-Nesterov around Adam and Aurora (#40, #42): keep an EMA of each parameter's per-step
    displacement, and before the forward of each step in [start, stop) jump along it by stepsize
    x (the embedding's lr / its initial lr). The jump is not undone: the next displacement
    includes it, so the EMA tracks the whole path. Each tensor in its parameter's dtype."""

    def __init__(self, params, stepsize, beta, start, stop):
        self.params = list(params)
        self.stepsize, self.beta, self.start, self.stop = stepsize, beta, start, stop
        self.prev = [p.detach().clone() for p in self.params]
        self.ema = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def look_ahead(self, step, lr_ratio):
        if self.start <= step < self.stop:
            for p, d in zip(self.params, self.ema):
                p.add_(d, alpha=self.stepsize * lr_ratio)

    @torch.no_grad()
    def after_step(self):
        for p, prev, d in zip(self.params, self.prev, self.ema):
            d.lerp_(p - prev, 1 - self.beta)
            prev.copy_(p)

    def state(self):
        """For a checkpoint: the EMA and the weights it measures the next displacement from (not
        always the weights at a checkpoint: the reference interpolation's add and subtract round)."""
        return dict(prev=[t.cpu() for t in self.prev], ema=[t.cpu() for t in self.ema])

    def load(self, state):
        for mine, saved in ((self.prev, state["prev"]), (self.ema, state["ema"])):
            for t, s in zip(mine, saved, strict=True):
                t.copy_(s)


@contextlib.contextmanager
def reference_interpolation(run, step):
    """Around a validation from ref_start on (#42): the weights W + gamma (W - W_ref), then back
    by subtracting the same delta (not bit for bit the weights before: training goes on from
    (W + d) - d, as in the script)."""
    if not run.hp.ref_gamma or step < run.hp.ref_start:
        yield
        return
    if run.reference is None:
        raise ValueError(f"--ref-gamma: no reference weights at step {step} (--ref-capture "
                         f"{run.hp.ref_capture} was not reached)")
    params = list(run.model.parameters())
    with torch.no_grad():
        deltas = [(p - ref) * run.hp.ref_gamma for p, ref in zip(params, run.reference)]
        for p, d in zip(params, deltas):
            p.add_(d)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, d in reversed(list(zip(params, deltas))):
                p.sub_(d)


def scale_steps(parts, merged, flags, train_steps, presets, scaled):
    """Scale the `scaled` step counts of the last of `parts` in `presets` (and PowerCool's c) to the
    run's length."""
    stated = next((presets[p]["train_steps"] for p in reversed(parts) if p in presets), None)
    steps = flags.get("train_steps", merged.get("train_steps", train_steps))
    if stated and steps != stated:
        r = steps / stated
        for k in scaled:
            if k in merged:
                merged[k] = (tuple(sorted({round(v * r) for v in merged[k]})) if isinstance(merged[k], tuple)
                             else round(merged[k] * r))  # steps that round to one step count once
        if "power_c" not in flags:  # c (H - s)^p keeps its shape when H - s scales by r
            power = flags.get("lr_power", merged.get("lr_power", LineageHyperparameters.lr_power))
            merged["power_c"] = tuple(c / r ** power for c in merged.get("power_c", LineageHyperparameters.power_c))
    return merged


# --- the technique: what train_gpt.py calls at its named points -------------------------------------

class Lineage:
    """The lineage as a technique of train_gpt.py (see TECHNIQUES there). The trainer calls each
    method at the point its name says, for a run whose hyperparameters use the lineage (used());
    a method returning None leaves the trainer's own choice. The running trial's EMA-Nesterov and
    reference weights are `run.ema` and `run.reference` (harness.py's checkpoints keep them:
    checkpoint_state, load_checkpoint_state)."""
    name = "lineage.py"
    Hyperparameters, PRESETS = LineageHyperparameters, LINEAGE_PRESETS
    GPU_PRESETS = tuple(LINEAGE_PRESETS)
    CHOICES = dict(init=("record", "torch"), lr_schedule=("linear", "power"), norm_estimate=("record", "schatten4"),
                   soap=("none", "mlp_v"), lineage_rounding=("none", "2930", "2860"))
    OFF = {f.name: f.default for f in dataclasses.fields(LineageHyperparameters)}

    def used(self, hp):
        return any(getattr(hp, k, v) != v for k, v in self.OFF.items())

    @staticmethod
    def preset_overrides(parts, merged, flags, train_steps):
        return scale_steps(parts, merged, flags, train_steps, LINEAGE_PRESETS, SCALED_STEPS)

    @staticmethod
    def check(hp, bad):
        """The lineage's settings: what they need, and what they do not combine with (yet); their
        ranges are harness.py's RANGES."""
        if hp.lr_schedule == "power" and (hp.schedule_steps or hp.train_steps) < hp.train_steps:
            bad("schedule_steps", f"must be >= --train-steps ({hp.train_steps}): PowerCool's lr is 0 from there")
        if hp.ref_gamma and hp.ref_capture > hp.ref_start:
            bad("ref_capture", f"must be <= --ref-start ({hp.ref_start}): the reference comes first")
        if hp.ema_nesterov and hp.ema_nesterov_start >= hp.ema_nesterov_stop:
            bad("ema_nesterov_start", f"must be < --ema-nesterov-stop ({hp.ema_nesterov_stop}): the look-aheads "
                                      "run from start to before stop")
        if any(not isinstance(s, int) or s < 0 for s in hp.val_extra):
            bad("val_extra", "must be steps (integers >= 0)")
        if uses_lineage_rule({**dataclasses.asdict(hp), "soap": hp.soap != "none"}) and (
                hp.aurora_batched or hp.rule == "normuon" or hp.ns_iteration != "quintic12"):
            raise ValueError("the lineage's matrix rule (--norm-estimate, --contra-fade, --soap, --radial-brake, "
                             "--radius-pin, --lineage-rounding) runs per matrix with --rule aurora or muon and "
                             "--ns-iteration quintic12: drop --aurora-batched, normuon or cans12")

    @staticmethod
    def setup(hp):
        if not hp.cudnn_attention:
            torch.backends.cuda.enable_cudnn_sdp(False)

    @staticmethod
    def model_built(model, hp):
        if hp.norm_in_fp32:  # every RMSNorm (it has gains) by the float32 one, on the same gains
            for module in list(model.modules()):
                for name, child in list(module.named_children()):
                    if hasattr(child, "gains"):
                        setattr(module, name, Float32RMSNorm(child.gains))

    @staticmethod
    def init_weights(model, hp):
        if hp.init == "record":
            model.init_weights(hp.init_var)
        else:  # the lineage's: the model's default init drawn on the CPU, as its scripts do
            init_lineage(model, hp)
        scale_init(model, hp)
        return True

    @staticmethod
    def make_aurora(matrices, hp, model, options):
        """LineageAurora when the lineage's rule is on (else None: the trainer's choice)."""
        rule = dict(norm_estimate=hp.norm_estimate, contra_fade=hp.contra_fade, radial_brake=hp.radial_brake,
                    radius_pin=hp.radius_pin, lineage_rounding=hp.lineage_rounding)
        if not uses_lineage_rule({**rule, "soap": hp.soap != "none"}):
            return None
        return LineageAurora(matrices, soap=soap_matrices(model, hp), soap_beta2=hp.soap_beta2,
                             soap_every=hp.soap_every, **rule, **options)

    @staticmethod
    def optimizers_built(adam, aurora, hp):
        if hp.lr_schedule == "power":
            for group, c in zip(adam.param_groups + aurora.param_groups, hp.power_c):
                group.setdefault("power_c", c)  # (a technique before this one may have set it)

    @staticmethod
    def lr_at(step, group, hp):
        """PowerCool: min(lr0, c (H - step)^p), flat, then a power-law fall to 0 at the horizon H."""
        if hp.lr_schedule == "power":
            horizon = hp.schedule_steps or hp.train_steps
            return min(group["initial_lr"], group["power_c"] * max(0.0, horizon - step) ** hp.lr_power)
        return None

    @staticmethod
    def momentum_at(step, hp):
        """hp.momentum, rising linearly from momentum_min over the first momentum_warmup steps and
        falling back over the momentum_cooldown steps before momentum_horizon."""
        lo, hi = hp.momentum_min, hp.momentum
        cooldown_start = (hp.momentum_horizon or hp.train_steps) - hp.momentum_cooldown
        if step < hp.momentum_warmup:
            return lo + step / hp.momentum_warmup * (hi - lo)
        if hp.momentum_cooldown and step > cooldown_start:
            return hi - (step - cooldown_start) / hp.momentum_cooldown * (hi - lo)
        return hi

    @staticmethod
    def is_val_step(step, hp):
        if step in hp.val_extra:
            return True
        return False if step == 0 and not hp.val_first else None

    @staticmethod
    def trial_started(run):
        hp = run.hp
        run.reference = None
        run.ema = EMANesterov(run.model.parameters(), hp.ema_nesterov, hp.ema_nesterov_beta, hp.ema_nesterov_start,
                              hp.ema_nesterov_stop) if hp.ema_nesterov else None

    @staticmethod
    def before_step(run, step):
        if run.ema:  # the look-ahead scales with the embedding's lr as the last step left it
            embed = run.optimizers[0].param_groups[0]
            run.ema.look_ahead(step, embed["lr"] / embed["initial_lr"])

    @staticmethod
    def after_step(run, step):
        if run.ema:
            run.ema.after_step()
        if run.hp.ref_gamma and step + 1 == run.hp.ref_capture:
            run.reference = [p.detach().clone() for p in run.model.parameters()]

    @staticmethod
    def validating(run, step):
        return reference_interpolation(run, step)

    @staticmethod
    def checkpoint_state(run):
        return dict(ema=run.ema.state() if run.ema else None,
                    reference=None if run.reference is None else [t.cpu() for t in run.reference])

    @staticmethod
    def load_checkpoint_state(run, state):
        if run.ema:
            run.ema.load(state["ema"])
        if state["reference"] is not None:
            run.reference = [t.to(run.ctx.device) for t in state["reference"]]


LINEAGE = Lineage()
