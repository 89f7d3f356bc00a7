"""Rows and batches: packed rows of a token stream, host shards of shuffled epochs, weighted
mixtures of sources, and the checkpointable grain iterator over them."""

from __future__ import annotations

import numpy as np


class PackedRows:
    """Row i = stream[i * L : i * L + L + 1] (inputs and shifted targets share it)."""

    def __init__(self, stream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        self.n = max(0, (len(stream) - 1) // seq_len)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        i = int(i)
        return np.asarray(self.stream[i * self.seq_len: i * self.seq_len + self.seq_len + 1], np.int32)


class Mixture:
    """Rows drawn from several sources in proportion to their weights (``data.mixture``)."""

    def __init__(self, parts: list[PackedRows], weights: list[float], names: list[str]):
        self.parts, self.weights, self.names = parts, weights, names
        self.seq_len = parts[0].seq_len

    def __len__(self):
        return sum(len(p) for p in self.parts)


class EpochShards:
    """Position g of this host -> a row: epoch e = g // n uses permutation(seed, e) of all rows, and
    host h of H takes every H-th entry of it, so hosts read disjoint rows that cover each epoch.
    ``stream`` > 0 gives a mixture's other sources their own permutations."""

    EPOCHS = 100_000  # effectively endless; the training loop decides when to stop

    def __init__(self, rows: PackedRows, *, seed: int, shuffle: bool, process_index: int, process_count: int,
                 stream: int = 0):
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self.h, self.H = process_index, process_count
        self.per_host = len(rows) // process_count
        self.key = [seed] if not stream else [seed, 1_000_003 * stream]
        self._perm = (None, None)

    def __len__(self):
        return self.per_host * self.EPOCHS

    def _permutation(self, epoch):
        if self._perm[0] != epoch:
            n = len(self.rows)
            perm = np.random.default_rng([*self.key, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm = (epoch, perm)
        return self._perm[1]

    def __getitem__(self, g):
        epoch, pos = divmod(int(g), self.per_host)
        return self.rows[self._permutation(epoch)[pos * self.H + self.h]]


def loader(rows, *, batch_size: int, seed: int, shuffle: bool = True, process_index: int = 0,
           process_count: int = 1):
    """A checkpointable grain iterator of [batch_size // process_count, L + 1] int32 batches."""
    import grain  # lazy: ~0.3 s

    if batch_size % process_count:
        raise ValueError(f"data.batch_size={batch_size} is not divisible by {process_count} processes")
    if len(rows) < batch_size:
        raise ValueError(f"the data holds {len(rows)} rows (data.seq_len={rows.seq_len}), fewer than "
                         f"data.batch_size={batch_size}; use more text or a smaller batch / seq_len")
    def source(r, stream=0):
        return grain.MapDataset.source(EpochShards(r, seed=seed, shuffle=shuffle, process_index=process_index,
                                                   process_count=process_count, stream=stream))

    if isinstance(rows, Mixture):
        for name, part in zip(rows.names, rows.parts):
            if len(part) < process_count:
                raise ValueError(f"data.mixture source {name} holds {len(part)} rows of data.seq_len="
                                 f"{rows.seq_len}, fewer than the {process_count} processes")
        ds = grain.MapDataset.mix([source(p, i + 1) for i, p in enumerate(rows.parts)], rows.weights)
    else:
        ds = source(rows)
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
    # Rows are slices of memory-mapped shards: one reader thread a few batches ahead is plenty
    # (grain's default reads ~500 batches ahead: gigabytes for large batches).
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))
