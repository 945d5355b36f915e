"""A training run's directory: what the run depends on (its inputs), and rank 0's verdict on the directory before
training starts (claimed, reused, resumed or refused), on top of the output lifecycle (``esmm.outputs.Output``).
``esmm.train`` holds the loop, the checkpoints and the launchers."""
from __future__ import annotations

import logging
import re

from esmm import storage
from esmm import validation as V
from esmm.artifacts import EXPORT, SUMMARY, read_manifest
from esmm.config import Config, to_dict
from esmm.methods import get_method
from esmm.outputs import Output, OutputRefused, dataset_fingerprint
from schemas.dataset import TRAIN

log = logging.getLogger(__name__)
RUN_KIND = "train_run"


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says what is missing."""


class TrainOutputRefused(TrainError, OutputRefused):
    """The run directory holds a run of other inputs; ``--overwrite`` deletes it and starts over (exit code 4)."""


def ctr_model_path(cfg: Config, check: bool = False) -> str:
    path = storage.resolve(cfg.train.ctr_model or storage.join(cfg.paths.runs, "ctr", EXPORT))
    if check and not storage.isfile(path):
        raise TrainError(f"method {cfg.train.method!r} needs the reference CTR network at {storage.display(path)}: "
                         f"train it first (train.method=ctr) or set train.ctr_model")
    return path


def run_inputs(manifest: dict, cfg: Config, ctr_digest: str | None = None) -> dict:
    """What a run's results depend on: the dataset build, its feature layout, the model and train config sections,
    and for the methods that score with it the reference CTR network's export (sha256). The run directory's marker
    records them; resume and reuse require the same fingerprint."""
    inputs = {"dataset": dataset_fingerprint(manifest), "layout": manifest["layout"], "model": to_dict(cfg.model),
              "train": to_dict(cfg.train)}
    if ctr_digest is not None:
        inputs["train"] = {**inputs["train"], "ctr_model": None}  # the path is not the identity; its content is
        inputs["ctr_model_sha256"] = ctr_digest
    return inputs


def _differences(old: dict, new: dict) -> list[str]:
    """What differs between two runs' inputs, in words (the refusal message)."""
    out = []
    if old.get("dataset") != new["dataset"]:
        out.append(f"the dataset (fingerprint {old.get('dataset')} -> {new['dataset']}: another or a rebuilt dataset)")
    if old.get("layout") != new["layout"]:
        out.append("the dataset's feature layout")
    if old.get("ctr_model_sha256") != new.get("ctr_model_sha256"):
        out.append("the reference CTR network's export (sha256)")
    for section in ("model", "train"):
        a, b = old.get(section) or {}, new[section]
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if keys:
            out.append("the config: " + ", ".join(f"{section}.{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys))
    return out


def _has_artifacts(out_dir: str, list_checkpoints) -> bool:
    names = set(storage.listdir(out_dir))
    return bool(list_checkpoints(out_dir)) or bool(names & {EXPORT, SUMMARY})


def _remove_partial_writes(out_dir: str) -> None:
    """Temporary files of writes a killed run left behind (``*.tmp-<pid>-<id>``): never read, removed under the lock
    so they do not pile up (only files: this project's own atomic-write names inside its own run directory)."""
    for name in storage.listdir(out_dir):
        if re.search(r"\.tmp-[0-9a-z-]+$", name) and storage.isfile(storage.join(out_dir, name)):
            log.warning("removing %s, the partial write of an interrupted run", name)
            storage.delete(storage.join(out_dir, name))


def prepare(cfg: Config, dataset: str, out: Output, list_checkpoints, load_checkpoint) -> dict:
    """Rank 0's verdict, holding the run directory's lock: the manifest, the run's marker, and either the finished
    summary or the checkpoint to resume (None: start from scratch; ``load_checkpoint(run dir)`` reads it). Raises
    whatever stops the run before it starts."""
    manifest = read_manifest(dataset)
    digest = None
    if get_method(cfg.train.method).needs_ctr_probs:
        digest = storage.file_digest(ctr_model_path(cfg, check=True))[1]
    out.inputs = run_inputs(manifest, cfg, digest)
    out.__enter__()
    if out.reusable:
        log.info("%s already holds a finished run of the same inputs: skipping", storage.display(out.out))
        return {"manifest": manifest, "finished": {**storage.read_json(storage.join(out.out, SUMMARY)),
                                                   "skipped": True}}
    marker = out.claim(lambda: _has_artifacts(out.out, list_checkpoints))
    _remove_partial_writes(out.out)
    try:
        split = V.find_split(storage.join(dataset, TRAIN), manifest, cfg.train.validation_share)
    except V.ValidationError as e:
        raise TrainError(str(e)) from e
    return {"manifest": manifest, "marker": marker, "checkpoint": load_checkpoint(out.out), "validation": split}


