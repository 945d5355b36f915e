"""The typed contract between the data reader and the model: one mini-batch of impressions as tensors.

Shapes use one legend: B = batch (impressions), L = slots per impression (``FeatureLayout.num_slots``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch


def _tensor(a, dtype: np.dtype) -> torch.Tensor:
    """NumPy -> torch, sharing memory when ``a`` already has ``dtype``, is contiguous and writable."""
    a = np.asarray(a)
    if a.dtype == object:  # e.g. a column of per-row arrays; stack into one 2-D block
        a = np.stack(a)
    a = np.ascontiguousarray(a, dtype=dtype)
    if not a.flags.writeable:  # torch.from_numpy on read-only memory (Arrow buffers) is undefined behaviour
        a = a.copy()
    return torch.from_numpy(a)


@dataclass
class Batch:
    """One mini-batch.

    ids:        (B, L) int64   global hashed ids (field offset + bucket), slot ranges per field
    wts:        (B, L) float32 pooling weights (0 for padding slots)
    click:      (B,)   float32 0/1
    conversion: (B,)   float32 0/1 (conversion=1 implies click=1)
    weight:     (B,)   float32 per-sample loss weights; ones when not given
    sample_id:  (B,)   int64   optional, increasing in time
    """
    ids: torch.Tensor
    wts: torch.Tensor
    click: torch.Tensor
    conversion: torch.Tensor
    weight: Optional[torch.Tensor] = None
    sample_id: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.weight is None:
            self.weight = torch.ones(self.ids.shape[0], dtype=torch.float32, device=self.ids.device)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def from_numpy(cls, ids, wts, click, conversion, sample_id=None) -> "Batch":
        """Build from NumPy arrays: ids (B, L) int, wts (B, L) float, click/conversion (B,) 0/1, sample_id (B,).

        Zero-copy for int64 ``ids``/``sample_id`` and float32 ``wts`` (contiguous, writable); other dtypes are
        converted. click/conversion become float32 labels.
        """
        return cls(ids=_tensor(ids, np.int64), wts=_tensor(wts, np.float32),
                   click=_tensor(click, np.float32), conversion=_tensor(conversion, np.float32),
                   sample_id=None if sample_id is None else _tensor(sample_id, np.int64))

    def _map(self, fn) -> "Batch":
        return Batch(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                        for f in dataclasses.fields(self)})

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """A copy of the batch on ``device`` (tensors already there are not copied)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def select(self, rows: torch.Tensor) -> "Batch":
        """Rows by a (B,) bool mask or an int64 index (which may repeat rows); a new Batch."""
        return self._map(lambda t: t[rows])

    def replace(self, **changes) -> "Batch":
        """A copy with some fields replaced, e.g. ``batch.replace(weight=w)``."""
        return dataclasses.replace(self, **changes)

    @staticmethod
    def cat(batches: Sequence["Batch"]) -> "Batch":
        """Concatenate along the batch dimension; ``sample_id`` is kept only when every batch has one."""
        if not batches:
            raise ValueError("Batch.cat needs at least one batch")
        out = {}
        for f in dataclasses.fields(Batch):
            parts = [getattr(b, f.name) for b in batches]
            out[f.name] = None if any(p is None for p in parts) else torch.cat(parts)
        return Batch(**out)
