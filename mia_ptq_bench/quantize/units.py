"""Reconstruction units and the capture of their calibration inputs and outputs.

A unit is what one reconstruction step optimises: a single quantizable layer
(AdaRound: its own output, as in the study's code), or a whole residual/dense block
with the stem and classifier as layers together with the BatchNorm/activation that
directly follows them (BRECQ, as its reference code does). Its input is captured at the first module it
contains and its output at the last, by forward hooks that stop the model's
forward pass as soon as they fire.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import BenchError
from ..inference import eval_mode
from ..models import BLOCKS, QUANTIZABLE, quantizable_layers
from ..pool.train import memory_share

# Modules that may directly follow a layer and belong to its output.
_FOLLOWERS = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.Identity)


@dataclass
class Unit:
    name: str
    module: nn.Module  # called on the captured input
    first: nn.Module  # its input is the unit's input
    last: nn.Module  # its output is the unit's output
    layers: dict[str, str]  # parameter prefix inside ``module`` -> layer name in the model


def traced_graph(model: nn.Module, needed_for: str) -> fx.Graph:
    """``model``'s fx graph, or one BenchError saying what needed it when the model does not trace."""
    try:
        return fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 -- fx raises several types for what it cannot follow
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BenchError(f"the model does not trace with torch.fx ({reason}), and {needed_for} needs its graph") from None


def layer_followers(model: nn.Module) -> dict[str, list[str]]:
    """For each quantizable layer, the BatchNorm/ReLU/Identity modules applied straight after it.

    Read off the traced graph: a follower must be the only consumer of the previous
    output, and a module must be called only once (a ReLU shared by two places in a
    residual block is not absorbed: a hook on it would fire at the wrong call).
    """
    graph = traced_graph(model, "finding the BatchNorm and ReLU after each layer (BRECQ's layer units)")
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


def layer_units(model: nn.Module, followers: bool = False) -> list[Unit]:
    """One unit per quantizable layer (AdaRound's): the layer alone, its own output the unit's output, or,
    with ``followers``, with the BatchNorm/ReLU that directly follow it (``layer_followers``, as BRECQ's
    stem and classifier units have them)."""
    after = layer_followers(model) if followers else {name: [] for name, _ in quantizable_layers(model)}
    return _walk(model, model, "", False, after)


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
    try:
        with eval_mode(model):
            for batch in images.split(batch_size):
                try:
                    model(batch)
                except _Stop:
                    continue
                raise RuntimeError(f"the forward pass never reached {type(module).__name__}")
    finally:
        handle.remove()
    return torch.cat(store)


# -- Capture by propagation ------------------------------------------------------------------------
#
# ``capture`` re-runs the model from its input for every unit: O(L^2) layer evaluations for L
# units. A ``ForwardCursor`` instead runs the model's traced graph once, in segments, pausing
# before each unit: the values still needed later (the "live" ones) are kept per calibration
# batch, and the next segment continues from them with the weights as they are by then. Each
# module sees the same batch as in a full forward pass with the same earlier weights, so the
# captured values are the same, bit for bit (the tests compare them with ``capture``).


class _Tracer(fx.Tracer):
    """fx tracer that keeps the given module types (BRECQ's blocks) as single calls."""

    def __init__(self, leaves: tuple[type, ...]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


@torch.no_grad()
def call_order(model: nn.Module, units: list[Unit], example: torch.Tensor) -> list[int]:
    """Unit indices in the order ``model(example)`` first calls their first modules (any not called: last).

    The order for a model that does not trace (``forward_plan`` is None): registration order can
    put a layer before the one that feeds it, whose inputs would then come from a model quantized
    in another order than the forward pass's. ``model`` is in eval mode (the quantizers' callers put
    it there); the pass draws no random numbers from the streams the quantizer goes on to use.
    """
    first: dict[int, int] = {}

    def called(u: int) -> None:  # a pre-hook that returns a value would replace the module's input
        first.setdefault(u, len(first))

    handles = [unit.first.register_forward_pre_hook(lambda *_, u=u: called(u)) for u, unit in enumerate(units)]
    try:
        with torch.random.fork_rng(devices=[]):
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(range(len(units)), key=lambda u: first.get(u, len(units) + u))


@dataclass
class ForwardPlan:
    """A model's graph cut before each unit, with the units in the order the graph reaches them."""

    nodes: list[fx.Node]
    order: list[int]  # unit indices, in the order their first modules are called
    first: dict[int, int]  # unit -> index of the node calling its first module
    last: dict[int, int]  # unit -> index of the node calling its last module
    last_use: dict[fx.Node, int]  # node -> index of the last node reading it


def forward_plan(model: nn.Module, units: list[Unit], blocks: bool = False) -> ForwardPlan | None:
    """How to run ``model`` unit by unit, or None where that is not possible (then use ``capture``).

    Possible when the model traces with fx (blocks kept whole), every unit's first and last
    module and each of its quantizable layers are called exactly once, and every unit lies
    between its own first call and the next unit's: then the segment before a unit uses only
    weights of units already processed, exactly as a full forward pass at that point would.
    Units are processed in the order the graph calls them; a model's registration order differs
    only for parallel branches (a ResNet's downsample), whose inputs do not depend on each other.
    """
    leaves = tuple(block for _, block in BLOCKS.items()) if blocks else ()
    try:
        graph = _Tracer(leaves).trace(model)
    except Exception:  # noqa: BLE001 -- dynamic control flow and the like: fall back to capture
        return None
    nodes = list(graph.nodes)
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    calls: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(index)

    def single_call(module: nn.Module) -> int | None:
        name = names.get(id(module))
        found = calls.get(name, []) if name is not None else []
        return found[0] if len(found) == 1 else None

    first, last, layer_calls = {}, {}, {}
    for u, unit in enumerate(units):
        f, last_index = single_call(unit.first), single_call(unit.last)
        if f is None or last_index is None or last_index < f or not nodes[f].args or nodes[f].kwargs:
            return None
        first[u], last[u] = f, last_index
        layer_calls[u] = [calls.get(prefix_name, [None]) for prefix_name in
                          (names.get(id(unit.module.get_submodule(p))) for p in unit.layers)]
    order = sorted(first, key=first.get)
    if len({first[u] for u in order}) != len(order):
        return None
    for position, u in enumerate(order):
        end = first[order[position + 1]] if position + 1 < len(order) else len(nodes)
        if last[u] >= end:
            return None
        for found in layer_calls[u]:
            if blocks and units[u].first is units[u].last and found == [None]:
                continue  # a layer inside a block kept whole: called within the block's own call
            if len(found) != 1 or found[0] is None or not first[u] <= found[0] < end:
                return None
    last_use: dict[fx.Node, int] = {}
    for index, node in enumerate(nodes):
        for used in node.all_input_nodes:
            last_use[used] = index
    return ForwardPlan(nodes, order, first, last, last_use)


class ForwardCursor:
    """One model's forward pass over fixed batches, run segment by segment along a ``ForwardPlan``."""

    def __init__(self, model: nn.Module, plan: ForwardPlan, batches: list[torch.Tensor]) -> None:
        self.model = model.eval()
        self.plan = plan
        self.modules = dict(model.named_modules(remove_duplicate=False))
        placeholders = [n for n in plan.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError("a ForwardCursor needs a model with one input")
        self.envs: list[dict[fx.Node, object]] = [{placeholders[0]: batch} for batch in batches]
        self.position = 0  # index of the next node to run

    @torch.no_grad()
    def run_to(self, stop: int, keep: fx.Node | None = None) -> list[object]:
        """Run the nodes before index ``stop`` on every batch; return ``keep``'s value per batch (cloned)."""
        kept = []
        for env in self.envs:
            for index in range(self.position, stop):
                node = self.plan.nodes[index]
                env[node] = self._run(node, env)
                if node is keep:
                    kept.append(_clone(env[node]))
                for used in node.all_input_nodes:  # free what no later node reads
                    if self.plan.last_use.get(used, -1) <= index:
                        env.pop(used, None)
        self.position = max(self.position, stop)
        return kept

    def input_of(self, unit: int) -> torch.Tensor:
        """The unit's input for every image (its first module's first argument), as ``capture(..., "input")``."""
        index = self.plan.first[unit]
        self.run_to(index)
        source = self.plan.nodes[index].args[0]
        values = [_clone(fx.node.map_arg(source, lambda n, env=env: env[n])) for env in self.envs]
        return torch.cat([_as_tensor(v) for v in values])

    def inputs_per_batch(self, unit: int) -> list[torch.Tensor]:
        """The unit's input batch by batch, not copied (for reading before the cursor moves on)."""
        index = self.plan.first[unit]
        self.run_to(index)
        source = self.plan.nodes[index].args[0]
        return [_as_tensor(fx.node.map_arg(source, lambda n, env=env: env[n])) for env in self.envs]

    def output_of(self, unit: int) -> torch.Tensor:
        """The unit's output for every image (its last module's output), as ``capture(..., "output")``."""
        index = self.plan.last[unit]
        if self.position > index:
            raise RuntimeError("the cursor has already run past this unit")
        kept = self.run_to(index + 1, keep=self.plan.nodes[index])
        return torch.cat([_as_tensor(v) for v in kept])

    def _run(self, node: fx.Node, env: dict) -> object:
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "placeholder":
            return env[node]
        if node.op == "get_attr":
            target = self.model
            for part in str(node.target).split("."):
                target = getattr(target, part)
            return target
        if node.op == "call_module":
            return self.modules[str(node.target)](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            receiver, *rest = args
            return getattr(receiver, str(node.target))(*rest, **kwargs)
        if node.op == "output":
            return args[0]
        raise RuntimeError(f"unknown fx op {node.op}")


def carried_bytes(model: nn.Module, plan: ForwardPlan, image: torch.Tensor) -> int:
    """The most bytes a paused ``ForwardCursor`` on ``model`` keeps per image (``image``: a batch of one)."""
    cursor = ForwardCursor(model, plan, [image.clone()])  # its own storage: a slice would count its whole base
    peak = 0
    for index in range(len(plan.nodes)):  # one node at a time: what is kept between two nodes
        cursor.run_to(index + 1)
        peak = max(peak, _live_bytes(cursor.envs[0]))
    return peak


def carry_fits(model: nn.Module, plan: ForwardPlan, example: torch.Tensor, examples: int, cursors: int) -> bool:
    """Whether ``cursors`` cursors over ``examples`` inputs like ``example`` (a batch of one), each over a
    model like ``model``, keep their values within the share of the device's memory that training a group
    may take; where they would not, a pass per unit from the images (``capture``) holds one unit's values."""
    needed = carried_bytes(model, plan, example) * examples * cursors
    return needed <= memory_share(example.device)


def _live_bytes(env: dict[fx.Node, object]) -> int:
    """Bytes of the distinct tensor storages in ``env`` (views and in-place results count once;
    values fetched with get_attr are the model's own, not per example, and do not count)."""
    storages: dict[int, int] = {}

    def visit(value: object) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    for node, value in env.items():
        if node.op != "get_attr":
            visit(value)
    return sum(storages.values())


def _clone(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def _as_tensor(value: object) -> torch.Tensor:
    if isinstance(value, (list, tuple)):  # DenseNet layers take the list of earlier feature maps
        return torch.cat(list(value), 1)
    return value  # type: ignore[return-value]
