"""Feature hashing and the slot layout of the processed dataset (pure functions, no Spark).

The hash (one definition, used by the Spark ETL and by Python scoring/tests)::

    h      = Spark xxhash64(field_index: int, feature_id: long)   # seed 42, chained as Spark does for 2 columns
    bucket = 1 + pmod(h, buckets[field] - 1)                     # 0 is reserved for missing / padding
    id     = offset[field] + bucket                               # global id into one embedding table

Spark computes it with ``F.xxhash64(F.lit(field_index).cast("int"), col.cast("long"))``; ``spark_hash_long`` below is
the same function in plain Python (and ``hash_ids`` a vectorized NumPy version). A test checks they agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from schemas.raw import ALL_FIELDS

_M = 0xFFFFFFFFFFFFFFFF
P1 = 0x9E3779B185EBCA87
P2 = 0xC2B2AE3D27D4EB4F
P3 = 0x165667B19E3779F9
P4 = 0x85EBCA77C2B2AE63
P5 = 0x27D4EB2F165667C5
SPARK_SEED = 42


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M


def _fmix(h: int) -> int:
    h ^= h >> 33
    h = (h * P2) & _M
    h ^= h >> 29
    h = (h * P3) & _M
    h ^= h >> 32
    return h


def xxh64_int(value: int, seed: int) -> int:
    """Spark's ``XXH64.hashInt`` (unsigned 64-bit result)."""
    h = (seed + P5 + 4) & _M
    h ^= ((value & 0xFFFFFFFF) * P1) & _M
    h = (_rotl(h, 23) * P2 + P3) & _M
    return _fmix(h)


def xxh64_long(value: int, seed: int) -> int:
    """Spark's ``XXH64.hashLong`` (unsigned 64-bit result)."""
    h = (seed + P5 + 8) & _M
    h ^= (_rotl((value * P2) & _M, 31) * P1) & _M
    h = (_rotl(h, 27) * P1 + P4) & _M
    return _fmix(h)


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def spark_hash_long(field_index: int, feature_id: int) -> int:
    """``xxhash64(int field_index, long feature_id)`` exactly as Spark returns it (signed long)."""
    return _signed(xxh64_long(feature_id & _M, xxh64_int(field_index, SPARK_SEED)))


def bucket_of(field_index: int, feature_id: int, buckets: int) -> int:
    """Bucket in ``[1, buckets)`` of one feature id (Spark's ``pmod`` of the signed hash)."""
    return 1 + spark_hash_long(field_index, feature_id) % (buckets - 1)


# ---------------------------------------------------------------------------------------- vectorized (NumPy)

def _np_rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def _np_fmix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(P2)
    h = h ^ (h >> np.uint64(29))
    h = h * np.uint64(P3)
    return h ^ (h >> np.uint64(32))


def hash_ids(field_index: int, feature_ids: np.ndarray, buckets: int) -> np.ndarray:
    """Vectorized ``bucket_of`` over an int64 array; returns int64 buckets in ``[1, buckets)``."""
    return _hash(np.uint64(xxh64_int(field_index, SPARK_SEED)), feature_ids, buckets)


_FIELD_SEEDS = np.array([xxh64_int(i, SPARK_SEED) for i in range(64)], np.uint64)


def hash_ids_fields(field_index: np.ndarray, feature_ids: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """``hash_ids`` with a field index and a bucket count per element (int64 buckets in ``[1, buckets)``)."""
    return _hash(_FIELD_SEEDS[field_index], feature_ids, buckets)


def _hash(seed, feature_ids: np.ndarray, buckets) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = np.asarray(feature_ids, dtype=np.int64).view(np.uint64)
        h = seed + np.uint64(P5) + np.uint64(8)
        h = h ^ (_np_rotl(x * np.uint64(P2), 31) * np.uint64(P1))
        h = _np_rotl(h, 27) * np.uint64(P1) + np.uint64(P4)
        signed = _np_fmix(h).view(np.int64)
    return 1 + np.mod(signed, buckets - 1)  # np.mod of a negative int gives a non-negative result, like pmod


# ------------------------------------------------------------------------------------------- slot layout

@dataclass(frozen=True)
class FeatureLayout:
    """Where each field lives in ``feat_ids``/``feat_wts`` and in the global id space.

    ``fields[i]`` occupies slots ``slot_start[i] : slot_start[i] + max_len[i]`` and ids
    ``offset[i] : offset[i] + buckets[i]``; ``num_embeddings`` is the size of one shared table.
    """
    fields: tuple
    buckets: tuple
    max_len: tuple

    @classmethod
    def from_config(cls, features_cfg) -> "FeatureLayout":
        return cls(fields=ALL_FIELDS, buckets=tuple(features_cfg.buckets[f] for f in ALL_FIELDS),
                   max_len=tuple(features_cfg.max_len[f] for f in ALL_FIELDS))

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    @property
    def offsets(self) -> tuple:
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.buckets)[:-1]]))

    @property
    def slot_starts(self) -> tuple:
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.max_len)[:-1]]))

    @property
    def num_slots(self) -> int:
        return int(sum(self.max_len))

    @property
    def num_embeddings(self) -> int:
        return int(sum(self.buckets))

    def field_index(self, field: str) -> int:
        return self.fields.index(field)

    def slot_field(self) -> np.ndarray:
        """(L,) field index of every slot."""
        return np.repeat(np.arange(self.num_fields), self.max_len)

    def global_id(self, field: str, feature_id: int) -> int:
        i = self.field_index(field)
        return self.offsets[i] + bucket_of(i, feature_id, self.buckets[i])

    def to_dict(self) -> dict:
        return {"fields": list(self.fields), "buckets": list(self.buckets), "max_len": list(self.max_len),
                "offsets": list(self.offsets), "slot_starts": list(self.slot_starts),
                "num_slots": self.num_slots, "num_embeddings": self.num_embeddings,
                "hash": "bucket = 1 + pmod(xxhash64(int field_index, long feature_id), buckets - 1); id = offset + bucket"}


def encode_line_features(layout: FeatureLayout, entries: list[tuple[str, int, float]]) -> tuple[list[int], list[float]]:
    """Plain-Python reference of the ETL's per-row encoding (used by tests and online scoring).

    ``entries`` are (field, feature_id, value) of one impression (skeleton + its common line). Per field: keep the
    top-``max_len`` entries by value (ties: smaller feature_id first), weights = value / sum(kept values) for
    multi-slot fields (1.0 for single-slot fields; all-zero values get equal weights), pad with (offset, 0.0);
    a field with no entry gets (offset, 1.0) in its first slot. Unknown fields are ignored.
    """
    ids: list[int] = []
    wts: list[float] = []
    offsets = layout.offsets
    for i, f in enumerate(layout.fields):
        k = layout.max_len[i]
        vals = sorted(((v, fid) for (fld, fid, v) in entries if fld == f), key=lambda t: (-t[0], t[1]))[:k]
        if not vals:
            ids += [offsets[i]] + [offsets[i]] * (k - 1)
            wts += [1.0] + [0.0] * (k - 1)
            continue
        b = [offsets[i] + bucket_of(i, fid, layout.buckets[i]) for (_, fid) in vals]
        if k == 1:
            w = [1.0]
        else:
            total = sum(v for v, _ in vals)
            w = [v / total for v, _ in vals] if total > 0 else [1.0 / len(vals)] * len(vals)
        ids += b + [offsets[i]] * (k - len(b))
        wts += w + [0.0] * (k - len(b))
    return ids, wts
