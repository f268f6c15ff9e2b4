"""Shared machinery of the static methods (L1, FPGM, SFP): which channels may
go, how many go for a requested MACs reduction, and their physical removal.

The layering follows Torch-Pruning's, dependencies pointing one way:

* what is coupled: :func:`channel_groups` reads Torch-Pruning's dependency
  graph and returns :class:`ChannelGroup` records (the convs whose output
  channels must go together, plus every layer whose inputs or outputs shrink
  with them), filtered by a layer-selection mode of :data:`LAYER_MODES`;
* what to remove: one score per channel of each group, lowest removed
  (:func:`select_removed`), through one hook,
  :meth:`StructuredPruning.channel_scores`: by default a per-filter score of
  the weights (the paper's criterion, :func:`group_scores`); data-driven
  scores (activations, gradients; Torch-Pruning's importances among them)
  override the hook and read a few training batches (:func:`scoring_batches`);
* how much: :func:`plan_removal` turns the requested MACs reduction into a
  number of channels per group: one ratio for all groups, then single-channel
  corrections, checked on a physically pruned copy through the one MAC counter;
* surgery: :func:`remove_channels` hands our indices to the dependency graph,
  so the model really shrinks; the removed indices per group are all a saved
  model needs to rebuild its architecture (:class:`StructuredPruning.restore`).

Layer modes: ``first_conv`` (default, every backbone family) prunes the first
conv of each block: exactly Li et al.'s mode for BasicBlock ResNets (the second
conv's output is tied to the shortcut), conv1 of a Bottleneck, the expansion
conv (with its depthwise conv) of an inverted residual. ``all`` prunes every
coupled group, residual groups together; it is refused where the graph couples
layers of different widths, i.e. on option-A CIFAR ResNets whose zero-pad
shortcuts Torch-Pruning cannot follow. ``auto`` is ``all`` where the graph
allows it and ``first_conv`` where it does not (FPGM's and SFP's default: their
papers prune every conv; option-A shortcuts force first-conv pruning).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from manidp.errors import UserError
from manidp.macs import count_macs, trace_layers
from manidp.methods import Method, RunContext

__all__ = [
    "ChannelGroup", "LAYER_MODES", "channel_groups", "plan_removal", "group_scores", "select_removed",
    "scoring_batches", "tp_groups", "remove_channels", "silence_channels", "zero_filters", "zero_filter_grads",
    "StructuredPruning",
]

FilterScore = Callable[[torch.Tensor], torch.Tensor]  # [C_out, fan_in] -> [C_out]


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels that must be removed together.

    ``key`` is the group's first full conv in module order (its name is how a
    saved selection refers to the group); ``convs`` are the full (non-depthwise)
    convs whose filters are these channels (scored and zeroed); ``out_layers``
    and ``in_layers`` are every module whose outputs or inputs shrink with them.
    """

    key: str
    channels: int
    convs: tuple[str, ...]
    out_layers: tuple[str, ...]
    in_layers: tuple[str, ...]
    parent: str
    consistent: bool  # every coupled layer has ``channels`` outputs


# ---------------------------------------------------------------- what is coupled
def _dependency_graph(model: nn.Module, input_size: Sequence[int]) -> tp.DependencyGraph:
    """Trace ``model`` in eval mode, so the dummy input leaves BN statistics untouched."""
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, torch.zeros(1, *input_size, device=param.device), verbose=False)
    finally:
        model.train(was_training)


def _full_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == 1


def _describe(graph: tp.DependencyGraph, group, names: dict, order: dict) -> ChannelGroup:
    outs, ins, convs = [], [], []
    for dep, _ in group:
        module = dep.target.module
        name = names.get(module)
        if name is None:  # functional ops (add, relu, pad) carry no weights
            continue
        if graph.is_out_channel_pruning_fn(dep.handler):
            outs.append(name)
            if _full_conv(module):
                convs.append(name)
        elif graph.is_in_channel_pruning_fn(dep.handler):
            ins.append(name)
    convs = sorted(set(convs), key=order.get)
    outs = sorted(set(outs), key=order.get)
    channels = len(group[0].idxs)
    widths = {m.out_channels if isinstance(m, nn.Conv2d) else m.num_features
              for m in (graph.model.get_submodule(n) for n in outs)
              if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))}
    key = convs[0] if convs else outs[0]
    return ChannelGroup(key=key, channels=channels, convs=tuple(convs), out_layers=tuple(outs),
                        in_layers=tuple(sorted(set(ins), key=order.get)), parent=key.rpartition(".")[0],
                        consistent=widths == {channels})


def _first_conv(groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """Per block, the first group fed by one full conv alone (not tied to a residual add)."""
    chosen: dict[str, ChannelGroup] = {}
    for group in groups:
        if len(group.convs) == 1 and group.parent and group.parent not in chosen:
            chosen[group.parent] = group
    return list(chosen.values())


def _all(groups: list[ChannelGroup]) -> list[ChannelGroup]:
    broken = [g.key for g in groups if not g.consistent]
    if broken:
        raise UserError(
            f"layers 'all' cannot prune this backbone: the dependency graph couples layers of different widths "
            f"(groups {', '.join(broken[:3])}), as parameter-free zero-pad (option A) shortcuts do; "
            "use method_options.layers=first_conv")
    return [g for g in groups if g.convs]


def _auto(groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """``all`` where the dependency graph allows it, ``first_conv`` where option-A shortcuts forbid it."""
    if any(not g.consistent for g in groups):
        return _first_conv(groups)
    return _all(groups)


#: Layer-selection modes: all coupled groups -> the groups a method may prune.
LAYER_MODES: dict[str, Callable[[list[ChannelGroup]], list[ChannelGroup]]] = {
    "first_conv": _first_conv,
    "all": _all,
    "auto": _auto,
}


def channel_groups(model: nn.Module, input_size: Sequence[int], layers: str = "first_conv",
                   skip_layers: Iterable[str] = ()) -> list[ChannelGroup]:
    """The prunable groups of ``model`` under mode ``layers``, minus groups touching ``skip_layers``."""
    if layers not in LAYER_MODES:
        raise UserError(f"unknown layers mode '{layers}'; valid modes: {', '.join(LAYER_MODES)}")
    graph = _dependency_graph(model, input_size)
    names = {module: name for name, module in model.named_modules()}
    order = {name: i for i, name in enumerate(names.values())}
    skip = set(skip_layers)
    unknown = skip - {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if unknown:
        raise UserError(f"skip_layers names no conv of this backbone: {', '.join(sorted(unknown))}")
    groups = [_describe(graph, g, names, order) for g in graph.get_all_groups(root_module_types=(nn.Conv2d,))]
    groups.sort(key=lambda g: order[g.key])
    return [g for g in LAYER_MODES[layers](groups) if not skip & set(g.convs)]


# ---------------------------------------------------------------- how much
def _mac_model(model: nn.Module, input_size: Sequence[int], groups: list[ChannelGroup]):
    """MACs as a function of channels removed per group, from one trace of the dense model."""
    costs = trace_layers(model, input_size)

    def macs(removed: Mapping[str, int]) -> float:
        in_kept, out_kept = {}, {}
        for g in groups:
            kept = g.channels - removed[g.key]
            out_kept.update((n, kept) for n in g.out_layers if n in costs)
            in_kept.update((n, kept) for n in g.in_layers if n in costs)
        return sum(c.kept_macs(in_kept.get(n), out_kept.get(n)) for n, c in costs.items())

    return macs


def plan_removal(model: nn.Module, input_size: Sequence[int], groups: list[ChannelGroup],
                 reduction: float) -> tuple[dict[str, int], float]:
    """Channels to remove per group so the pruned model has ``reduction`` fewer MACs.

    One ratio for every group (the papers' per-layer rate), found by bisection,
    then single-channel corrections that bring the count closest to the
    request; every group keeps at least one channel. Returns the counts and
    the reduction measured by :func:`count_macs` on a physically pruned copy.
    """
    if not groups:
        raise UserError("no prunable channel groups in this backbone with these layer options")
    macs = _mac_model(model, input_size, groups)
    dense = macs({g.key: 0 for g in groups})
    target = (1 - reduction) * dense

    def at_ratio(ratio: float) -> dict[str, int]:
        return {g.key: min(g.channels - 1, round(ratio * g.channels)) for g in groups}

    most = macs(at_ratio(1.0))
    if most > target:
        raise UserError(f"a {reduction:.1%} MACs reduction is out of reach for these layers (at most "
                        f"{1 - most / dense:.1%}); lower the budget or use method_options.layers=all")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if macs(at_ratio(mid)) <= target else (mid, hi)
    counts = at_ratio(hi)
    error = abs(macs(counts) - target)
    while True:
        best = None
        for g in groups:
            for step in (-1, 1):
                n = counts[g.key] + step
                if 0 <= n < g.channels:
                    trial = {**counts, g.key: n}
                    trial_error = abs(macs(trial) - target)
                    if trial_error < error:
                        best, error = trial, trial_error
        if best is None:
            break
        counts = best
    pruned = copy.deepcopy(model)
    remove_channels(pruned, input_size, {g.key: list(range(counts[g.key])) for g in groups})
    achieved = 1 - count_macs(pruned, input_size) / count_macs(model, input_size)
    return counts, achieved


# ---------------------------------------------------------------- what to remove
@torch.no_grad()
def group_scores(model: nn.Module, groups: list[ChannelGroup], score: FilterScore) -> dict[str, torch.Tensor]:
    """Per group, ``score`` of each output filter, summed over the group's coupled full convs."""
    out = {}
    for g in groups:
        total = 0
        for name in g.convs:
            weight = model.get_submodule(name).weight.detach().float()
            total = total + score(weight.flatten(1)).cpu()
        out[g.key] = total
    return out


def select_removed(scores: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> dict[str, list[int]]:
    """The ``counts[key]`` lowest-scored channels of each group (ties: lower index first)."""
    return {key: sorted(torch.argsort(s, stable=True)[: counts[key]].tolist()) for key, s in scores.items()}


def scoring_batches(ctx: RunContext, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` training batches, on the run's device: what data-driven scores read."""
    if ctx.train_loader is None:
        raise UserError("this method scores channels on training batches, and the run gives none")
    for index, (images, targets) in enumerate(ctx.train_loader):
        if index == count:
            break
        yield images.to(ctx.device), targets.to(ctx.device)


def tp_groups(model: nn.Module, input_size: Sequence[int], groups: list[ChannelGroup]) -> dict[str, tp.Group]:
    """Torch-Pruning's group of every channel of each of ``groups``: what its importances score."""
    graph = _dependency_graph(model, input_size)
    return {g.key: _pruning_group(graph, model, g.key, range(g.channels)) for g in groups}


# ---------------------------------------------------------------- surgery and masks
def remove_channels(model: nn.Module, input_size: Sequence[int], removed: Mapping[str, Sequence[int]]) -> nn.Module:
    """Physically remove ``removed[key]`` output channels of each group rooted at conv ``key`` (in place)."""
    graph = _dependency_graph(model, input_size)
    for key, idxs in removed.items():
        if idxs:
            _pruning_group(graph, model, key, idxs).prune()
    return model


def _pruning_group(graph: tp.DependencyGraph, model: nn.Module, key: str, idxs: Iterable[int]) -> tp.Group:
    module = model.get_submodule(key)
    return graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels, list(idxs))


def _rows(removed: Sequence[int], device) -> torch.Tensor:
    return torch.as_tensor(list(removed), dtype=torch.long, device=device)


@torch.no_grad()
def silence_channels(model: nn.Module, groups: list[ChannelGroup], removed: Mapping[str, Sequence[int]]) -> None:
    """Zero the removed channels' filters, biases and BN scale/shift: each outputs exactly 0,
    so the model computes what its physically pruned twin computes."""
    for g in groups:
        for name in g.out_layers:
            module = model.get_submodule(name)
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                for param in (module.weight, module.bias):
                    if param is not None:
                        param[_rows(removed[g.key], param.device)] = 0


@torch.no_grad()
def zero_filters(model: nn.Module, groups: list[ChannelGroup], removed: Mapping[str, Sequence[int]],
                 silence_bn: bool = True) -> None:
    """The soft schedule's step: zero the selected filters (and biases) of the group's convs.

    With ``silence_bn`` the selected channels output exactly 0, as if removed:
    the shift and running mean of every BN whose outputs they are are zeroed
    too (a zero filter gives a zero batch in train mode, and BN then outputs
    its shift; in eval mode ``-running_mean * scale + shift``), so the
    physically pruned model computes exactly what the masked one did. The BN
    scale is kept. Without it (both authors' codes) a zeroed channel still
    feeds ``ReLU(shift)`` forward.
    """
    for g in groups:
        rows = removed[g.key]
        for name in g.convs:
            conv = model.get_submodule(name)
            conv.weight[_rows(rows, conv.weight.device)] = 0
            if conv.bias is not None:
                conv.bias[_rows(rows, conv.bias.device)] = 0
        for name in g.out_layers if silence_bn else ():
            norm = model.get_submodule(name)
            if isinstance(norm, nn.BatchNorm2d):
                if norm.bias is not None:
                    norm.bias[_rows(rows, norm.bias.device)] = 0
                if norm.running_mean is not None:
                    norm.running_mean[_rows(rows, norm.running_mean.device)] = 0


@torch.no_grad()
def zero_filter_grads(model: nn.Module, groups: list[ChannelGroup], removed: Mapping[str, Sequence[int]]) -> None:
    """Keep the selected filters where they are (the FPGM authors' code): zero their gradients."""
    for g in groups:
        for name in g.convs:
            for param in (model.get_submodule(name).weight, model.get_submodule(name).bias):
                if param is not None and param.grad is not None:
                    param.grad[_rows(removed[g.key], param.grad.device)] = 0


# ---------------------------------------------------------------- the method base
class StructuredPruning(Method):
    """A static method: score channels, meet the budget on the physically pruned model.

    By default it prunes once, before fine-tuning (:meth:`prepare`: plan,
    select, remove). Subclasses give the scores: :meth:`filter_scores` (a
    criterion on one conv's filters) or, for data-driven scores, override
    :meth:`channel_scores`; soft schedules override :meth:`prepare` and select
    again during training. The removed indices per group are the method's
    state: :meth:`restore` re-applies that surgery to a fresh backbone
    without scoring anything.
    """

    needs_budget = True
    budget_tolerance = 0.01
    default_options = {"layers": "first_conv", "skip_layers": []}
    #: :meth:`channel_scores` reads training batches (summed over processes under DDP).
    data_driven: ClassVar[bool] = False

    def __init__(self, options: Optional[dict] = None, budget: Optional[float] = None):
        super().__init__(options, budget)
        if self.options["layers"] not in LAYER_MODES:
            raise UserError(f"method '{self.name}': unknown layers mode '{self.options['layers']}'; "
                            f"valid modes: {', '.join(LAYER_MODES)}")
        self.groups: list[ChannelGroup] = []
        self.counts: dict[str, int] = {}
        self.planned_reduction: Optional[float] = None
        self.removed: Optional[dict[str, list[int]]] = None  # set once channels are physically gone

    @staticmethod
    def filter_scores(filters: torch.Tensor) -> torch.Tensor:
        """Score of each row of ``filters`` ([C_out, fan_in]); the lowest scores are removed."""
        raise NotImplementedError

    def plan(self, model: nn.Module, ctx: RunContext) -> None:
        """Find the prunable groups and how many channels each loses for the budget."""
        self.groups = channel_groups(model, ctx.input_size, self.options["layers"], self.options["skip_layers"])
        self.counts, self.planned_reduction = plan_removal(model, ctx.input_size, self.groups, self.budget)
        ctx.log(f"{self.name}: {len(self.groups)} channel groups, {sum(self.counts.values())} channels to remove, "
                f"{self.planned_reduction:.2%} fewer MACs once removed")

    def channel_scores(self, model: nn.Module, ctx: RunContext) -> dict[str, torch.Tensor]:
        """The importance hook: per group key, one score per channel (lowest removed).

        Default: :meth:`filter_scores` of the weights, summed over the group's
        convs. Data-driven scores (:attr:`data_driven`) override this and read
        :func:`scoring_batches`.
        """
        return group_scores(model, self.groups, self.filter_scores)

    def select(self, model: nn.Module, ctx: RunContext) -> dict[str, list[int]]:
        scores = self.channel_scores(model, ctx)
        if self.data_driven:  # each process saw other batches: sum, so that all remove the same channels
            scores = {key: ctx.all_reduce_sum(s.to(ctx.device)).cpu() for key, s in scores.items()}
        return select_removed(scores, self.counts)

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Prune once, before fine-tuning: the engine then trains the physically smaller model."""
        self.plan(model, ctx)
        return self.remove(model, ctx, self.select(model, ctx))

    def remove(self, model: nn.Module, ctx: RunContext, removed: dict[str, list[int]]) -> nn.Module:
        remove_channels(model, ctx.input_size, removed)
        self.removed = removed
        return model

    def restore(self, model: nn.Module, state: dict, ctx: RunContext) -> nn.Module:
        self.load_state_dict(state)
        if self.removed is None:
            raise UserError(f"the saved '{self.name}' state lists no removed channels; the run did not finish")
        return remove_channels(model, ctx.input_size, self.removed)

    def state_dict(self) -> dict:
        return {"removed": self.removed}

    def load_state_dict(self, state: dict) -> None:
        self.removed = state.get("removed")

    def describe(self) -> dict:
        removed = self.removed or {}
        return {**super().describe(), "kind": "static", "layers": self.options["layers"],
                "planned_reduction": self.planned_reduction,
                "removed_channels": {key: len(idxs) for key, idxs in removed.items()}}
