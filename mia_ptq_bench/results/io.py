"""Writing results (arrays first, then the document that names their hash) and checking them back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from ..atomic import sha256_bytes, sha256_file, write_bytes_atomic, write_npz_atomic, write_text_atomic
from ..errors import SpecError
from ..spec.loader import format_validation_error
from .schema import ArraysRef, EvidenceRef, Result



def result_path(out_dir: Path, task_id: str, quantizer: str | None, plan: str, threat_model: str) -> Path:
    """``<out>/<task>/<quantizer>/<plan>--<threat>.json``; without a quantizer level inside a submission."""
    folder = Path(out_dir) / task_id
    return (folder / quantizer if quantizer else folder) / f"{plan}--{threat_model}.json"


EVIDENCE_CAP = 2 * 2**20  # bytes: evidence is committed with a submission, so it stays small


def evidence_path(result_path: Path, plan: str) -> Path:
    return result_path.parent / f"{plan}.models.safetensors"


def write_evidence(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> EvidenceRef:
    """The quantized weights of one plan's models, beside its result documents (shared by threat models)."""
    from safetensors.numpy import save

    # One metadata entry: safetensors writes a map's entries in an order that changes between processes.
    data = save({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())},
                metadata={"evidence": json.dumps(metadata, sort_keys=True)})
    write_bytes_atomic(path, data)
    models = sorted({int(key.split("::")[0]) for key in tensors})
    return EvidenceRef(file=path.name, sha256=sha256_bytes(data), models=models)


def load_evidence(path: Path, result: Result) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    if result.evidence is None:
        raise SpecError(f"{path}: evidence: the result holds no quantized weights")
    evidence = Path(path).parent / result.evidence.file
    if not evidence.is_file():
        raise SpecError(f"{path}: evidence.file: {evidence} does not exist")
    data = evidence.read_bytes()
    if sha256_bytes(data) != result.evidence.sha256:
        raise SpecError(f"{path}: evidence.sha256: {evidence.name} was changed after the result was written")
    try:
        return load(data)
    except (SafetensorError, ValueError) as exc:
        raise SpecError(f"{path}: evidence.file: {evidence.name} is not a readable safetensors file ({exc})") from None


def write_result(path: Path, result: Result, arrays: dict[str, np.ndarray]) -> Result:
    """Write ``<path>.npz`` then ``path``; each atomically, so a finished document always has its arrays."""
    arrays_path = path.with_suffix(".npz")
    write_npz_atomic(arrays_path, arrays)
    result = result.model_copy(update={"arrays": ArraysRef(file=arrays_path.name, sha256=sha256_file(arrays_path))})
    write_text_atomic(path, result.model_dump_json(indent=2) + "\n")
    return result


def load_result(path: Path) -> Result:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"{path}: not a readable JSON document: {exc}") from None
    try:
        return Result.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(str(path), exc)) from None


def load_arrays(path: Path, result: Result) -> dict[str, np.ndarray]:
    arrays_path = Path(path).parent / result.arrays.file
    if not arrays_path.is_file():
        raise SpecError(f"{path}: arrays.file: {arrays_path} does not exist")
    actual = sha256_file(arrays_path)
    if actual != result.arrays.sha256:
        raise SpecError(f"{path}: arrays.sha256: {arrays_path.name} has sha256 {actual[:12]}…, "
                        f"the document records {result.arrays.sha256[:12]}… (file changed or corrupted)")
    with np.load(arrays_path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}
