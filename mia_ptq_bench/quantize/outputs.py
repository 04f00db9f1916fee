"""What the evaluation keeps of a model: its scores on the pool, its test predictions and its audit.

Quantized outputs are cached per model (one .npz each) under a key of the pool, the
quantizer's config, the plan, the calibration spec and the environment, so an interrupted run
resumes where it stopped and a rerun costs nothing.
"""

from __future__ import annotations

import json
import pickle
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..atomic import content_hash, write_npz_atomic
from ..context import RunContext
from ..data import Split
from ..environment import environment
from ..data.splits import evaluation_test_split
from ..errors import BenchError, CacheError
from ..extensions import import_module_or_file, load_extensions
from ..inference import eval_mode, predict_logits, score_split
from ..models import QUANTIZABLE, quantizable_layers
from ..pool import Pool, build_pool
from ..progress import Progress, SilentProgress
from ..spec.audit import LayerAudit, audit_problems
from ..spec.plans import PrecisionPlan
from .audit import audit_model, enforce_audit
from .base import Quantizer
from .calibration import calibration_count, calibration_set
from .evidence import encode_model

# Of a cached outputs file: 2 added the quantized weights; 3 records the key it was made under, checked on
# loading with its arrays' shapes, values and audit (a file moved into another plan's folder was used as is).
FORMAT = 3
EVIDENCE = "evidence/"  # prefix of the quantized weights' arrays inside a cached outputs file
RESIDENT = "resident worker"  # set in a process that keeps its quantizer from unit to unit (receive_pool)


@dataclass(frozen=True)
class ModelOutputs:
    scores: np.ndarray  # (N, Q) on the pool
    test_predictions: np.ndarray  # (n_test,) on the evaluation test split
    audit: list[LayerAudit]
    evidence: dict[str, np.ndarray] = field(default_factory=dict)  # the quantized weights (quantize/evidence.py)


def environment_key(device: str, workers: int = 1) -> str:
    """A hash of the environment a result records (package versions, processor, threads, device, the
    processes the models were quantized in...).

    That environment is the one its numbers were computed in (docs/reproducibility.md: the same
    environment gives the same bits), so outputs made under another one are kept apart in the cache,
    never mixed into a result that names this one.
    """
    return content_hash(environment(device, workers))


class OutputStore:
    """Quantized-model outputs, one .npz per model, keyed by pool, quantizer config, plan, calibration and environment."""

    def __init__(self, cache_dir: Path, pool: Pool, quantizer: Quantizer, plan: PrecisionPlan, made_in: str,
                 progress: Progress | None = None) -> None:
        """``made_in``: ``environment_key`` of the run's device, taken once by the process that writes the
        result (a worker writing outputs for it uses the same folder and key)."""
        spec = pool.spec
        self.progress = progress or SilentProgress()
        self.tested = len(evaluation_test_split(spec.calibration, pool.dataset))  # what predictions are made on
        described = quantizer.describe()
        calibration = content_hash(spec.calibration.model_dump(mode="json"))
        code = quantizer.code_digest()  # "" for a built-in, whose version is bumped with its code
        key = described["config_hash"] if not code else content_hash({"config": described["config_hash"], "code": code})
        # A method asking for more images than some pool model has members calibrates every model on
        # that fewest count (calibration_count); such outputs are named by it, apart from the outputs
        # of the rule before it (each model capped at its own members, then its group at the fewest).
        capped = ""
        if spec.calibration.source == "members":
            requested = quantizer.calibration_size(spec.calibration.size)
            count = calibration_count(pool.keep, requested)
            capped = f"-n{count}" if count < requested else ""
        self.pool = pool
        self.plan = plan
        self.root = (Path(cache_dir) / "quantized" / pool.store.root.name /
                     f"{quantizer.name}-{key[:12]}" / f"{plan}-cal{calibration[:8]}{capped}-env{made_in[:8]}-v{FORMAT}")
        # The whole key, which the folder names only by prefixes: each file carries it and must match it.
        self.key = json.dumps({"format": FORMAT, "pool": pool.store.root.name, "quantizer": described["name"],
                               "version": described["version"], "config_hash": described["config_hash"],
                               "code": code, "plan": str(plan), "calibration": calibration, "capped": capped,
                               "environment": made_in},
                              sort_keys=True)

    def path(self, index: int) -> Path:
        return self.root / f"model-{index:04d}.npz"

    def load(self, index: int) -> ModelOutputs | None:
        """Model ``index``'s cached outputs, or None (absent, or unusable: then the file is removed and redone)."""
        path = self.path(index)
        if not path.exists():
            return None
        if path.is_dir() and not path.is_symlink():
            raise CacheError(f"{path}: a folder where model {index}'s quantized outputs belong; remove it to redo them")
        if not path.is_file():  # a FIFO would block the read below
            return self._redo(index, "not a regular file")
        try:
            with np.load(path, allow_pickle=False) as archive:
                files = set(archive.files)
                key = str(archive["key_json"]) if "key_json" in files else None
                # Quantized from the pool model as it is now? A retrained pool (cache cleared, another
                # trainer) keeps its folder name, so the outputs say which weights they came from.
                source = str(archive["pool_weights_sha256"]) if "pool_weights_sha256" in files else None
                scores, predictions = archive["scores"], archive["test_predictions"]
                audit = [LayerAudit.model_validate(x) for x in json.loads(str(archive["audit_json"]))]
                evidence = {k.removeprefix(EVIDENCE): archive[k] for k in files if k.startswith(EVIDENCE)}
        except (OSError, EOFError, ValueError, KeyError, TypeError, RuntimeError, NotImplementedError,
                zipfile.BadZipFile, zlib.error) as exc:
            # a truncated or damaged zip, bad JSON, a missing array: the file cannot be used
            return self._redo(index, f"corrupted cache file ({type(exc).__name__}: {str(exc)[:120]})")
        if key != self.key:
            return self._redo(index, "made under another key (quantizer, config, plan, calibration or environment)")
        if source != self.pool.store.record(index).weights_sha256:
            return self._redo(index, "quantized from other pool weights")
        problem = self._problem(index, scores, predictions, audit, evidence)
        if problem:
            return self._redo(index, problem)
        return ModelOutputs(scores, predictions, audit, evidence)

    def _problem(self, index: int, scores: np.ndarray, predictions: np.ndarray, audit: list[LayerAudit],
                 evidence: dict[str, np.ndarray]) -> str | None:
        """Why arrays read from a cache file are not outputs a quantization of this plan gives, or None."""
        dataset = self.pool.dataset
        expected = (len(dataset.pool), len(self.pool.spec.queries))
        if scores.dtype.kind != "f" or scores.shape != expected or not np.isfinite(scores).all():
            return f"scores: {scores.dtype} {scores.shape}, expected finite floats of shape {expected}"
        tested = self.tested
        if predictions.dtype.kind not in "iu" or predictions.shape != (tested,) or (
                predictions.size and (predictions.min() < 0 or predictions.max() >= dataset.num_classes)):
            return (f"test_predictions: {predictions.dtype} {predictions.shape}, expected {tested} classes "
                    f"0-{dataset.num_classes - 1}")
        if not audit or any(not a.passed for a in audit) or audit_problems(audit, str(self.plan)):
            return "audit: not a passed audit of this plan"
        if any(not k.startswith(f"{index}::") for k in evidence):
            return f"evidence: holds weights of another model than {index}"
        return None

    def _redo(self, index: int, reason: str) -> None:
        path = self.path(index)
        self.progress.log(f"redoing model {index}: {path}: {reason}")
        path.unlink(missing_ok=True)
        return None

    def save(self, index: int, outputs: ModelOutputs) -> None:
        write_npz_atomic(self.path(index), {
            "key_json": np.array(self.key),
            "scores": outputs.scores, "test_predictions": outputs.test_predictions,
            "pool_weights_sha256": np.array(self.pool.store.record(index).weights_sha256),
            "audit_json": np.array(json.dumps([a.model_dump(mode="json") for a in outputs.audit])),
            **{EVIDENCE + k: v for k, v in outputs.evidence.items()},
        })


def predicted_classes(model: torch.nn.Module, pool: Pool, test: Split, device: str) -> np.ndarray:
    return predict_logits(model, pool.dataset, test, "identity", device).argmax(dim=1).numpy()


def reference_outputs(pool: Pool, index: int, test: Split, device: str) -> ModelOutputs:
    """A pool model at full precision: its cached pool scores, its test predictions, an fp32 audit."""
    model = pool.load_model(index, device)
    return ModelOutputs(pool.scores[index], predicted_classes(model, pool, test, device),
                        audit_model(model, PrecisionPlan(None)))


def probe_forward(model: torch.nn.Module, pool: Pool, what: str, device: str) -> None:
    """Two pool images through a quantizer's model before it is scored: a model the quantizer left unable to
    run (a weight reshaped, a dtype changed) or with the wrong number of outputs is one error naming the
    quantizer, not torch's traceback from deep in the scoring. Only the model's own call is blamed on it."""
    probe = pool.dataset.pool.images[:2].to(device)
    inputs = pool.dataset.normalize(probe)
    try:
        with eval_mode(model), torch.no_grad():
            logits = model(inputs)
    except Exception as exc:  # noqa: BLE001 - the model's forward failed: the quantizer's model, reported as such
        raise BenchError(f"{what} fails on the task's images: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]}") from None
    expected = (len(probe), pool.dataset.num_classes)
    got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
    if got != expected:
        raise BenchError(f"{what} returns {f'outputs of shape {got}' if isinstance(got, tuple) else f'a {got}'} "
                         f"for {len(probe)} images; expected a tensor of shape {expected} (one logit per class)")


def quantized_outputs(pool: Pool, indices: list[int], quantizer: Quantizer, plan: PrecisionPlan, test: Split,
                      store: OutputStore, device: str, whole: bool = False) -> dict[int, ModelOutputs]:
    """Quantize, audit and score a group of pool models (cached ones are loaded, not redone; ``whole``: unless one
    is missing, then all are quantized together again, as the group they were made in)."""
    outputs = {i: cached for i in indices if (cached := store.load(i)) is not None}
    todo = [i for i in indices if i not in outputs]
    if not todo:
        return outputs
    if whole:
        outputs, todo = {}, list(indices)
    spec = pool.spec
    size = quantizer.calibration_size(spec.calibration.size) if spec.calibration.source == "members" else 0
    models = [pool.load_model(i, device) for i in todo]
    layers = layer_structure(models[0])  # before the quantizer may change the models in place
    calibrations = [calibration_set(spec, pool.dataset, pool.keep, i, size, device) for i in todo]
    try:
        quantized = quantizer.quantize_many(models, calibrations, plan)
    except SystemExit as exc:  # a plugin's exit() would end the run as if it had succeeded, writing nothing
        raise BenchError(f"quantizer {quantizer.name!r} at {plan}: quantize called exit({exc.code!r}); a quantizer "
                         "returns its models or raises an exception") from None
    if not isinstance(quantized, (list, tuple)) or len(quantized) != len(todo):
        got = f"{len(quantized)} models" if isinstance(quantized, (list, tuple)) else type(quantized).__name__
        raise BenchError(f"quantizer {quantizer.name!r} at {plan}: quantize_many returned {got} for {len(todo)}; "
                         "expected a list of the quantized models, in order")
    for index, model in zip(todo, quantized, strict=True):
        if not isinstance(model, torch.nn.Module):
            raise BenchError(f"quantizer {quantizer.name!r} at {plan}: quantize returned {type(model).__name__} for "
                             f"pool model {index}; expected the quantized model (a torch.nn.Module)")
        probe_forward(model, pool, f"quantizer {quantizer.name!r} at {plan}: its model for pool model {index}", device)
        # The audit reads the layers the returned model has: one that hid a layer from it, or moved the
        # classifier, would pass a plan it breaks (and its evidence would not load into the pool's architecture).
        changed = layer_change(layers, layer_structure(model))
        if changed:
            raise BenchError(f"quantizer {quantizer.name!r} at {plan}: its model for pool model {index} does not keep "
                             f"the pool model's quantizable layers ({changed}); a quantizer changes weights, not "
                             "which Conv2d and Linear layers there are or their order")
        audit = audit_model(model, plan)
        enforce_audit(audit, plan, f"quantizer {quantizer.name!r} on pool model {index}")
        scores = score_split(model, pool.dataset, pool.dataset.pool, list(spec.queries), device)
        predictions = predicted_classes(model, pool, test, device)
        if not np.isfinite(scores).all():
            raise BenchError(f"quantizer {quantizer.name!r} at {plan}: model {index} produced non-finite outputs")
        outputs[index] = ModelOutputs(scores, predictions, audit, encode_model(index, model))
        store.save(index, outputs[index])
    return outputs


def layer_structure(model: torch.nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """Each quantizable layer's name, kind (Conv2d or Linear, subclasses included) and weight shape, in order."""
    return [(name, next(kind.__name__ for kind in QUANTIZABLE if isinstance(layer, kind)),
             tuple(getattr(layer.weight, "shape", ()))) for name, layer in quantizable_layers(model)]


def layer_change(expected: list[tuple], got: list[tuple]) -> str:
    """The first difference between two ``layer_structure`` lists, in words ("" if none)."""
    for position, (want, have) in enumerate(zip(expected, got)):
        if want != have:
            return (f"layer {position + 1} is {have[1]} {have[0]!r} of weight {list(have[2])}, where the pool model "
                    f"has {want[1]} {want[0]!r} of weight {list(want[2])}")
    if len(got) != len(expected):
        return f"{len(got)} layers, where the pool model has {len(expected)}"
    return ""


def quantize_unit(context: RunContext, quantizer: Quantizer, plan: str, made_in: str,
                  indices: tuple[int, ...]) -> list[int]:
    """A unit of work: quantize a group of pool models into the output cache (the pool is read, never trained);
    ``made_in``: the driver's ``environment_key``, so that the driver finds what its units wrote."""
    context.enter()
    if context.loaded(RESIDENT, lambda: False):
        # A resident worker goes on with the first copy of the quantizer it received: its memo holds the
        # units earlier plans quantized, which the driver's (never run there) copy sent with each unit lacks.
        described = quantizer.describe()
        quantizer = context.loaded(f"quantizer {described['name']} {described['config_hash']}", lambda: quantizer)
    pool = context.loaded("pool", lambda: build_pool(context.spec, context.dataset(), context.cache_dir,
                                                     context.device))
    test = context.loaded("test", lambda: evaluation_test_split(context.spec.calibration, pool.dataset))
    parsed = PrecisionPlan.parse(plan)
    store = OutputStore(context.outputs_root, pool, quantizer, parsed, made_in)
    quantized_outputs(pool, list(indices), quantizer, parsed, test, store, context.device, whole=True)
    return list(indices)


def receive_pool(context: RunContext, handed: bytes, files: tuple[str, ...] = ()) -> None:
    """In a worker process that will run ``quantize_unit``s: keep the driver's pool and test split (pickled by
    value: as tensors they would go through torch's shared memory, which a container's small /dev/shm refuses).
    First the extensions, which may define the pool's data, and ``files``, the .py files that define the
    quantizers its units will receive (``extensions.defining_files``)."""
    load_extensions(context.extensions)
    for file in files:
        import_module_or_file(file)
    pool, test = pickle.loads(handed)
    context.remember("pool", pool)
    context.remember("test", test)
    context.remember(RESIDENT, True)
