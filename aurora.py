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
    Aurora(params, lr, ...)       torch.optim.Optimizer; works with or without torch.distributed

This file is the record's rule and its distribution over ranks, top to bottom: `polar`,
`aurora_polar` and `aurora_direction` are the algorithm; `Aurora` holds the momentum and deals the
matrices to the ranks. Variants live beside it, as subclasses that change one step:
aurora_variants.py (NorMuon, the cans12 iteration, the batched path: ablations) and lineage.py
(the later records' rule, with SOAP). A log's code part carries them only when its run uses them.
"""
import torch
import torch.distributed as dist


# The record's Newton-Schulz coefficients: X <- a X + (b A + c A A) X with A = X X^T, i.e. every
# singular value s maps by p(s) = 2s - 1.5s^3 + 0.5s^5, whose fixed point s = 1 is superattracting.
NS_COEFFICIENTS, NS_STEPS = (2, -1.5, 0.5), 12


@torch.no_grad()
def polar(G: torch.Tensor, dtype: torch.dtype = torch.bfloat16, scale=None) -> torch.Tensor:
    """Polar factor of G (batched over leading dims) by 12 simple-quintic Newton-Schulz steps,
    written with the record's operations in the record's order (bit for bit the same rounding).

    The record runs it in bfloat16 (the tensor-core dtype); on a CPU without native bfloat16 a
    bf16 matmul is hundreds of times slower than float32, so the optimizer passes dtype=float32
    there. The input is divided by its Frobenius norm (+1e-7), or by scale(X) when given (the
    lineage's Schatten-4 estimate). Returns G's shape, in `dtype`.
    """
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide side so X X^T is the small Gram matrix
        X = X.mT
    if scale is None:
        X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # all singular values now <= 1
    else:
        X = X / scale(X)
    for _ in range(NS_STEPS):
        A = X @ X.mT
        B = b * A + c * A @ A  # (c * A) @ A, as the record evaluates it
        X = a * X + B @ X
    return X.mT if tall else X


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


# The record's hyperparameters of the rule (what Aurora's constructor defaults to).
RECORD = dict(momentum=0.95, nesterov=True, pp_iterations=2, pp_beta=0.5, contra=0.4, uw_floor=0.35,
              rule="aurora", aurora_on="nonsquare", ns_iteration="quintic12", ns_dtype="bfloat16")


# Newton-Schulz iterations by name (aurora_variants.py adds "cans12").
POLARS = {"quintic12": polar}


@torch.no_grad()
def orthogonalize(u, hp=RECORD, polar_fn=None):
    """Step 3 of the rule: aurora_polar on the matrices hp["aurora_on"] names (the record: every
    non-square one; aurora_polar is plain polar on a square matrix), plain polar otherwise and
    with rule="muon". Returns the Newton-Schulz output dtype as it is (bfloat16 in the record)."""
    polar_fn, dtype = polar_fn or POLARS[hp["ns_iteration"]], ns_dtype_for(hp["ns_dtype"], u.device)
    rows, cols = u.size(-2), u.size(-1)
    on = {"nonsquare": True, "tall": rows > cols, "wide_only": rows < cols}[hp["aurora_on"]]
    if hp["rule"] == "aurora" and on:
        return aurora_polar(u, hp["pp_iterations"], hp["pp_beta"], polar_fn=polar_fn, dtype=dtype)
    return polar_fn(u, dtype=dtype)


@torch.no_grad()
def aurora_direction(grad, momentum, hp=RECORD, state=None, orthogonalize=orthogonalize):
    """Steps 1-5 of the record's per-matrix rule (the part the record compiles), with the record's
    operations in the record's order and dtypes. Updates `momentum` in place and overwrites `grad`
    with the Nesterov look-ahead, as the record does. Returns the float32 direction U.
    Batched over leading dims. A variant passes its own step 3 (`orthogonalize`, called with
    `state`, its per-matrix state, when given: NorMuon's, aurora_variants.py)."""
    mu = hp["momentum"]
    # 1. Momentum, then the Nesterov look-ahead (written into grad).
    momentum.lerp_(grad, 1 - mu)
    update = grad.lerp_(momentum, mu) if hp["nesterov"] else momentum
    # 2. Contra direction: the look-ahead scaled to unit spectral norm (float32).
    contra_direction = unit_spectral(update.clone())
    # 3. Orthogonalize: leverage-uniform polar (Aurora); plain polar (Muon) for ablations.
    update = orthogonalize(update, hp) if state is None else orthogonalize(update, hp, state)
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


def aurora_update(grad, momentum, weight, hp=RECORD):
    """The record's whole per-matrix rule, steps 1-6: returns U (float32); the caller applies
    W.add_(U, alpha=-lr). `hp` holds the rule's hyperparameters (default: the record's, RECORD)."""
    return apply_uw_floor(aurora_direction(grad, momentum, hp), weight, hp["uw_floor"])


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
    Aurora; rule="muon" swaps aurora_polar for plain polar and changes nothing else;
    aurora_on="tall" keeps square and wide matrices on plain polar. ns_dtype="auto" runs
    Newton-Schulz in bfloat16 on CUDA (the record) and float32 elsewhere.

    With torch.distributed initialized, call step() on every rank after the gradients have been
    summed across ranks; each rank updates its share of the matrices and the results are
    all-gathered, so all ranks end with identical weights. Momentum lives on the owning rank. As
    the record: matrices sorted by shape, largest first (Python's stable sort on p.size(),
    descending), rank r updates matrix round*world + r of each round, one update and one
    all-gather per matrix; the Nesterov look-ahead is left in p.grad after step(). compile="auto"
    wraps steps 1-5 in torch.compile for CUDA matrices, as the record does.

    step() never waits for the GPU (no host synchronization): it only notes, on the device, the
    first step at which each matrix's update was not finite. check_finite() reads those notes
    (a host sync, and a collective under torch.distributed) and raises FloatingPointError naming
    the matrices and the step; call it where a pause costs nothing (e.g. at validation).
    `step_index` counts step() calls (set it when resuming, so the messages name the right step).

    A variant subclasses it and changes one step: `orthogonalize` (step 3), `_update` (one
    matrix's whole rule), `_step_group` (how a group's matrices are dealt), and the state it keeps
    per matrix (STATE_KEYS, `_state_shape`, `_load_held`), which state_dict() gathers.
    """
    RULES = ("aurora", "muon")
    orthogonalize = staticmethod(orthogonalize)
    batched = False

    def __init__(self, params, lr, momentum=0.95, nesterov=True, pp_iterations=2, pp_beta=0.5,
                 contra=0.4, uw_floor=0.35, weight_decay=0.0, rule="aurora", aurora_on="nonsquare",
                 ns_iteration="quintic12", ns_dtype="auto", compile="auto", **extra):
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
        for name, value, allowed in (("rule", rule, self.RULES),
                                     ("aurora_on", aurora_on, ("nonsquare", "tall", "wide_only")),
                                     ("ns_iteration", ns_iteration, tuple(POLARS)),
                                     ("ns_dtype", ns_dtype, ("auto", "bfloat16", "float32")),
                                     ("compile", compile, ("auto", True, False))):
            if value not in allowed:
                raise ValueError(f"Aurora: {name} must be one of {allowed}, got {value!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, pp_iterations=int(pp_iterations),
                        pp_beta=pp_beta, contra=contra, uw_floor=uw_floor, weight_decay=weight_decay,
                        rule=rule, aurora_on=aurora_on, ns_iteration=ns_iteration, ns_dtype=ns_dtype, **extra)
        super().__init__(params, defaults)
        self.compile, self._compiled = compile, None
        self.step_index = 0
        self._step_flags = []  # (finite flags, matrices) of the running step
        self._first_bad = {}   # matrices -> device vector: first non-finite step of each, or -1
        self._keep, self._kept = False, {}  # what pop_leverage() orthogonalizes, by matrix
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"Aurora: parameter of shape {tuple(p.shape)} is not a 2-D matrix; "
                        "give biases, gains and embeddings to Adam instead")

    def track_leverage(self, on=True):
        """Ask for the row leverage of the next step's orthogonalized updates (diagnostics). The
        step itself does nothing more than keep a reference to each look-ahead it orthogonalizes
        (and a copy of a variant's state): pop_leverage() does the work, later."""
        self._keep = on

    @torch.no_grad()
    def pop_leverage(self):
        """{matrix: row leverage (see row_leverage)} of the orthogonalized update of the last step
        that tracked it, for the matrices this rank updated; then forgotten. Recomputed here,
        uncompiled, from the kept look-ahead: the same as the step's up to the compiler's rounding."""
        kept, self._kept = self._kept, {}
        return {p: row_leverage(orthogonalize(u, hp) if state is None else orthogonalize(u, hp, state))
                for p, (orthogonalize, u, hp, state) in kept.items()}

    def _keep_lookahead(self, p, orthogonalize, u, hp, state=None):
        self._kept[p] = (orthogonalize, u, hp, state)

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
            self._step_group(group, rank, world, distributed)
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

    def _apply(self, group, params, grads, momenta, weights, state=None):
        """The rule on one matrix (or a variant's stack of same-shape ones); notes finite flags."""
        hp = {k: group[k] for k in RECORD}
        if self._keep and state is not None:
            state_before = state.clone()  # the variant's state as the step's orthogonalize saw it
        U = self._direction(weights.device)(grads, momenta, hp, state, orthogonalize=self.orthogonalize)
        if self._keep:  # the look-ahead the rule orthogonalized (grads now holds it, as in the record)
            lookahead = grads if hp["nesterov"] else momenta
            for j, p in enumerate(params):
                one = (lambda t: t) if lookahead.ndim == 2 else (lambda t: t[j])
                self._keep_lookahead(p, self.orthogonalize, one(lookahead), hp,
                                     None if state is None else one(state_before))
        U = apply_uw_floor(U, weights, group["uw_floor"])  # outside the compiled part, as the record
        self._step_flags.append((torch.isfinite(U).flatten(-2).all(-1).reshape(-1), params))
        if group["weight_decay"]:
            weights.mul_(1 - group["lr"] * group["weight_decay"])
        weights.add_(U.to(weights.dtype), alpha=-group["lr"])

    def _buffer(self, p, key, shape):
        state = self.state[p]
        if key not in state:
            state[key] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        return state[key]

    def _update(self, group, p):
        """One matrix's rule: the record's (a variant's is another)."""
        self._apply(group, [p], p.grad, self._buffer(p, "momentum", p.shape), p.data)

    def _step_group(self, group, rank, world, gather):
        """The record's per-matrix path: each rank updates its share, round by round, and the
        round's matrices are all-gathered (under a process group always, world size 1 too)."""
        params = self._record_order(group["params"])
        for base in range(0, len(params), world):
            round_ = params[base:base + world]
            if rank < len(round_):
                self._update(group, round_[rank])
            if gather:
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

    def owners(self, group, world):
        """The rank that updates each matrix of `group`, in group["params"] order: the matrices,
        sorted by shape largest first, dealt round by round (matrix j of that order to rank j % world)."""
        owner = {p: j % world for j, p in enumerate(self._record_order(group["params"]))}
        return [owner[p] for p in group["params"]]

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

    # --- what a checkpoint holds of it (harness.py's aurora_state_dict, load_aurora_state_dict) ---

    STATE_KEYS = ("momentum",)  # per matrix

    @staticmethod
    def _state_shape(p, key):
        """(shape, dtype) of a matrix's saved state `key` (a variant adds its own keys)."""
        return tuple(p.shape), torch.float32

    def _held_state(self, p):
        """This rank's state of matrix p, by STATE_KEYS name (empty if it has not stepped it)."""
        return {key: self.state[p][key] for key in self.STATE_KEYS if key in self.state[p]}

    def _load_held(self, i, p, state):
        """Put matrix p's saved state (matrix i of the saved groups) back on this rank."""
        for key in self.STATE_KEYS:
            if key in state:
                self.state[p][key] = state[key].to(device=p.device, dtype=torch.float32, copy=True)

    def _check_saved(self, i, p, state):
        """A variant's check that matrix p's saved state is its kind (ValueError if not)."""


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
