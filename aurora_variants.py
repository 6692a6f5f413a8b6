"""Ablations of the record's rule, beside it (aurora.py): NorMuon's per-row normalization
(--rule normuon), the cans12 Newton-Schulz iteration (--ns-iteration cans12) and the batched path
(--aurora-batched: same-shape matrices stacked, one Newton-Schulz chain and one collective per
shape). `VariantAurora` is aurora.py's Aurora with these; on the record's settings it runs the
record's code. A technique module of train_gpt.py (VARIANTS below): a log's code part carries it
only when its run uses one of them.
"""
import torch
import torch.distributed as dist

from aurora import POLARS, RECORD, Aurora, aurora_direction, orthogonalize

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


POLARS["cans12"] = polar_cans12
NORMUON_BETA2 = 0.95  # NorMuon's decay of the per-row second moment


@torch.no_grad()
def variant_orthogonalize(u, hp=RECORD, row_v=None):
    """Step 3 with the variants: aurora.py's orthogonalize (whose Newton-Schulz iteration
    ns_iteration names), then, with rule="normuon", NorMuon's per-row second-moment normalization
    (row_v, one value per row, updated in place)."""
    O = orthogonalize(u, hp)
    if hp["rule"] == "normuon":
        O = O.float()
        row_v.lerp_(O.square().mean(dim=-1, keepdim=True), 1 - NORMUON_BETA2)
        N = O / (row_v.sqrt() + 1e-10)
        O = N * (O.norm(dim=(-2, -1), keepdim=True) / N.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-30))
    return O


def variant_direction(grad, momentum, hp=RECORD, row_v=None):
    """aurora_direction (steps 1-5) with variant_orthogonalize as step 3."""
    return aurora_direction(grad, momentum, hp, row_v, orthogonalize=variant_orthogonalize)


class VariantAurora(Aurora):
    """Aurora with rule="normuon" (per-row state row_v), ns_iteration="cans12", and batched=True:
    the same rule on stacks of same-shape matrices, each shape gathered with one collective,
    overlapped with the next shape's compute; p.grad is left as it was (the stacks are copies)."""
    RULES = Aurora.RULES + ("normuon",)
    orthogonalize = staticmethod(variant_orthogonalize)
    STATE_KEYS = ("momentum", "row_v")  # the batched path's *_stack keys hold views of these

    def __init__(self, params, lr, batched=False, **kwargs):
        super().__init__(params, lr, **kwargs)
        self.batched = batched

    @staticmethod
    def _state_shape(p, key):
        return ((p.size(0), 1) if key == "row_v" else tuple(p.shape)), torch.float32

    def _update(self, group, p):
        row_v = self._buffer(p, "row_v", (p.size(0), 1)) if group["rule"] == "normuon" else None
        self._apply(group, [p], p.grad, self._buffer(p, "momentum", p.shape), p.data, row_v)

    def _step_group(self, group, rank, world, gather):
        if not self.batched:
            return super()._step_group(group, rank, world, gather)
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


# all_gather_single replaces all_gather_into_tensor in newer torch; same arguments.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Variants:
    """The technique train_gpt.py plugs in (see its TECHNIQUES): no flags of its own (rule,
    ns_iteration and aurora_batched are the trainer's), the choices it adds, and Aurora with them."""
    name = "aurora_variants.py"
    CHOICES = dict(rule=("normuon",), ns_iteration=("cans12",))

    @staticmethod
    def used(hp):
        return hp.rule == "normuon" or hp.ns_iteration == "cans12" or hp.aurora_batched

    @staticmethod
    def make_aurora(matrices, hp, model, options):
        return VariantAurora(matrices, batched=hp.aurora_batched, **options)


VARIANTS = Variants()
