"""Relational KD (Park et al., CVPR 2019): distance-wise (Eq. 4-5) and angle-wise (Eq. 6-7).

Distance: ``psi_D(t_i, t_j) = ||t_i - t_j|| / mu`` with ``mu`` the mean distance over the
pairs of the batch (EKD baseline: mean over the nonzero entries of the full ``N x N`` matrix);
``L_D = smooth_L1(psi_D^s, psi_D^t)`` averaged over all ``N^2`` entries.
Angle: ``psi_A(t_i, t_j, t_k) = <e_ij, e_kj>`` with ``e_ij = (t_i - t_j) / ||t_i - t_j||``;
``L_A = smooth_L1(psi_A^s, psi_A^t)`` averaged over all ``N^3`` triplets (a vector of zero length
has ``e = 0``, as in the authors' code). Weights: distance 25, angle 50 (paper and baseline).

Raw (unnormalised) embeddings, as in the EKD authors' baseline. The angle term is O(N^3): it
is evaluated from the Gram matrix, ``<x_j - x_i, x_k - x_i> = G_jk - G_ij - G_ik + G_ii``, in
blocks of vertices, with an analytic backward that recomputes each block, so memory stays
O(block) instead of the O(N^3 d) of the direct formulation; the cost stays O(N^3). Pairs whose
squared distance is below the rounding noise of the Gram matrix count as duplicates (zero
distance, ``e = 0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ekd.distill._utils import pair, zero
from ekd.distill.base import Distiller, register_distiller
from ekd.errors import ConfigError

#: Elements of one ``[chunk, N, N]`` block of the angle term: small blocks stay in cache and avoid
#: page-faulting fresh allocations, which dominate the cost of large blocks on CPU.
CHUNK_ELEMENTS = 1 << 19


def gram_geometry(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram matrix of the centred rows, pairwise distances, and their inverses (0 for duplicates)."""
    x = x - x.mean(dim=0, keepdim=True)  # translation-invariant quantities; better conditioned
    g = x @ x.t()
    d = torch.diagonal(g)
    sq = d[:, None] + d[None, :] - 2.0 * g
    noise = 64.0 * torch.finfo(x.dtype).eps * (d[:, None] + d[None, :])
    dup = (sq <= noise) | torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    ones, zeros = torch.ones_like(sq), torch.zeros_like(sq)
    root = torch.where(dup, ones, sq).sqrt()  # double where: no inf/nan in the unused branch
    dist = torch.where(dup, zeros, root)
    inv = torch.where(dup, zeros, 1.0 / root)
    return g, dist, inv


def angle_factors(g: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``v = 1/||x_j - x_i||`` and ``w = v * (G_ij - G_ii / 2)`` (rows: vertex i), so that
    ``A_i = G o (v_i v_i^T) - w_i v_i^T - v_i w_i^T`` (``A_ijk = <e_ij, e_ik>``)."""
    return inv, inv * (g - 0.5 * torch.diagonal(g)[:, None])


def _block(g: torch.Tensor, v: torch.Tensor, w: torch.Tensor, rows: slice,
           out: torch.Tensor) -> torch.Tensor:
    """Angles ``A[i, j, k]`` for the vertices ``i`` in ``rows``, written into ``out``."""
    vi, wi = v[rows], w[rows]
    torch.mul(vi[:, :, None], vi[:, None, :], out=out)
    out.mul_(g[None])
    return out.baddbmm_(torch.stack([wi, vi], dim=2), -torch.stack([vi, wi], dim=1))


class ChunkedAngleLoss(torch.autograd.Function):
    """``sum_{i,j,k} smooth_L1(A_s[i,j,k] - A_t[i,j,k])`` over blocks of vertices, O(block) memory.

    With ``A_i = G o v_i v_i^T - w_i v_i^T - v_i w_i^T`` and ``R = clamp(A_s - A_t, -1, 1)`` (the
    smooth-L1 derivative, symmetric in j, k), the gradients are ``dG = sum_i R_i o v_i v_i^T``,
    ``dv_i = 2 (R_i o G) v_i - 2 R_i w_i`` and ``dw_i = -2 R_i v_i``; backward recomputes blocks.
    """

    @staticmethod
    def forward(ctx, g_s: torch.Tensor, v_s: torch.Tensor, w_s: torch.Tensor,  # type: ignore[override]
                g_t: torch.Tensor, v_t: torch.Tensor, w_t: torch.Tensor, step: int) -> torch.Tensor:
        n = g_s.shape[0]
        a = g_s.new_empty((min(step, n), n, n))
        b = torch.empty_like(a)
        total = g_s.new_zeros(())
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            m = rows.stop - rows.start
            total += F.smooth_l1_loss(_block(g_s, v_s, w_s, rows, a[:m]),
                                      _block(g_t, v_t, w_t, rows, b[:m]), reduction="sum")
        ctx.save_for_backward(g_s, v_s, w_s, g_t, v_t, w_t)
        ctx.step = step
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        g_s, v_s, w_s, g_t, v_t, w_t = ctx.saved_tensors
        n, step = g_s.shape[0], ctx.step
        d_g, d_v, d_w = torch.zeros_like(g_s), torch.zeros_like(v_s), torch.zeros_like(w_s)
        a = g_s.new_empty((min(step, n), n, n))
        b = torch.empty_like(a)
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            m = rows.stop - rows.start
            r = _block(g_s, v_s, w_s, rows, a[:m]).sub_(_block(g_t, v_t, w_t, rows, b[:m]))
            r.clamp_(-1.0, 1.0)
            vi, wi = v_s[rows], w_s[rows]
            rvw = torch.bmm(r, torch.stack([vi, wi], dim=2))  # [m, N, 2]: R v, R w
            rg_v = torch.bmm(torch.mul(r, g_s[None], out=b[:m]), vi[:, :, None])[..., 0]
            d_v[rows] += 2.0 * rg_v - 2.0 * rvw[..., 1]
            d_w[rows] += -2.0 * rvw[..., 0]
            d_g += r.mul_(vi[:, :, None]).mul_(vi[:, None, :]).sum(0)
        return d_g * grad, d_v * grad, d_w * grad, None, None, None, None


@register_distiller("rkd")
class RKDLoss(Distiller):
    """Distance (``rkd_dist``) and angle (``rkd_angle``) relational terms.

    Args:
        distance_weight, angle_weight: the paper's lambda_D = 25 and lambda_A = 50.
        chunk_elements: size of one angle block (memory/speed trade-off only).
    """

    def __init__(self, weight: float = 1.0, distance_weight: float = 25.0,
                 angle_weight: float = 50.0, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        super().__init__(weight)
        if distance_weight < 0 or angle_weight < 0:
            raise ConfigError("distiller 'rkd': distance_weight and angle_weight must be >= 0")
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1:
            raise ConfigError(f"distiller 'rkd': chunk_elements must be a positive integer, "
                              f"got {chunk_elements!r}")
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)
        self.chunk_elements = chunk_elements

    @staticmethod
    def _normalised(dist: torch.Tensor) -> torch.Tensor:
        positive = dist > 0
        if not bool(positive.any()):
            return dist
        return dist / dist[positive].mean()

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: object) -> dict[str, torch.Tensor]:
        s, t = pair(student_emb, teacher_emb)
        n = s.shape[0]
        g_s, d_s, inv_s = gram_geometry(s)
        with torch.no_grad():
            g_t, d_t, inv_t = gram_geometry(t)
            v_t, w_t = angle_factors(g_t, inv_t)
        terms = {"rkd_dist": self.distance_weight * F.smooth_l1_loss(
            self._normalised(d_s), self._normalised(d_t))}
        if self.angle_weight == 0 or n < 2:
            terms["rkd_angle"] = zero(s)
            return terms
        step = max(1, self.chunk_elements // (n * n))
        v_s, w_s = angle_factors(g_s, inv_s)
        total = ChunkedAngleLoss.apply(g_s, v_s, w_s, g_t, v_t, w_t, step)
        terms["rkd_angle"] = self.angle_weight * total / float(n) ** 3
        return terms
