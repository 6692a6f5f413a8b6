"""SOAP preconditioning of a matrix's momentum, as the Aurora lineage (results #30, #40, #42) uses
it before Aurora's polar step on mlp.fc, mlp.proj and attn.v (spec/aurora-lineage.md).

SOAP keeps running Gram matrices of the gradient, L = E[G G^T] and R = E[G^T G], and their
eigenbases QL, QR. In that basis the momentum is divided entrywise by the root of its own running
second moment (Adam in the eigenbasis of Shampoo's preconditioner), mapped back, and rescaled to
the momentum's Schatten-4 norm, so that the polar step that follows sees a whitened direction of
the same size. The bases come from the first gradient and are refreshed by one QR power step
every `every` steps rather than by a fresh eigendecomposition.
"""
import torch


def schatten4(X, eps):
    """sqrt(||X^T X||_F) in float32, the Gram matrix taken on the small side, clamped below at eps:
    the lineage's norm estimate (between the spectral and the Frobenius norm). Batched over leading
    dims with the matrix dims kept, so it broadcasts against X."""
    X = X.float()
    gram = X.mT @ X if X.size(-2) > X.size(-1) else X @ X.mT
    return gram.norm(dim=(-2, -1), keepdim=X.ndim > 2).sqrt().clamp_min(eps)


def eigenbasis(A):
    """Eigenvectors of the symmetric A, columns by descending eigenvalue. The tiny diagonal shift is
    the published one (it only matters for an all-zero A); float64 if float32 eigh fails."""
    try:
        _, Q = torch.linalg.eigh(A + 1e-30 * torch.eye(A.size(0), device=A.device))
    except RuntimeError:
        _, Q = torch.linalg.eigh(A.double() + 1e-30 * torch.eye(A.size(0), device=A.device))
        Q = Q.float()
    return torch.flip(Q, [1])


class SoapPreconditioner:
    """One matrix's SOAP state. precondition(u) maps the momentum look-ahead; observe(G), called
    after the weight update with the raw gradient, updates the statistics.

    blend < 1 mixes that fraction of the preconditioned direction with the rest of u, and floor > 0
    keeps every denominator above floor x its root-mean-square (attn.v's settings). renorm
    ("none", "lerp", "scale") is attn.v's extra renormalization to u's norm, in the form of the
    script (see spec/aurora-lineage.md): lerp B = u + (Z - u) as #30/#40's gate-1 blend computes
    it, scale the #42 form."""

    EPS = 1e-8

    def __init__(self, shape, device, beta2=0.9, every=10, blend=1.0, floor=0.0, renorm="none"):
        m, n = shape
        self.beta2, self.every, self.blend, self.floor, self.renorm = beta2, every, blend, floor, renorm
        self.exp_avg_sq = torch.zeros(m, n, dtype=torch.float32, device=device)
        self.L = torch.zeros(m, m, dtype=torch.float32, device=device)
        self.R = torch.zeros(n, n, dtype=torch.float32, device=device)
        self.QL = self.QR = None
        self.count = 0

    @torch.no_grad()
    def precondition(self, u):
        if self.QL is None:  # no gradient seen yet: u as it is, second moment untouched
            Z = u
        else:
            eps, v = self.EPS, u.float()
            P = self.QL.T @ v @ self.QR
            self.exp_avg_sq.mul_(self.beta2).add_(P.square(), alpha=1 - self.beta2)
            den = self.exp_avg_sq.clamp_min(eps * eps).pow(0.5)
            if self.floor > 0:
                den = den.clamp_min(den.square().mean().sqrt().mul(self.floor).clamp_min(eps))
            Z = self.QL @ (P / den) @ self.QR.T
            if self.blend != 1.0:
                Z = self.blend * Z + (1 - self.blend) * v
            Z.mul_(schatten4(v, eps) / schatten4(Z, eps))
        if self.renorm == "lerp":
            Z = u + (Z - u)
        if self.renorm != "none":
            Z = Z * (schatten4(u, self.EPS) / schatten4(Z, self.EPS))
        return Z

    @torch.no_grad()
    def observe(self, grad):
        G = grad.float()
        self.L.lerp_(G @ G.T, 1 - self.beta2)
        self.R.lerp_(G.T @ G, 1 - self.beta2)
        if self.QL is None:
            self.QL, self.QR = eigenbasis(self.L), eigenbasis(self.R)
        elif self.count > 0 and self.count % self.every == 0:
            self.QL, self.exp_avg_sq = self._refresh(self.L, self.QL, self.exp_avg_sq, 0)
            self.QR, self.exp_avg_sq = self._refresh(self.R, self.QR, self.exp_avg_sq, 1)
        self.count += 1

    STATE = ("exp_avg_sq", "L", "R", "QL", "QR", "count")

    def state(self):
        """The statistics a checkpoint must hold to continue bit for bit: {name: tensor} (the bases
        once a gradient was seen; the count, which times the refreshes, as an int64 scalar)."""
        held = {k: getattr(self, k) for k in self.STATE[:-1] if getattr(self, k) is not None}
        return {**held, "count": torch.tensor(self.count, dtype=torch.int64)}

    def load(self, state):
        """The inverse of state(), onto this preconditioner's device."""
        to = dict(device=self.L.device, dtype=torch.float32, copy=True)
        self.exp_avg_sq, self.L, self.R = (state[k].to(**to) for k in ("exp_avg_sq", "L", "R"))
        self.QL, self.QR = (state[k].to(**to) if k in state else None for k in ("QL", "QR"))
        self.count = int(state["count"])

    @staticmethod
    def _refresh(A, Q, exp_avg_sq, dim):
        """One QR power step towards A's eigenbasis, after sorting Q's columns (and the matching
        second-moment rows or columns) by their Rayleigh quotients, largest first."""
        order = torch.argsort(torch.diag(Q.T @ A @ Q), descending=True)
        Q = Q[:, order]
        exp_avg_sq = exp_avg_sq.index_select(dim, order)
        Q, _ = torch.linalg.qr(A @ Q)
        return Q, exp_avg_sq
