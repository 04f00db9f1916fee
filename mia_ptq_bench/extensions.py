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

from .errors import BenchError

PLUGINS_ENV = "MPTQ_PLUGINS"
PLUGIN_ENTRY_POINTS = "mia_ptq_bench.plugins"


def import_module_or_file(ref: str) -> ModuleType:
    """``package.module``, or ``path/to/file.py`` imported under a name derived from its absolute path."""
    try:
        if ref.endswith(".py"):
            file = Path(ref).resolve()
            if not file.is_file():
                raise BenchError(f"{ref}: no such file {file}")
            name = "mptq_plugin_" + hashlib.sha256(str(file).encode()).hexdigest()[:16]
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
    except BenchError:
        raise
    except (Exception, SystemExit) as exc:  # the plugin's own code failed on import: what and where, in one line
        frames = traceback.extract_tb(exc.__traceback__)
        last = frames[-1] if frames else None
        where = f" ({Path(last.filename).name}, line {last.lineno})" if last is not None else ""
        reason = " ".join(str(exc).split())[:200]
        raise BenchError(f"{ref}: cannot import: {type(exc).__name__}{': ' + reason if reason else ''}{where}") from None


def extension_refs(refs: Iterable[str] = ()) -> tuple[str, ...]:
    """Every extension to load: the given ones, then $MPTQ_PLUGINS, then installed entry points."""
    from_env = [p for p in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if p]
    points = [ep.value for ep in metadata.entry_points(group=PLUGIN_ENTRY_POINTS)]
    return tuple(dict.fromkeys([*refs, *from_env, *points]))


def load_extensions(refs: Iterable[str] = ()) -> tuple[str, ...]:
    """Import every extension (each once per process); returns what was loaded, in order."""
    loaded = extension_refs(refs)
    for ref in loaded:
        import_module_or_file(ref)
    return loaded
