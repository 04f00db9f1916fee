"""Reconstruction units and the capture of their calibration inputs and outputs.

A unit is what one reconstruction step optimises: a single quantizable layer
together with the BatchNorm/activation that directly follows it (AdaRound), or a
whole residual/dense block (BRECQ). Its input is captured at the first module it
contains and its output at the last, by forward hooks that stop the model's
forward pass as soon as they fire.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..models import BLOCKS, QUANTIZABLE, quantizable_layers

# Modules that may directly follow a layer and belong to its output.
_FOLLOWERS = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.Identity)


@dataclass
class Unit:
    name: str
    module: nn.Module  # called on the captured input
    first: nn.Module  # its input is the unit's input
    last: nn.Module  # its output is the unit's output
    layers: dict[str, str]  # parameter prefix inside ``module`` -> layer name in the model


def layer_followers(model: nn.Module) -> dict[str, list[str]]:
    """For each quantizable layer, the BatchNorm/ReLU/Identity modules applied straight after it.

    Read off the traced graph: a follower must be the only consumer of the previous
    output, and a module must be called only once (a ReLU shared by two places in a
    residual block is not absorbed: a hook on it would fire at the wrong call).
    """
    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    followers: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), QUANTIZABLE):
            continue
        chain, current = [], node
        while len(current.users) == 1:
            (user,) = current.users
            if (user.op != "call_module" or not isinstance(modules.get(user.target), _FOLLOWERS)
                    or calls[user.target] != 1):
                break
            chain.append(str(user.target))
            current = user
        followers[str(node.target)] = chain
    return followers


def _layer_unit(model: nn.Module, name: str, followers: list[str]) -> Unit:
    modules = [model.get_submodule(name)] + [model.get_submodule(f) for f in followers]
    return Unit(name=name, module=nn.Sequential(*modules), first=modules[0], last=modules[-1], layers={"0": name})


def _walk(model: nn.Module, module: nn.Module, prefix: str, blocks: bool, followers: dict[str, list[str]]) -> list[Unit]:
    units = []
    for child_name, child in module.named_children():
        full = prefix + child_name
        if isinstance(child, QUANTIZABLE):
            units.append(_layer_unit(model, full, followers[full]))
        elif blocks and any(isinstance(child, block) for _, block in BLOCKS.items()):
            inner = {name: f"{full}.{name}" for name, _ in quantizable_layers(child)}
            units.append(Unit(name=full, module=child, first=child, last=child, layers=inner))
        else:
            units.extend(_walk(model, child, full + ".", blocks, followers))
    return units


def layer_units(model: nn.Module) -> list[Unit]:
    return _walk(model, model, "", False, layer_followers(model))


def block_units(model: nn.Module) -> list[Unit]:
    return _walk(model, model, "", True, layer_followers(model))


class _Stop(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, module: nn.Module, images: torch.Tensor, where: str, batch_size: int = 256) -> torch.Tensor:
    """The input (``where="input"``) or output of ``module`` for every image, stopping each pass there."""
    store: list[torch.Tensor] = []

    def hook(_: nn.Module, args: tuple, output: torch.Tensor) -> None:
        value = args[0] if where == "input" else output
        if isinstance(value, (list, tuple)):  # DenseNet layers take the list of earlier feature maps
            value = torch.cat(list(value), 1)
        store.append(value.detach().clone())
        raise _Stop

    handle = module.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for batch in images.split(batch_size):
            try:
                model(batch)
            except _Stop:
                continue
            raise RuntimeError(f"the forward pass never reached {type(module).__name__}")
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(store)
