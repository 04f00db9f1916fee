"""Writing results (arrays first, then the document that names their hash) and checking them back."""

from __future__ import annotations

import io
import json
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from ..atomic import sha256_bytes, sha256_file, write_bytes_atomic, write_npz_atomic, write_text_atomic
from ..errors import SpecError
from ..limits import (EVIDENCE_FILE_BYTES, NPY_HEADER_BYTES, RESULT_ARRAYS_BYTES, RESULT_ARRAYS_MEMBERS,
                      RESULT_JSON_BYTES, size_text)
from ..readers import read_bounded, read_json_file
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
    # evidence.file is written by whoever wrote the document: only this plan's file beside it is read
    name = result.evidence.file
    if name != evidence_path(Path(path), result.plan).name:
        raise SpecError(f"{path}: evidence.file: {name[:80]!r} is not {result.plan}.models.safetensors beside the "
                        "document; refused")
    evidence = Path(path).parent / name
    try:
        mode = evidence.lstat().st_mode
    except OSError:
        raise SpecError(f"{path}: evidence.file: {evidence} does not exist") from None
    if stat.S_ISLNK(mode) or not stat.S_ISREG(mode):
        raise SpecError(f"{path}: evidence.file: {evidence} is not a regular file (links are refused)")
    data = read_bounded(evidence, EVIDENCE_FILE_BYTES, follow_symlinks=False)
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
    """A result document, bounded in size and nesting before it is parsed (readers.py), then validated."""
    data = read_json_file(Path(path), RESULT_JSON_BYTES)
    try:
        return Result.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(str(path), exc)) from None


def plain_arrays_name(path: Path, result: Result) -> str:
    """The document's ``arrays.file``, refused unless a plain ``.npz`` file name (no path, no link, no hidden
    name, short enough for a file system to hold)."""
    name = result.arrays.file
    if (not name.endswith(".npz") or name.startswith(".") or any(c in name for c in "/\\\0")
            or Path(name).name != name or len(name.encode("utf-8", "surrogatepass")) > 255):
        raise SpecError(f"{path}: arrays.file: {name[:80]!r} is not a plain .npz file name beside the document; refused")
    return name


def arrays_present(path: Path, result: Result) -> bool:
    """Whether anything sits where the document's arrays would be (its name checked first)."""
    try:
        (Path(path).parent / plain_arrays_name(path, result)).lstat()
    except OSError:
        return False
    return True


def arrays_file(path: Path, result: Result) -> Path:
    """Where the document's arrays are: a plain ``.npz`` file name beside it, never a path or a link.

    ``arrays.file`` is written by whoever wrote the document: ``../../../../etc/passwd`` must not be read.
    """
    arrays_path = Path(path).parent / plain_arrays_name(path, result)
    try:
        mode = arrays_path.lstat().st_mode
    except OSError:
        raise SpecError(f"{path}: arrays.file: {arrays_path} does not exist (a committed result keeps no arrays: "
                        "validate it with --recompute, which recomputes them from its quantized weights)") from None
    if stat.S_ISLNK(mode):
        raise SpecError(f"{path}: arrays.file: {arrays_path} is a symbolic link; refused")
    if not stat.S_ISREG(mode):
        raise SpecError(f"{path}: arrays.file: {arrays_path} is not a regular file; refused")
    return arrays_path


def load_arrays(path: Path, result: Result) -> dict[str, np.ndarray]:
    arrays_path = arrays_file(path, result)
    actual = sha256_file(arrays_path)
    if actual != result.arrays.sha256:
        raise SpecError(f"{path}: arrays.sha256: {arrays_path.name} has sha256 {actual[:12]}…, "
                        f"the document records {result.arrays.sha256[:12]}… (file changed or corrupted)")
    return read_npz(arrays_path)


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_HEADER_LENGTH = {(1, 0): "<H", (2, 0): "<I"}  # the field after the magic that says how long the header is


def _npy_header(member, where: str, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of the .npy stream ``member``, its header length checked before it is read.

    numpy reads a header of whatever length the file claims (up to 4 GiB in format 2.0) before it
    applies its own bound, so the length field is read here first and held to NPY_HEADER_BYTES."""
    version = np.lib.format.read_magic(member)
    if version not in _HEADER_READERS:
        raise SpecError(f"{where}: {name[:80]!r} has an unsupported .npy format version")
    field = member.read(struct.calcsize(_HEADER_LENGTH[version]))
    if len(field) != struct.calcsize(_HEADER_LENGTH[version]):
        raise SpecError(f"{where}: {name[:80]!r} ends inside its header")
    (length,) = struct.unpack(_HEADER_LENGTH[version], field)
    if length > NPY_HEADER_BYTES:
        raise SpecError(f"{where}: {name[:80]!r} claims a {size_text(length)} header, more than the "
                        f"{size_text(NPY_HEADER_BYTES)} a .npy header needs; refused")
    shape, _, dtype = _HEADER_READERS[version](io.BytesIO(field + member.read(length)))
    return shape, dtype


_END_RECORD, _ZIP64_LOCATOR, _ZIP64_END_RECORD = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06"
# A listing entry is 46 bytes plus its name, extra field and comment: an array's entry needs far less.
_LISTING_ENTRY_BYTES = 1024


def _zip_listing_size(path: Path) -> tuple[int, int]:
    """(members, bytes of the central directory) as a zip's end record states them, read before ``zipfile``
    opens the file: it builds its whole listing in memory, in proportion to what the file claims."""
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        tail_start = max(0, size - (22 + 0xFFFF))  # the end record, then a comment of at most 64 KiB
        handle.seek(tail_start)
        tail = handle.read()
        at = tail.rfind(_END_RECORD)
        if at < 0 or len(tail) - at < 22:
            raise zipfile.BadZipFile("no end of central directory record")
        members, listing = struct.unpack("<HI", tail[at + 10:at + 16])
        if members == 0xFFFF or listing == 0xFFFFFFFF:  # ZIP64: the locator just before names the real record
            locator = tail[at - 20:at] if at >= 20 else b""
            if not locator.startswith(_ZIP64_LOCATOR):
                raise zipfile.BadZipFile("a ZIP64 end record without its locator")
            (offset,) = struct.unpack("<Q", locator[8:16])
            handle.seek(offset)
            record = handle.read(56)
            if len(record) < 56 or not record.startswith(_ZIP64_END_RECORD):
                raise zipfile.BadZipFile("no ZIP64 end of central directory record")
            members, listing = struct.unpack("<QQ", record[32:48])
    return members, listing


def read_npz(path: Path, max_bytes: int = RESULT_ARRAYS_BYTES) -> dict[str, np.ndarray]:
    """Every array of an .npz whose headers were checked first: numeric dtypes only (never pickled objects),
    and no more than ``max_bytes`` in all, so a small compressed file cannot claim a huge array."""
    where = f"{path}: arrays"
    try:
        members, listing = _zip_listing_size(path)
        if members > RESULT_ARRAYS_MEMBERS:
            raise SpecError(f"{where}: the zip lists {members} members, more than the {RESULT_ARRAYS_MEMBERS} arrays "
                            "a result holds; refused")
        if listing > RESULT_ARRAYS_MEMBERS * _LISTING_ENTRY_BYTES:
            raise SpecError(f"{where}: the zip's listing takes {size_text(listing)}, more than "
                            f"{size_text(RESULT_ARRAYS_MEMBERS * _LISTING_ENTRY_BYTES)} for at most "
                            f"{RESULT_ARRAYS_MEMBERS} arrays; refused")
        with zipfile.ZipFile(path) as archive:
            total, names = 0, set()
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise SpecError(f"{where}: {info.filename[:80]!r} is not an array; refused")
                if info.filename in names:  # np.load would read the last of them, not the one checked here
                    raise SpecError(f"{where}: {info.filename[:80]!r} appears twice; refused")
                names.add(info.filename)
                if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise SpecError(f"{where}: {info.filename[:80]!r} is encrypted or compressed other than as "
                                    "numpy writes it (stored or deflate); refused")
                with archive.open(info) as member:  # the header only: shape and dtype, nothing allocated
                    shape, dtype = _npy_header(member, where, info.filename)
                if any(int(side) < 0 for side in shape):
                    raise SpecError(f"{where}: {info.filename[:-4][:80]} claims a negative shape {shape}; refused")
                if dtype.hasobject or dtype.kind not in "biuf":
                    raise SpecError(f"{where}: {info.filename[:-4]} holds {dtype} values; only numbers and booleans "
                                    "are accepted (object arrays are never unpickled)")
                total += int(np.prod(shape, dtype=object)) * dtype.itemsize
                if total > max_bytes:
                    raise SpecError(f"{where}: more than {size_text(max_bytes)} of arrays; refused")
            # exactly the members checked above (np.load would look "x.npy" up as member "x.npy", not "x.npy.npy")
            arrays = {}
            for info in archive.infolist():
                with archive.open(info) as member:
                    arrays[info.filename[: -len(".npy")]] = np.lib.format.read_array(member, allow_pickle=False)
            return arrays
    except SpecError:
        raise
    except (OSError, ValueError, EOFError, KeyError, MemoryError, RuntimeError, NotImplementedError,
            zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error) as exc:  # zlib.error: a damaged deflate stream
        raise SpecError(f"{where}: unreadable .npz file ({type(exc).__name__}: {str(exc)[:120]})") from None
