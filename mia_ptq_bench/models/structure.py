"""What the quantizers and the bit-width audit assume of a network's layers, checked on one forward pass.

Every stage after the pool sees a network as its Conv2d and Linear modules (``quantizable_layers``):
the quantizers rewrite their weights, the audit counts their distinct values per channel, a plan's
``-last<b>`` takes the last one as the classifier, and the calibrated methods capture each layer's
inputs with a hook and fold BatchNorm into the convolution before it. A network can be valid
PyTorch and still break those views without an error: a weight matrix outside these modules stays
at full precision and unaudited, a layer whose weight is used without calling the module gets no
inputs (OBC and GPTQ would zero it), a layer or BatchNorm called twice has two sets of inputs
(its reconstruction target and its fold mix them), and two layers sharing one weight each rewrite
it. ``check_quantizable`` refuses such a network with one line naming the layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import SpecError
from .base import QUANTIZABLE, quantizable_layers

_NORMS = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def call_order(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """The Conv2d, Linear and BatchNorm modules ``model(example)`` calls: name -> number of calls, in first-call order."""
    calls: dict[str, int] = {}
    watched = [(name, module) for name, module in model.named_modules() if isinstance(module, (*QUANTIZABLE, _NORMS))]
    handles = [module.register_forward_pre_hook(lambda mod, args, name=name: calls.update({name: calls.get(name, 0) + 1}))
               for name, module in watched]
    training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    return calls


def check_quantizable(model: nn.Module, example: torch.Tensor) -> None:
    """Raise SpecError if ``model`` breaks what the quantizers assume of its layers (module docstring).

    ``example``: a batch of at least 2 inputs of the model's shape (BatchNorm refuses a batch of 1).
    """
    layers = quantizable_layers(model)
    owners: dict[int, str] = {}
    for name, layer in layers:
        for leaf, parameter in layer.named_parameters(recurse=False):
            other = owners.setdefault(id(parameter), f"{name}.{leaf}")
            if other != f"{name}.{leaf}":
                raise SpecError(f"model: layers {other.rsplit('.', 1)[0]!r} and {name!r} share one parameter "
                                f"({other} is {name}.{leaf}); a quantizer would rewrite it once per layer")
    quantized = {id(layer.weight) for _, layer in layers}
    for name, parameter in model.named_parameters():
        if parameter.ndim >= 2 and id(parameter) not in quantized:
            raise SpecError(f"model: parameter {name!r} {tuple(parameter.shape)} is a weight matrix outside any "
                            "Conv2d or Linear; the quantizers would leave it at full precision and the bit-width "
                            "audit would not see it")
    calls = call_order(model, example)
    for name, _ in layers:
        if name not in calls:
            raise SpecError(f"model: layer {name!r} is never called by the forward pass (its weight used directly, "
                            "or not at all); the calibrated quantizers see a layer's inputs only through its call")
    for name, count in calls.items():
        if count > 1:
            raise SpecError(f"model: {name!r} is called {count} times in one forward pass; the quantizers need each "
                            "Conv2d, Linear and BatchNorm called once (one set of inputs, one fold)")
    called = [name for name in calls if isinstance(model.get_submodule(name), QUANTIZABLE)]
    if layers and called[-1] != layers[-1][0]:
        raise SpecError(f"model: the last layer registered, {layers[-1][0]!r}, is not the last one called "
                        f"({called[-1]!r}); plans read the last registered layer as the classifier, so register "
                        "the classifier last")
