"""What the quantizers and the bit-width audit assume of a network's layers, checked on one forward pass.

Every stage after the pool sees a network as its Conv2d and Linear modules (``quantizable_layers``):
the quantizers rewrite their ``weight``, the audit counts its distinct values per channel, a plan's
``-last<b>`` takes the last layer as the classifier, and the calibrated methods capture each layer's
inputs with a hook on its call. A network can be valid PyTorch and still break those views without
an error, so ``check_quantizable`` watches one forward pass (hooks on the layers, a torch function
mode on the operations that multiply by a weight) and refuses, naming the layer:

- a parameter multiplied as a matrix outside any Conv2d or Linear (an attention's ``in_proj_weight``,
  an embedding table): it would stay at full precision, unaudited;
- a layer's weight used outside the layer's own call (``F.linear(x, layer.weight)``), or a layer
  never called: hooks see no inputs there (OBC and GPTQ would zero a never-called layer);
- a layer whose call multiplies by something other than its ``weight`` parameter (``weight_norm``
  and other parametrizations, a subclass that transforms its weight): the written weight is not used;
- two layers sharing a parameter (each quantization rewrites it);
- a classifier that is not both the last layer registered and the last one called;
- with ``once``: a Conv2d, Linear or BatchNorm called more than once per forward pass, which
  AdaRound's and BRECQ's reconstruction targets and BatchNorm folding cannot take (OBC, GPTQ and
  RTN sum or ignore the calls, and take it).

One pass sees one path: a layer called only for some inputs is judged on the example given.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import SpecError
from .base import QUANTIZABLE, quantizable_layers

_NORMS = nn.modules.batchnorm._BatchNorm

# Operations that multiply by a weight. A torch function mode sees the outermost call only, so
# attention's fused forward is listed whole.
_MATRIX_OPS = {F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
               F.conv_transpose3d, F.embedding, F.embedding_bag, F.multi_head_attention_forward, torch.matmul,
               torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.addbmm, torch.einsum, torch.tensordot,
               torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.Tensor.mm,
               torch.Tensor.bmm, torch.Tensor.addmm, torch.Tensor.baddbmm}
_LAYER_OPS = {nn.Conv2d: F.conv2d, nn.Linear: F.linear}


def _name(func) -> str:
    return getattr(func, "__name__", repr(func))


def _root(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a view was taken of (a reshaped or transposed parameter is still that parameter)."""
    while tensor._base is not None:
        tensor = tensor._base
    return tensor


class _Watch(TorchFunctionMode):
    """Records, during a forward pass, which parameters the matrix operations read and inside which layer call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.parameters = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        self.weights = {id(layer.weight): name for name, layer in quantizable_layers(model)}
        self.inside: list[tuple[str, nn.Module]] = []  # the layer calls under way, innermost last
        self.problems: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATRIX_OPS:
            self._look(func, args, kwargs)
        return func(*args, **kwargs)

    def _look(self, func, args, kwargs) -> None:
        current = self.inside[-1] if self.inside else None
        for value in tree_flatten((args, kwargs))[0]:
            if not isinstance(value, torch.Tensor):
                continue
            root = _root(value)
            name = self.parameters.get(id(root))
            if name is None:
                continue
            owner = self.weights.get(id(root))
            if owner is not None and (current is None or current[0] != owner):
                self.problems.append(f"the weight of layer {owner!r} is used outside the layer's own call "
                                     f"(by {_name(func)}); the quantizers see a layer's inputs only through its call")
            elif owner is None and (value.ndim >= 2 or root.ndim >= 2):
                self.problems.append(f"parameter {name!r} {tuple(root.shape)} is multiplied as a matrix (by "
                                     f"{_name(func)}) outside any Conv2d or Linear; the quantizers would leave it "
                                     "at full precision and the bit-width audit would not see it")
        if current is not None and any(func is op and isinstance(current[1], kind) for kind, op in _LAYER_OPS.items()):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if not isinstance(weight, torch.Tensor) or _root(weight) is not current[1].weight:
                self.problems.append(f"layer {current[0]!r} multiplies by something other than its weight parameter "
                                     "(a parametrization such as weight_norm, or a subclass that transforms its weight); "
                                     "the quantizers write .weight, which its forward would not use as it is")


@torch.no_grad()
def call_order(model: nn.Module, example: torch.Tensor, watch: _Watch | None = None) -> dict[str, int]:
    """The Conv2d, Linear and BatchNorm modules ``model(example)`` calls in eval mode: name -> number of
    calls, in first-call order. The model's modes and the global random state are left as they were."""
    calls: dict[str, int] = {}
    modules = dict(model.named_modules())
    watched = [(name, module) for name, module in modules.items() if isinstance(module, (*QUANTIZABLE, _NORMS))]
    inside = watch.inside if watch is not None else []

    def enter(name: str, module: nn.Module) -> None:
        calls[name] = calls.get(name, 0) + 1
        if isinstance(module, QUANTIZABLE):
            inside.append((name, module))

    def leave(module: nn.Module) -> None:
        if isinstance(module, QUANTIZABLE):
            inside.pop()

    handles = [module.register_forward_pre_hook(lambda mod, args, name=name: enter(name, mod))
               for name, module in watched]
    handles += [module.register_forward_hook(lambda mod, args, out: leave(mod)) for _, module in watched]
    modes = {name: module.training for name, module in modules.items()}
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            if watch is None:
                model(example)
            else:
                with watch:
                    model(example)
    finally:
        for handle in handles:
            handle.remove()
        for name, module in modules.items():
            module.training = modes[name]
    return calls


def check_quantizable(model: nn.Module, example: torch.Tensor, once: bool = False) -> None:
    """Raise SpecError if ``model`` breaks what the quantizers assume of its layers (module docstring).

    ``example``: a batch of at least 2 inputs of the model's shape (a BatchNorm without running
    statistics refuses a batch of 1). ``once``: also require every Conv2d, Linear and BatchNorm to be
    called at most once.
    """
    layers = quantizable_layers(model)
    owners: dict[int, str] = {}
    for name, layer in layers:
        for leaf, parameter in layer.named_parameters(recurse=False):
            other = owners.setdefault(id(parameter), f"{name}.{leaf}")
            if other != f"{name}.{leaf}":
                raise SpecError(f"model: layers {other.rsplit('.', 1)[0]!r} and {name!r} share one parameter "
                                f"({other} is {name}.{leaf}); a quantizer would rewrite it once per layer")
    watch = _Watch(model)
    calls = call_order(model, example, watch)
    if watch.problems:
        raise SpecError(f"model: {watch.problems[0]}")
    for name, _ in layers:
        if name not in calls:
            raise SpecError(f"model: layer {name!r} is never called by the forward pass in eval mode; the calibrated "
                            "quantizers see a layer's inputs only through its call")
    if once:
        for name, count in calls.items():
            if count > 1:
                raise SpecError(f"model: {name!r} is called {count} times in one forward pass; this method needs each "
                                "Conv2d, Linear and BatchNorm called once (one reconstruction target, one fold)")
    called = [name for name in calls if isinstance(model.get_submodule(name), QUANTIZABLE)]
    if layers and called[-1] != layers[-1][0]:
        raise SpecError(f"model: the last layer registered, {layers[-1][0]!r}, is not the last one called "
                        f"({called[-1]!r}); plans read the last registered layer as the classifier, so register "
                        "the classifier last")
