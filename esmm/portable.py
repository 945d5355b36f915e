"""Portable export: a TorchScript scorer (``model.ts.pt``) and its contract (``model.portable.json``).

Both are written beside ``model.pt`` at the end of every finished training (``esmm.train``, rank 0) and can be
written for an existing run with ``export_portable_from(run_dir)``. Neither needs this package to be used::

    m = torch.jit.load("model.ts.pt")                   # torch only, any device via map_location
    p_ctr, p_cvr, p_ctcvr = m(feat_ids, feat_wts)      # (B, L) int64 and (B, L) float32 -> three (B,) float32

The module is ``torch.jit.script`` of the trained network itself (the same ``esmm.model`` code), wrapped by its
method's head (``esmm.methods``: one logit, ESMM's product of two towers, or AITM's two steps) so that every method
returns the same three outputs, scored as the evaluation scores them without a reference network, NaN where the
network predicts nothing by itself (e.g. a BASE network's p_ctr). Any batch size works,
B = 0 included. The JSON holds the feature layout, the hashing and per-row encoding rules spelled out (with test
vectors) so a serving system can build ``feat_ids``/``feat_wts`` from raw Ali-CCP entries, the method, run id and
the input/output contract; the same JSON (less the file's own checksum) is also stored inside the TorchScript
archive (``_extra_files={"portable.json": ""}`` of ``torch.jit.load``).

``export_onnx`` (optional; needs ``onnx``, ``onnxscript`` and, to check it, ``onnxruntime``, none of which are in
requirements.txt) writes the same contract as ONNX; see README "Portable export".
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from typing import Tuple

import torch
from torch import nn

from esmm.features import P1, P2, P3, P4, P5, SPARK_SEED, FeatureLayout, spark_hash_long
from esmm.methods import (HEAD_SINGLE, OWN, RATIO, TASK_CTR, TASK_CVR, build_model,
                          get_method)
from esmm.model import FieldEmbedding, head
from esmm import storage

log = logging.getLogger(__name__)
TORCHSCRIPT = "model.ts.pt"
CONTRACT = "model.portable.json"
ONNX = "model.onnx"
EMBEDDED = "portable.json"   # name of the contract inside the TorchScript archive
PORTABLE_FORMAT = 1
OUTPUTS = ("p_ctr", "p_cvr", "p_ctcvr")
Probs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------------------------------------ the modules

class _Checked(nn.Module):
    """Input checks and casts shared by both scorers (TorchScript raises them as ``torch.jit.Error``)."""

    def __init__(self, net: nn.Module, num_slots: int):
        super().__init__()
        self.net = net
        self.num_slots = num_slots

    def _inputs(self, feat_ids: torch.Tensor, feat_wts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if feat_ids.dim() != 2 or feat_ids.size(1) != self.num_slots:
            raise ValueError(f"feat_ids must have shape (B, {self.num_slots}), got {feat_ids.shape}")
        if feat_wts.shape != feat_ids.shape:
            raise ValueError(f"feat_wts must have the shape of feat_ids {feat_ids.shape}, got {feat_wts.shape}")
        return feat_ids.to(torch.long), feat_wts.to(torch.float32)


class PairScorer(_Checked):
    """A two-output network (ESMM's product of towers: ESMM, ESMM-NS, MMoE, ESCM2; AITM's two steps): its first two
    outputs through the one head (``esmm.model.head``, ``kind`` product or steps)."""

    def __init__(self, net: nn.Module, num_slots: int, kind: int):
        super().__init__(net, num_slots)
        self.kind = kind

    def forward(self, feat_ids: torch.Tensor, feat_wts: torch.Tensor) -> Probs:
        ids, wts = self._inputs(feat_ids, feat_wts)
        out = self.net(ids, wts)
        return head(out[0], out[1], self.kind, -1)


class SingleScorer(_Checked):
    """A single-task network: sigmoid(logit) at position ``output`` of (p_ctr, p_cvr, p_ctcvr), NaN elsewhere
    (``esmm.model.head``, kind single)."""

    def __init__(self, net: nn.Module, num_slots: int, output: int):
        super().__init__(net, num_slots)
        self.output = output

    def forward(self, feat_ids: torch.Tensor, feat_wts: torch.Tensor) -> Probs:
        ids, wts = self._inputs(feat_ids, feat_wts)
        return head(self.net(ids, wts), None, 0, self.output)  # 0: HEAD_KIND_SINGLE


def scorer(net: nn.Module, method: str, layout: FeatureLayout) -> nn.Module:
    """The eager (not yet scripted) scorer of a trained network of ``method``."""
    m = get_method(method)
    if m.head == HEAD_SINGLE:
        return SingleScorer(net, layout.num_slots, m.head_slot).eval()
    return PairScorer(net, layout.num_slots, m.head_kind).eval()


def cpu_copy(model: nn.Module, method: str, cfg, layout: FeatureLayout) -> nn.Module:
    """A CPU, eval-mode copy of a trained network (the training model may live on a GPU and stays untouched; torch's
    global RNG is not consumed by the copy's throw-away initialization)."""
    with torch.random.fork_rng(devices=[]):
        net = build_model(method, layout, cfg.model)
    net.load_state_dict({k: v.detach().to("cpu") for k, v in model.state_dict().items()})
    return net.eval()


# ------------------------------------------------------------------------------------------------ the contract

def _hex(x: int) -> str:
    return f"0x{x:016X}"


def hashing_spec(layout: FeatureLayout) -> dict:
    """The hashing rule of ``esmm.features`` spelled out, with test vectors computed by it."""
    ids = (1, 987654321)
    extremes = (0, -1, 2 ** 63 - 1, -2 ** 63, 123456789012345)
    vectors = []
    for i, f in enumerate(layout.fields):
        for fid in ids + (extremes if i == 0 else ()):
            h = spark_hash_long(i, fid)
            b = 1 + h % (layout.buckets[i] - 1)
            vectors.append({"field": f, "field_index": i, "feature_id": fid, "xxhash64": h,
                            "xxhash64_hex": f"0x{h & (2 ** 64 - 1):016X}", "bucket": b, "id": layout.offsets[i] + b})
    return {
        "rule": "bucket = 1 + pmod(xxhash64(int field_index, long feature_id), buckets[f] - 1); "
                "id = offsets[f] + bucket",
        "definition": "Spark SQL xxhash64(CAST(field_index AS INT), CAST(feature_id AS BIGINT)) with its default "
                      "seed 42, i.e. the reference XXH64 applied to each value's little-endian bytes, the first "
                      "hash being the seed of the second",
        "seed": SPARK_SEED,
        "steps": [
            "f = the field's position in layout.fields (0-based); field_index = f as a 32-bit int",
            "feature_id = the raw entry's feature id (the number between \\x02 and \\x03 of an Ali-CCP entry) as a "
            "signed 64-bit int (two's complement)",
            "h1 = XXH64(4 little-endian bytes of field_index, seed = 42)  (unsigned 64-bit)",
            "h2 = XXH64(8 little-endian bytes of feature_id, seed = h1)  (unsigned 64-bit)",
            "h = h2 read as a signed 64-bit int (Spark returns a signed long)",
            "bucket = 1 + pmod(h, buckets[f] - 1), pmod(a, n) = ((a % n) + n) % n with a truncating %, i.e. the "
            "non-negative remainder; bucket is in [1, buckets[f] - 1]",
            "id = offsets[f] + bucket (bucket 0, id = offsets[f], is reserved for missing and padding)",
        ],
        "xxh64_4_bytes": "h = seed + P5 + 4; h ^= uint32(v) * P1; h = rotl64(h, 23) * P2 + P3; return avalanche(h)",
        "xxh64_8_bytes": "h = seed + P5 + 8; h ^= rotl64(uint64(v) * P2, 31) * P1; h = rotl64(h, 27) * P1 + P4; "
                         "return avalanche(h)",
        "avalanche": "h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32",
        "arithmetic": "unsigned 64-bit, wrapping (mod 2**64); >> is a logical shift",
        "json_note": "64-bit integers here are exact JSON integers: parse them as int64, not as doubles "
                     "(xxhash64_hex is the same hash as unsigned hex)",
        "primes": {"P1": _hex(P1), "P2": _hex(P2), "P3": _hex(P3), "P4": _hex(P4), "P5": _hex(P5)},
        "test_vectors": vectors,
    }


ENCODING = [
    "One row per impression: its entries are (field, feature_id, value) of the skeleton line plus its common line "
    "(field = the Ali-CCP field id string, e.g. '101', '109_14'); entries of fields not in layout.fields are ignored",
    "Per field f (in layout.fields order) the row owns slots slot_starts[f] .. slot_starts[f] + max_len[f] - 1",
    "Keep the field's top max_len[f] entries by value (descending; ties: smaller feature_id first), in that order",
    "Weights: 1.0 when max_len[f] == 1; else value / sum(kept values), or 1 / (number kept) when that sum is 0",
    "Unused slots of the field: id = offsets[f], weight 0.0",
    "A field with no entry: first slot id = offsets[f] with weight 1.0 (the learned 'missing' embedding), the rest "
    "id = offsets[f], weight 0.0",
]


def _outputs(method: str) -> dict:
    m = get_method(method)
    if m.head != HEAD_SINGLE and m.cvr_from == OWN:
        meaningful, combine = list(OUTPUTS), "all three from this network; p_ctcvr = p_ctr * p_cvr"
    elif m.head != HEAD_SINGLE and m.cvr_from == RATIO:
        meaningful = list(OUTPUTS)
        combine = ("all three from this network: its click and click-and-convert steps give p_ctr and pCTCVR; "
                   "p_cvr = clip(pCTCVR / max(p_ctr, 1.1754944e-38), 0, 1), reported p_ctcvr = p_ctr * p_cvr")
    elif m.task == TASK_CTR:
        meaningful, combine = ["p_ctr"], "the reference CTR network: p_cvr and p_ctcvr are NaN"
    elif m.task == TASK_CVR:
        meaningful = ["p_cvr"]
        combine = ("as the evaluation does: p_ctr from the reference CTR network's portable module (method 'ctr') on "
                   "the same rows, p_ctcvr = p_ctr * p_cvr")
    else:
        meaningful = ["p_ctcvr"]
        combine = ("DIVISION, as the evaluation does: p_ctr from the reference CTR network (method 'ctr'), "
                   "p_cvr = clip(p_ctcvr / max(p_ctr, 1.1754944e-38), 0, 1), reported p_ctcvr = p_ctr * p_cvr")
    return {"names": list(OUTPUTS), "dtype": "float32", "shape": ["B"], "meaningful": meaningful,
            "nan": [o for o in OUTPUTS if o not in meaningful], "combine": combine}


def contract(method: str, layout: FeatureLayout, identity: dict | None = None) -> dict:
    """The JSON that describes a portable export (everything but the file's checksum)."""
    m = get_method(method)
    lay = layout.to_dict()
    lay["per_field"] = [{"field": f, "field_index": i, "slot_start": layout.slot_starts[i],
                         "max_len": layout.max_len[i], "offset": layout.offsets[i], "buckets": layout.buckets[i]}
                        for i, f in enumerate(layout.fields)]
    L = layout.num_slots
    return {
        "format": PORTABLE_FORMAT, "method": method, "task": m.task, "model_kind": m.network, "head": m.head,
        "run_id": (identity or {}).get("run_id"), "dataset_fingerprint": (identity or {}).get("dataset_fingerprint"),
        "torch_version": torch.__version__,
        "usage": "m = torch.jit.load(path, map_location='cpu'); p_ctr, p_cvr, p_ctcvr = m(feat_ids, feat_wts)",
        "inputs": {
            "feat_ids": {"dtype": "int64", "shape": ["B", L], "values": f"global ids in [0, {layout.num_embeddings})",
                         "note": "int32 is accepted (cast); B may be 0"},
            "feat_wts": {"dtype": "float32", "shape": ["B", L], "note": "pooling weights, 0 for padding slots"},
        },
        "outputs": _outputs(method),
        "layout": lay,
        "hashing": hashing_spec(layout),
        "encoding": ENCODING,
    }


# ------------------------------------------------------------------------------------------------ writing

def _atomic(path: str, write) -> None:
    """``write(local_path)`` for a library that writes to a path, then the file moves (or uploads) to ``path``
    (``esmm.storage.local_file``): readers never see a partial file."""
    with storage.local_file(path) as tmp:
        write(tmp)


def script(net: nn.Module, method: str, layout: FeatureLayout) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of the scorer (torch 2.13 flags TorchScript as deprecated; it is what loads without this
    package and without Python, so the warning is silenced here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.*")
        return torch.jit.script(scorer(net, method, layout))


def write_portable(net: nn.Module, method: str, layout: FeatureLayout, out_dir: str,
                   identity: dict | None = None) -> dict:
    """Script a CPU network and write ``model.ts.pt`` then ``model.portable.json`` (each atomically; the JSON, with
    the module's size and sha256, comes last and marks the pair complete). Returns the JSON."""
    start = time.time()
    spec = contract(method, layout, identity)
    module = script(net, method, layout)
    ts_path = storage.join(out_dir, TORCHSCRIPT)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.*")
        _atomic(ts_path, lambda p: torch.jit.save(module, p, _extra_files={EMBEDDED: json.dumps(spec)}))
    size, digest = storage.file_digest(ts_path)
    spec["files"] = {"torchscript": TORCHSCRIPT, "bytes": size, "sha256": digest}
    storage.write_json(storage.join(out_dir, CONTRACT), spec)
    log.info("portable export (%s, %s) written to %s in %.2fs", TORCHSCRIPT, CONTRACT, storage.display(out_dir),
             time.time() - start)
    return spec


def export_portable(model: nn.Module, method: str, cfg, layout: FeatureLayout, out_dir: str,
                    identity: dict | None = None) -> dict:
    """The portable export of a trained model (any device; copied to the CPU first). Same arguments as
    ``esmm.train.export_model`` with the run directory instead of the export path."""
    return write_portable(cpu_copy(model, method, cfg, layout), method, layout, out_dir, identity)


def _load(export_path: str):
    from esmm.artifacts import EXPORT, load_export
    if storage.isdir(export_path):
        export_path = storage.join(export_path, EXPORT)
    net, blob = load_export(export_path)
    lay = blob["layout"]
    return net, blob, FeatureLayout(tuple(lay["fields"]), tuple(lay["buckets"]), tuple(lay["max_len"])), export_path


def export_portable_from(export_path: str, out_dir: str | None = None) -> dict:
    """The portable export of an existing run: ``export_path`` is a ``model.pt`` or its run directory; the files go
    to ``out_dir`` (default: beside the export)."""
    net, blob, layout, export_path = _load(export_path)
    return write_portable(net, blob["method"], layout, out_dir or storage.parent(export_path), blob)


# ------------------------------------------------------------------------------------------------ ONNX (optional)

class _GatherPool(nn.Module):
    """``FieldEmbedding`` without ``EmbeddingBag`` for ONNX: gather the slots' rows, weight them, sum each field's
    slot range with a fixed (L, F) 0/1 matrix. Same maths (the sum order differs: ~1e-7). The ONNX exporters turn
    ``EmbeddingBag`` into a Loop over bags, which onnxruntime ran 40x (legacy exporter) to 18,000x (dynamo) slower
    than TorchScript (4096 rows at conf/test.yaml sizes: 0.52 s, 220 s vs 0.012 s; this version: 0.013 s)."""

    def __init__(self, emb: FieldEmbedding, layout: FeatureLayout):
        super().__init__()
        self.weight = emb.bag.weight
        self.out_dim = emb.out_dim
        assign = torch.zeros(layout.num_slots, layout.num_fields)
        for f, (s, k) in enumerate(zip(layout.slot_starts, layout.max_len)):
            assign[s:s + k, f] = 1.0
        self.register_buffer("assign", assign)

    def forward(self, ids: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.weight) * wts.unsqueeze(-1)           # (B, L, D)
        pooled = torch.matmul(rows.transpose(1, 2), self.assign)                         # (B, D, F)
        return pooled.transpose(1, 2).reshape(ids.shape[0], self.out_dim)               # (B, F*D), field-major


def onnx_scorer(net: nn.Module, method: str, layout: FeatureLayout) -> nn.Module:
    """The scorer with every ``FieldEmbedding`` swapped for ``_GatherPool`` (sharing the weights)."""
    for name, child in list(net.named_children()):
        if isinstance(child, FieldEmbedding):
            setattr(net, name, _GatherPool(child, layout))
    return scorer(net, method, layout)


def export_onnx(export_path: str, out_path: str | None = None) -> str:
    """Write ``model.onnx`` (opset of torch's dynamo exporter, dynamic batch dimension; inputs ``feat_ids`` int64 and
    ``feat_wts`` float32 (B, L), outputs ``p_ctr``, ``p_cvr``, ``p_ctcvr`` (B,) as the TorchScript module, the
    contract JSON in the model's metadata_props under ``esmm.portable``) for a ``model.pt`` or its run directory.
    Needs ``onnx`` and ``onnxscript``; returns the path written. B >= 1 (onnxruntime rejects an empty batch here)."""
    import onnx  # an ImportError names what is missing
    import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) needs it)
    net, blob, layout, export_path = _load(export_path)
    out_path = out_path or storage.join(storage.parent(export_path), ONNX)
    module = onnx_scorer(net, blob["method"], layout)
    L = layout.num_slots
    example = (torch.zeros(2, L, dtype=torch.long) + torch.tensor(layout.offsets).repeat_interleave(
        torch.tensor(layout.max_len)), torch.ones(2, L))
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(module, example, dynamo=True, input_names=["feat_ids", "feat_wts"],
                                output_names=list(OUTPUTS), dynamic_shapes=({0: batch}, {0: batch}),
                                verbose=False)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = "esmm.portable", json.dumps(contract(blob["method"], layout, blob))
    _atomic(out_path, lambda p: onnx.save(proto, p))
    return out_path
