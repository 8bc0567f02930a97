"""Formats are promises: what earlier commits wrote is read as today's format here, in one place, one
function per old version, applied when the file or state is read. Nothing else in the data pipeline
knows a format's history.

    format                                    version  upgraded by
    a prepared directory's manifest.json      1        _manifest_v1 (data.character_coverage may be null)
    the tokenizer sidecar (tokenizer.json)    1        _sidecar_v1 (the same)
    the loader's state (a checkpoint's        1        _loader_state_v1 (a02a75f and before: the
      meta.json, "loader")                               materialised epoch order)
                                              2        _loader_state_v2 (before stride scheduling: the
                                                         deficit mixing rule)

A run keeps the sample order it started with, so the loader state of a run that began before the Feistel
order (or stride scheduling) cannot be rewritten into today's rule without changing its next batches. Its
upgraded state names the rule it was written with instead, and that rule is kept below, isolated and
frozen: `MaterialisedOrder` (order "legacy") and `deficit_mix` (mixing "deficit"). The loader looks the
rules of a state up once, when the state is loaded (data_pipeline/loader.py, ORDERS and MIXING).
"""

from __future__ import annotations

import numpy as np

from data_pipeline.errors import DataError

# The current version of each format (the writers import them from here).
MANIFEST_VERSION = 2
SIDECAR_VERSION = 2
LOADER_STATE_VERSION = 3


def _upgrade(record: dict, version, current: int, steps: dict, what: str, hint: str) -> dict:
    """`record`, of `version`, brought to `current` by the one-version steps; DataError for a version
    this megacore does not know (`what` names the file or state, `hint` what to do)."""
    if version != current and (not isinstance(version, int) or version not in steps):
        raise DataError(f"{what}: unsupported version {version!r} (this megacore reads 1 to {current}; {hint})")
    while version != current:
        record = steps[version](record)
        version = record["version"]
    return record


# -- a prepared directory's manifest.json --

def upgrade_manifest(manifest: dict, path) -> dict:
    """The manifest read from `path`, in MANIFEST_VERSION; DataError naming the file for a version this
    megacore does not know."""
    return _upgrade(manifest, manifest.get("version"), MANIFEST_VERSION, {1: _manifest_v1}, f"{path}: manifest",
                    "a newer megacore wrote it, or prepare it again")


def _manifest_v1(manifest: dict) -> dict:
    """Version 1: data.character_coverage could not be left to megacore."""
    return {**manifest, "version": 2, "settings": upgrade_v1_settings(manifest.get("settings"))}


def upgrade_v1_settings(settings: dict | None) -> dict | None:
    """Preparation settings recorded before data.character_coverage could be left to megacore (null):
    the coverage was sentencepiece's 0.9995 unless set (and absent in the oldest), and such a
    preparation exists only where the characters fit at 0.9995, which is exactly what null chooses
    there. So 0.9995 reads as null, and the same settings today prepare nothing again."""
    if settings is None:
        return None
    return {**settings, "character_coverage": None if settings.get("character_coverage", 0.9995) == 0.9995
            else settings["character_coverage"]}


# -- the tokenizer sidecar (tokenizer.json): what a trained tokenizer was trained from --

def upgrade_sidecar(sidecar: dict, path) -> dict:
    """The sidecar read from `path`, in SIDECAR_VERSION (version 1 has no "version" key)."""
    return _upgrade(sidecar, sidecar.get("version", 1), SIDECAR_VERSION, {1: _sidecar_v1}, f"{path}: tokenizer sidecar",
                    "a newer megacore wrote it")


def _sidecar_v1(sidecar: dict) -> dict:
    """Version 1: written before data.character_coverage could be null."""
    return {"version": 2, **sidecar, "settings": upgrade_v1_settings(sidecar.get("settings", {}))}


# -- the loader's state --

def upgrade_loader_state(state: dict) -> dict:
    """A loader state (PackedLoader.state_dict) as an earlier commit wrote it, in LOADER_STATE_VERSION.
    States written before the version key existed are told apart by the keys they have."""
    version = state.get("version", 3 if "mixing" in state else 2 if "order" in state else 1)
    return _upgrade(state, version, LOADER_STATE_VERSION, {1: _loader_state_v1, 2: _loader_state_v2},
                    "the checkpoint's loader state", "a newer megacore wrote the checkpoint")


def _loader_state_v1(state: dict) -> dict:
    """Version 1 (before commit c0f17a7, e.g. tests/fixtures/run_a02a75f): no "order": each epoch was a
    materialised permutation, which the run keeps."""
    return {**state, "version": 2, "order": MaterialisedOrder.name}


def _loader_state_v2(state: dict) -> dict:
    """Version 2 (before commit 606cb94): no "mixing": a mixture went sample by sample to the dataset
    furthest behind its share, which the run keeps."""
    return {**state, "version": 3, "mixing": "deficit"}


# -- the rules that upgraded loader states continue with (frozen: changing them changes old runs' batches) --

class MaterialisedOrder:
    """The epoch order of runs whose loader states predate the Feistel order (order "legacy"): epoch e
    of a dataset is numpy's permutation of every sample id, seeded by (seed, e, fingerprint). It holds
    8 bytes a sample per rank; only runs that began with it use it."""

    name = "legacy"

    def __init__(self, num_samples: int, seed: int, fingerprint: str):
        self.num_samples, self.seed, self.fingerprint = num_samples, seed, fingerprint
        self._epoch, self._ids = -1, None

    def __call__(self, epoch: int, offsets: np.ndarray) -> np.ndarray:
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch, int(self.fingerprint, 16)])
            self._ids, self._epoch = rng.permutation(self.num_samples), epoch
        return self._ids[offsets]


def deficit_mix(weights: np.ndarray, positions: np.ndarray, batch: int) -> np.ndarray:
    """The mixing rule of loader states that predate stride scheduling (mixing "deficit"): the dataset of
    each of the next `batch` samples, one at a time, the dataset furthest behind its share."""
    datasets, positions = np.empty(batch, dtype=np.int64), positions.copy()
    for i in range(batch):
        j = int(np.argmax(weights * (positions.sum() + 1) - positions))
        datasets[i] = j
        positions[j] += 1
    return datasets
