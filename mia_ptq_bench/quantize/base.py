"""What a quantizer is: a config model, a name, and ``quantize(model, calibration, plan) -> model``.

A quantizer receives a copy of a trained full-precision model, its calibration
data (a ``Calibration``: normalised images drawn as the task says, and augmented
copies on request), and a precision plan.
It returns a model of the same architecture whose quantized layers' weights lie
on a grid of at most the plan's number of values per output channel (the audit
checks). Its config is a pydantic model; the hash of (name, version, config)
goes into every result.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from ..atomic import quantizer_config_hash
from ..errors import BenchError
from ..progress import Progress, SilentProgress
from ..registry import Registry
from ..spec.plans import PrecisionPlan
from .calibration import Calibration


MAX_DIGESTED_FILES = 200  # .py files beside a plugin's own file that count, in name order


class QuantizerConfig(BaseModel):
    # No inf or NaN: a result records its config as JSON, which holds neither (it wrote null, which a
    # reproduction then refused).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Quantizer(ABC):
    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Config: ClassVar[type[QuantizerConfig]] = QuantizerConfig
    default_plans: ClassVar[list[str] | None] = None  # None: the task's plans
    # Whether the method spends long on each model (thousands of optimisation steps per layer, say), so that
    # on a CPU with threads to share `evaluate` runs a large grid in two worker processes of half the threads
    # each (runner.quantize_workers): measured 1.26-1.31x for BRECQ on 2 cores, nothing for GPTQ, whose time
    # goes mostly to scoring. Off unless a method sets it; `--workers` decides either way.
    runs_long: ClassVar[bool] = False

    def __init__(self, config: QuantizerConfig | dict | None = None) -> None:
        if config is None:
            config = self.Config()
        elif isinstance(config, dict):
            config = self.Config.model_validate(config)
        self.config = config
        self.progress: Progress = SilentProgress()  # the runner hands in its progress display

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("progress", None)  # a terminal display does not travel to worker processes
        # The class travels by reference, and a name given where it was resolved (a file's class named
        # after itself, an entry point's or a submission's name) is not in its source: it goes along.
        state["name"] = self.name
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.progress = SilentProgress()

    def calibration_size(self, task_size: int) -> int:
        """How many calibration images to draw from the target's members (the task's number by default)."""
        return task_size

    def quantize_many(self, models: list[nn.Module], calibrations: list[Calibration], plan: PrecisionPlan) -> list[nn.Module]:
        """Quantize several same-architecture models; override where batching them is faster."""
        return [self.quantize(m, c, plan) for m, c in zip(models, calibrations)]

    def unsupported(self, plan: PrecisionPlan) -> str | None:
        """Why this quantizer cannot serve ``plan``, or None if it can."""
        if plan.is_full_precision:
            return "plan fp32 is the full-precision reference; use the fp32 quantizer"
        return None

    @abstractmethod
    def quantize(self, model: nn.Module, calibration: Calibration, plan: PrecisionPlan) -> nn.Module: ...

    def code_digest(self) -> str:
        """A digest of the source of this quantizer's classes that live outside the benchmark, or "" for a
        built-in: what the cache of its outputs is also keyed on, so that editing a plugin without bumping
        its ``version`` cannot bring back outputs of the code as it was.

        Each such class counts with its qualified name, its file and the ``.py`` files beside it (the
        helpers a submission folder's quantizer imports), or, for a class in a package, every ``.py`` file
        of its top-level package (a helper in a sibling subpackage counts too), by content and relative
        name only: the same code in another folder or clone gives the same digest. Beside a file in
        site-packages only the file itself counts.
        """
        digest = hashlib.sha256()
        found = False
        for cls in type(self).__mro__:
            if cls.__module__.split(".")[0] in ("mia_ptq_bench", "builtins", "abc"):
                continue
            found = True
            digest.update(f"class {cls.__qualname__}\0".encode())
            try:
                source = inspect.getsourcefile(cls)
            except TypeError:  # defined where no file is (an interactive session)
                continue
            if not source or not Path(source).is_file():
                continue
            source = Path(source)
            package = _package_folder(cls.__module__, source)
            if package is not None:  # resolved, as the package's folder is: the names are relative to it
                source = source.resolve()
                files = [source, *sorted(p for p in package.rglob("*.py") if p != source)[:MAX_DIGESTED_FILES]]
                names = [str(file.relative_to(package)) for file in files]
            else:
                beside = [] if source.parent.name in ("site-packages", "dist-packages") else \
                    sorted(p for p in source.parent.glob("*.py") if p.name != source.name)
                files = [source, *beside[:MAX_DIGESTED_FILES]]
                names = [file.name for file in files]
            for name, file in zip(names, files):
                digest.update(f"{name}\0".encode() + file.read_bytes() + b"\0")
        return digest.hexdigest() if found else ""

    def describe(self) -> dict:
        config = self.config.model_dump(mode="json")
        return {"name": self.name, "version": self.version, "config": config,
                "config_hash": quantizer_config_hash(self.name, self.version, config)}


def _package_folder(module: str, source: Path) -> Path | None:
    """The folder of the top-level package ``module`` belongs to, where ``source`` lies inside it; None for a
    module that is no package's (a plugin file, imported alone) or a package whose folder holds more than
    its own code (site-packages itself)."""
    top = sys.modules.get(module.split(".")[0])
    paths = list(getattr(top, "__path__", None) or [])
    if "." not in module or len(paths) != 1:
        return None
    folder = Path(paths[0]).resolve()
    if folder.name in ("site-packages", "dist-packages") or folder not in source.resolve().parents:
        return None
    return folder


QUANTIZERS: Registry[type[Quantizer]] = Registry("quantizer")


# A quantizer's name names folders (results, the cache): letters, digits, '_', '.', '-', no path in it.
QUANTIZER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a quantizer's name, or None."""
    if not isinstance(name, str) or not QUANTIZER_NAME.fullmatch(name):
        return (f"{str(name)[:80]!r} is not a quantizer name: 1 to 64 letters, digits, '_', '.' or '-', starting "
                "with a letter or digit (it names the folders its results and cache go in)")
    return None


def register_quantizer(name: str):
    """Class decorator: ``@register_quantizer("mine")`` makes ``mptq-bench evaluate mine`` find it."""
    problem = name_problem(name)
    if problem:
        raise BenchError(f"register_quantizer: {problem}")

    def decorator(cls: type[Quantizer]) -> type[Quantizer]:
        cls.name = name
        QUANTIZERS.add(name, cls)
        return cls

    return decorator
