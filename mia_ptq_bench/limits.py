"""Every size limit on input the benchmark reads, in one place, and the checks shared by several readers.

Task files, submissions, result documents and their arrays come from people the benchmark
does not know. Each reader refuses input beyond these limits with one line naming the file,
before it allocates in proportion to what the input claims.
"""

from __future__ import annotations

import math
from typing import Any

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# YAML: submission metadata is a page of text; a task file a little more (its description and lists).
SUBMISSION_YAML_BYTES = 64 * KiB
TASK_YAML_BYTES = 256 * KiB
YAML_DEPTH = 16  # nested mappings/lists; the deepest real document has 4
YAML_NODES = 20_000  # scalars, lists and mappings together

# JSON: a result document grows with targets x attacks (about 2 KiB each); 1024 targets x 8 attacks fits.
RESULT_JSON_BYTES = 32 * MiB
MANIFEST_JSON_BYTES = 1 * MiB
JSON_DEPTH = 32
# Lists and objects in one document: a result holds about 1,000 in 240 KiB, so a document at the size
# limit honestly holds some 130,000. Each costs far more memory parsed than its two bytes of text.
JSON_CONTAINERS = 500_000

# Arrays beside a result: the largest study task (64 models x 100,000 examples x 2 queries x 8 bytes,
# twice) is about 200 MiB uncompressed.
RESULT_ARRAYS_BYTES = 4 * GiB
# Arrays in one such file: a result saves about 40 (a few per attack and threat model); the zip's own
# listing of more would take memory and time in proportion to what the file claims.
RESULT_ARRAYS_MEMBERS = 256

# Evidence: one plan's quantized weights as bit-packed codes and per-channel codebooks, committed with
# a submission. 16 ResNet10 (width 1/8) targets at 4 bits take 1.1 MiB; a study-size ResNet18 target
# about 6 MiB, so 16 of them fit under the cap.
EVIDENCE_FILE_BYTES = 128 * MiB

# A submission folder: results for many tasks, a little code, a README.
SUBMISSION_FILES = 1000  # files and folders together
SUBMISSION_DEPTH = 8  # folders deep, counting results/<task>/ as 2
# By where a file is, then its suffix: result files are large only under results/ (a LICENSE.npz
# beside submission.yaml gets the 1 MiB of any other file, not the 4 GiB of result arrays).
SUBMISSION_RESULT_FILE_BYTES = {".json": RESULT_JSON_BYTES, ".npz": RESULT_ARRAYS_BYTES,
                                ".safetensors": EVIDENCE_FILE_BYTES}
SUBMISSION_FILE_BYTES = {".py": 1 * MiB, ".yaml": SUBMISSION_YAML_BYTES}
SUBMISSION_OTHER_FILE_BYTES = 1 * MiB  # README.md, LICENSE*
SUBMISSION_TOTAL_BYTES = 8 * GiB


def submission_file_limit(relative_parts: tuple[str, ...], suffix: str) -> int:
    """The size allowed for a submission's file at ``relative_parts`` (inside the submission folder)."""
    if relative_parts[:1] == ("results",) and suffix in SUBMISSION_RESULT_FILE_BYTES:
        return SUBMISSION_RESULT_FILE_BYTES[suffix]
    return SUBMISSION_FILE_BYTES.get(suffix, SUBMISSION_OTHER_FILE_BYTES)


# A pool pulled from the Hub, per file (sizes checked before the download when the Hub lists them, and
# again on disk): a study-size ResNet18's weights take 45 MiB. Its arrays (masks, scores) are bounded by
# the task's own sizes, plus a .npy header (pool/hub.py file_limit).
POOL_FILE_BYTES = {".safetensors": 1 * GiB, ".json": 64 * KiB}
NPY_HEADER_BYTES = 4 * KiB

# quantizer.config is rendered on the site as indented JSON.
CONFIG_DEPTH = 8
CONFIG_JSON_BYTES = 8 * KiB


def size_text(n: float) -> str:
    """Bytes for people: 1.5 GiB, 320 KiB."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def plain_data_problem(value: Any, max_depth: int, where: str = "") -> str | None:
    """Why ``value`` is not plain JSON data (str keys; str, finite numbers, bools, None, lists, dicts)
    nested at most ``max_depth`` deep, or None. Walks iteratively: a deep value cannot exhaust the stack."""
    stack = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > max_depth:
            return f"{path or '(value)'}: nested deeper than {max_depth} levels"
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return f"{path or '(value)'}: key {key!r} is not a string"
                stack.append((child, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{path or '(value)'}: {item!r} is not a finite number"
        elif not (item is None or isinstance(item, (str, int, bool))):
            return f"{path or '(value)'}: {type(item).__name__} is not plain data (use strings, numbers, lists, mappings)"
    return None


def nesting_depth(value: Any) -> int:
    """How deeply lists and dicts nest in ``value`` (a scalar is 0), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
            deepest = max(deepest, depth + 1)
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
            deepest = max(deepest, depth + 1)
    return deepest
