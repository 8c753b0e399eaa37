"""Step-indexed, infinite batch samplers for `DataLoader(batch_sampler=...)`.

Batch `s` is a pure function of (seed, s), so a run restarted with `start_step=s` continues
bit-identically. Items are `(index, aug_seed)`; the datasets seed augmentation from aug_seed, so
images are augmented identically whatever the number of loader workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

Batch = list[tuple[int, int]]


def aug_seeds(seed: int, step: int, count: int) -> np.ndarray:
    """One 64-bit augmentation seed per position of a global batch, from (seed, step, position)."""
    return np.random.SeedSequence([seed, step]).generate_state(count, dtype=np.uint64)


def _check_rank(world_size: int, rank: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")


class DistributedBatchSampler:
    """Per-epoch seeded permutation cut into global batches; each rank takes its slice.

    The last partial global batch of an epoch is dropped so every rank sees equal batches.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        world_size: int,
        rank: int,
        seed: int,
        start_step: int = 0,
        shuffle: bool = True,
    ) -> None:
        _check_rank(world_size, rank)
        if batch_size < 1 or start_step < 0:
            raise ValueError(f"need batch_size >= 1 and start_step >= 0, got {batch_size}, {start_step}")
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {batch_size} x {world_size} ranks")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.seed = seed
        self.start_step = start_step
        self.shuffle = shuffle

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[Batch]:
        step, epoch, order = self.start_step, -1, np.empty(0, dtype=np.int64)
        lo = self.rank * self.batch_size
        while True:
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                order = self.epoch_order(epoch)
            begin = (step % self.steps_per_epoch) * self.global_batch + lo
            indices = order[begin : begin + self.batch_size]
            seeds = aug_seeds(self.seed, step, self.global_batch)[lo : lo + self.batch_size]
            yield list(zip(indices.tolist(), seeds.tolist(), strict=True))
            step += 1


class PKBatchSampler:
    """P identities x K images per rank batch, identities distinct across ranks within a step.

    An epoch walks a seeded permutation of the identities; an identity with fewer than K images
    is sampled with replacement (its repeats still get distinct aug_seeds).
    """

    def __init__(
        self,
        labels: np.ndarray,
        p: int,
        k: int,
        world_size: int,
        rank: int,
        seed: int,
        start_step: int = 0,
    ) -> None:
        _check_rank(world_size, rank)
        if p < 1 or k < 1 or start_step < 0:
            raise ValueError(f"need p >= 1, k >= 1 and start_step >= 0, got {p}, {k}, {start_step}")
        labels = np.asarray(labels)
        self.identities, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(self.identities)))[:-1]
        self.members = np.split(order, bounds)
        self.steps_per_epoch = len(self.identities) // (p * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.identities)} identities cannot fill {p}/rank x {world_size} ranks")
        self.p, self.k, self.world_size, self.rank = p, k, world_size, rank
        self.seed = seed
        self.start_step = start_step

    def __iter__(self) -> Iterator[Batch]:
        step, epoch, identity_order = self.start_step, -1, np.empty(0, dtype=np.int64)
        global_batch = self.p * self.k * self.world_size
        lo = self.rank * self.p * self.k
        while True:
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                identity_order = np.random.default_rng([self.seed, epoch]).permutation(len(self.identities))
            first = (step % self.steps_per_epoch) * self.p * self.world_size + self.rank * self.p
            indices: list[int] = []
            for slot, identity in enumerate(identity_order[first : first + self.p]):
                members = self.members[identity]
                rng = np.random.default_rng([self.seed, step, self.rank * self.p + slot])
                if len(members) >= self.k:
                    indices += rng.choice(members, size=self.k, replace=False).tolist()
                else:  # each image once before any repeats: a class of 2 at k = 4 always has its positive pair
                    repeats = rng.choice(members, size=self.k - len(members))
                    indices += np.concatenate([rng.permutation(members), repeats]).tolist()
            seeds = aug_seeds(self.seed, step, global_batch)[lo : lo + self.p * self.k]
            yield list(zip(indices, seeds.tolist(), strict=True))
            step += 1
