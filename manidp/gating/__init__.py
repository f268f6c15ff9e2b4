"""Dynamic channel gating shared by every gated method (ManiDP, FBS, ...), split by who reads it.

* :mod:`~manidp.gating.gates`: the gate contract and its insertion into a
  backbone (what a method uses at training time: :func:`insert_gates`,
  :class:`ChannelGate`, :func:`kept_channels`, :func:`round_kept`,
  :class:`GateKernel`, :func:`register_gated_block`).
* :mod:`~manidp.gating.deployed`: the deployed batch-1 form
  (:func:`deploy_model`), with :mod:`~manidp.gating.slices` (sliced
  convolutions, :class:`SliceCache`) and :mod:`~manidp.gating.fusion`
  (:func:`fold_batchnorm`, :func:`fuse_onednn`, :func:`trace_and_freeze`,
  which the dense reference gets too).
* :mod:`~manidp.gating.plan`: per-block path choice on the running hardware
  and freezing (:func:`plan_deployment`, :func:`compile_deployed`), for latency.
* :mod:`~manidp.gating.blocks`: one module per block family (ResNet,
  MobileNet/EfficientNet), each deployed block beside its gate placement.

Every public name is importable from ``manidp.gating`` itself.
"""
from manidp.gating.gates import (BLOCKS, ChannelGate, GateFactory, GateKernel, GateSpec, copy_model, gated_layers,
                                 insert_gates, kept_channels, register_gated_block, round_kept)
from manidp.gating.slices import DEFAULT_SLICE_CACHE_MB, SliceCache, onednn_bf16
from manidp.gating.fusion import fold_batchnorm, fuse_onednn, trace_and_freeze
from manidp.gating.deployed import cast_deployed, deploy_model, deployed_blocks, set_slice_cache_limit, slice_cache
from manidp.gating.plan import block_inputs, compile_deployed, plan_deployment
from manidp.gating.blocks.mobilenet import DeployedInvertedResidual
from manidp.gating.blocks.resnet import DeployedBasicBlock, DeployedBottleneck

__all__ = [
    "GateFactory", "GateSpec", "ChannelGate", "GateKernel", "BLOCKS", "register_gated_block", "insert_gates",
    "gated_layers", "kept_channels", "round_kept", "copy_model", "deploy_model", "plan_deployment", "block_inputs",
    "compile_deployed", "fold_batchnorm", "fuse_onednn", "trace_and_freeze", "deployed_blocks", "slice_cache",
    "set_slice_cache_limit", "cast_deployed", "SliceCache", "DEFAULT_SLICE_CACHE_MB", "onednn_bf16",
    "DeployedBasicBlock", "DeployedBottleneck", "DeployedInvertedResidual",
]
