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


def verify_result(path: Path) -> Result:
    """Raise BenchError naming the file and field of the first kind of problem found."""
    result = load_result(path)
    failed = [a.layer for a in result.audit if not a.passed]
    if failed:
        raise BenchError(f"{path}: audit: layers {', '.join(failed)} failed the bit-width audit")
    arrays = load_arrays(path, result)
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
