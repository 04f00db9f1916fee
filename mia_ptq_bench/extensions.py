"""Loading user code that extends the benchmark: a module by name, or a .py file by path.

An extension registers what it adds when imported (``@register_quantizer``, ``ATTACKS.register``,
``DATASETS.register``, ``MODELS.register``). ``load_extensions`` imports, in order, the modules
named by ``--plugin`` options, by ``$MPTQ_PLUGINS`` (os.pathsep-separated) and by installed
packages' entry points in the group ``mia_ptq_bench.plugins``. Every process that runs units of
work (a Ray worker too) loads the same list, so a registered dataset or model is found there.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from types import ModuleType

from .errors import BenchError, NameTakenError

PLUGINS_ENV = "MPTQ_PLUGINS"
PLUGIN_ENTRY_POINTS = "mia_ptq_bench.plugins"
FILE_MODULE_PREFIX = "mptq_plugin_"  # of the name a .py file given by path is imported under


def import_module_or_file(ref: str) -> ModuleType:
    """``package.module``, or ``path/to/file.py`` imported under a name derived from its absolute path."""
    try:
        if ref.endswith(".py"):
            file = Path(ref).resolve()
            if not file.is_file():
                raise BenchError(f"{ref}: no such file {file}")
            name = FILE_MODULE_PREFIX + hashlib.sha256(str(file).encode()).hexdigest()[:16]
            if name in sys.modules:
                return sys.modules[name]
            spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[name] = module
            # No __pycache__ beside the file: a submission's folder stays as its author wrote it, and
            # `validate` refuses files it does not expect there.
            writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
            try:
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            except BaseException:
                del sys.modules[name]
                raise
            finally:
                sys.dont_write_bytecode = writes_bytecode
            return module
        return importlib.import_module(ref)
    except SyntaxError as exc:  # the plugin author's own typo: where it is, in one line
        where = f"{Path(exc.filename).name}, line {exc.lineno}" if exc.filename else f"line {exc.lineno}"
        raise BenchError(f"{ref}: cannot import: {exc.msg} ({where})") from None
    except ImportError as exc:
        missing_itself = getattr(exc, "name", None) == ref  # not a module it imports
        hint = f" (a file is imported as {ref}.py)" if missing_itself and Path(f"{ref}.py").is_file() else ""
        raise BenchError(f"{ref}: cannot import: {exc}{hint}") from None
    except NameTakenError as exc:  # registering under a taken name: which extension did
        raise NameTakenError(f"{ref}: {exc}") from None
    except BenchError:
        raise
    except (Exception, SystemExit) as exc:  # the plugin failed on import: what, and where in its file, in one line
        frames = traceback.extract_tb(exc.__traceback__)
        if frames and in_package(frames[-1].filename):
            raise  # a bug in the benchmark's own code, reached from the plugin: its traceback is the report
        own = _source_file(ref)
        lines = [f.lineno for f in frames if own is not None and _same_file(f.filename, own)]
        where = f" ({own.name}, line {lines[-1]})" if lines and own is not None else ""
        reason = " ".join(str(exc).split())[:200]
        raise BenchError(f"{ref}: cannot import: {type(exc).__name__}{': ' + reason if reason else ''}{where}") from None


_PACKAGE = Path(__file__).resolve().parent


def in_package(filename: str) -> bool:
    """Whether the source file ``filename`` is this package's own code."""
    return _PACKAGE in Path(filename).resolve().parents


def _same_file(filename: str, path: Path) -> bool:
    return Path(filename).resolve() == path


def _source_file(ref: str) -> Path | None:
    """The file an extension's own code is in: the .py given, or the module's (None where it cannot be told)."""
    if ref.endswith(".py"):
        return Path(ref).resolve()
    try:
        spec = importlib.util.find_spec(ref)
    except (ImportError, ValueError, AttributeError):
        return None
    return Path(spec.origin).resolve() if spec is not None and spec.origin else None


def extension_refs(refs: Iterable[str] = ()) -> tuple[str, ...]:
    """Every extension to load: the given ones, then $MPTQ_PLUGINS, then installed entry points."""
    from_env = [p for p in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if p]
    # the module an entry point names, whether written "pkg.mod" or "pkg.mod:attr": importing it registers
    points = [ep.module for ep in metadata.entry_points(group=PLUGIN_ENTRY_POINTS)]
    return tuple(dict.fromkeys([*refs, *from_env, *points]))


def load_extensions(refs: Iterable[str] = ()) -> tuple[str, ...]:
    """Import every extension (each once per process); returns what was loaded, in order."""
    loaded = extension_refs(refs)
    for ref in loaded:
        import_module_or_file(ref)
    return loaded


def defining_files(*objects: object) -> tuple[str, ...]:
    """The .py files imported by path whose classes or functions pickling ``objects`` refers to (their own
    classes, base classes, attributes' and settings' classes): another process imports them
    (``import_module_or_file``, under the same module names) before it can unpickle the objects."""
    import pickle
    import pickletools

    files = []
    for _, arg, _ in pickletools.genops(pickle.dumps(objects)):
        # A module is named by a string the pickle carries (GLOBAL's "module name", or the operand STACK_GLOBAL
        # takes): every string that names a module loaded by path counts, in the order pickling met it.
        for name in arg.split() if isinstance(arg, str) else ():
            module = sys.modules.get(name) if name.startswith(FILE_MODULE_PREFIX) else None
            if getattr(module, "__file__", None):
                files.append(module.__file__)
    return tuple(dict.fromkeys(files))
