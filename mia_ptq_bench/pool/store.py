"""The pool's on-disk cache: one folder per pool hash, one completion record per model.

Layout under ``<cache>/pools/<task-id>-<pool-hash[:12]>/``::

    pool.json                     what this pool is (task id, pool hash, the pool part of the spec)
    keep.npy                      (n_models, n_examples) bool membership masks
    models/model-0007.safetensors weights of model 7
    scores/model-0007.npy         (n_examples, n_queries) float64 logit-scaled confidences
    models/model-0007.json        completion record: sha256 of both files, test accuracy

The record is written last and atomically, so a model counts as done only when
its weights and scores are whole; an interrupted build loses at most the work in
flight. Every read checks the recorded sha256.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .. import __version__
from ..atomic import sha256_file, write_atomic, write_bytes_atomic, write_json_atomic
from ..errors import CacheError, SpecError
from ..readers import read_json_file
from ..spec.schema import POOL_FIELDS, TaskSpec


# The data hash's definition (ImageDataset.digest). Version 2 sums the normalisation statistics exactly;
# version 1's float sums followed torch's thread count, and gave some datasets' same files another hash.
DATA_HASH_VERSION = 2


def other_data(header: dict, loaded: str) -> str:
    """Why a pool whose header records another data hash than ``loaded`` is refused."""
    recorded = str(header.get("data_sha256"))[:12]
    if header.get("data_hash_version") != DATA_HASH_VERSION:
        return (f"data_sha256: recorded by an earlier mia-ptq-bench ({recorded}…), whose hash of the same files "
                f"could differ from this version's ({loaded[:12]}…), so nothing says whether the pool was trained "
                "on this data")
    return f"data_sha256: this pool was trained on other data ({recorded}…, the data loaded now is {loaded[:12]}…)"


@dataclass(frozen=True)
class ModelRecord:
    index: int
    test_accuracy: float
    weights_sha256: str
    scores_sha256: str
    # trained under bfloat16 autocast (pool/train.py Speed.amp); None: recorded before records said (CUDA builds
    # autocast by default then, CPU builds never)
    autocast: bool | None = None


# How a pool's models were trained (``PoolStore.arithmetic``), as results record it.
FLOAT32, BFLOAT16_AUTOCAST, MIXED = "float32", "bfloat16-autocast", "mixed"
AUTOCAST = {FLOAT32: False, BFLOAT16_AUTOCAST: True}  # the arithmetic one Speed.amp trains in


SOURCE = "source.json"  # where a pulled pool came from (pool/hub.py); gone once any model is replaced
RECORD_BYTES = 1 << 20  # a bookkeeping JSON file: pool.json (the task spec inside) is the largest, a few KB
GROUPS = "groups.json"  # how many models each trained group held: a resumed build keeps the same groups


class PoolStore:
    def __init__(self, cache_dir: Path, spec: TaskSpec) -> None:
        self.spec = spec
        self.cache_dir = Path(cache_dir)
        self.root = self.cache_dir / "pools" / f"{spec.id}-{spec.pool_hash[:12]}"

    # -- paths --------------------------------------------------------------------------
    def weights_path(self, index: int) -> Path:
        return self.root / "models" / f"model-{index:04d}.safetensors"

    def scores_path(self, index: int) -> Path:
        return self.root / "scores" / f"model-{index:04d}.npy"

    def record_path(self, index: int) -> Path:
        return self.root / "models" / f"model-{index:04d}.json"

    # -- pool-level files -----------------------------------------------------------------
    def ensure_header(self, keep: np.ndarray, data_sha256: str) -> None:
        """Write pool.json and keep.npy once; refuse a folder that belongs to another pool, or to the
        same task trained on other data (``data_sha256``: ``ImageDataset.digest``)."""
        header = self.root / "pool.json"
        if header.exists():
            info = self.read_record(header)
            if info.get("pool_hash") != self.spec.pool_hash:
                raise CacheError(f"{header}: pool_hash: belongs to pool {info.get('pool_hash')!r}, "
                                 f"not {self.spec.pool_hash!r}; remove the folder to rebuild")
            stored = self._load_npy(self.root / "keep.npy")
            # dtype first: a structured array cannot even be compared with the masks
            if stored.dtype != np.bool_ or stored.shape != keep.shape or not np.array_equal(stored, keep):
                raise CacheError(f"{self.root / 'keep.npy'}: masks differ from the task's; remove the folder to rebuild")
            recorded = info.get("data_sha256")
            if recorded is None:  # written before pools recorded their data: from now on it is this data's
                write_json_atomic(header, {**info, "data_sha256": data_sha256, "data_hash_version": DATA_HASH_VERSION})
            elif recorded != data_sha256:
                raise CacheError(f"{header}: {other_data(info, data_sha256)}; point --data-root at the files it was "
                                 "built from, or remove the folder to rebuild")
            elif info.get("data_hash_version") != DATA_HASH_VERSION:  # the same hash under both definitions
                write_json_atomic(header, {**info, "data_hash_version": DATA_HASH_VERSION})
            return
        dumped = self.spec.model_dump(mode="json")
        write_atomic(self.root / "keep.npy", lambda handle: np.save(handle, keep))
        write_json_atomic(header, {
            "task_id": self.spec.id, "pool_hash": self.spec.pool_hash, "package_version": __version__,
            "spec": {key: dumped[key] for key in POOL_FIELDS}, "data_sha256": data_sha256,
            "data_hash_version": DATA_HASH_VERSION,
        })

    def group_layout(self, device_type: str) -> tuple[int, int] | None:
        """How this pool's build so far trained its groups on this kind of device: models per group, and the
        worker processes they were trained in (pool/build.py; 1 for a pool started before builds recorded
        them, which trained every group in one process). None: not recorded, or recorded for another kind,
        whose choice does not carry over (stacking is measured on the CPU only)."""
        info = self._groups()
        if info is None:
            return None
        layout = info.get("models_per_group"), info.get("workers", 1)
        for field, value in zip(("models_per_group", "workers"), layout):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CacheError(f"{self.root / GROUPS}: {field}: not a positive whole number; delete it (the next "
                                 "build chooses again)")
        return layout if info.get("device") == device_type else None

    def started_autocast(self, done: list[int]) -> bool | None:
        """Whether the unfinished build trained under bfloat16 autocast, on whatever device: as its completed
        models' records say, else as groups.json does (before it said, CUDA builds autocast by default and CPU
        builds never); None when neither tells."""
        recorded = AUTOCAST.get(self.arithmetic(done))
        if recorded is not None:
            return recorded
        info = self._groups()
        if info is None:
            return None
        autocast = info.get("autocast", info.get("device") == "cuda")
        if not isinstance(autocast, bool):
            raise CacheError(f"{self.root / GROUPS}: autocast: not true or false; delete it (the next build "
                             "chooses again)")
        return autocast

    def _groups(self) -> dict | None:
        path = self.root / GROUPS
        return self.read_record(path) if path.is_file() else None

    def remember_group_layout(self, size: int, device_type: str, workers: int, autocast: bool) -> None:
        write_json_atomic(self.root / GROUPS, {"models_per_group": size, "device": device_type, "workers": workers,
                                               "autocast": autocast})

    # -- per-model files --------------------------------------------------------------------
    def is_complete(self, index: int) -> bool:
        return self.record_path(index).exists()

    def is_complete_pool(self) -> bool:
        return all(self.is_complete(i) for i in range(self.spec.membership.n_models))

    def save_model(self, index: int, model: nn.Module, scores: np.ndarray, test_accuracy: float, *,
                   autocast: bool) -> None:
        state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
        # One metadata entry: safetensors writes a map's entries in an order that changes between
        # processes, and the same weights must make the same file (its sha256 names the pool: digest).
        about = json.dumps({"pool_hash": self.spec.pool_hash, "index": index}, sort_keys=True)
        write_bytes_atomic(self.weights_path(index), save(state, metadata={"pool": about}))
        write_atomic(self.scores_path(index), lambda handle: np.save(handle, scores.astype(np.float64)))
        write_json_atomic(self.record_path(index), {
            "index": index, "test_accuracy": test_accuracy,
            "weights_sha256": sha256_file(self.weights_path(index)),
            "scores_sha256": sha256_file(self.scores_path(index)),
            "autocast": autocast,
        })

    def problem(self, index: int) -> str | None:
        """Why model ``index``'s cached files cannot be trusted (unreadable record, missing or altered file), or None."""
        try:
            record = self.record(index)
            for path, expected in ((self.weights_path(index), record.weights_sha256),
                                   (self.scores_path(index), record.scores_sha256)):
                self._verify(path, expected, index)
        except CacheError as exc:
            return str(exc)
        return None

    def discard(self, index: int) -> None:
        """Forget model ``index`` (record first, so a crash in between leaves it merely incomplete).

        A pulled pool stops naming its Hub origin first: with a model retrained here it is that
        pool no longer, and results must not say it is."""
        for path in (self.root / SOURCE, self.record_path(index), self.weights_path(index), self.scores_path(index)):
            if path.is_dir() and not path.is_symlink():
                raise CacheError(f"{path}: a folder where model {index}'s file belongs; remove it to retrain the model")
            path.unlink(missing_ok=True)

    def record(self, index: int) -> ModelRecord:
        path = self.record_path(index)
        info = self.read_record(path)
        try:
            if type(info["index"]) is not int:  # not 1.0, true or 1e400: a record writes the index it was saved as
                raise ValueError(f"index: {str(info['index'])[:40]} is not a whole number")
            record = ModelRecord(info["index"], float(info["test_accuracy"]),
                                 str(info["weights_sha256"]), str(info["scores_sha256"]), info.get("autocast"))
            if record.autocast is not None and not isinstance(record.autocast, bool):
                raise ValueError("autocast: not true or false")
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheError(f"{path}: {exc}: malformed completion record; delete it to retrain model {index}") from None
        if record.index != index:
            raise CacheError(f"{path}: index: the record is model {record.index}'s, not model {index}'s; delete it to "
                             f"retrain model {index}")
        return record

    def digest(self) -> str:
        """sha256 over every model's recorded weights and scores sha256, in model order: one name for
        this very pool. A pool retrained on another CPU rounds differently and gets another digest."""
        records = [self.record(i) for i in range(self.spec.membership.n_models)]
        lines = "".join(f"{r.index} {r.weights_sha256} {r.scores_sha256}\n" for r in records)
        return hashlib.sha256(lines.encode()).hexdigest()

    def arithmetic(self, indices: list[int] | None = None) -> str | None:
        """How the pool's models (or those of ``indices``) were trained: float32, bfloat16-autocast, or mixed (a
        build resumed in the other arithmetic); None when a model's record predates the field and so does not say."""
        autocast = {self.record(i).autocast for i in (range(self.spec.membership.n_models) if indices is None
                                                      else indices)}
        if None in autocast or not autocast:
            return None
        return MIXED if len(autocast) > 1 else BFLOAT16_AUTOCAST if autocast == {True} else FLOAT32

    def load_scores(self, index: int, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Model ``index``'s scores; with ``shape`` (examples, queries), checked to be that many finite float64s
        (a pulled pool's files match its own manifest, which says nothing of what they hold)."""
        path = self.scores_path(index)
        self._verify(path, self.record(index).scores_sha256, index)
        scores = self._load_npy(path)
        if shape is not None:
            if scores.shape != shape or scores.dtype.kind != "f" or scores.dtype.itemsize != 8:
                problem = f"{scores.dtype} of shape {scores.shape}, not float64 of shape {shape} (examples, queries)"
            elif not np.isfinite(scores).all():
                problem = (f"{int((~np.isfinite(scores)).sum())} scores are not finite (a pool model whose training "
                           "diverged gives this too: check the task's recipe)")
            else:
                return scores.astype(np.float64, copy=False)
            raise CacheError(f"{path}: {problem}; delete {self.record_path(index)} to retrain model {index}")
        return scores

    def load_weights(self, index: int) -> dict[str, torch.Tensor]:
        path = self.weights_path(index)
        self._verify(path, self.record(index).weights_sha256, index)
        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise CacheError(f"{path}: unreadable weights ({exc}); delete {self.record_path(index)} to retrain model "
                             f"{index}") from None

    # -- helpers ---------------------------------------------------------------------------
    def _verify(self, path: Path, expected: str, index: int) -> None:
        if not path.is_file():
            raise CacheError(f"{path}: missing although model {index} is recorded complete; "
                             f"delete {self.record_path(index).name} to retrain it")
        actual = sha256_file(path)
        if actual != expected:
            raise CacheError(f"{path}: sha256 {actual[:12]}… does not match the recorded {expected[:12]}… "
                             f"(corrupted cache file); delete {self.record_path(index)} to retrain model {index}")

    @staticmethod
    def read_record(path: Path) -> dict:
        """A cache's JSON bookkeeping file as a mapping, or one CacheError naming it (a FIFO, a folder, a huge or
        deeply nested file included: the bounded reader refuses them without blocking)."""
        if not path.exists() and not path.is_symlink():
            raise CacheError(f"{path}: missing (removed while this run used the cache, by `cache clear` or another "
                             "process?); rerun to redo that work")
        try:
            info = read_json_file(path, RECORD_BYTES)
        except SpecError as exc:
            reason = str(exc).removeprefix(f"{path}: ")
            raise CacheError(f"{path}: unreadable cache record ({reason}); delete it to redo that work") from None
        if not isinstance(info, dict):
            raise CacheError(f"{path}: unreadable cache record (a JSON {type(info).__name__}, not an object); "
                             "delete it to redo that work")
        return info

    @staticmethod
    def _load_npy(path: Path) -> np.ndarray:
        if path.exists() and not path.is_file():  # np.load would block on a FIFO
            raise CacheError(f"{path}: not a regular file; delete it to rebuild")
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, EOFError, ValueError) as exc:  # EOFError: an empty (truncated) file
            raise CacheError(f"{path}: unreadable cache file ({exc}); delete it to rebuild") from None
