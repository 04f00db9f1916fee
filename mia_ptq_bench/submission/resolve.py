"""A quantizer from a submission folder, and name resolution that includes submissions/.

The one place where the submission side meets the quantizer stack: importing this module
loads torch and every built-in method, so the validator and the site builder never do.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BenchError, UnknownNameError
from ..registry import did_you_mean
from ..quantize.base import QUANTIZERS
from ..quantize.plugins import ENTRY_POINT_GROUP, Found, discover_installed, entry_points, load_import_path, \
    resolve_installed
from .load import METADATA, load_submission
from .schema import QuantizerReference

DEFAULT_SUBMISSIONS = Path("submissions")


def submission_quantizer(folder: Path) -> Found:
    """The quantizer a submission names: a built-in, a file of the folder, or an installed requirement's class.

    Importing a file of the folder runs submitted code: call this only where that is intended.
    """
    spec = load_submission(folder)
    ref: QuantizerReference = spec.quantizer
    where = f"submission {folder}"
    if ref.builtin is not None:
        cls = QUANTIZERS.get(ref.builtin)
    else:
        if ref.file is not None:
            cls = load_import_path(f"{Path(folder) / ref.file}:{ref.class_name}", spec.name)
        else:
            try:
                cls = load_import_path(str(ref.entry), spec.name)
            except BenchError as exc:
                raise BenchError(f"{exc}; install the submission's requirement first: pip install '{ref.requirement}'") from None
        if cls.name != spec.name:  # its results would record the class's name, which validate refuses
            raise BenchError(f"{where}: class {cls.__name__} calls itself {cls.name!r}, but the submission is "
                             f"{spec.name!r}: give the class name = {spec.name!r} (or no name: it takes the submission's)")
    return Found(spec.name, cls, where, dict(ref.config))


def resolve(name: str, submissions: Path = DEFAULT_SUBMISSIONS, submissions_option: str | None = None) -> Found:
    """Find ``name``; if nothing matches, say every place that was searched (and ``submissions_option``, the
    caller's option for another submissions folder, if it has one)."""
    found = resolve_installed(name)
    if found is not None:
        return found
    folder = Path(submissions) / name
    if (folder / METADATA).is_file():
        return submission_quantizer(folder)
    submitted = sorted(p.parent.name for p in Path(submissions).glob(f"*/{METADATA}"))
    hint = did_you_mean(name, [*QUANTIZERS, *entry_points(), *submitted])
    raise UnknownNameError(
        f"unknown quantizer {name!r}{hint}; looked in the registry ({', '.join(QUANTIZERS) or 'empty'}), "
        f"entry points '{ENTRY_POINT_GROUP}' ({', '.join(sorted(entry_points())) or 'none'}), "
        f"and {submissions}/*/{METADATA} ({', '.join(submitted) or 'none'}"
        f"{f'; another folder: {submissions_option}' if submissions_option else ''}); "
        "or pass package.module:Class or file.py:Class (a name a plugin registers needs the plugin loaded: "
        "--plugin file.py or $MPTQ_PLUGINS)"
    )


def discover(submissions: Path = DEFAULT_SUBMISSIONS) -> list[tuple[str, str, str]]:
    """Every quantizer that can be found without running submitted code, one row per name, saying which
    one ``evaluate NAME`` uses: an installed one comes first; a submission folder of the same name (the
    built-ins' published results) is named beside it."""
    rows = {name: (name, source, doc) for name, source, doc in discover_installed()}
    for path in sorted(Path(submissions).glob(f"*/{METADATA}")):
        try:
            spec = load_submission(path.parent)
            name, source, doc = spec.name, f"submission {path.parent}", spec.display_name
        except BenchError as exc:
            name, source, doc = path.parent.name, f"submission {path.parent} (invalid)", str(exc).splitlines()[0]
        if name in rows:
            installed = rows[name]
            rows[name] = (name, f"{installed[1]} (used by evaluate); results in {path.parent}", installed[2])
        else:
            rows[name] = (name, source, doc)
    return list(rows.values())
