"""Aurora: Muon with a leverage-aware polar step.

Muon replaces a matrix's momentum by its polar factor (the nearest orthogonal matrix). For a tall
matrix (more rows than columns, e.g. an MLP's fc weight with one row per hidden neuron) an
orthogonal update U with U^T U = I has row norms ||U_i||^2 that sum to `cols` but need not be
equal: rows with small "leverage" get persistently tiny updates, and those neurons die early in
training. Aurora rescales the rows by a positive diagonal D before the polar step. polar(D G) is
still orthogonal for any positive D, so D is free to choose; Aurora iterates it so that the row
norms of the result become uniform (every row gets leverage cols/rows). On square matrices every
orthogonal matrix already has uniform row norms, and Aurora is exactly Muon.

Public API (names as in the Aurora reference code):
    polar(G)                      12-step simple-quintic Newton-Schulz polar factor (bf16 default)
    aurora_polar(G, ...)          leverage-uniform polar factor
    aurora_direction(...)         steps 1-5 of the record's per-matrix rule (what it compiles)
    aurora_update(...)            the whole per-matrix rule: direction, then the u/w floor
    lineage_direction(...)        the later records' direction (steps 3-8 of spec/aurora-lineage.md)
    Aurora(params, lr, ...)       torch.optim.Optimizer; works with or without torch.distributed

The whole algorithm is `polar`, `aurora_polar` and `aurora_direction` below; `Aurora` only holds
the momentum buffers and shares the matrices among ranks. The lineage's rule (results #30, #40,
#42: SOAP-preconditioned momentum, Schatten-4 norms, a fading Contra-Muon, a radial brake and a
radius pin) reuses those pieces; it follows `aurora_update`.
"""
import functools

import torch
import torch.distributed as dist

from soap import SoapPreconditioner, schatten4


# The record's Newton-Schulz coefficients: X <- a X + (b A + c A A) X with A = X X^T, i.e. every
# singular value s maps by p(s) = 2s - 1.5s^3 + 0.5s^5, whose fixed point s = 1 is superattracting.
NS_COEFFICIENTS, NS_STEPS = (2, -1.5, 0.5), 12


@torch.no_grad()
def polar(G: torch.Tensor, dtype: torch.dtype = torch.bfloat16, norm: str = "frobenius") -> torch.Tensor:
    """Polar factor of G (batched over leading dims) by 12 simple-quintic Newton-Schulz steps,
    written with the record's operations in the record's order (bit for bit the same rounding).

    The record runs it in bfloat16 (the tensor-core dtype); on a CPU without native bfloat16 a
    bf16 matmul is hundreds of times slower than float32, so the optimizer passes dtype=float32
    there.
    norm="schatten4" scales the input by its Schatten-4 norm instead of the Frobenius norm (the
    lineage's choice: a tighter bound on the spectral norm, so small singular values start larger).
    Returns G's shape, in `dtype`.
    """
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide side so X X^T is the small Gram matrix
        X = X.mT
    if norm == "frobenius":
        X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # all singular values now <= 1
    else:
        X = X / schatten4(X, 1e-7).to(X.dtype)
    for _ in range(NS_STEPS):
        A = X @ X.mT
        B = b * A + c * A @ A  # (c * A) @ A, as the record evaluates it
        X = a * X + B @ X
    return X.mT if tall else X


# (a, b) of the 12 cubic steps X <- a X + b (X X^T) X of the `cans12` variant.
CANS12 = [(5.182503604966906, -5.178098480082684), (2.586120737395915, -0.6479542005271643),
          (2.567364126726186, -0.6454968804392178), (2.520560084348265, -0.6393528082067044),
          (2.410759275435182, -0.6248683598710716), (2.1883348130094173, -0.5952022073798908),
          (1.8595760874873613, -0.5504490972723968), (1.589020160467417, -0.5126569802066718),
          (1.5051653981684994, -0.5007377068751799)] + [(1.5, -0.5)] * 3


@torch.no_grad()
def polar_cans12(G: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Polar factor by 12 tuned cubic Newton-Schulz steps in float32 (same normalization and
    transpose rule as `polar`); a variant the authors proposed in public discussion, not part of
    the record. Always float32 (`dtype` is accepted for a common signature and ignored)."""
    X = G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b in CANS12:
        X = a * X + b * ((X @ X.mT) @ X)
    return X.mT if tall else X


POLARS = {"quintic12": polar, "cans12": polar_cans12}


def ns_dtype_for(setting, device):
    """Newton-Schulz dtype: "auto" is the record's bfloat16 on CUDA and float32 elsewhere (a CPU
    without native bf16 runs bf16 matmuls hundreds of times slower); "bfloat16"/"float32" force one."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[setting]


@torch.no_grad()
def aurora_polar(G: torch.Tensor, pp_iterations: int = 2, pp_beta: float = 0.5, eps: float = 1e-7,
                 polar_fn=polar, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Orthogonal factor of G whose rows (of the tall orientation) all have the same norm.

    Square: plain polar (orthogonal square matrices already have unit rows). Wide: the transpose
    of the tall case. Tall (m > n), in float32: start from D = 1/||G_i|| (row-normalized G), take
    U = polar(D G), and push each row's squared norm r_i towards the uniform value n/m by
    D_i <- D_i * ((n/m) / r_i)^beta. Batched over leading dims. Like the record, returns the
    output of the last Newton-Schulz run as it is (bfloat16 for the record's quintic).
    """
    m, n = G.size(-2), G.size(-1)
    if m == n:
        return polar_fn(G, dtype=dtype)
    if m < n:
        return aurora_polar(G.mT, pp_iterations, pp_beta, eps, polar_fn, dtype).mT
    G = G.to(torch.float32)
    D = 1.0 / G.norm(dim=-1, keepdim=True).clamp_(min=eps)
    for k in range(pp_iterations):
        U = polar_fn(D * G, dtype=dtype)
        if k < pp_iterations - 1:
            r = U.to(torch.float32).pow(2).sum(dim=-1, keepdim=True).clamp_(min=eps * eps)
            D = D * ((n / m) / r).pow(pp_beta)
    return U


@torch.no_grad()
def unit_spectral(G: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """G (in float32) over an estimate of its largest singular value: 5 power iterations from the
    normalized all-ones vector, with matrix-vector products as the record has them. A stack of
    matrices is done one matrix at a time, so each gets exactly the per-matrix result."""
    X = G.float()
    if X.ndim > 2:
        return torch.stack([unit_spectral(x, eps) for x in X])
    v = torch.ones(X.size(-1), dtype=X.dtype, device=X.device)
    v = v / torch.clamp(v.norm(), min=eps)
    for _ in range(5):
        u = X @ v
        u = u / torch.clamp(u.norm(), min=eps)
        v = X.mT @ u
        v = v / torch.clamp(v.norm(), min=eps)
    return X / torch.clamp((X @ v).norm(), min=eps)


def frobenius(X):
    """||X||_F of a matrix, or of each matrix of a stack (keepdim, for broadcasting)."""
    return X.norm() if X.ndim == 2 else X.norm(dim=(-2, -1), keepdim=True)


NORMUON_BETA2 = 0.95  # NorMuon's decay of the per-row second moment

# The record's hyperparameters of the rule (what Aurora's constructor defaults to).
RECORD = dict(momentum=0.95, nesterov=True, pp_iterations=2, pp_beta=0.5, contra=0.4, uw_floor=0.35,
              rule="aurora", aurora_on="nonsquare", ns_iteration="quintic12", ns_dtype="bfloat16")


@torch.no_grad()
def orthogonalize(u, hp=RECORD, row_v=None):
    """Step 3 of the rule: aurora_polar (Aurora; the record), plain polar (Muon), or polar with
    NorMuon's per-row second-moment normalization (row_v, one value per row, updated in place).
    Returns the Newton-Schulz output dtype as it is (bfloat16 in the record)."""
    polar_fn, dtype = POLARS[hp["ns_iteration"]], ns_dtype_for(hp["ns_dtype"], u.device)
    if hp.get("norm_estimate") == "schatten4":  # the lineage's (quintic12 only)
        polar_fn = functools.partial(polar, norm="schatten4")
    rows, cols = u.size(-2), u.size(-1)
    # aurora_polar is plain polar on a square matrix: "nonsquare" may send every matrix there
    on = {"nonsquare": True, "tall": rows > cols, "wide_only": rows < cols}[hp["aurora_on"]]
    if hp["rule"] == "aurora" and on:
        return aurora_polar(u, hp["pp_iterations"], hp["pp_beta"], polar_fn=polar_fn, dtype=dtype)
    O = polar_fn(u, dtype=dtype)
    if hp["rule"] == "normuon":
        O = O.float()
        row_v.lerp_(O.square().mean(dim=-1, keepdim=True), 1 - NORMUON_BETA2)
        N = O / (row_v.sqrt() + 1e-10)
        O = N * (O.norm(dim=(-2, -1), keepdim=True) / N.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-30))
    return O


@torch.no_grad()
def aurora_direction(grad, momentum, hp=RECORD, row_v=None):
    """Steps 1-5 of the record's per-matrix rule (the part the record compiles), with the record's
    operations in the record's order and dtypes. Updates `momentum` in place and overwrites `grad`
    with the Nesterov look-ahead, as the record does. Returns the float32 direction U.
    Batched over leading dims."""
    mu = hp["momentum"]
    # 1. Momentum, then the Nesterov look-ahead (written into grad).
    momentum.lerp_(grad, 1 - mu)
    update = grad.lerp_(momentum, mu) if hp["nesterov"] else momentum
    # 2. Contra direction: the look-ahead scaled to unit spectral norm (float32).
    contra_direction = unit_spectral(update.clone())
    # 3. Orthogonalize: leverage-uniform polar (Aurora); plain polar (Muon) or NorMuon for ablations.
    update = orthogonalize(update, hp, row_v)
    # 4. Contra-Muon: subtract contra/2 of the contra direction (the record's contra=0.4 subtracts
    #    0.2 c; U - 0.2 c promotes to float32), then restore the Frobenius norm U had (taken of
    #    the bfloat16 U, as in the record).
    if hp["contra"]:
        polar_fro = frobenius(update)
        update = update - hp["contra"] / 2 * contra_direction
        update = update * polar_fro / torch.clamp(frobenius(update), min=1e-10)
    else:  # plain Aurora (ablation): keep the update in float32 from here on
        update = update.float()
    # 5. Aspect scale: tall matrices get sqrt(rows/cols), so their per-entry step matches square ones.
    update *= max(1, grad.size(-2) / grad.size(-1)) ** 0.5
    return update


@torch.no_grad()
def apply_uw_floor(U, weight, floor):
    """Step 6: never let the update be smaller than `floor` of the weight (Frobenius norms in
    float32, each clamped below at 1e-8), as the record writes it: a torch.where, no host sync."""
    if not floor:
        return U
    p_fro = frobenius(weight.float()).clamp_min(1e-8)
    u_fro = frobenius(U.float()).clamp_min(1e-8)
    scale = torch.where(u_fro / p_fro < floor, floor * p_fro / u_fro, torch.ones_like(p_fro))
    return U * scale.to(U.dtype)


def aurora_update(grad, momentum, weight, hp=RECORD, row_v=None):
    """The record's whole per-matrix rule, steps 1-6: returns U (float32); the caller applies
    W.add_(U, alpha=-lr). `hp` holds the rule's hyperparameters (default: the record's, RECORD)."""
    return apply_uw_floor(aurora_direction(grad, momentum, hp, row_v), weight, hp["uw_floor"])


# --- the lineage's rule (results #30, #40, #42; spec/aurora-lineage.md) ----------------------------

# The lineage's hyperparameters beyond RECORD's, at their off values (the record's rule).
LINEAGE_OFF = dict(norm_estimate="record", contra_fade=0, radial_brake=1.0, radius_pin=False,
                   lineage_rounding="none")


def uses_lineage_rule(hp):
    """Whether any of the lineage's changes to the per-matrix rule is on (SOAP counts too)."""
    return any(hp.get(k, v) != v for k, v in LINEAGE_OFF.items()) or bool(hp.get("soap"))


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
        O = orthogonalize(u.to(ns_dtype_for(hp["ns_dtype"], u.device)), hp)
    else:
        contra_direction = unit_spectral(u)
        O = orthogonalize(u, hp)
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


def row_leverage(O):
    """Row leverage ||O_i||^2 / (n/m) of an orthogonalized matrix (or stack) in its tall
    orientation (m x n, m >= n): 1 everywhere is uniform. Diagnostics."""
    O = O.float()
    rows, cols = O.size(-2), O.size(-1)
    return (O if rows >= cols else O.mT).square().sum(dim=-1) * (max(rows, cols) / min(rows, cols))


class NonFiniteUpdate(FloatingPointError):
    """Raised by Aurora.check_finite(): the first step (0-based step() count) whose update was
    NaN/inf, and the shapes of the matrices it was NaN/inf for."""

    def __init__(self, step, shapes):
        super().__init__(f"Aurora: non-finite update at step {step} for parameter(s) of shape {shapes}; "
                         "check the loss and gradients for NaN/inf")
        self.step, self.shapes = step, shapes


class Aurora(torch.optim.Optimizer):
    """Aurora for 2-D weight matrices (use Adam for embeddings, heads, biases and gains).

    Defaults are the record's rule (see `aurora_update`). contra=0 and uw_floor=0 give plain
    Aurora; rule="muon" swaps aurora_polar for plain polar and changes nothing else, and
    rule="normuon" adds NorMuon's per-row normalization to plain polar. aurora_on="tall" keeps
    square and wide matrices on plain polar; ns_iteration="cans12" uses a float32 cubic iteration.
    ns_dtype="auto" runs Newton-Schulz in bfloat16 on CUDA (the record) and float32 elsewhere.

    With torch.distributed initialized, call step() on every rank after the gradients have been
    summed across ranks; each rank updates its share of the matrices and the results are
    all-gathered, so all ranks end with identical weights. Momentum lives on the owning rank.

    Like the record, the per-matrix path leaves the Nesterov look-ahead in p.grad after step()
    (the batched path works on stacked copies and leaves p.grad as it was).

    batched=False (default) is the record's scheme: matrices sorted by shape, largest first
    (Python's stable sort on p.size(), descending), rank r updates matrix round*world + r of each
    round, one update and one all-gather per matrix. batched=True computes the same rule on stacks
    of same-shape matrices (one Newton-Schulz chain per shape instead of per matrix) and gathers
    each shape with one collective, overlapped with the next shape's compute. compile="auto"
    wraps steps 1-5 in torch.compile for CUDA matrices, as the record does.

    norm_estimate, contra_fade, radial_brake, radius_pin, lineage_rounding and soap ({matrix:
    SoapPreconditioner options}, e.g. blend/floor for attn.v) switch on the lineage's rule
    (`_apply_lineage`, spec/aurora-lineage.md): per matrix and eager, as its scripts run it;
    p.grad then keeps the raw gradient; SOAP's statistics are in state_dict() with the momentum.

    step() never waits for the GPU (no host synchronization): it only notes, on the device, the
    first step at which each matrix's update was not finite. check_finite() reads those notes
    (a host sync, and a collective under torch.distributed) and raises FloatingPointError naming
    the matrices and the step; call it where a pause costs nothing (e.g. at validation).
    `step_index` counts step() calls (set it when resuming, so the messages name the right step).
    """

    def __init__(self, params, lr, momentum=0.95, nesterov=True, pp_iterations=2, pp_beta=0.5,
                 contra=0.4, uw_floor=0.35, weight_decay=0.0, rule="aurora", aurora_on="nonsquare",
                 ns_iteration="quintic12", ns_dtype="auto", batched=False, compile="auto",
                 norm_estimate="record", contra_fade=0, radial_brake=1.0, radius_pin=False,
                 lineage_rounding="none", soap=None, soap_beta2=0.9, soap_every=10):
        if not lr > 0:
            raise ValueError(f"Aurora: lr must be > 0, got {lr}")
        if not 0 < momentum < 1:
            raise ValueError(f"Aurora: momentum must be in (0, 1), got {momentum}")
        if int(pp_iterations) != pp_iterations or pp_iterations < 1:
            raise ValueError(f"Aurora: pp_iterations must be an integer >= 1, got {pp_iterations}")
        if not 0 < pp_beta <= 1:
            raise ValueError(f"Aurora: pp_beta must be in (0, 1], got {pp_beta}")
        if contra < 0 or uw_floor < 0 or weight_decay < 0:
            raise ValueError("Aurora: contra, uw_floor and weight_decay must be >= 0, got "
                             f"{contra}, {uw_floor}, {weight_decay}")
        for name, value, allowed in (("rule", rule, ("aurora", "muon", "normuon")),
                                     ("aurora_on", aurora_on, ("nonsquare", "tall", "wide_only")),
                                     ("norm_estimate", norm_estimate, ("record", "schatten4")),
                                     ("lineage_rounding", lineage_rounding, ("none", "2930", "2860")),
                                     ("ns_iteration", ns_iteration, tuple(POLARS)),
                                     ("ns_dtype", ns_dtype, ("auto", "bfloat16", "float32")),
                                     ("compile", compile, ("auto", True, False))):
            if value not in allowed:
                raise ValueError(f"Aurora: {name} must be one of {allowed}, got {value!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, pp_iterations=int(pp_iterations),
                        pp_beta=pp_beta, contra=contra, uw_floor=uw_floor, weight_decay=weight_decay,
                        rule=rule, aurora_on=aurora_on, ns_iteration=ns_iteration, ns_dtype=ns_dtype,
                        norm_estimate=norm_estimate, contra_fade=contra_fade, radial_brake=radial_brake,
                        radius_pin=radius_pin, lineage_rounding=lineage_rounding)
        super().__init__(params, defaults)
        self.batched, self.compile = batched, compile
        # SOAP: {matrix: SoapPreconditioner keyword arguments} for the matrices it preconditions
        self.soap, self.soap_beta2, self.soap_every = soap or {}, soap_beta2, soap_every
        self.lineage = uses_lineage_rule({**defaults, "soap": self.soap})
        if self.lineage and (batched or rule == "normuon" or ns_iteration != "quintic12"):
            raise ValueError("Aurora: the lineage's rule runs per matrix, with rule aurora or muon and "
                             "the quintic12 iteration (no batched path, NorMuon or cans12)")
        self._compiled = None
        self.step_index = 0
        self._step_flags = []  # (finite flags, matrices) of the running step
        self._first_bad = {}   # matrices -> device vector: first non-finite step of each, or -1
        self._keep, self._kept = False, {}  # look-aheads kept for pop_leverage()
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"Aurora: parameter of shape {tuple(p.shape)} is not a 2-D matrix; "
                        "give biases, gains and embeddings to Adam instead")

    def track_leverage(self, on=True):
        """Ask for the row leverage of the next step's orthogonalized updates (diagnostics). The
        step itself does nothing more than keep a reference to each look-ahead it orthogonalizes
        (and a copy of NorMuon's row state): pop_leverage() does the work, later."""
        self._keep = on

    @torch.no_grad()
    def pop_leverage(self):
        """{matrix: row leverage (see row_leverage)} of the orthogonalized update of the last step
        that tracked it, for the matrices this rank updated; then forgotten. Recomputed here,
        uncompiled, from the kept look-ahead: the same as the step's up to the compiler's rounding."""
        kept, self._kept = self._kept, {}
        return {p: row_leverage(orthogonalize(u, hp, row_v)) for p, (u, hp, row_v) in kept.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    raise RuntimeError(f"Aurora: parameter of shape {tuple(p.shape)} has no gradient")
            if self.batched:
                self._step_batched(group, rank, world, distributed)
            else:
                self._step_per_matrix(group, rank, world, distributed)
        self._note_finite()
        self._keep = False
        self.step_index += 1
        return loss

    def _direction(self, device):
        """aurora_direction, compiled for CUDA tensors when compile is on: a plain torch.compile, as
        the record's decorator (automatic dynamic shapes: a second matrix shape recompiles)."""
        if self.compile is True or (self.compile == "auto" and device.type == "cuda"):
            if self._compiled is None:
                self._compiled = compiled_aurora_direction()
            return self._compiled
        return aurora_direction

    def _apply(self, group, params, grads, momenta, weights, row_v=None):
        """The rule on one matrix or a stack of same-shape ones; notes finite flags."""
        hp = {k: group[k] for k in RECORD}
        kept_row_v = row_v.clone() if self._keep and row_v is not None else None
        U = self._direction(weights.device)(grads, momenta, hp, row_v)
        if self._keep:  # the look-ahead the rule orthogonalized (grads now holds it, as in the record)
            lookahead = grads if hp["nesterov"] else momenta
            for j, p in enumerate(params):
                self._kept[p] = (lookahead if lookahead.ndim == 2 else lookahead[j], hp,
                                 None if kept_row_v is None else
                                 kept_row_v if kept_row_v.ndim == 2 else kept_row_v[j])
        U = apply_uw_floor(U, weights, group["uw_floor"])  # outside the compiled part, as the record
        self._step_flags.append((torch.isfinite(U).flatten(-2).all(-1).reshape(-1), params))
        if group["weight_decay"]:
            weights.mul_(1 - group["lr"] * group["weight_decay"])
        weights.add_(U.to(weights.dtype), alpha=-group["lr"])

    def _apply_lineage(self, group, p):
        """The lineage's rule on one matrix, eagerly as the scripts run it (spec/aurora-lineage.md):
        momentum and look-ahead (p.grad keeps the raw gradient, which SOAP reads after the
        update), SOAP, lineage_direction, radial brake, u/w floor, the step (radius-pinned)."""
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
        if self._keep:
            self._kept[p] = (u, hp, None)
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

    def _buffer(self, p, key, shape):
        state = self.state[p]
        if key not in state:
            state[key] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        return state[key]

    def _step_per_matrix(self, group, rank, world, gather):
        params = self._record_order(group["params"])
        for base in range(0, len(params), world):
            round_ = params[base:base + world]
            if rank < len(round_):
                p = round_[rank]
                if self.lineage:
                    self._apply_lineage(group, p)
                else:
                    row_v = self._buffer(p, "row_v", (p.size(0), 1)) if group["rule"] == "normuon" else None
                    self._apply(group, [p], p.grad, self._buffer(p, "momentum", p.shape), p.data, row_v)
            if gather:  # under a process group always, as the record (world size 1 too)
                self._gather_round(round_, rank, world)

    @staticmethod
    def _gather_round(round_, rank, world):
        # Matrices in a round may differ in shape: send each as a flat buffer padded to the
        # round's largest, then copy each rank's part back.
        size = max(q.numel() for q in round_)
        send = torch.zeros(size, dtype=round_[0].dtype, device=round_[0].device)
        if rank < len(round_):
            send[:round_[rank].numel()].copy_(round_[rank].flatten())
        recv = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(recv, send)
        for j, q in enumerate(round_):
            if j != rank:
                q.copy_(recv[j][:q.numel()].view_as(q))

    @staticmethod
    def _record_order(params):
        """The record's order of the per-matrix path: by shape, largest first (Python's stable
        sort, so equal shapes keep model order); matrix j goes to rank j % world."""
        return sorted(params, key=lambda p: p.size(), reverse=True)

    @staticmethod
    def _shape_stacks(params, world):
        """(shape, matrices of that shape, their owning ranks) for the batched path: matrix i of
        a shape goes to rank (offset + i) % world, and offset carries over from shape to shape so
        that uneven shares even out across shapes."""
        shapes, offset = {}, 0
        for p in params:
            shapes.setdefault(tuple(p.shape), []).append(p)
        for shape, same in shapes.items():
            yield shape, same, [(offset + i) % world for i in range(len(same))]
            offset = (offset + len(same)) % world

    def _step_batched(self, group, rank, world, gather):
        gathers = []
        for shape, params, owners in self._shape_stacks(group["params"], world):
            mine = [p for p, r in zip(params, owners) if r == rank]
            if mine:
                W = torch.stack([p.data for p in mine])
                row_v = (self._stacked(mine, "row_v", (shape[0], 1)) if group["rule"] == "normuon"
                         else None)
                self._apply(group, mine, torch.stack([p.grad for p in mine]),
                            self._stacked(mine, "momentum", shape), W, row_v)
            if not gather:
                for p, w in zip(mine, W):
                    p.copy_(w)
                continue
            slots = max(owners.count(r) for r in range(world))
            send = torch.zeros(slots, *shape, dtype=params[0].dtype, device=params[0].device)
            if mine:
                send[:len(mine)].copy_(W)
            recv = torch.empty(world * slots, *shape, dtype=send.dtype, device=send.device)
            work = _all_gather_single(recv, send, async_op=True)  # overlaps the next shape
            gathers.append((work, recv, params, owners, slots))
        for work, recv, params, owners, slots in gathers:
            work.wait()
            filled = [0] * world
            for p, r in zip(params, owners):
                p.copy_(recv[r * slots + filled[r]])
                filled[r] += 1

    def _stacked(self, params, key, shape):
        """One (k, *shape) float32 buffer per stack; each matrix's state[key] is a view into it,
        so the per-matrix path and the batched path keep interchangeable state."""
        first = self.state[params[0]]
        stack = first.get(key + "_stack")
        if stack is None or stack.size(0) != len(params):
            stack = torch.zeros(len(params), *shape, dtype=torch.float32, device=params[0].device)
            for p, buf in zip(params, stack):
                if key in self.state[p]:
                    buf.copy_(self.state[p][key])
                self.state[p][key] = buf
            first[key + "_stack"] = stack
        return stack

    def owners(self, group, world):
        """The rank that updates each matrix of `group`, in group["params"] order: the per-matrix
        path deals the matrices, sorted by shape largest first, round by round (matrix j of that
        order to rank j % world); the batched path deals each shape's matrices in turn, carrying
        the offset from shape to shape (as the two step methods do)."""
        params = group["params"]
        if self.batched:
            owner = {p: r for _, same, owners in self._shape_stacks(params, world)
                     for p, r in zip(same, owners)}
        else:
            owner = {p: j % world for j, p in enumerate(self._record_order(params))}
        return [owner[p] for p in params]

    # per matrix (the batched path's *_stack keys hold views of momentum and row_v)
    STATE_KEYS = ("momentum", "row_v") + tuple(f"soap_{k}" for k in SoapPreconditioner.STATE)

    @staticmethod
    def _state_shape(p, key):
        """(shape, dtype) of a matrix's saved state `key`: momentum; NorMuon's row_v; SOAP's second
        moment, Gram matrices and bases (L, QL: rows x rows; R, QR: columns x columns), count."""
        m, n = p.shape
        shapes = dict(momentum=(m, n), row_v=(m, 1), soap_exp_avg_sq=(m, n), soap_L=(m, m), soap_QL=(m, m),
                      soap_R=(n, n), soap_QR=(n, n), soap_count=())
        return shapes[key], torch.int64 if key == "soap_count" else torch.float32

    def _held_state(self, p):
        """This rank's state of matrix p, by STATE_KEYS name (empty if it has not stepped it)."""
        state = self.state[p]
        held = {key: state[key] for key in ("momentum", "row_v") if key in state}
        if "soap" in state:
            held.update({f"soap_{k}": v for k, v in state["soap"].state().items()})
        return held

    @torch.no_grad()
    def state_dict(self):
        """Every matrix's state (momentum; NorMuon's row_v; SOAP's statistics) as CPU copies, in
        torch's format (state by parameter index, then the groups' hyperparameters), the same
        whatever the world size or path: checkpoints resume with another world size. Under
        torch.distributed a rank holds only the matrices it updates, so this is a collective:
        every rank calls it, and every rank gets the whole state."""
        distributed = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if distributed else 0
        params = [p for group in self.param_groups for p in group["params"]]
        held = [self._held_state(p) for p in params]
        # who holds what: rank + 1 where this rank has the state, 0 elsewhere; summed over ranks
        holder = torch.tensor([[rank + 1 if key in mine else 0 for key in self.STATE_KEYS] for mine in held],
                              dtype=torch.int64)
        if distributed:
            holder = holder.to(_collective_device())
            dist.all_reduce(holder)
        state = {}
        for i, (p, mine, holders) in enumerate(zip(params, held, holder.tolist())):
            for key, h in zip(self.STATE_KEYS, holders):
                if not h:
                    continue  # not stepped yet: no state, as in a fresh optimizer
                shape, dtype = self._state_shape(p, key)
                buf = mine[key] if h == rank + 1 else torch.empty(shape, dtype=dtype, device=p.device)
                if distributed:  # contiguous: a collective sends the storage as it lies (QR's Q is
                    buf = buf.to(_collective_device()).contiguous()  # column-major)
                    dist.broadcast(buf, h - 1)
                state.setdefault(i, {})[key] = buf.to("cpu", copy=True)  # a copy, never a view
        groups, start = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + n))})
            start += n
        return dict(state=state, param_groups=groups)

    def load_state_dict(self, state_dict):
        """The inverse of state_dict() for this process's world size and path: this rank keeps the
        state of the matrices it updates (the batched path stacks it at its next step); the groups'
        hyperparameters are the saved ones. Raises ValueError if the state does not fit."""
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("Aurora.load_state_dict: the saved groups hold "
                             f"{[len(g['params']) for g in saved_groups]} matrices, this optimizer "
                             f"{[len(g['params']) for g in self.param_groups]}")
        self.state.clear()
        self._first_bad, self._kept = {}, {}
        i = 0
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
            for p, owner in zip(group["params"], self.owners(group, world)):
                state = state_dict["state"].get(i, {})
                for key, value in state.items():
                    if key not in self.STATE_KEYS or tuple(value.shape) != self._state_shape(p, key)[0]:
                        raise ValueError(f"Aurora.load_state_dict: matrix {i} ({tuple(p.shape)}) "
                                         f"has saved {key!r} of shape {tuple(value.shape)}")
                if (p in self.soap) != ("soap_L" in state) and "momentum" in state:
                    raise ValueError(f"Aurora.load_state_dict: matrix {i} ({tuple(p.shape)}) has "
                                     f"{'no ' if p in self.soap else ''}saved SOAP state, and this optimizer "
                                     f"{'runs' if p in self.soap else 'does not run'} SOAP on it")
                if owner == rank:
                    for key in ("momentum", "row_v"):
                        if key in state:
                            self.state[p][key] = state[key].to(device=p.device, dtype=torch.float32, copy=True)
                    if "soap_L" in state:
                        soap = self.state[p]["soap"] = self._soap_for(p)
                        soap.load({k[len("soap_"):]: v for k, v in state.items() if k.startswith("soap_")})
                i += 1

    def _note_finite(self):
        """Fold this step's finite flags into each matrix's first non-finite step, on the device
        (a few small kernels per step, no host sync). The matrices a rank updates are the same
        every step, so one vector per set of matrices."""
        if not self._step_flags:
            return
        flags = torch.cat([f for f, _ in self._step_flags])
        params = tuple(p for _, ps in self._step_flags for p in ps)
        self._step_flags = []
        first = self._first_bad.get(params)
        if first is None:
            first = torch.full((len(params),), -1, dtype=torch.int64, device=flags.device)
        self._first_bad[params] = torch.where(flags | (first >= 0), first, self.step_index)

    def check_finite(self):
        """Raise FloatingPointError if any update so far was NaN/inf, naming the matrices and the
        first such step. A host sync; under torch.distributed a collective (every rank calls it,
        and every rank raises, or the others would hang in the next collective)."""
        distributed = dist.is_available() and dist.is_initialized()
        if not self._first_bad and not distributed:
            return
        params = [p for group in self.param_groups for p in group["params"]]
        index = {p: i for i, p in enumerate(params)}
        device = _collective_device() if distributed else next(iter(self._first_bad.values())).device
        first = torch.full((len(params),), -1, dtype=torch.int64, device=device)
        for ps, steps in self._first_bad.items():
            first[[index[p] for p in ps]] = steps.to(device)
        if distributed:
            dist.all_reduce(first, op=dist.ReduceOp.MAX)  # each matrix is noted by its owner only
        first = first.tolist()
        bad = [s for s in first if s >= 0]
        if bad:
            step = min(bad)
            shapes = [tuple(p.shape) for p, s in zip(params, first) if s == step]
            raise NonFiniteUpdate(step, shapes)


_COMPILED = []
COMPILE_BACKEND = "inductor"  # torch.compile's default; tests trace with "aot_eager" (no kernels)


def compiled_aurora_direction():
    """aurora_direction wrapped once per process in a plain torch.compile (default options), as
    the record's decorator: every optimizer (one per trial) shares its compiled graphs, so later
    trials compile nothing."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(aurora_direction, backend=COMPILE_BACKEND))
    return _COMPILED[0]


def _collective_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# all_gather_single replaces all_gather_into_tensor in newer torch; same arguments.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
