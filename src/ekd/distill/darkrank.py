"""Hard DarkRank (Chen, Wang & Zhang, AAAI 2018, Sec. 3.2-3.3): cross-sample similarity transfer.

On L2-normalised embeddings, each anchor ``q`` scores every other sample ``x`` by
``S(q, x) = -alpha * ||q - x||_2^beta``. The teacher's scores rank the candidates; the
hard variant maximises the Plackett-Luce log-likelihood of the teacher's top
``list_length`` ranking under the student's scores,
``log P(pi | S_s) = sum_{r=1}^{L} [ S_s(q, x_pi(r)) - log sum_{k=r}^{L} exp S_s(q, x_pi(k)) ]``,
and the loss is its negative mean over anchors. Paper / EKD-baseline values: alpha = 3,
beta = 3, list length 3. The anchor itself is always excluded from its list (the authors drop
the first element of the teacher's sorted row, which is the anchor unless a duplicate ties it).
"""

from __future__ import annotations

import torch

from ekd.functional import unit
from ekd.distill._utils import check_positive, pair, zero
from ekd.distill.base import Distiller, register_distiller
from ekd.errors import ConfigError


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """``||x_i||^2 + ||x_j||^2 - 2 x_i . x_j`` clamped at 1e-12 (the authors' stabiliser)."""
    sq = x.pow(2).sum(1, keepdim=True)
    return (sq + sq.t() - 2.0 * (x @ x.t())).clamp_min(1e-12)


@register_distiller("darkrank")
class HardDarkRankLoss(Distiller):
    """Listwise transfer of the teacher's top-``list_length`` neighbour ranking."""

    def __init__(self, weight: float = 1.0, alpha: float = 3.0, beta: float = 3.0,
                 list_length: int = 3) -> None:
        super().__init__(weight)
        check_positive("darkrank", alpha=alpha, beta=beta)
        if isinstance(list_length, bool) or not isinstance(list_length, int) or list_length < 1:
            raise ConfigError(f"distiller 'darkrank': list_length must be an integer >= 1, "
                              f"got {list_length!r}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.list_length = list_length

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``-alpha * distance^beta`` between all pairs of normalised rows."""
        return -self.alpha * squared_distances(unit(x)).pow(self.beta / 2.0)

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: object) -> dict[str, torch.Tensor]:
        s, t = pair(student_emb, teacher_emb)
        n = s.shape[0]
        length = min(self.list_length, n - 1)
        if length < 1:
            return {"darkrank": zero(s)}
        with torch.no_grad():
            t_scores = self.scores(t)
            t_scores.fill_diagonal_(float("inf"))  # the anchor always ranks first, then dropped
            order = torch.topk(t_scores, length + 1, dim=1).indices[:, 1:]
        ranked = torch.gather(self.scores(s), 1, order)  # [N, L] student scores, teacher order
        # log-normaliser of position r: logsumexp over positions r..L (reverse cumulative)
        tail = torch.logcumsumexp(ranked.flip(1), dim=1).flip(1)
        log_prob = (ranked - tail).sum(dim=1)
        return {"darkrank": -log_prob.mean()}
