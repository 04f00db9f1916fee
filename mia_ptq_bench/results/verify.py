"""Check a result document against its arrays: schema, checksum, audit, and every number recomputed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BenchError
from .compute import build_evaluation
from .io import MEMBERSHIP, REFERENCE_MEMBERSHIP, load_arrays, load_result
from .schema import Result

TOLERANCE = 1e-9


def _differences(stored: Any, recomputed: Any, where: str) -> list[str]:
    if isinstance(stored, dict) and isinstance(recomputed, dict):
        if stored.keys() != recomputed.keys():
            return [f"{where}: keys {sorted(stored)} differ from recomputed {sorted(recomputed)}"]
        return [d for key in stored for d in _differences(stored[key], recomputed[key], f"{where}.{key}")]
    if isinstance(stored, list) and isinstance(recomputed, list):
        if len(stored) != len(recomputed):
            return [f"{where}: {len(stored)} entries, recomputed {len(recomputed)}"]
        return [d for i, (a, b) in enumerate(zip(stored, recomputed)) for d in _differences(a, b, f"{where}[{i}]")]
    if isinstance(stored, float) or isinstance(recomputed, float):
        if not math.isclose(stored, recomputed, rel_tol=0.0, abs_tol=TOLERANCE):
            return [f"{where}: stored {stored!r}, recomputed {recomputed!r}"]
        return []
    return [] if stored == recomputed else [f"{where}: stored {stored!r}, recomputed {recomputed!r}"]


def _membership(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}


def _check_arrays(path: Path, arrays: dict[str, np.ndarray], result: Result) -> None:
    """Every array the numbers are recomputed from is present, numeric and of consistent shape.

    The arrays come with a submission: a missing key or a mismatched shape is one line here, not an
    IndexError deep inside the metrics.
    """
    attacks = [(MEMBERSHIP + a, "float") for a in result.quantized.attacks]
    attacks += [(REFERENCE_MEMBERSHIP + a, "float") for a in result.reference.attacks]
    wanted = [("keep", "bool"), ("targets", "int"), ("test_labels", "int"), ("test_predictions", "int"),
              ("reference_test_predictions", "int"), *attacks]
    kinds = {"bool": "b", "int": "iu", "float": "fiu"}
    for key, kind in wanted:
        if key not in arrays:
            raise BenchError(f"{path}: arrays: {key} is missing from {result.arrays.file}")
        if arrays[key].dtype.kind not in kinds[kind]:
            raise BenchError(f"{path}: arrays: {key} holds {arrays[key].dtype}, expected {kind} values")
    keep, targets, labels = arrays["keep"], arrays["targets"], arrays["test_labels"]
    if keep.ndim != 2 or targets.ndim != 1 or labels.ndim != 1:
        raise BenchError(f"{path}: arrays: keep must be (models, examples), targets and test_labels one-dimensional")
    n_models, n_examples = keep.shape
    if targets.size and (targets.min() < 0 or targets.max() >= n_models):
        raise BenchError(f"{path}: arrays: targets must be pool model indices below {n_models}")
    shapes = {key: (targets.size, n_examples) for key, _ in attacks}
    shapes.update(test_predictions=(targets.size, labels.size), reference_test_predictions=(targets.size, labels.size))
    for key, shape in shapes.items():
        if arrays[key].shape != shape:
            raise BenchError(f"{path}: arrays: {key} has shape {arrays[key].shape}, expected {shape} "
                             "(targets x examples, or targets x test images)")


def verify_result(path: Path) -> Result:
    """Raise BenchError naming the file and field of the first kind of problem found."""
    result = load_result(path)
    failed = [a.layer for a in result.audit if not a.passed]
    if failed:
        raise BenchError(f"{path}: audit: layers {', '.join(failed)} failed the bit-width audit")
    arrays = load_arrays(path, result)
    _check_arrays(path, arrays, result)
    for name, prefix, evaluation, predictions in (
        ("quantized", MEMBERSHIP, result.quantized, "test_predictions"),
        ("reference", REFERENCE_MEMBERSHIP, result.reference, "reference_test_predictions"),
    ):
        recomputed = build_evaluation(arrays["keep"], arrays["targets"], _membership(arrays, prefix),
                                      arrays[predictions], arrays["test_labels"])
        problems = _differences(evaluation.model_dump(mode="json"), recomputed.model_dump(mode="json"), name)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise BenchError(f"{path}: {problems[0]}{more}: numbers do not match the saved arrays")
    return result
