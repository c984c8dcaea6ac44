"""The balanced batch sampler of EKD (Huang et al., CVPR 2022, Sec. 4.1).

Every batch holds ``random_size`` samples drawn at random from the whole dataset followed by
``identities_per_batch`` (P) identities x ``samples_per_identity`` (K) samples, so that the batch
contains positive pairs for the rank loss while the margin softmax still sees a random batch.

Differences from the authors' sampler, all deliberate:
- the random part walks a per-epoch permutation, so each sample is seen once per epoch (the
  authors draw each batch independently); an epoch is ``len(dataset) // (random_size * world)``
  batches per rank, as theirs;
- identities are drawn among those with at least 2 images (others cannot form positive pairs),
  and K samples without replacement when the identity has at least K images, else every image
  once and the rest drawn with replacement;
- everything is seeded by ``(seed, epoch, rank)``: reproducible, and no two ranks share a
  stream, so no batch is duplicated across ranks;
- it uses ``numpy.random.Generator`` only; the authors' ``random.sample(dict.keys(), n)`` raises
  ``TypeError`` on Python >= 3.11.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from ekd.errors import ConfigError


class BalancedBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices: ``random_size`` random + P x K identity-balanced."""

    def __init__(self, labels: Sequence[int] | np.ndarray, random_size: int, identities_per_batch: int,
                 samples_per_identity: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1,
                 batches_per_epoch: int | None = None) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1 or labels.size == 0:
            raise ConfigError("sampler: the dataset has no labelled samples")
        if random_size < 0 or identities_per_batch < 0 or samples_per_identity < 1:
            raise ConfigError("sampler: random_size and identities_per_batch must be >= 0 and "
                              "samples_per_identity >= 1")
        if random_size + identities_per_batch == 0:
            raise ConfigError("sampler: the batch is empty")
        if not 0 <= rank < world_size:
            raise ConfigError(f"sampler: rank {rank} is outside world size {world_size}")
        self.labels = labels
        self.random_size = int(random_size)
        self.p = int(identities_per_batch)
        self.k = int(samples_per_identity)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.start_batch = 0  # batches of the epoch already trained (resume after an interrupt)
        order = np.argsort(labels, kind="stable")
        ids, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        self._members = {int(i): order[s:s + c] for i, s, c in zip(ids, starts, counts)}
        self._eligible = np.array([i for i, c in zip(ids, counts) if c >= 2], dtype=np.int64)
        if self.p > len(self._eligible):
            raise ConfigError(
                f"sampler.identities_per_batch={self.p} but only {len(self._eligible)} identities "
                f"have 2 or more images; lower identities_per_batch")
        if random_size > len(labels):
            raise ConfigError(f"sampler.random_size={random_size} exceeds the dataset size {len(labels)}")
        if batches_per_epoch is None:
            per_batch = self.random_size or self.p * self.k
            batches_per_epoch = len(labels) // (per_batch * self.world_size)
        if batches_per_epoch < 1:
            raise ConfigError(f"sampler: the dataset ({len(labels)} samples) is smaller than one "
                              f"global batch; lower the batch size or the world size")
        self.batches_per_epoch = int(batches_per_epoch)

    @property
    def batch_size(self) -> int:
        return self.random_size + self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's streams (call before iterating, as with DistributedSampler)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def _identity_samples(self, rng: np.random.Generator, identity: int) -> np.ndarray:
        members = self._members[identity]
        if len(members) >= self.k:
            return rng.choice(members, self.k, replace=False)
        extra = rng.choice(members, self.k - len(members), replace=True)
        return np.concatenate([rng.permutation(members), extra])

    def __iter__(self) -> Iterator[list[int]]:
        # One permutation per epoch shared by all ranks (same seed), split into disjoint chunks.
        shared = np.random.default_rng([self.seed, self.epoch])
        need = self.batches_per_epoch * self.random_size * self.world_size
        reps = -(-need // len(self.labels)) if need else 0
        perm = np.concatenate([shared.permutation(len(self.labels)) for _ in range(reps)]) if reps else \
            np.empty(0, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 1])
        for b in range(self.batches_per_epoch):
            start = (b * self.world_size + self.rank) * self.random_size
            batch = [int(i) for i in perm[start:start + self.random_size]]
            if self.p:
                for identity in rng.choice(self._eligible, self.p, replace=False):
                    batch.extend(int(i) for i in self._identity_samples(rng, int(identity)))
            if b >= self.start_batch:  # earlier batches are drawn, not yielded: same streams
                yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
