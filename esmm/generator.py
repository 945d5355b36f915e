"""Synthetic Ali-CCP raw logs with ground truth (the conversion outcome of *every* impression, clicked or not).

Output (under ``out``, staged and committed by ``esmm.outputs.Output``)::

    sample_skeleton_train.csv  common_features_train.csv   first half of the common keys in time order
    sample_skeleton_test.csv   common_features_test.csv    second half
    ground_truth/              Parquet, schemas.dataset.GROUND_TRUTH_SCHEMA, one row per impression (both splits)
    _GENERATED.json            resolved generate config, intercepts and counts; makes re-runs idempotent

The text files are byte-for-byte in the Ali-CCP layout (schemas/raw.py). With ``generate.single_files`` and a local
path each is one plain file; otherwise each is a Spark directory of part files under the same name.

Generative model
----------------
World (drawn once from the global seed; every Spark task rebuilds it identically):

* Latent space of ``latent_dim`` = d dims, split into *shared* dims S (the first d//2, rewarded by clicks and, with
  ``selection_bias``, partly by conversions) and *conversion-only* dims V (the rest).
* Categories: latent c ~ N(0, I), log-normal popularity. Shops, brands and intention nodes each belong to a main
  category (popularity-weighted). Items: a category (by popularity), latent v = 0.75 c + 0.66 noise, a shop and a
  brand of that category (10% any shop/brand), 1-3 intention nodes of that category (field 210), log-normal popularity.
  Item *attractiveness* att = 0.6 shop_att + 0.8 noise (so the shop reveals it partly); intrinsic quality
  q0 = 0.6 brand_quality + 0.8 noise (the brand reveals it partly). The item's conversion quality is
  q = 0.8 q0 - 0.7 lambda att (lambda = ``selection_bias``): with lambda > 0, attractive-but-poor items.
* Users: latent u ~ N(0, I), log-normal activity, click bias ~ N(0, 0.4^2), conversion bias ~ N(0, 0.3^2). Profile
  fields are noisy functions of u: 121/122/128/129 = argmax of random projections + Gumbel noise, 124/125 = quantile
  bins of noisy projections, 126/127 (consumption levels) = quantile bins of noisy projections on the V dims.

Per common key (a user request context; keys are in time order, sample_id increases with them):

* A user by activity; category preference P_k(c) ~ softmax(1.5 <u, c>/sqrt(d) + log popularity(c)).
* The four ``*_14`` histories: interaction events drawn from P_k (then a shop/brand/intention of the category by
  popularity), about ``history_len`` distinct ids each (Poisson); the value is the event count (preferred ids repeat).
* 1 + Multinomial impressions per key (mean ``impressions_per_key``; the total is exactly ``impressions``); each shows
  an item of a category drawn from 0.75 P_k + 0.25 popularity, at a position (field 301, 4 values, P=.4/.3/.2/.1).
* Combination fields 508/509/702/853 (history x item attribute, schemas.raw.COMBINATIONS): emitted when the item's
  attribute is in the user's history, value = the history count.

Propensities (A_S = <u_S, v_S>/sqrt|S|, A_V = <u_V, v_V>/sqrt|V|, lambda = ``selection_bias``)::

    logit pCTR = b_ctr + 0.6 A_S + user_click_bias + 0.7 att + position_effect        position: +.5 +.15 -.2 -.45
    logit pCVR = b_cvr + 0.6 A_V + q + user_conv_bias + w_S A_S          w_S = ``shared_affinity`` (default 0.2 lambda)

With lambda = 0, pCVR shares nothing with pCTR (independent up to the recommender's item choice: the logit
correlation is ~0.03); lambda scales both couplings linearly: conversions share part of the click affinity and, more
strongly, attractive items (clicked more) convert worse.

``shared_affinity`` (w_S) sets apart how much of the conversion propensity comes from the *same* user-item affinity
that drives clicks. It is the knob for "when does ESMM help?": the shared embedding table transfers the click task's
abundant signal to CVR exactly through the features both tasks reward, so a larger w_S gives ESMM's transfer more to
carry, while lambda's attractive-but-poor penalty is what makes the clicked population a biased sample. Left at null
it is 0.2 lambda, the coupling of earlier versions (same seed and config => the same files as before); set it to
vary the two effects independently (``bench/esmm_map.py`` maps ESMM - BASE over both). So the clicked population differs from all impressions
(sample selection bias): at the default config the expected pCVR over clicked impressions is ~0.82x the mean pCVR
over all impressions with lambda = 1 (logit correlation ~ -0.19), ~1.02x with lambda = 0, ~0.73x with lambda = 2.
Oracle AUCs (true probabilities as scores) at the default config: CTR ~0.79, CVR over all impressions ~0.79-0.83,
CTCVR ~0.89.

The intercepts are calibrated on the driver by bisection on a calibration sample drawn from the same process, so
that mean pCTR ~= ``ctr`` and the pCTR-weighted mean pCVR (= expected CVR over clicked impressions) ~= ``cvr``.
For every impression: click ~ Bernoulli(pCTR), would_convert ~ Bernoulli(pCVR), conversion = click AND would_convert.

Ids: every field has a disjoint feature_id range, ``field_bases(g)[field] + local id`` (bases are cumulative
cardinalities in ALL_FIELDS order). Common keys are 16 lowercase hex chars of a bijective 64-bit mix of (key, seed).

Execution: the driver plans key blocks (<= 512 keys, never straddling the train/test split) and the exact number of
impressions of each (so sample_ids are contiguous), assigns contiguous blocks to tasks, and calibrates the
intercepts; each Spark task (``spark.range`` -> ``mapInArrow``) simulates its blocks with numpy Generators seeded from
(seed, block) and builds the text lines vectorized with pyarrow.compute. Passes: skeleton and common lines per split,
then ground truth; a pass simulates only what it needs (separate random streams keep them consistent). Same seed and
config => byte-identical files.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.accumulators import AccumulatorParam

from esmm import storage
from esmm.outputs import Output, OutputRefused
from schemas import raw as R
from schemas.dataset import (CLICK, CONVERSION, GROUND_TRUTH_SCHEMA, SAMPLE_ID, TRUE_CTR, TRUE_CVR, WOULD_CONVERT)

log = logging.getLogger(__name__)

MARKER = "_GENERATED.json"
GROUND_TRUTH_DIR = "ground_truth"
FIRST_SAMPLE_ID = 1
MAX_KEYS_PER_BLOCK = 512
CALIBRATION_KEYS = 2048

# Model constants (documented in the module docstring).
PROFILE_CARD = {"121": 97, "122": 13, "124": 3, "125": 7, "126": 3, "127": 4, "128": 3, "129": 5}
POSITIONS = 4
POSITION_PROBS = np.array([0.4, 0.3, 0.2, 0.1])
POSITION_EFFECT = np.array([0.5, 0.15, -0.2, -0.45])
PREF_SCALE = 1.5          # sharpness of the category preference
EXPLORE = 0.25            # share of impressions from global popularity instead of the user's preference
W_AFF_CLICK = 0.6
W_ATT = 0.7
W_AFF_CONV = 0.6
W_QUALITY = 0.8
W_SHARED_CONV = 0.2       # x selection_bias
W_ATT_PENALTY = 0.7       # x selection_bias: attractive-but-poor items
USER_CLICK_SD = 0.4
USER_CONV_SD = 0.3

_GT_ARROW = pa.schema([pa.field(SAMPLE_ID, pa.int64(), False), pa.field(TRUE_CTR, pa.float32(), False),
                       pa.field(TRUE_CVR, pa.float32(), False), pa.field(WOULD_CONVERT, pa.int32(), False),
                       pa.field(CLICK, pa.int32(), False), pa.field(CONVERSION, pa.int32(), False)])
_TEXT_ARROW = pa.schema([pa.field("value", pa.string())])


def shared_affinity(g) -> float:
    """Weight of the click affinity A_S in logit pCVR: ``generate.shared_affinity``, or 0.2 x selection_bias."""
    return W_SHARED_CONV * g.selection_bias if g.shared_affinity is None else float(g.shared_affinity)


class GeneratorError(RuntimeError):
    """The generator refused its output path (exists, not ours, different config)."""


class GeneratorOutputRefused(GeneratorError, OutputRefused):
    """The output holds data of another generate config; ``--overwrite`` replaces it (exit code 4)."""


# ------------------------------------------------------------------------------------------------ ids

def field_cardinalities(g) -> dict:
    """Number of distinct local ids per field (feature_id = field_bases(g)[field] + local id)."""
    card = {"101": g.users, **PROFILE_CARD, "109_14": g.categories, "110_14": g.shops, "127_14": g.brands,
            "150_14": g.intentions, "205": g.items, "206": g.categories, "207": g.shops, "210": g.intentions,
            "216": g.brands, "301": POSITIONS}
    for combo, (hist, _item) in R.COMBINATIONS.items():
        card[combo] = card[hist]
    return {f: card[f] for f in R.ALL_FIELDS}


def field_bases(g) -> dict:
    """Disjoint feature_id ranges: base[f] = 1 + cardinalities of the fields before f in ALL_FIELDS order."""
    bases, acc = {}, 1
    for f, n in field_cardinalities(g).items():
        bases[f] = acc
        acc += n
    return bases


def common_key_hex(key_index: np.ndarray, seed: int) -> np.ndarray:
    """16 lowercase hex chars (numpy ``S16``) of a bijective 64-bit mix of the key index (unique per seed)."""
    with np.errstate(over="ignore"):
        x = np.asarray(key_index, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019)
                                                             & 0xFFFFFFFFFFFFFFFF)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    b = x.astype(">u8").view(np.uint8).reshape(-1, 8)
    return _HEX[b].reshape(-1, 16).view("S16").ravel()


_HEX = np.array([[ord(c) for c in f"{i:02x}"] for i in range(256)], dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ world

class _Grouped:
    """Draw a member of a group with probability proportional to its weight (vectorized; empty group -> any member)."""

    def __init__(self, group: np.ndarray, weight: np.ndarray, n_groups: int):
        self.order = np.argsort(group, kind="stable")
        w = weight[self.order].astype(np.float64)
        self.cw = np.cumsum(w)
        self.cw0 = self.cw - w
        gs = group[self.order]
        gids = np.arange(n_groups)
        self.start = np.searchsorted(gs, gids, "left")
        self.end = np.searchsorted(gs, gids, "right")
        self.global_cw = np.cumsum(weight.astype(np.float64))

    def sample(self, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        n = len(self.order)
        lo, hi = self.start[g], self.end[g]
        empty = hi == lo
        base = self.cw0[np.minimum(lo, n - 1)]
        top = self.cw[np.maximum(hi - 1, 0)]
        idx = np.searchsorted(self.cw, base + u * (top - base), side="right")
        idx = np.clip(idx, lo, np.maximum(hi - 1, lo))
        out = self.order[np.minimum(idx, n - 1)]
        if empty.any():
            out[empty] = _draw(self.global_cw, u[empty])
        return out


def _draw(cw: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws from unnormalized cumulative weights ``cw``."""
    return np.minimum(np.searchsorted(cw, u * cw[-1], side="right"), len(cw) - 1)


def _argmax_bins(rng, x: np.ndarray, n: int) -> np.ndarray:
    w = rng.standard_normal((x.shape[1], n))
    return np.argmax(x @ w / math.sqrt(x.shape[1]) + rng.gumbel(size=(x.shape[0], n)), axis=1)


def _quantile_bins(rng, x: np.ndarray, n: int, noise: float = 0.7) -> np.ndarray:
    w = rng.standard_normal(x.shape[1])
    s = x @ w / math.sqrt(x.shape[1]) + noise * rng.standard_normal(x.shape[0])
    cuts = np.quantile(s, np.arange(1, n) / n)
    return np.searchsorted(cuts, s)


@dataclass
class World:
    """Users, items and their attributes (global; a pure function of the generate config)."""
    d: int
    ds: int
    cat_lat: np.ndarray
    cat_cw: np.ndarray
    cat_logpop: np.ndarray
    shops_of_cat: _Grouped
    brands_of_cat: _Grouped
    ints_of_cat: _Grouped
    items_of_cat: _Grouped
    item_lat: np.ndarray
    item_cat: np.ndarray
    item_shop: np.ndarray
    item_brand: np.ndarray
    item_ints: np.ndarray      # (items, 3), -1 = none
    item_att: np.ndarray
    item_quality: np.ndarray
    user_lat: np.ndarray
    user_cw: np.ndarray
    user_cbias: np.ndarray
    user_vbias: np.ndarray
    user_profile: np.ndarray   # (users, 8) local ids of USER_FIELDS[1:]


@functools.lru_cache(maxsize=2)
def build_world(g) -> World:
    rng = np.random.default_rng([g.seed, 0])
    d = g.latent_dim
    ds = d // 2
    C = g.categories
    cat_lat = rng.standard_normal((C, d))
    cat_pop = rng.lognormal(0.0, 1.0, C)
    cat_cw = np.cumsum(cat_pop)

    def members(n):  # main category and popularity of n shops/brands/intentions
        return _draw(cat_cw, rng.random(n)), rng.lognormal(0.0, 1.0, n)

    shop_cat, shop_pop = members(g.shops)
    brand_cat, brand_pop = members(g.brands)
    int_cat, int_pop = members(g.intentions)
    shop_att = rng.standard_normal(g.shops)
    brand_qual = rng.standard_normal(g.brands)
    shops_of_cat = _Grouped(shop_cat, shop_pop, C)
    brands_of_cat = _Grouped(brand_cat, brand_pop, C)
    ints_of_cat = _Grouped(int_cat, int_pop, C)

    n = g.items
    item_cat = _draw(cat_cw, rng.random(n))
    item_lat = 0.75 * cat_lat[item_cat] + 0.66 * rng.standard_normal((n, d))
    item_pop = rng.lognormal(0.0, 1.0, n)
    item_shop = np.where(rng.random(n) < 0.9, shops_of_cat.sample(item_cat, rng.random(n)),
                         rng.integers(0, g.shops, n))
    item_brand = np.where(rng.random(n) < 0.9, brands_of_cat.sample(item_cat, rng.random(n)),
                          rng.integers(0, g.brands, n))
    n_int = 1 + _draw(np.cumsum([0.6, 0.3, 0.1]), rng.random(n))
    ints = np.stack([ints_of_cat.sample(item_cat, rng.random(n)) for _ in range(3)], axis=1)
    ints[np.arange(3)[None, :] >= n_int[:, None]] = -1
    ints[:, 1][ints[:, 1] == ints[:, 0]] = -1                      # distinct values only
    ints[:, 2][(ints[:, 2] == ints[:, 0]) | (ints[:, 2] == ints[:, 1])] = -1
    item_att = 0.6 * shop_att[item_shop] + 0.8 * rng.standard_normal(n)
    q0 = 0.6 * brand_qual[item_brand] + 0.8 * rng.standard_normal(n)
    item_quality = W_QUALITY * q0 - W_ATT_PENALTY * g.selection_bias * item_att

    U = g.users
    user_lat = rng.standard_normal((U, d))
    user_cw = np.cumsum(rng.lognormal(0.0, 1.0, U))
    user_cbias = USER_CLICK_SD * rng.standard_normal(U)
    user_vbias = USER_CONV_SD * rng.standard_normal(U)
    uv = user_lat[:, ds:]
    profile = np.stack([
        _argmax_bins(rng, user_lat, PROFILE_CARD["121"]),
        _argmax_bins(rng, user_lat, PROFILE_CARD["122"]),
        _quantile_bins(rng, user_lat, PROFILE_CARD["124"]),
        _quantile_bins(rng, user_lat, PROFILE_CARD["125"]),
        _quantile_bins(rng, uv, PROFILE_CARD["126"]),
        _quantile_bins(rng, uv, PROFILE_CARD["127"]),
        _argmax_bins(rng, user_lat, PROFILE_CARD["128"]),
        _argmax_bins(rng, user_lat, PROFILE_CARD["129"]),
    ], axis=1)
    return World(d, ds, cat_lat, cat_cw, np.log(cat_pop), shops_of_cat, brands_of_cat, ints_of_cat,
                 _Grouped(item_cat, item_pop, C), item_lat, item_cat, item_shop, item_brand, ints, item_att,
                 item_quality, user_lat, user_cw, user_cbias, user_vbias, profile)


# ------------------------------------------------------------------------------------------------ plan

@dataclass(frozen=True)
class Block:
    block_id: int
    split: str
    key0: int        # global key index range [key0, key1), in time order
    key1: int
    extra: int       # impressions beyond one per key
    sid0: int        # first sample_id
    part: int        # task index within the split

    @property
    def impressions(self) -> int:
        return self.key1 - self.key0 + self.extra


@dataclass(frozen=True)
class Plan:
    blocks: tuple
    keys: dict          # split -> number of keys
    impressions: dict   # split -> number of impressions
    parts: dict         # split -> number of tasks

    def blocks_of(self, split: str) -> list:
        return [b for b in self.blocks if b.split == split]


def make_plan(g) -> Plan:
    """Key blocks per split and their exact impression counts (drawn on the driver from the seed)."""
    n_keys = max(2, int(round(g.impressions / g.impressions_per_key)))
    n_imp = max(g.impressions, n_keys)
    k_train = n_keys - n_keys // 2
    p_train = max(1, (g.partitions + 1) // 2)
    parts = {"train": p_train, "test": max(1, g.partitions - p_train)}
    ranges = {"train": (0, k_train), "test": (k_train, n_keys)}
    spans = []
    for split in R.RAW_SPLITS:
        lo, hi = ranges[split]
        size = max(1, min(MAX_KEYS_PER_BLOCK, -(-(hi - lo) // parts[split])))
        starts = list(range(lo, hi, size))
        for i, s in enumerate(starts):
            spans.append((split, s, min(s + size, hi), i * parts[split] // len(starts)))
    sizes = np.array([b - a for _, a, b, _ in spans], dtype=np.float64)
    extra = np.random.default_rng([g.seed, 3]).multinomial(n_imp - n_keys, sizes / sizes.sum())
    blocks, sid = [], FIRST_SAMPLE_ID
    for i, ((split, a, b, part), e) in enumerate(zip(spans, extra)):
        blocks.append(Block(i, split, a, b, int(e), sid, part))
        sid += b - a + int(e)
    keys = {s: ranges[s][1] - ranges[s][0] for s in R.RAW_SPLITS}
    imps = {s: sum(b.impressions for b in blocks if b.split == s) for s in R.RAW_SPLITS}
    return Plan(tuple(blocks), keys, imps, parts)


# ------------------------------------------------------------------------------------------------ simulation

def _softmax_rows_cdf(logits: np.ndarray) -> np.ndarray:
    """Row-wise CDFs laid end to end (row r occupies (r, r+1]) for vectorized per-row inverse-CDF sampling."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    cdf = np.cumsum(p, axis=1)
    cdf /= cdf[:, -1:]
    return (cdf + np.arange(len(cdf))[:, None]).ravel()


def _row_draw(flat_cdf: np.ndarray, width: int, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    q = rows + u
    o = np.argsort(q)                       # sorted needles: a much more cache-friendly search
    idx = np.empty(len(q), np.int64)
    idx[o] = np.searchsorted(flat_cdf, q[o], side="right")
    return np.clip(idx - rows * width, 0, width - 1)


def _history(rng, target: np.ndarray, draw_cat, to_attr, card: int):
    """Distinct (key, id) history entries with event counts: about ``target[k]`` ids per key, drawn from P_k.

    Returns (codes, counts) with codes = key * card + id, sorted (by key, then id)."""
    n = len(target)
    codes = np.empty(0, np.int64)
    todo, want = np.arange(n), 2 * target
    for _ in range(8):
        rows = np.repeat(todo, want)
        cat = draw_cat(rows, rng.random(len(rows)))
        attr = cat if to_attr is None else to_attr.sample(cat, rng.random(len(rows)))
        codes = np.concatenate([codes, rows.astype(np.int64) * card + attr])
        have = np.bincount(np.unique(codes) // card, minlength=n)
        short = target - have
        todo = np.nonzero(short > 0)[0]
        if len(todo) == 0:
            break
        want = 2 * short[todo] + 1
    uniq, first, cnt = np.unique(codes, return_index=True, return_counts=True)
    key = uniq // card
    o = np.lexsort((first, key))            # per key, by first occurrence (= sequential sampling w/o replacement)
    ko = key[o]
    rank = np.arange(len(o)) - np.searchsorted(ko, ko, "left")
    keep = np.sort(o[rank < target[ko]])
    return uniq[keep], cnt[keep]


def _lookup(codes: np.ndarray, counts: np.ndarray, query: np.ndarray):
    """History count of each query code (0 when absent)."""
    if len(codes) == 0:
        return np.zeros(len(query), np.int64)
    i = np.minimum(np.searchsorted(codes, query), len(codes) - 1)
    return np.where(codes[i] == query, counts[i], 0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def simulate_block(g, world: World, key0: int, key1: int, extra: int, stream: tuple, need: str,
                   intercepts=(0.0, 0.0)) -> dict:
    """Simulate one key block. ``need``: 'common' (keys + histories), 'skeleton' (everything), 'truth' (impressions
    and outcomes, no histories), 'calib' (pre-intercept logits). Random streams are split so that each pass
    reproduces exactly the same draws for what it computes."""
    ss = np.random.SeedSequence([g.seed, *stream])
    r_key, r_hist, r_imp, r_out = (np.random.default_rng(s) for s in ss.spawn(4))
    n = key1 - key0
    users = _draw(world.user_cw, r_key.random(n))
    per_key = 1 + r_key.multinomial(extra, np.full(n, 1.0 / n))
    targets = np.maximum(1, r_key.poisson(g.history_len, (4, n)))
    out = {"n_keys": n, "users": users, "per_key": per_key}

    C = g.categories
    logits = PREF_SCALE * (world.user_lat[users] @ world.cat_lat.T) / math.sqrt(world.d) + world.cat_logpop
    flat = _softmax_rows_cdf(logits)

    def draw_cat(rows, u):
        return _row_draw(flat, C, rows, u)

    if need in ("common", "skeleton"):
        hist = {}
        for i, (f, to_attr) in enumerate((("109_14", None), ("110_14", world.shops_of_cat),
                                          ("127_14", world.brands_of_cat), ("150_14", world.ints_of_cat))):
            card = field_cardinalities(g)[f]
            hist[f] = _history(r_hist, np.minimum(targets[i], card), draw_cat, to_attr, card) + (card,)
        out["hist"] = hist
        if need == "common":
            return out

    n_imp = int(per_key.sum())
    ik = np.repeat(np.arange(n), per_key)
    pref_cat = draw_cat(ik, r_imp.random(n_imp))
    pop_cat = _draw(world.cat_cw, r_imp.random(n_imp))
    cat = np.where(r_imp.random(n_imp) < EXPLORE, pop_cat, pref_cat)
    item = world.items_of_cat.sample(cat, r_imp.random(n_imp))
    pos = _draw(np.cumsum(POSITION_PROBS), r_imp.random(n_imp))
    u = world.user_lat[users[ik]]
    v = world.item_lat[item]
    ds = world.ds
    a_s = (u[:, :ds] * v[:, :ds]).sum(axis=1) / math.sqrt(ds)
    a_v = (u[:, ds:] * v[:, ds:]).sum(axis=1) / math.sqrt(world.d - ds)
    zc = W_AFF_CLICK * a_s + world.user_cbias[users[ik]] + W_ATT * world.item_att[item] + POSITION_EFFECT[pos]
    zv = (W_AFF_CONV * a_v + world.item_quality[item] + world.user_vbias[users[ik]]
          + shared_affinity(g) * a_s)
    if need == "calib":
        out.update(zc=zc, zv=zv)
        return out
    pctr = _sigmoid(intercepts[0] + zc)
    pcvr = _sigmoid(intercepts[1] + zv)
    click = r_out.random(n_imp) < pctr
    would = r_out.random(n_imp) < pcvr
    out.update(n_imp=n_imp, imp_key=ik, item=item, pos=pos, pctr=pctr, pcvr=pcvr, click=click, would=would,
               conversion=click & would)
    return out


# ------------------------------------------------------------------------------------------------ calibration

def _bisect(z: np.ndarray, target: float, w: np.ndarray | None = None) -> float:
    lo, hi = -40.0, 40.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        p = _sigmoid(mid + z)
        m = p.mean() if w is None else (p * w).sum() / w.sum()
        lo, hi = (mid, hi) if m < target else (lo, mid)
    return 0.5 * (lo + hi)


def calibrate(g, world: World | None = None) -> tuple:
    """(b_ctr, b_cvr) such that mean pCTR ~= ctr and the expected CVR over clicked impressions ~= cvr."""
    world = world or build_world(g)
    zc, zv = [], []
    n_keys = CALIBRATION_KEYS
    per_block = min(MAX_KEYS_PER_BLOCK, n_keys)
    for b in range(0, n_keys, per_block):
        k = min(per_block, n_keys - b)
        r = simulate_block(g, world, 0, k, int(round(k * (g.impressions_per_key - 1))), (2, b), "calib")
        zc.append(r["zc"])
        zv.append(r["zv"])
    zc, zv = np.concatenate(zc), np.concatenate(zv)
    b_ctr = _bisect(zc, g.ctr)
    b_cvr = _bisect(zv, g.cvr, w=_sigmoid(b_ctr + zc))
    return b_ctr, b_cvr


# ------------------------------------------------------------------------------------------------ lines

def _str(a: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(a, pa.int64()), pa.string())


def _feature_lists(owner: np.ndarray, n_owner: int, field_idx: np.ndarray, fid: np.ndarray,
                   value: np.ndarray) -> tuple:
    """Entries (any order, stable within an owner) -> per-owner feature_list strings and entry counts."""
    o = np.argsort(owner, kind="stable")
    prefix = pa.array([f + R.ID_SEP for f in R.ALL_FIELDS])
    vmax = int(value.max()) if len(value) else 1
    vals = pa.array([f"{R.VALUE_SEP}{i}.0" for i in range(vmax + 1)])
    entries = pc.binary_join_element_wise(prefix.take(pa.array(field_idx[o], pa.int32())), _str(fid[o]),
                                          vals.take(pa.array(value[o], pa.int64())), "")
    nums = np.bincount(owner, minlength=n_owner)
    offsets = np.concatenate([[0], np.cumsum(nums)]).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), entries)
    return pc.binary_join(lists, R.ENTRY_SEP), nums


_FIELD_INDEX = {f: i for i, f in enumerate(R.ALL_FIELDS)}


def _entries_block(parts: list) -> tuple:
    """[(field, owner, local_id, value)] -> concatenated arrays (field blocks in the given order)."""
    fi = np.concatenate([np.full(len(o), _FIELD_INDEX[f], np.int32) for f, o, _, _ in parts])
    ow = np.concatenate([o for _, o, _, _ in parts])
    lid = np.concatenate([lid for _, _, lid, _ in parts])
    val = np.concatenate([v for _, _, _, v in parts])
    return ow, fi, lid, val


def common_lines(g, world: World, sim: dict, key0: int) -> tuple:
    """(common lines, entries per line) of a simulated block."""
    n = sim["n_keys"]
    bases = field_bases(g)
    users = sim["users"]
    ones = np.ones(n, np.int64)
    keys = np.arange(n)
    parts = [("101", keys, users, ones)]
    parts += [(f, keys, world.user_profile[users, i], ones) for i, f in enumerate(R.USER_FIELDS[1:])]
    for f in R.HISTORY_FIELDS:
        codes, counts, card = sim["hist"][f]
        parts.append((f, codes // card, codes % card, counts))
    ow, fi, lid, val = _entries_block(parts)
    fid = lid + np.array([bases[f] for f in R.ALL_FIELDS], np.int64)[fi]
    fl, nums = _feature_lists(ow, n, fi, fid, val)
    key_hex = pa.array(common_key_hex(np.arange(key0, key0 + n), g.seed), pa.binary()).cast(pa.string())
    return pc.binary_join_element_wise(key_hex, _str(nums), fl, R.COL_SEP), nums


def skeleton_lines(g, world: World, sim: dict, key0: int, sid0: int) -> tuple:
    """(skeleton lines, entries per line) of a simulated block."""
    n_imp, ik, item = sim["n_imp"], sim["imp_key"], sim["item"]
    bases = field_bases(g)
    imps = np.arange(n_imp)
    ones = np.ones(n_imp, np.int64)
    ints = world.item_ints[item]
    iv = ints >= 0
    int_owner = np.broadcast_to(imps[:, None], ints.shape)[iv]
    attr = {"206": world.item_cat[item], "207": world.item_shop[item], "216": world.item_brand[item]}
    parts = [("205", imps, item, ones), ("206", imps, attr["206"], ones), ("207", imps, attr["207"], ones),
             ("210", int_owner, ints[iv], np.ones(len(int_owner), np.int64)), ("216", imps, attr["216"], ones)]
    for combo, (hf, itf) in R.COMBINATIONS.items():
        codes, counts, card = sim["hist"][hf]
        if itf == "210":
            q = ik[int_owner].astype(np.int64) * card + ints[iv]
            cnt = _lookup(codes, counts, q)
            m = cnt > 0
            parts.append((combo, int_owner[m], ints[iv][m], cnt[m]))
        else:
            a = attr[itf]
            cnt = _lookup(codes, counts, ik.astype(np.int64) * card + a)
            m = cnt > 0
            parts.append((combo, imps[m], a[m], cnt[m]))
    parts.append(("301", imps, sim["pos"], ones))
    ow, fi, lid, val = _entries_block(parts)
    fid = lid + np.array([bases[f] for f in R.ALL_FIELDS], np.int64)[fi]
    fl, nums = _feature_lists(ow, n_imp, fi, fid, val)
    key_hex = pa.array(common_key_hex(np.arange(key0, key0 + sim["n_keys"]), g.seed), pa.binary()) \
        .cast(pa.string()).take(pa.array(ik, pa.int32()))
    lines = pc.binary_join_element_wise(
        _str(sid0 + imps), _str(sim["click"].astype(np.int64)), _str(sim["conversion"].astype(np.int64)),
        key_hex, _str(nums), fl, R.COL_SEP)
    return lines, nums


def truth_batch(sim: dict, sid0: int) -> pa.RecordBatch:
    n = sim["n_imp"]
    return pa.RecordBatch.from_arrays([
        pa.array(sid0 + np.arange(n, dtype=np.int64), pa.int64()),
        pa.array(sim["pctr"].astype(np.float32), pa.float32()),
        pa.array(sim["pcvr"].astype(np.float32), pa.float32()),
        pa.array(sim["would"].astype(np.int32), pa.int32()),
        pa.array(sim["click"].astype(np.int32), pa.int32()),
        pa.array(sim["conversion"].astype(np.int32), pa.int32()),
    ], schema=_GT_ARROW)


def block_output(g, kind: str, block: Block, intercepts: tuple, with_stats: bool = False):
    """What one pass produces for one block: text lines ('common'/'skeleton') or a ground-truth batch ('truth').

    With ``with_stats`` also a tuple of counts: common (lines, entries), skeleton (lines, entries, clicks,
    conversions), truth (rows, clicks, conversions, would_convert)."""
    world = build_world(g)
    sim = simulate_block(g, world, block.key0, block.key1, block.extra, (1, block.block_id), kind, intercepts)
    if kind == "common":
        lines, nums = common_lines(g, world, sim, block.key0)
        out, stats = pa.RecordBatch.from_arrays([lines], schema=_TEXT_ARROW), (len(nums), int(nums.sum()))
    elif kind == "skeleton":
        lines, nums = skeleton_lines(g, world, sim, block.key0, block.sid0)
        out = pa.RecordBatch.from_arrays([lines], schema=_TEXT_ARROW)
        stats = (len(nums), int(nums.sum()), int(sim["click"].sum()), int(sim["conversion"].sum()))
    elif kind == "truth":
        out = truth_batch(sim, block.sid0)
        stats = (sim["n_imp"], int(sim["click"].sum()), int(sim["conversion"].sum()), int(sim["would"].sum()))
    else:
        raise ValueError(f"unknown output kind {kind!r}")
    return (out, stats) if with_stats else out


# ------------------------------------------------------------------------------------------------ Spark job

class _BlockStats(AccumulatorParam):
    """Accumulates {(kind, block_id): counts}; keyed by block, so a retried task cannot count twice."""

    def zero(self, value):
        return {}

    def addInPlace(self, a, b):
        a.update(b)
        return a


def _task_fn(g, kind: str, tasks: list, intercepts: tuple, acc):
    def run(batches):
        for batch in batches:
            for t in batch.column(0).to_pylist():
                for blk in tasks[t]:
                    out, stats = block_output(g, kind, blk, intercepts, with_stats=True)
                    acc.add({(kind, blk.block_id): stats})
                    yield out
    return run


def _pass(spark, g, kind: str, tasks: list, intercepts: tuple, acc):
    """One Spark task per entry of ``tasks`` (a list of blocks), each emitting its blocks' output in order."""
    schema = GROUND_TRUTH_SCHEMA if kind == "truth" else "value string"
    n = len(tasks)
    return spark.range(0, n, 1, n).mapInArrow(_task_fn(g, kind, tasks, intercepts, acc), schema)


def _split_tasks(plan: Plan, split: str) -> list:
    tasks = [[] for _ in range(plan.parts[split])]
    for b in plan.blocks_of(split):
        tasks[b.part].append(b)
    return tasks


def _single_files_ok(spark, path: str) -> bool:
    """Whether part files can be joined into plain files: a local master writing to the local filesystem."""
    return storage.is_local(path) and spark.sparkContext.master.startswith("local")


def _read_marker(out: str) -> dict:
    """The generator's summary (``_GENERATED.json``) of a committed output; {} when unreadable."""
    try:
        return storage.read_json(storage.join(out, MARKER))
    except (OSError, ValueError):
        return {}


def generate(spark, cfg, out: str | None = None, overwrite: bool = False) -> dict:
    """Write the synthetic Ali-CCP files and ground truth under ``out`` (default ``cfg.paths.raw``); return the summary.

    Idempotent: when ``out`` already holds a committed output of the same resolved generate config it is kept
    (summary has ``skipped: True``); one of another config is refused unless ``overwrite`` (``esmm.outputs``)."""
    from esmm.config import to_dict
    g = cfg.generate
    out = storage.resolve(out or cfg.paths.raw)
    resolved = to_dict(g)
    storage.check_shared(spark, storage.parent(out))  # executors write the files: a local path must be shared
    with Output(out, "raw", {"generate": resolved}, "generate", overwrite, GeneratorOutputRefused) as o:
        if o.reusable:
            log.info("%s already holds generated data of the same generate config: nothing to do",
                     storage.display(out))
            return {**_read_marker(out), "out": out, "skipped": True, "seconds": 0.0}
        o.refuse_other_inputs("generated data")
        t0 = time.time()
        tmp = o.stage()
        marker = _generate_into(spark, g, tmp, resolved)
        marker["run_id"] = o.run_id
        storage.write_json(storage.join(tmp, MARKER), marker)
        o.commit()
    summary = {**marker, "out": out, "skipped": False, "seconds": round(time.time() - t0, 2)}
    log.info("generated %s in %.1fs", storage.display(out), summary["seconds"])
    return summary


def _generate_into(spark, g, tmp: str, resolved: dict) -> dict:
    """Write every file into the staging directory ``tmp``; returns the summary (the lifecycle removes ``tmp`` if
    this fails)."""
    plan = make_plan(g)
    intercepts = calibrate(g)
    log.info("generating %s impressions over %s keys into %s (%d blocks; intercepts ctr %.3f cvr %.3f)",
             f"{sum(plan.impressions.values()):,}", f"{sum(plan.keys.values()):,}", storage.display(tmp),
             len(plan.blocks), *intercepts)
    single = g.single_files and _single_files_ok(spark, tmp)
    acc = spark.sparkContext.accumulator({}, _BlockStats())
    files = {}
    for split in R.RAW_SPLITS:
        tasks = _split_tasks(plan, split)
        for kind, pattern in (("skeleton", R.SKELETON_FILE), ("common", R.COMMON_FILE)):
            name = pattern.format(split=split)
            t1 = time.time()
            target = f"{tmp}/_parts/{name}" if single else f"{tmp}/{name}"
            _pass(spark, g, kind, tasks, intercepts, acc).write.text(target)
            if single:
                storage.concat_parts(f"{tmp}/_parts/{name}", f"{tmp}/{name}")
            files[name] = "file" if single else "directory"
            log.info("wrote %s (%.1fs)", name, time.time() - t1)
    if single:
        storage.delete(f"{tmp}/_parts", recursive=True)
    t1 = time.time()
    all_tasks = _split_tasks(plan, "train") + _split_tasks(plan, "test")
    _pass(spark, g, "truth", all_tasks, intercepts, acc).write.parquet(f"{tmp}/{GROUND_TRUTH_DIR}")
    log.info("wrote %s (%.1fs)", GROUND_TRUTH_DIR, time.time() - t1)
    marker = _summarize(g, plan, intercepts, files, acc.value)
    marker["generate"] = resolved
    return marker


def _summarize(g, plan: Plan, intercepts: tuple, files: dict, stats: dict) -> dict:
    """Counts per split from the per-block statistics of the passes, cross-checked against the plan."""
    splits = {}
    for split in R.RAW_SPLITS:
        blocks = plan.blocks_of(split)
        missing = [(k, b.block_id) for b in blocks for k in ("common", "skeleton", "truth")
                   if (k, b.block_id) not in stats]
        if missing:
            raise GeneratorError(f"no statistics from blocks {missing[:5]} (a task output was lost?)")
        tot = lambda kind, i: sum(stats[(kind, b.block_id)][i] for b in blocks)  # noqa: E731
        s = {"keys": plan.keys[split], "impressions": tot("truth", 0), "clicks": tot("truth", 1),
             "conversions": tot("truth", 2), "would_convert": tot("truth", 3),
             "skeleton_entries": tot("skeleton", 1), "common_entries": tot("common", 1),
             "first_sample_id": blocks[0].sid0, "last_sample_id": blocks[-1].sid0 + blocks[-1].impressions - 1}
        checks = {  # name: (observed, expected)
            "ground-truth rows": (s["impressions"], plan.impressions[split]),
            "skeleton lines": (tot("skeleton", 0), plan.impressions[split]),
            "common lines": (tot("common", 0), plan.keys[split]),
            "skeleton clicks": (tot("skeleton", 2), s["clicks"]),
            "skeleton conversions": (tot("skeleton", 3), s["conversions"]),
        }
        for name, (seen, want) in checks.items():
            if seen != want:
                raise GeneratorError(f"{split}: {name} {seen} != {want} (the passes disagree)")
        splits[split] = s
    imps = sum(s["impressions"] for s in splits.values())
    clicks = sum(s["clicks"] for s in splits.values())
    convs = sum(s["conversions"] for s in splits.values())
    keys = sum(plan.keys.values())
    return {
        "version": 1, "splits": splits, "files": files, "ground_truth": GROUND_TRUTH_DIR,
        "impressions": imps, "keys": keys, "clicks": clicks, "conversions": convs,
        "ctr": clicks / imps, "cvr": convs / max(clicks, 1), "impressions_per_key": imps / keys,
        "mean_common_entries": sum(s["common_entries"] for s in splits.values()) / keys,
        "mean_skeleton_entries": sum(s["skeleton_entries"] for s in splits.values()) / imps,
        "intercepts": {"ctr": intercepts[0], "cvr": intercepts[1]}, "field_bases": field_bases(g),
    }


def summary_text(s: dict) -> str:
    """A short human summary of ``generate``'s result."""
    head = "kept existing output" if s.get("skipped") else f"generated in {s['seconds']:.1f}s"
    lines = [f"{s['out']}: {head}: {s['impressions']:,} impressions, {s['keys']:,} keys, "
             f"{s['impressions_per_key']:.1f} impressions/key, entries per line: common "
             f"{s['mean_common_entries']:.0f}, skeleton {s['mean_skeleton_entries']:.1f}"]
    for split in R.RAW_SPLITS:
        t = s["splits"][split]
        ctr = t["clicks"] / max(t["impressions"], 1)
        lines.append(f"  {split:5s} {t['impressions']:>11,} impressions  CTR {ctr:6.2%}"
                     f"  CVR|click {t['conversions'] / max(t['clicks'], 1):6.2%}  conversions {t['conversions']:,}"
                     f"  (would-convert {t['would_convert']:,})")
    lines.append(f"  total {s['impressions']:>11,} impressions  CTR {s['ctr']:6.2%}  CVR|click {s['cvr']:6.2%}")
    return "\n".join(lines)
