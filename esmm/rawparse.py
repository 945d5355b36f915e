"""Vectorized parsing, validation and encoding of raw Ali-CCP lines (Arrow compute + NumPy, no per-line Python).

The ETL's default parser (``etl.parser: arrow``) runs this on Arrow batches of raw lines inside Spark
(``mapInArrow``): every step is a columnar kernel over a whole chunk of lines, Python only touches the rare bad line
(to format its quarantine reason). It is faster than Spark-native expressions here because parsing a
``feature_list`` needs a per-entry lambda in Spark SQL, and higher-order functions are interpreted; see
``bench/RESULTS.md`` (ETL) for the A/B measurement. ``etl.parser: native`` keeps the pure Spark SQL path.

What a chunk goes through (the output has one row per input line, a ``reason`` for each bad one):

0. whole lines: a line over ``etl.max_line_bytes`` (its length comes from the JVM, which already cut it to its
   first max_line_bytes bytes), then invalid UTF-8: one ``validate(full=True)`` per chunk, bisected down to the bad
   lines only when it fails; such lines are blanked so no later kernel (or ``as_py``) sees their bytes;
1. columns: ``count_substring(",")`` checks the column count, ``split_pattern`` splits the line;
2. numbers: one ``cast`` per column; when a chunk holds a bad number the cast is retried behind a regex mask, so the
   bad value becomes "not an integer" for its line only (integers: ``-?[0-9]{1,18}``; values: decimal or
   scientific, finite);
3. entries: ``split_pattern("\\x01")`` then one anchored regex per entry (``field^Bid^Cvalue``), ``index_in`` for
   the field's slot-order index (an unknown field is not encoded, like in the native parser, but returned
   per line in ``unknown`` so the manifest counts it);
4. encoding: one ``lexsort`` by (line, field, -value, id) puts every field's top-K first, ranks come from the group
   starts, ids are hashed with ``esmm.features.hash_ids_fields`` (Spark's xxhash64, bit-identical), weights are
   value / sum(kept values) in float64 then float32, exactly as ``encode_line_features`` computes them;
5. the user key (common lines): the full signed 64-bit hash of the first field-101 entry in that order
   (``user_keys``), ``schemas.dataset.UNKNOWN_USER`` for a line without one.

Reasons are worded exactly like the native parser's, so the two parsers produce the same quarantine.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import schemas as S
from esmm.features import P1, P2, P4, P5, _FIELD_SEEDS, _np_fmix, _np_rotl, FeatureLayout, hash_ids_fields

INT_RE = r"^-?[0-9]{1,18}$"
FLOAT_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
ENTRY_RE = f"^(?P<f>[^{S.ID_SEP}{S.VALUE_SEP}]*){S.ID_SEP}(?P<i>[^{S.ID_SEP}{S.VALUE_SEP}]*)" \
           f"{S.VALUE_SEP}(?P<v>[^{S.ID_SEP}{S.VALUE_SEP}]*)$"
CHUNK_BYTES = 8 << 20  # lines per chunk: about this much text (bounds the chunk's intermediate arrays)
_FIELDS = pa.array(S.ALL_FIELDS)


def _q(text) -> str:
    """A raw value quoted for a reason, with the entry separators shown as ^B / ^C (as in the native parser)."""
    return "'" + ("" if text is None else str(text).replace(S.ID_SEP, "^B").replace(S.VALUE_SEP, "^C")) + "'"


# ------------------------------------------------------------------------------------------------ numbers

def to_int64(s: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (int64 values, valid mask). Valid: ``-?[0-9]{1,18}``; invalid entries get 0.

    Fast path: one Arrow cast of the whole array, taken only where that cast cannot accept more than the grammar:
    every string at most 18 bytes (19-byte negatives go the regex way) and none starting with ``0x``/``0X``, the hex
    that Arrow's integer parser also reads. Otherwise a chunk's '0x1f' or 19-digit id would be valid or not
    depending on the other ids in the chunk.
    """
    short = pc.less_equal(pc.binary_length(s), 18)
    if pc.all(short).as_py() is not False and not any(pc.any(pc.starts_with(s, p)).as_py() for p in ("0x", "0X")):
        try:
            return pc.cast(s, pa.int64()).to_numpy(zero_copy_only=False), np.ones(len(s), bool)
        except pa.ArrowInvalid:
            pass
    ok = pc.fill_null(pc.match_substring_regex(s, INT_RE), False)
    vals = pc.cast(pc.if_else(ok, s, pa.scalar("0")), pa.int64())
    return vals.to_numpy(zero_copy_only=False), ok.to_numpy(zero_copy_only=False)


def to_float64(s: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (float64 values, valid mask). Valid: a finite decimal or scientific literal; invalid get 0."""
    try:
        v = pc.cast(s, pa.float64()).to_numpy(zero_copy_only=False)
        ok = np.isfinite(v)
        if ok.all():
            return v, ok
    except pa.ArrowInvalid:
        pass
    ok = pc.fill_null(pc.match_substring_regex(s, FLOAT_RE), False)
    v = pc.cast(pc.if_else(ok, s, pa.scalar("0")), pa.float64()).to_numpy(zero_copy_only=False)
    ok = ok.to_numpy(zero_copy_only=False) & np.isfinite(v)
    return np.where(ok, v, 0.0), ok


# ----------------------------------------------------------------------------------------------- encoding

def hash64(field_index: int, feature_ids: np.ndarray) -> np.ndarray:
    """Spark's ``xxhash64(int field_index, long id)`` as a signed int64 array (``esmm.features.spark_hash_long``,
    vectorized): the hash ``hash_ids_fields`` reduces to a bucket, kept whole."""
    with np.errstate(over="ignore"):
        x = np.asarray(feature_ids, dtype=np.int64).view(np.uint64)
        h = _FIELD_SEEDS[field_index] + np.uint64(P5) + np.uint64(8)
        h = h ^ (_np_rotl(x * np.uint64(P2), 31) * np.uint64(P1))
        h = _np_rotl(h, 27) * np.uint64(P1) + np.uint64(P4)
        return _np_fmix(h).view(np.int64)


def user_keys(n: int, line: np.ndarray, field: np.ndarray, fid: np.ndarray, val: np.ndarray,
              user_field: int) -> np.ndarray:
    """Per line (``n`` lines): ``hash64(user_field, id)`` of its first ``user_field`` entry in the encoding's order
    (value descending, then smallest id), or ``schemas.dataset.UNKNOWN_USER`` when it has none. Only the user
    field's entries are sorted (one per line in Ali-CCP)."""
    out = np.full(n, S.UNKNOWN_USER, np.int64)
    sel = np.flatnonzero(field == user_field)
    if len(sel):
        line, fid, val = line[sel], fid[sel], val[sel]
        order = np.lexsort((fid, -val, line))
        line, fid = line[order], fid[order]
        first = np.r_[True, line[1:] != line[:-1]]
        out[line[first]] = hash64(user_field, fid[first])
    return out

def sort_order(group: np.ndarray, val: np.ndarray, fid: np.ndarray) -> np.ndarray:
    """The permutation sorting entries by (group ascending, val descending, fid ascending).

    Same result as ``np.lexsort((fid, -val, group))`` but 5-10x faster: two stable single-key argsorts of packed
    int64 keys, (group, value rank) and then (run of equal keys, fid), instead of three indirect passes. Falls back
    to lexsort where a key does not fit its bits (ids outside [0, 2^40), absurd group counts).
    """
    if len(group) == 0:
        return np.zeros(0, np.int64)
    if val.min() >= 0 and val.max() < 1 << 21 and np.array_equal(val, np.floor(val)):
        bits, vkey = 21, (1 << 21) - 1 - val.astype(np.int64)            # counts: the value itself is the rank
    else:
        uniq, vkey = np.unique(-val, return_inverse=True)
        bits = max(1, len(uniq).bit_length())
    if group.min() < 0 or group.max() >= 1 << (62 - bits):
        return np.lexsort((fid, -val, group))
    k2 = (group << bits) | vkey
    o1 = np.argsort(k2, kind="stable")
    k2s = k2[o1]
    run = np.cumsum(np.r_[True, k2s[1:] != k2s[:-1]]) - 1
    f = fid[o1]
    if f.min() >= 0 and f.max() < 1 << 40 and run[-1] < 1 << 22:
        o2 = np.argsort((run << 40) | f, kind="stable")
    else:
        o2 = np.lexsort((f, run))
    return o1[o2]


class SideEncoder:
    """Encodes the entries of one line kind (skeleton or common) into that side's fixed slots.

    The side's slots are the contiguous run of the layout's slots that its fields occupy (COMMON_FIELDS come first
    in the slot order, SKELETON_FIELDS after), so ``concat(common slots, skeleton slots)`` is the full row.
    """

    def __init__(self, layout: FeatureLayout, fields: tuple):
        idx = [layout.field_index(f) for f in fields]
        assert idx == list(range(idx[0], idx[0] + len(idx))), "a side's fields must be contiguous in slot order"
        nf = layout.num_fields
        self.width = int(sum(layout.max_len[i] for i in idx))
        base = layout.slot_starts[idx[0]]
        self.on_side = np.zeros(nf, bool)
        self.on_side[idx] = True
        self.slot = np.array([layout.slot_starts[i] - base for i in range(nf)], np.int64)
        self.k = np.array(layout.max_len, np.int64)
        self.offset = np.array(layout.offsets, np.int64)
        self.buckets = np.array(layout.buckets, np.int64)
        self.default_ids = np.concatenate([np.full(layout.max_len[i], layout.offsets[i], np.int32) for i in idx])
        self.default_wts = np.concatenate([np.r_[1.0, np.zeros(layout.max_len[i] - 1)] for i in idx]).astype(np.float32)
        # the side that holds the user id (field 101) also gives each line its user key
        self.user_field = layout.field_index(S.USER_FIELD) if S.USER_FIELD in fields else None

    def encode(self, n: int, line: np.ndarray, field: np.ndarray, fid: np.ndarray,
               val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Entries (line index in [0, n), field index, feature id, value) -> ids (n, width) int32, wts float32."""
        ids = np.tile(self.default_ids, (n, 1))
        wts = np.tile(self.default_wts, (n, 1))
        keep = self.on_side[field]
        if not keep.all():                              # entries of the other side's fields are ignored
            line, field, fid, val = line[keep], field[keep], fid[keep], val[keep]
        if len(line) == 0:
            return ids, wts
        group = line.astype(np.int64) * len(self.k) + field
        order = sort_order(group, val, fid)             # per (line, field): value descending, then smaller id first
        group, field, fid, val, line = group[order], field[order], fid[order], val[order], line[order]
        start = np.r_[True, group[1:] != group[:-1]]
        pos = np.arange(len(group))
        rank = pos - np.maximum.accumulate(np.where(start, pos, 0))
        keep = rank < self.k[field]
        group_no = np.cumsum(start)[keep] - 1
        line, field, fid, val, rank = line[keep], field[keep], fid[keep], val[keep], rank[keep]
        cell = line.astype(np.int64) * self.width + self.slot[field] + rank
        ids.ravel()[cell] = (self.offset[field] + hash_ids_fields(field, fid, self.buckets[field])).astype(np.int32)
        total = np.bincount(group_no, weights=val)[group_no]
        count = np.bincount(group_no)[group_no]
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(total > 0, val / total, 1.0 / count)
        wts.ravel()[cell] = np.where(self.k[field] == 1, 1.0, w).astype(np.float32)
        return ids, wts


# ------------------------------------------------------------------------------------------------ parsing

def too_long(nbytes: int, max_line_bytes: int) -> str:
    return f"line is {nbytes} bytes, over etl.max_line_bytes={max_line_bytes} (only its first {max_line_bytes} kept)"


def utf8_reason(raw: bytes, columns: tuple) -> str:
    """Where the first invalid UTF-8 sequence of ``raw`` starts: byte offset, and the column (or feature_list entry)."""
    try:
        raw.decode("utf-8")
        return None
    except UnicodeDecodeError as e:
        at = e.start
    prefix = raw[:at]
    col = prefix.count(S.COL_SEP.encode()) + 1
    if col == len(columns):
        where = f"feature_list entry {prefix.rsplit(S.COL_SEP.encode(), 1)[-1].count(S.ENTRY_SEP.encode()) + 1}"
    elif col < len(columns):
        where = columns[col - 1]
    else:
        where = f"column {col}"
    return f"invalid UTF-8 at byte offset {at} ({where})"


def invalid_utf8(lines: pa.Array) -> np.ndarray:
    """Indices of the lines that are not valid UTF-8: one C++ validation of the whole chunk, bisected on failure."""
    def ok(lo: int, hi: int) -> bool:
        try:
            lines.slice(lo, hi - lo).validate(full=True)
            return True
        except pa.ArrowInvalid:
            return False

    bad, todo = [], [(0, len(lines))] if len(lines) else []
    while todo:
        lo, hi = todo.pop()
        if ok(lo, hi):
            continue
        if hi - lo == 1:
            bad.append(lo)
        else:
            mid = (lo + hi) // 2
            todo += [(mid, hi), (lo, mid)]
    return np.array(sorted(bad), np.int64)


def _whole_lines(lines: pa.Array, nbytes, max_line_bytes, columns: tuple, reasons: "_Reasons") -> pa.Array:
    """Over-long lines, then invalid UTF-8; returns ``lines`` with those lines blanked (later checks skip them)."""
    if nbytes is None:
        nbytes = pc.binary_length(lines).to_numpy(zero_copy_only=False)
    if max_line_bytes is not None:
        reasons.add(nbytes > max_line_bytes, lambda i: too_long(int(nbytes[i]), max_line_bytes))
    bad = invalid_utf8(lines)
    if len(bad):
        raw = lines.view(pa.binary()) if pa.types.is_string(lines.type) else lines.view(pa.large_binary())
        mask = np.zeros(len(lines), bool)
        mask[bad] = True
        reasons.add(mask, lambda i: utf8_reason(raw[i].as_py(), columns))
    if reasons.bad.any():
        lines = pc.if_else(pa.array(~reasons.bad), lines, pa.scalar("", lines.type))
    return lines


class _Reasons:
    """Per-line reasons; the first one assigned to a line wins (the checks run in the native parser's order)."""

    def __init__(self, n: int):
        self.text = np.full(n, None, object)
        self.bad = np.zeros(n, bool)

    def add(self, mask: np.ndarray, make) -> None:
        new = mask & ~self.bad
        for i in np.flatnonzero(new):
            self.text[i] = make(int(i))
        self.bad |= new


def _entries(fl: pa.Array, lines: np.ndarray, n_ent: np.ndarray, reasons: _Reasons, encoder: SideEncoder,
             n: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse the feature lists ``fl`` of ``lines`` (``n_ent`` >= 1 entries each), flag bad entries, encode."""
    lists = pc.split_pattern(fl, S.ENTRY_SEP)
    flat = lists.values
    line = np.repeat(lines, n_ent)
    parts = pc.extract_regex(flat, ENTRY_RE)
    shaped = parts.is_valid().to_numpy(zero_copy_only=False)
    f_idx = pc.index_in(parts.field("f"), value_set=_FIELDS)
    fid, id_ok = to_int64(pc.fill_null(parts.field("i"), ""))
    val, val_ok = to_float64(pc.fill_null(parts.field("v"), ""))
    ok = shaped & id_ok & val_ok
    if not ok.all():
        first_entry = np.repeat(lists.offsets.to_numpy()[:-1], n_ent)
        bad_at = np.flatnonzero(~ok)
        lines_bad, first = np.unique(line[bad_at], return_index=True)
        bad_entry = dict(zip(lines_bad.tolist(), bad_at[first].tolist()))
        mask = np.zeros(n, bool)
        mask[lines_bad] = True
        reasons.add(mask, lambda i: (
            f"feature_list entry {bad_entry[i] - first_entry[bad_entry[i]] + 1}: expected 'field^Bid^Cvalue' "
            f"with integer id and numeric value, got {_q(flat[bad_entry[i]].as_py())}"))
    known = f_idx.is_valid().to_numpy(zero_copy_only=False)
    use = ~reasons.bad[line] & known
    field = f_idx.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    ids, wts = encoder.encode(n, line[use], field[use], fid[use], val[use])
    users = None if encoder.user_field is None else \
        user_keys(n, line[use], field[use], fid[use], val[use], encoder.user_field)
    return ids, wts, _unknown(n, line, ~reasons.bad[line] & ~known, parts.field("f")), users


def _unknown(n: int, line: np.ndarray, mask: np.ndarray, names: pa.Array) -> pa.Array:
    """Per line: the field names of its entries with an unknown field (null when none), for the manifest."""
    if not mask.any():
        return pa.nulls(n, pa.list_(pa.string()))
    count = np.bincount(line[mask], minlength=n)
    offsets = np.r_[0, np.cumsum(count)].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, mask=np.r_[count == 0, False]), names.filter(pa.array(mask)))


def _feature_lists(fl: pa.Array, rows: np.ndarray, num: np.ndarray, num_ok: np.ndarray, reasons: _Reasons,
                   encoder: SideEncoder, n: int) -> tuple[np.ndarray, np.ndarray]:
    """feature_num check, then the entries of the lines still good; ``fl`` holds the feature lists of ``rows``.

    Returns the side's ids/wts for all ``n`` lines (defaults for lines that are bad or have no entries), each
    line's unknown field names (``_unknown``) and, on the side holding field 101, each line's user key (else None).
    """
    length = pc.binary_length(fl).to_numpy(zero_copy_only=False)
    n_ent = np.where(length == 0, 0, pc.count_substring(fl, S.ENTRY_SEP).to_numpy(zero_copy_only=False) + 1)
    count = _spread(n, rows, n_ent)
    reasons.add(num_ok & (num != count), lambda i: f"feature_num={num[i]} but feature_list has {count[i]} entries")
    sel = np.flatnonzero(~reasons.bad[rows] & (n_ent > 0))
    if len(sel) == 0:
        empty = np.zeros(0, np.int64)
        users = None if encoder.user_field is None else np.full(n, S.UNKNOWN_USER, np.int64)
        return (*encoder.encode(n, empty, empty, empty, np.zeros(0)), pa.nulls(n, pa.list_(pa.string())), users)
    return _entries(fl.take(pa.array(sel)) if len(sel) < len(fl) else fl, rows[sel], n_ent[sel], reasons,
                    encoder, n)


class _Columns:
    """The comma-split columns of the lines that have the right column count (``rows``, ascending)."""

    def __init__(self, lines: pa.Array, ncols: int, reasons: _Reasons):
        self.n = len(lines)
        commas = pc.count_substring(lines, S.COL_SEP).to_numpy(zero_copy_only=False)
        reasons.add(commas != ncols - 1, lambda i: f"expected {ncols} comma-separated columns, got {commas[i] + 1}")
        self.rows = np.flatnonzero(~reasons.bad)
        shaped = lines if len(self.rows) == self.n else lines.take(pa.array(self.rows))
        parts = pc.split_pattern(shaped, S.COL_SEP)
        self._values, self._starts = parts.values, parts.offsets.to_numpy()[:-1]

    def get(self, j: int) -> pa.Array:
        """Column ``j`` of ``rows``."""
        return self._values.take(pa.array(self._starts + j))

    def text(self, col: pa.Array):
        """Line index -> the raw text of ``col`` on that line (for reasons)."""
        return lambda i: col[int(np.searchsorted(self.rows, i))].as_py()

    def full(self, col: pa.Array) -> pa.Array:
        """``col`` for every line: null on the lines with a wrong column count."""
        if len(self.rows) == self.n:
            return col
        at = np.full(self.n, -1)
        at[self.rows] = np.arange(len(self.rows))
        return col.take(pa.array(at, mask=at < 0))

    def ints(self, col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        v, ok = to_int64(col)
        return _spread(self.n, self.rows, v), _spread(self.n, self.rows, ok, True)


def _spread(n: int, rows: np.ndarray, values: np.ndarray, fill=0) -> np.ndarray:
    if len(rows) == n:
        return values
    out = np.full(n, fill, values.dtype)
    out[rows] = values
    return out


def parse_skeleton(lines: pa.Array, encoder: SideEncoder, nbytes: np.ndarray | None = None,
                   max_line_bytes: int | None = None) -> dict:
    """Skeleton lines -> columns (NumPy / Arrow) for every line; ``reason`` is None for a good line.

    ``nbytes``: each line's length in the file (defaults to its length here; longer when the JVM cut it short).
    """
    n = len(lines)
    reasons = _Reasons(n)
    lines = _whole_lines(lines, nbytes, max_line_bytes, S.SKELETON_COLUMNS, reasons)
    c = _Columns(lines, len(S.SKELETON_COLUMNS), reasons)
    raw = [c.get(j) for j in range(len(S.SKELETON_COLUMNS))]
    (sid, sid_ok), (clk, clk_ok), (conv, conv_ok), (num, num_ok) = (c.ints(raw[j]) for j in (0, 1, 2, 4))
    reasons.add(~sid_ok, lambda i: f"sample_id: not an integer: {_q(c.text(raw[0])(i))}")
    reasons.add(~clk_ok | ((clk != 0) & (clk != 1)), lambda i: f"click: expected 0 or 1, got {_q(c.text(raw[1])(i))}")
    reasons.add(~conv_ok | ((conv != 0) & (conv != 1)),
                lambda i: f"conversion: expected 0 or 1, got {_q(c.text(raw[2])(i))}")
    reasons.add((clk == 0) & (conv == 1), lambda i: "conversion=1 with click=0")
    reasons.add(~num_ok, lambda i: f"feature_num: not an integer: {_q(c.text(raw[4])(i))}")
    ids, wts, unknown, _ = _feature_lists(raw[5], c.rows, num, num_ok, reasons, encoder, n)
    return {S.SAMPLE_ID: sid, S.CLICK: clk.astype(np.int32), S.CONVERSION: conv.astype(np.int32),
            S.COMMON_KEY: c.full(raw[3]), "ids": ids, "wts": wts, "reason": reasons.text, "bad": reasons.bad,
            "unknown": unknown}


def parse_common(lines: pa.Array, encoder: SideEncoder, nbytes: np.ndarray | None = None,
                 max_line_bytes: int | None = None) -> dict:
    """Common lines -> columns for every line, with each line's ``user_key`` (``user_keys``; meaningless on a bad
    line); duplicate keys are checked by the caller, across chunks."""
    n = len(lines)
    reasons = _Reasons(n)
    lines = _whole_lines(lines, nbytes, max_line_bytes, S.COMMON_COLUMNS, reasons)
    c = _Columns(lines, len(S.COMMON_COLUMNS), reasons)
    raw = [c.get(j) for j in range(len(S.COMMON_COLUMNS))]
    num, num_ok = c.ints(raw[1])
    reasons.add(~num_ok, lambda i: f"feature_num: not an integer: {_q(c.text(raw[1])(i))}")
    ids, wts, unknown, users = _feature_lists(raw[2], c.rows, num, num_ok, reasons, encoder, n)
    if users is None:   # an encoder without field 101 (not the ETL's common side)
        users = np.full(n, S.UNKNOWN_USER, np.int64)
    return {S.COMMON_KEY: c.full(raw[0]), "ids": ids, "wts": wts, "reason": reasons.text, "bad": reasons.bad,
            "unknown": unknown, S.USER_KEY: users}
