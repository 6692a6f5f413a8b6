"""Aurora: Muon with a leverage-aware polar step.

Muon replaces a matrix's momentum by its polar factor (the nearest orthogonal matrix). For a tall
matrix (e.g. an MLP's fc weight, one row per hidden neuron) an orthogonal update can still give
some rows persistently tiny norms ("leverage"), and those neurons die early. Aurora rescales the
rows by a positive diagonal D before the polar step (polar(D G) is orthogonal for any positive D)
and iterates D until the rows have uniform norm. On square matrices Aurora is exactly Muon. The
record's rule, top to bottom: `polar`, `aurora_polar`, `aurora_direction` (steps 1-5, compiled),
`apply_uw_floor` (step 6); `Aurora` holds the momentum and deals the matrices to the ranks.
"""
import torch
import torch.distributed as dist


# The record's Newton-Schulz coefficients: X <- a X + (b A + c A A) X with A = X X^T, i.e. every
# singular value s maps by p(s) = 2s - 1.5s^3 + 0.5s^5, whose fixed point s = 1 is superattracting.
NS_COEFFICIENTS, NS_STEPS = (2, -1.5, 0.5), 12


@torch.no_grad()
def polar(G: torch.Tensor, dtype: torch.dtype = torch.bfloat16, scale=None) -> torch.Tensor:
    """Polar factor of G (batched over leading dims) by 12 simple-quintic Newton-Schulz steps in
    `dtype` (the record's bfloat16; float32 on a CPU), with the record's operations in its order.
    The input is divided by its Frobenius norm (+1e-7), or by scale(X) (the lineage's)."""
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
    """Newton-Schulz dtype: "auto" is bfloat16 on CUDA (the record), float32 elsewhere."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[setting]


@torch.no_grad()
def aurora_polar(G: torch.Tensor, pp_iterations: int = 2, pp_beta: float = 0.5, eps: float = 1e-7,
                 polar_fn=polar, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Orthogonal factor of G whose rows (of the tall orientation) all have the same norm. Square:
    polar; wide: the transpose of the tall case. Tall (m > n), in float32: D = 1/||G_i||, U =
    polar(D G), then D_i <- D_i ((n/m) / ||U_i||^2)^beta. Returns the last polar's output as it is."""
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
    """G (in float32) over its largest singular value, estimated by 5 power iterations from the
    normalized all-ones vector, as the record has them (a stack: one matrix at a time)."""
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
    """Step 3: aurora_polar on the matrices hp["aurora_on"] names (the record: all), plain polar
    otherwise and with rule="muon"; in the Newton-Schulz output dtype."""
    polar_fn, dtype = polar_fn or POLARS[hp["ns_iteration"]], ns_dtype_for(hp["ns_dtype"], u.device)
    rows, cols = u.size(-2), u.size(-1)
    on = {"nonsquare": True, "tall": rows > cols, "wide_only": rows < cols}[hp["aurora_on"]]
    if hp["rule"] == "aurora" and on:
        return aurora_polar(u, hp["pp_iterations"], hp["pp_beta"], polar_fn=polar_fn, dtype=dtype)
    return polar_fn(u, dtype=dtype)


@torch.no_grad()
def aurora_direction(grad, momentum, hp=RECORD, state=None, orthogonalize=orthogonalize):
    """Steps 1-5 of the record's per-matrix rule (what it compiles), its operations in its order
    and dtypes: updates `momentum` in place, leaves the Nesterov look-ahead in `grad`, returns the
    float32 direction. A variant passes its own step 3 (and its per-matrix `state`)."""
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
    """Step 6: the update is at least `floor` of the weight (Frobenius norms, clamped at 1e-8)."""
    if not floor:
        return U
    p_fro = frobenius(weight.float()).clamp_min(1e-8)
    u_fro = frobenius(U.float()).clamp_min(1e-8)
    scale = torch.where(u_fro / p_fro < floor, floor * p_fro / u_fro, torch.ones_like(p_fro))
    return U * scale.to(U.dtype)


class NonFiniteUpdate(FloatingPointError):
    """Aurora.check_finite(): the first step whose update was NaN/inf, and its matrices' shapes."""

    def __init__(self, step, shapes):
        super().__init__(f"Aurora: non-finite update at step {step} for parameter(s) of shape {shapes}; "
                         "check the loss and gradients for NaN/inf")
        self.step, self.shapes = step, shapes


class Aurora(torch.optim.Optimizer):
    """Aurora for 2-D weight matrices (Adam takes embeddings, heads, biases and gains). Defaults:
    the record's rule; contra=0, uw_floor=0: plain Aurora; rule="muon": plain polar.

    Under torch.distributed, call step() on every rank after the gradients were summed: as the
    record, matrices sorted by shape (largest first), rank r updates matrix round*world + r of
    each round, and each round is all-gathered; momentum lives on the owning rank; the look-ahead
    is left in p.grad. compile="auto" compiles steps 1-5 on CUDA, as the record. step() never
    syncs with the device: it notes each matrix's first non-finite step there, and check_finite()
    (a host sync and a collective) raises naming them. `step_index` counts step() calls. A variant
    changes one step: `orthogonalize` (step 3), `_update` (one matrix), `_step_group` (the dealing).
    """
    RULES = ("aurora", "muon")
    orthogonalize = staticmethod(orthogonalize)

    def __init__(self, params, lr, momentum=0.95, nesterov=True, pp_iterations=2, pp_beta=0.5,
                 contra=0.4, uw_floor=0.35, weight_decay=0.0, rule="aurora", aurora_on="nonsquare",
                 ns_iteration="quintic12", ns_dtype="auto", compile="auto"):
        for ok, what in ((lr > 0, f"lr must be > 0, got {lr}"),
                         (0 < momentum < 1, f"momentum must be in (0, 1), got {momentum}"),
                         (int(pp_iterations) == pp_iterations >= 1,
                          f"pp_iterations must be an integer >= 1, got {pp_iterations}"),
                         (0 < pp_beta <= 1, f"pp_beta must be in (0, 1], got {pp_beta}"),
                         (min(contra, uw_floor, weight_decay) >= 0, "contra, uw_floor and weight_decay must "
                          f"be >= 0, got {contra}, {uw_floor}, {weight_decay}")):
            if not ok:
                raise ValueError(f"Aurora: {what}")
        for name, value, allowed in (("rule", rule, self.RULES),
                                     ("aurora_on", aurora_on, ("nonsquare", "tall", "wide_only")),
                                     ("ns_iteration", ns_iteration, tuple(POLARS)),
                                     ("ns_dtype", ns_dtype, ("auto", "bfloat16", "float32")),
                                     ("compile", compile, ("auto", True, False))):
            if value not in allowed:
                raise ValueError(f"Aurora: {name} must be one of {allowed}, got {value!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, pp_iterations=int(pp_iterations),
                        pp_beta=pp_beta, contra=contra, uw_floor=uw_floor, weight_decay=weight_decay,
                        rule=rule, aurora_on=aurora_on, ns_iteration=ns_iteration, ns_dtype=ns_dtype)
        super().__init__(params, defaults)
        self.compile, self._compiled = compile, None
        self.step_index = 0
        self._step_flags = []  # (finite flags, matrices) of the running step
        self._first_bad = {}   # matrices -> device vector: first non-finite step of each, or -1
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"Aurora: parameter of shape {tuple(p.shape)} is not a 2-D matrix; "
                        "give biases, gains and embeddings to Adam instead")

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
        self.step_index += 1
        return loss

    def _direction(self, device):
        """aurora_direction, compiled for CUDA tensors when compile is on (as the record)."""
        if self.compile is True or (self.compile == "auto" and device.type == "cuda"):
            if self._compiled is None:
                self._compiled = compiled_aurora_direction()
            return self._compiled
        return aurora_direction

    def _apply(self, group, params, grads, momenta, weights, state=None):
        """The rule on one matrix (or a variant's stack of same-shape ones); notes finite flags."""
        hp = {k: group[k] for k in RECORD}
        U = self._direction(weights.device)(grads, momenta, hp, state, orthogonalize=self.orthogonalize)
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
        """The record's per-matrix path: each rank updates its share, round by round; each round is
        all-gathered (under a process group always, world size 1 too)."""
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
        """By shape, largest first (a stable sort: equal shapes keep model order)."""
        return sorted(params, key=lambda p: p.size(), reverse=True)

    def _note_finite(self):
        """Fold this step's finite flags into each matrix's first non-finite step, on the device
        (no host sync; one vector per set of matrices: a rank updates the same ones every step)."""
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
        """Raise NonFiniteUpdate if an update so far was NaN/inf, naming the first such step and its
        matrices. A host sync; under torch.distributed a collective (every rank raises)."""
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
    """aurora_direction in a plain torch.compile, as the record's decorator, once per process (later
    trials' optimizers compile nothing)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(aurora_direction, backend=COMPILE_BACKEND))
    return _COMPILED[0]


def _collective_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
