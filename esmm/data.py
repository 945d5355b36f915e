"""Parquet -> training batches: a Petastorm reader per Horovod rank, a seeded shuffle buffer, typed ``Batch``es.

Sharding and epochs (what one "epoch" means across ranks):
- rank r of W reads the row groups ``r, r+W, r+2W, ...`` of the chosen subset (``cur_shard``/``shard_count``; the
  subset at sampling rate ``rates[t]`` is the partition filter ``sample_tier <= t``), in an order shuffled with a
  seed, cycling forever (pass p reads all of them in an order seeded by (seed, rank, p));
- every rank runs the same ``steps_per_epoch = ceil(rows / (batch_size * W))`` steps (rows from the ETL manifest),
  so uneven shards never leave one rank waiting in an allreduce;
- one epoch therefore processes ``steps * batch_size * W >= rows`` samples; with balanced shards each row is seen
  once per epoch, plus a few wrapped-around rows to fill the last step. A rank whose shard is larger than its share
  carries the rest into the next epoch (nothing is skipped: the stream continues).
A rank without data (more workers than row groups in the subset, or only empty row groups) is a ``DataError`` at
its first batch; ``esmm.train`` reads every rank's first batch before training and stops all ranks with the causes.
The stream is deterministic for a given seed, rank and world size when ``reader_workers == 1`` (Petastorm's thread
pool returns row groups in completion order when it has more than one worker), which is also what makes resuming
exact: a restarted run replays the stream and skips the batches it had already trained on.

Prefetch (``train.prefetch``): the whole stream (Petastorm's Arrow -> numpy conversion, the shuffle buffer, the
``Batch`` gather) runs in a background thread that keeps up to that many batches ready, so the training thread only
trains; the batches and their order are the same as without it (``Prefetch`` only moves where they are made).

Validation (``esmm.validation``): with a cut, every chunk drops its rows with ``sample_id >= cut`` (a vectorized mask
as the row group arrives, at every tier), so the validation part never reaches a training batch; ``rows`` is then
the subset's rows before the cut (``esmm.validation.train_rows``). Without a cut the stream is unchanged.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import warnings
from typing import Iterator

import numpy as np

import schemas as S
from esmm.batch import Batch

log = logging.getLogger(__name__)
READ_COLUMNS = [S.SAMPLE_ID, S.CLICK, S.CONVERSION, S.FEAT_IDS, S.FEAT_WTS]


class DataError(RuntimeError):
    """The dataset cannot be read as asked (missing split, empty shard, unknown rate)."""


def dataset_url(path: str) -> str:
    """The canonical URL Petastorm opens (``esmm.storage.resolve``; ``s3a://`` spelled ``s3://`` for pyarrow)."""
    from esmm import storage
    u = storage.resolve(path)
    return "s3://" + u[len("s3a://"):] if u.startswith("s3a://") else u


def tier_for_rate(manifest: dict, rate: float) -> int:
    rates = manifest["sampling_rates"]
    if rate not in rates:
        raise DataError(f"sampling rate {rate} is not one of the dataset's rates {rates}")
    return rates.index(rate)


def subset_rows(manifest: dict, split: str, rate: float) -> int:
    return int(manifest["splits"][split]["subsets"][str(rate)]["rows"])


def steps_per_epoch(rows: int, batch_size: int, world: int) -> int:
    return max(1, math.ceil(rows / (batch_size * world)))


class _ColumnResults:
    """Petastorm's batch results as numpy arrays, list columns reshaped from their flat values in one step.

    Petastorm's own ``ArrowReaderWorkerResultsQueueReader`` turns a list column into an object array of per-row
    arrays (``to_pandas``) and stacks them (``np.vstack``): per-row Python that holds the GIL for about 5 ms per row
    group of 4k rows x 57 slots, taken from the training thread. Here a list column is its flat values reshaped to
    (rows, width), after checking every row has the same width. It replaces the reader's ``_results_queue_reader``
    (petastorm 0.12.1, pinned), so the arrays, dtypes and order are the ones Petastorm gives (tested)."""

    batched_output = True

    def read_next(self, workers_pool, schema, ngram):
        import pyarrow as pa
        import pyarrow.compute as pc
        from petastorm.workers_pool import EmptyResultError
        try:
            table = workers_pool.get_results()
        except EmptyResultError:
            raise StopIteration from None
        out = {}
        for name in table.column_names:
            col = table.column(name)
            arr = col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
            if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
                widths = pc.list_value_length(arr)
                lo, hi = pc.min_max(widths).values() if len(arr) else (None, None)
                if arr.null_count or (lo is not None and lo.as_py() != hi.as_py()):
                    raise DataError(f"column {name!r}: every row must hold a list of one width (widths "
                                    f"{lo} to {hi}, {arr.null_count} null rows)")
                width = lo.as_py() if lo is not None else 0
                out[name] = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), width)
            else:
                out[name] = arr.to_numpy(zero_copy_only=False)
        return schema.make_namedtuple(**out)


def _fast_columns(reader):
    """``reader`` with ``_ColumnResults`` in place of Petastorm's per-row list conversion (kept if the attribute
    ever moves)."""
    if hasattr(reader, "_results_queue_reader"):
        reader._results_queue_reader = _ColumnResults()
    return reader


def _chunks(path: str, tier: int | None, rank: int, world: int, seed: int, workers: int,
            num_epochs: int | None, cut: int | None = None) -> Iterator[dict]:
    """Row-group-sized numpy chunks of this rank's shard, as dicts of column arrays; with ``cut``, only the rows with
    ``sample_id < cut`` (the validation rows, at and after the cut, are dropped)."""
    from petastorm import make_batch_reader
    from petastorm.errors import NoDataAvailableError
    filters = [(S.SAMPLE_TIER, "<=", tier)] if tier is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            reader = make_batch_reader(dataset_url(path), schema_fields=READ_COLUMNS, filters=filters,
                                       cur_shard=rank if world > 1 else None, shard_count=world if world > 1 else None,
                                       shuffle_row_groups=True, seed=seed, num_epochs=num_epochs,
                                       workers_count=workers, reader_pool_type="thread")
            _fast_columns(reader)
        except NoDataAvailableError as e:
            raise DataError(f"rank {rank}/{world} has no row groups of {path} (tier <= {tier}): the subset has fewer "
                            f"row groups than workers; lower etl.row_group_mb or use fewer workers ({e})") from e
    with reader:
        for chunk in reader:
            cols = {c: getattr(chunk, c) for c in READ_COLUMNS}
            if cut is not None:
                keep = cols[S.SAMPLE_ID] < cut
                if not keep.all():
                    cols = {c: v[keep] for c, v in cols.items()}
            yield cols


def _to_batch(cols: dict, idx: np.ndarray | slice) -> Batch:
    return Batch.from_numpy(np.ascontiguousarray(cols[S.FEAT_IDS][idx], dtype=np.int64),
                            np.ascontiguousarray(cols[S.FEAT_WTS][idx], dtype=np.float32),
                            cols[S.CLICK][idx].astype(np.float32), cols[S.CONVERSION][idx].astype(np.float32),
                            sample_id=np.ascontiguousarray(cols[S.SAMPLE_ID][idx]))


def shuffled_batches(chunks: Iterator[dict], batch_size: int, buffer_rows: int, seed: int) -> Iterator[Batch]:
    """Re-batch chunks to ``batch_size`` through a shuffle buffer (vectorized; no per-row Python).

    Rows accumulate in a pool; once it holds ``buffer_rows + batch_size`` rows, it is permuted and every full batch
    beyond ``buffer_rows`` rows is emitted, the rest stays to mix with the next chunks. ``buffer_rows=0`` keeps the
    reader's order. At the end the pool drains in full batches, then one short batch.
    """
    rng = np.random.default_rng(seed)
    pool: dict | None = None
    for chunk in chunks:
        pool = chunk if pool is None else {k: np.concatenate([pool[k], chunk[k]]) for k in chunk}
        n = len(pool[S.SAMPLE_ID])
        if n < buffer_rows + batch_size:
            continue
        order = rng.permutation(n) if buffer_rows > 0 else np.arange(n)
        k = (n - buffer_rows) // batch_size
        for b in range(k):
            yield _to_batch(pool, order[b * batch_size:(b + 1) * batch_size])
        rest = order[k * batch_size:]
        pool = {c: v[rest] for c, v in pool.items()}
    if pool is not None and len(pool[S.SAMPLE_ID]):
        n = len(pool[S.SAMPLE_ID])
        order = rng.permutation(n) if buffer_rows > 0 else np.arange(n)
        for b in range(0, n, batch_size):
            yield _to_batch(pool, order[b:b + batch_size])


def _passes(path: str, tier: int, rank: int, world: int, seed: int, workers: int,
            cut: int | None = None, pin: tuple | None = None) -> Iterator[dict]:
    """Endless chunks: one full pass over the shard after another, each pass with its own seeded order.
    (Petastorm's own ``num_epochs=None`` reshuffles with an unseeded RNG after the first pass.) ``pin``:
    (dataset, committed run id): every pass first checks that the dataset is still that run
    (``esmm.outputs.check_pinned``), so an ETL ``--overwrite`` during training stops it instead of mixing datasets."""
    p = 0
    while True:
        if pin is not None:
            from esmm.outputs import check_pinned
            check_pinned(pin[0], pin[1], "training")
        rows = 0
        for chunk in _chunks(path, tier, rank, world, seed=(seed * 1000 + rank) * 1000 + p, workers=workers,
                             num_epochs=1, cut=cut):
            rows += len(chunk[S.SAMPLE_ID])
            yield chunk
        if rows == 0:  # without this an empty shard would loop here forever
            where = f"tier <= {tier}" + (f", sample_id < {cut}: the rest is validation" if cut is not None else "")
            raise DataError(f"rank {rank}/{world} read no rows from {path} ({where}): its row groups are "
                            f"empty; use fewer workers or rebuild the dataset")
        p += 1


class Prefetch:
    """Iterate ``source`` in a background thread, up to ``depth`` items ahead of the consumer.

    The items and their order are the source's; an exception the source raises (a ``DataError``, a pinned dataset
    that changed) is raised by the consumer's ``next`` at the same position, and the stream ends there. ``close()``
    stops the thread and closes the source in that thread (a generator cannot be closed from another thread while
    it runs). The thread is a daemon, so a consumer that dies without closing never holds the process open.
    """

    _POLL_S = 0.05

    def __init__(self, source: Iterator, depth: int, name: str = "esmm-prefetch"):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for item in self._source:
                if not self._put((True, item)):
                    return
            self._put((False, None))
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
            self._put((False, e))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=self._POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetch":
        return self

    def __next__(self):
        if self._ended:
            raise StopIteration
        ok, item = self._queue.get()
        if ok:
            return item
        self._ended = True
        if item is None:
            raise StopIteration
        raise item

    def close(self) -> None:
        self._ended = True
        self._stop.set()
        self._thread.join()


def train_stream(path: str, manifest: dict, rate: float, rank: int, world: int, batch_size: int,
                 buffer_rows: int, seed: int, reader_workers: int = 1, cut: int | None = None,
                 pin: tuple | None = None, prefetch: int = 0) -> Iterator[Batch]:
    """Endless stream of this rank's training batches (see module docs for the epoch contract); with ``cut``, rows
    with ``sample_id >= cut`` (the validation part) are left out; with ``prefetch`` > 0 they are made in a background
    thread, that many ahead (``Prefetch``). Close it (``.close()``) when done so the reader threads stop."""
    tier = tier_for_rate(manifest, rate)
    chunks = _passes(path, tier, rank, world, seed, reader_workers, cut, pin)
    batches = shuffled_batches(chunks, batch_size, buffer_rows, seed=seed * 1000 + rank)
    return Prefetch(batches, prefetch) if prefetch > 0 else batches


def scan(path: str, batch_size: int, tier: int | None = None, rank: int = 0, world: int = 1) -> Iterator[Batch]:
    """One ordered pass over a split (no shuffling), for scoring and tests."""
    from petastorm import make_batch_reader
    filters = [(S.SAMPLE_TIER, "<=", tier)] if tier is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reader = make_batch_reader(dataset_url(path), schema_fields=READ_COLUMNS, filters=filters,
                                   cur_shard=rank if world > 1 else None, shard_count=world if world > 1 else None,
                                   shuffle_row_groups=False, num_epochs=1, workers_count=1)
    _fast_columns(reader)
    with reader:
        chunks = ({c: getattr(ch, c) for c in READ_COLUMNS} for ch in reader)
        yield from shuffled_batches(chunks, batch_size, 0, 0)
