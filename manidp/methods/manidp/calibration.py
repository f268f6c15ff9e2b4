"""Forward-order thresholds in one validation pass per gated block.

Setting a layer's threshold needs every validation instance's saliencies at
that layer with the thresholds upstream already set, so the gates are set one
after another. Run from the images, that is a pass up to each gate: about half
a model pass per gate, nine full passes for ResNet-20's 18 gates, for every
keep rate the budget search tries, each reading the validation images again.
When each gated block's input is the previous gated block's output, untouched
in between, the same saliencies come from the blocks alone: hold every batch's
input to the current block, run the block on it once per gate in it (stopping
at the gate), then once more with its thresholds set to get the next block's
inputs. The block sees the same tensor the full forward gives it, so every
saliency, and so every threshold, is bit for bit what the pass from the
images gives (``tests/test_manidp.py``).

:func:`block_chain` checks the condition on one batch and says why it does not
hold. The held inputs are capped in bytes: where the early blocks' inputs are
over the cap (ImageNet's at 224 px), their gates are set by passes from the
images, which stop early and so cost little, and the blocks from
:func:`first_held_block` on are run alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = ["GatedBlock", "block_chain", "first_held_block", "saliencies_at", "saliencies_by_block"]


class _Stop(Exception):
    """Ends a forward at the point whose tensors are being collected."""


@dataclass
class GatedBlock:
    """A module holding gates, with the indices of those gates in the forward order list."""

    module: nn.Module
    gates: list[int]
    #: bytes of one instance's input and output (both are held while the block runs)
    bytes_per_instance: int = 0


def _blocks(model: nn.Module, gates: Sequence[nn.Module]) -> Union[list[GatedBlock], str]:
    """Each gate's parent module, consecutive gates of one parent grouped; or why that is not a chain."""
    index = {id(gate): i for i, gate in enumerate(gates)}
    parents: dict[int, nn.Module] = {}
    for module in model.modules():
        for child in module.children():
            if id(child) in index:
                parents[index[id(child)]] = module
    if len(parents) != len(gates):
        return "a gate is not a child of a module of the model"
    blocks: list[GatedBlock] = []
    for i in range(len(gates)):
        if blocks and blocks[-1].module is parents[i]:
            blocks[-1].gates.append(i)
        elif any(b.module is parents[i] for b in blocks):
            return "a block's gates are not consecutive in forward order"
        else:
            blocks.append(GatedBlock(parents[i], [i]))
    return blocks


@torch.no_grad()
def block_chain(model: nn.Module, gates: Sequence[nn.Module], images: torch.Tensor,
                autocast: Callable) -> Union[list[GatedBlock], str]:
    """The gated blocks in forward order if each is run once a forward, on one tensor argument, that is
    the previous gated block's output unchanged, and none changes its input in place; else why not.

    Checked on one forward of ``images`` (eval mode): the tensor a block receives must be the very
    object the previous block returned, at the same version counter (no in-place op in between).
    """
    blocks = _blocks(model, gates)
    if isinstance(blocks, str):
        return blocks
    calls = [0] * len(blocks)
    given: dict[int, tuple[torch.Tensor, int]] = {}  # block -> (its input, the version it was called with)
    returned: dict[int, tuple[torch.Tensor, int]] = {}  # block -> (its output, the version it returned)
    problems: list[str] = []

    def before(j):
        def hook(module, args, kwargs):
            calls[j] += 1
            if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
                problems.append(f"block {j} is called with other than one tensor")
            else:
                given[j] = (args[0], args[0]._version)
        return hook

    def after(j):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor) or j not in given:
                problems.append(f"block {j} does not return one tensor")
                return
            if given[j][0]._version != given[j][1]:
                problems.append(f"block {j} changes its input in place")
            returned[j] = (output, output._version)
        return hook

    handles = []
    try:
        for j, block in enumerate(blocks):
            handles.append(block.module.register_forward_pre_hook(before(j), with_kwargs=True))
            handles.append(block.module.register_forward_hook(after(j)))
        with autocast():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    if problems:
        return problems[0]
    for j, count in enumerate(calls):
        if count != 1:
            return f"block {j} runs {count} times a forward"
    for j, block in enumerate(blocks):
        (x, version), (output, _) = given[j], returned[j]
        block.bytes_per_instance = (x.numel() * x.element_size() + output.numel() * output.element_size()) // len(x)
        if j and (x is not returned[j - 1][0] or version != returned[j - 1][1]):
            return f"block {j}'s input is not block {j - 1}'s output unchanged"
    return blocks


@torch.no_grad()
def saliencies_at(module: nn.Module, gate: nn.Module, inputs: Iterable[torch.Tensor],
                  autocast: Callable) -> torch.Tensor:
    """``gate``'s saliencies ``[N, C]`` (fp32) over ``module`` run on each input; each forward ends
    where the gate returns (what follows cannot change them)."""
    collected: list[torch.Tensor] = []

    def stop(hooked, args, output):
        collected.append(hooked.saliency.detach().float())
        raise _Stop

    handle = gate.register_forward_hook(stop)
    try:
        for x in inputs:
            try:
                with autocast():
                    module(x)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(collected)


def first_held_block(blocks: list[GatedBlock], instances: int, max_bytes: int) -> Optional[int]:
    """The first block from which every block's inputs and outputs for ``instances`` instances fit in
    ``max_bytes``; None when not even the last block's do."""
    for start in range(len(blocks)):
        if instances * max(block.bytes_per_instance for block in blocks[start:]) <= max_bytes:
            return start
    return None


@torch.no_grad()
def saliencies_by_block(model: nn.Module, gates: Sequence[nn.Module], blocks: list[GatedBlock],
                        batches: Iterable[torch.Tensor], autocast: Callable, set_threshold: Callable,
                        start: int = 0) -> None:
    """Set the thresholds of the gates in ``blocks[start:]`` in forward order, ``set_threshold(index,
    saliencies)`` with the ``[N, C]`` validation saliencies at that gate, running each block on its held
    inputs. Every gate before them must be set already: one pass from ``batches`` (the images) up to
    ``blocks[start]`` gives its inputs.
    """
    held: list[torch.Tensor] = []

    def stop_before(module, args):
        held.append(args[0])
        raise _Stop

    handle = blocks[start].module.register_forward_pre_hook(stop_before)
    try:
        for images in batches:
            try:
                with autocast():
                    model(images)
            except _Stop:
                pass
    finally:
        handle.remove()

    for j in range(start, len(blocks)):
        block = blocks[j]
        for index in block.gates:
            set_threshold(index, saliencies_at(block.module, gates[index].gate, held, autocast))
        if j + 1 < len(blocks):
            outputs = []
            for x in held:
                with autocast():
                    outputs.append(block.module(x))
            held = outputs
