"""The one training engine every method runs on.

``train(cfg)`` builds data, backbone and method from the resolved config, trains
with SGD (Nesterov momentum, per-iteration schedule, weight-decay groups, label
smoothing), checkpoints atomically every epoch, resumes from that checkpoint
when the same command is re-run, finalizes the method, evaluates on the
validation and test splits and writes the run folder:

    config.yaml        resolved config
    checkpoint.pt      last epoch's training state (for resuming)
    history.jsonl      one line of metrics per epoch
    model.pt           the final model (config + weights + method state)
    metrics.json       final metrics (the source of truth for tables)
    instances_test.csv one row per test instance (label, prediction, CE, MACs, severity)

CUDA runs use bf16 autocast and channels_last by default. Under ``torchrun``
the engine uses DDP (gloo on CPU, nccl on GPU); only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import yaml
from torch.utils.data import DataLoader

from manidp import _version
from manidp._files import atomic_save, atomic_write_text, result_id
from manidp.config import check_run_folder, check_runnable, config_differences, default_out_dir, run_id
from manidp.data import build_dataset
from manidp.distributed import Distributed as _Distributed
from manidp.errors import UserError
from manidp.evaluation import evaluate, summarize, write_instances
from manidp.macs import InstanceMacs, count_macs
from manidp.methods import METHODS, RunContext, load_all
from manidp.models import build_backbone, load_state_file

__all__ = ["train", "load_model", "evaluate_run", "TrainingDiverged", "RunObserver"]

CHECKPOINT_FORMAT = "manidp-checkpoint-1"
MODEL_FORMAT = "manidp-model-1"


class TrainingDiverged(UserError):
    """A non-finite loss: the run stops instead of training on NaNs."""

    def __init__(self, message: str, epoch: int, step: int, loss: float):
        super().__init__(message)
        self.epoch, self.step, self.loss = epoch, step, loss


class RunObserver:
    """What the engine reports as a run goes, for whoever records it (the command line passes
    ``manidp.tracking.MlflowObserver``); this base records nothing.

    ``seconds`` is the time the observer spent, which the engine keeps out of the
    recorded training times (a slow tracking server is not training).
    """

    seconds = 0.0

    def started(self, out: Path, cfg: dict, history: list[dict], splits) -> None:
        """The run starts (``history`` empty) or resumes after the epochs in ``history``."""

    def epoch_ended(self, row: dict, epoch: int) -> None:
        """One epoch's metrics (``row``), at step ``epoch``."""

    def finished(self, out: Path, model: nn.Module, metrics: dict, splits, step: int) -> None:
        """The run's final metrics (step after the last epoch) and model; its files are written."""

    def failed(self, error: BaseException) -> None:
        """The run dies (an error, Ctrl-C, SIGTERM)."""


# ---------------------------------------------------------------- runtime setup
def _seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic and device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


def _autocast_factory(cfg: dict, device: torch.device):
    precision = cfg["runtime"]["precision"]
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _channels_last(cfg: dict, device: torch.device) -> bool:
    value = cfg["runtime"]["channels_last"]
    return device.type == "cuda" if value == "auto" else bool(value)


def _lr_lambda(cfg: dict, steps_per_epoch: int):
    t = cfg["train"]
    total = max(1, t["epochs"] * steps_per_epoch)
    warmup = t["warmup_epochs"] * steps_per_epoch
    floor = t["min_lr"] / t["lr"] if t["lr"] else 0.0
    milestones = [m * steps_per_epoch for m in t["milestones"]]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t["schedule"] == "constant":
            return 1.0
        if t["schedule"] == "step":
            return t["gamma"] ** sum(step >= m for m in milestones)
        progress = (step - warmup) / max(1, total - warmup)
        # A Python float, not numpy's: the learning rates land in the checkpoint, which holds plain data only.
        return float(floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * min(1.0, progress))))

    return factor


def _versions() -> dict:
    import timm
    import torchvision

    return {"manidp": _version.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "python": platform.python_version()}


def _init_source(cfg: dict) -> Optional[str]:
    """The weights a run starts from: ``init_from`` (a run folder or file), else ``pretrained``."""
    source = cfg["init_from"]
    if source is None:
        return cfg["pretrained"]
    path = Path(source)
    if path.is_dir():
        path = path / "model.pt"
        if not path.is_file():
            raise UserError(f"init_from folder {source} holds no model.pt: train that run to the end first")
    return str(path)


def _loaders(splits, cfg: dict, dist: _Distributed, seed: int):
    t, workers = cfg["train"], cfg["runtime"]["workers"]
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if dist.world_size > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(splits.train, num_replicas=dist.world_size, rank=dist.rank, seed=seed)
    pin = dist.device.type == "cuda"
    batch = min(t["batch_size"], len(splits.train))
    train_loader = DataLoader(splits.train, batch_size=batch, shuffle=sampler is None, sampler=sampler,
                              generator=generator, num_workers=workers, pin_memory=pin, drop_last=True,
                              persistent_workers=workers > 0)

    def eval_loader(ds):
        return DataLoader(ds, batch_size=t["eval_batch_size"], shuffle=False, num_workers=workers, pin_memory=pin)

    # A validation-only run (eval_splits: [val], the recipe sweeps) never touches the test split.
    test_loader = eval_loader(splits.test) if "test" in cfg["eval_splits"] else None
    return train_loader, eval_loader(splits.val), test_loader


# ---------------------------------------------------------------- build / load
def _build(cfg: dict, dist_device: torch.device):
    """Dataset, method, the backbone with its dense MACs, and the method's model."""
    load_all()
    method_cls = METHODS.get(cfg["method"])
    method = method_cls(cfg["method_options"], cfg["budget"])
    splits = build_dataset(cfg["dataset"], cfg["data"], seed=cfg["seed"])
    backbone = build_backbone(cfg["backbone"], splits.num_classes, splits.input_size[0], _init_source(cfg))
    dense_macs = count_macs(backbone, splits.input_size)
    dense_params = sum(p.numel() for p in backbone.parameters())
    return splits, method, backbone.to(dist_device), dense_macs, dense_params


def load_model(path: str | Path, device="cpu"):
    """Rebuild a trained model from ``model.pt`` (or its run folder) in a fresh process.

    Returns (model, method, config). Static methods rebuild their physically
    smaller architecture from the saved method state; nothing is re-trained.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    saved = load_state_file(path)
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT:
        raise UserError(f"{path} is not a manidp model file (expected format {MODEL_FORMAT})")
    cfg = saved["config"]
    load_all()
    method = METHODS.get(cfg["method"])(cfg["method_options"], cfg["budget"])
    model = build_backbone(cfg["backbone"], saved["num_classes"], saved["input_size"][0])
    ctx = RunContext(config=cfg, device=torch.device(device), input_size=tuple(saved["input_size"]),
                     num_classes=saved["num_classes"], dense_macs=saved["dense_macs"], epochs=0, steps_per_epoch=0)
    model = method.restore(model, saved["method_state"], ctx)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as err:
        raise UserError(f"{path}: saved weights do not fit the rebuilt model ({str(err)[:300]})") from None
    return model.to(device).eval(), method, cfg, saved


# ---------------------------------------------------------------- training
def _progress(cfg: dict, dist: _Distributed):
    mode = cfg["runtime"]["progress"]
    return dist.main and (mode == "bar" or (mode == "auto" and sys.stderr.isatty()))


def _log(dist: _Distributed):
    def log(message: str) -> None:
        if dist.main:
            print(message, flush=True)

    return log


def train(cfg: dict, observer: Optional[RunObserver] = None, record_divergence: bool = False) -> Path:
    """Train (or resume) the run described by the resolved config; return its folder.

    ``observer`` hears about the run as it goes (on the first rank only).
    ``record_divergence``: a non-finite loss ends the run with a ``metrics.json``
    whose ``status`` is ``"diverged"`` (and no model) instead of an error; a sweep
    needs that, since a configuration that diverges is one of its results.
    """
    dist = _Distributed(cfg["runtime"]["device"])
    observer = observer if observer is not None and dist.main else RunObserver()
    log = _log(dist)
    out = Path(cfg["out"]) if cfg["out"] else default_out_dir(cfg)
    cfg = {**check_runnable(cfg), "out": str(out)}
    if check_run_folder(out, cfg) == "finished":
        log(f"{out}: already finished with this config; add --force (or delete the folder) to train again")
        return out
    if cfg["runtime"]["threads"]:
        torch.set_num_threads(cfg["runtime"]["threads"])
    device = dist.device
    _seed_everything(cfg["seed"] + dist.rank, cfg["runtime"]["deterministic"], device)
    splits, method, model, dense_macs, dense_params = _build(cfg, device)
    cfg = {**cfg, "method_options": method.options}  # every option with its default goes into config.yaml

    train_loader, val_loader, test_loader = _loaders(splits, cfg, dist, cfg["seed"])
    autocast = _autocast_factory(cfg, device)
    channels_last = _channels_last(cfg, device)
    ctx = RunContext(config=cfg, device=device, input_size=splits.input_size, num_classes=splits.num_classes,
                     dense_macs=dense_macs, epochs=cfg["train"]["epochs"], steps_per_epoch=len(train_loader),
                     train_loader=train_loader, val_loader=val_loader, autocast=autocast,
                     world_size=dist.world_size, rank=dist.rank, log=log)
    model = method.prepare(model, ctx).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(method.param_groups(model, cfg["train"]["weight_decay"]), lr=cfg["train"]["lr"],
                                momentum=cfg["train"]["momentum"], nesterov=cfg["train"]["nesterov"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, len(train_loader)))

    checkpoint_file = out / "checkpoint.pt"
    start_epoch, history = 0, []
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        result_id(out)
    if checkpoint_file.is_file():
        state = load_state_file(checkpoint_file)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{checkpoint_file} is not a manidp training checkpoint; delete it to start over")
        changed = config_differences(state["config"], cfg)
        if changed:
            raise UserError(f"{out} holds an unfinished run with a different config ({'; '.join(changed)}); "
                            "add --force to retrain it there, or choose another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method_state"])
        torch.set_rng_state(state["rng"]["torch"])
        train_loader.generator.set_state(state["rng"]["loader"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        log(f"{out}: resuming after epoch {state['epoch'] + 1}/{cfg['train']['epochs']}")
    if dist.main:
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    observer.started(out, cfg, history, splits)

    forward_model = model
    if dist.world_size > 1:
        forward_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=method.ddp_find_unused_parameters)

    def clock() -> float:  # wall time less the observer's (a slow tracking store is not training)
        return time.time() - observer.seconds

    started = clock() - sum(h.get("time_s", 0.0) for h in history)
    if start_epoch == 0 and cfg["train"]["epochs"] > 0:
        method.on_train_start(model, ctx)
    try:
        for epoch in range(start_epoch, cfg["train"]["epochs"]):
            ctx.epoch = epoch
            row = _train_epoch(forward_model, model, method, optimizer, scheduler, train_loader, ctx, cfg,
                               channels_last, dist)
            row.update(method.on_epoch_end(model, ctx) or {})
            if dist.main:
                val = evaluate(model, method, val_loader, None, device, autocast, channels_last=channels_last)
                row["val_top1"] = float(val["correct"].mean() * 100)
            row["time_s"] = clock() - started - sum(h.get("time_s", 0.0) for h in history)
            history.append(row)
            if dist.main:
                atomic_save({"format": CHECKPOINT_FORMAT, "config": cfg, "epoch": epoch, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "method_state": method.state_dict(), "history": history,
                             "rng": {"torch": torch.get_rng_state(), "loader": train_loader.generator.get_state()}},
                            checkpoint_file)
                atomic_write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
                observer.epoch_ended(row, epoch)
                log(_epoch_line(row, cfg))
            dist.barrier()
    except TrainingDiverged as diverged:
        observer.failed(diverged)
        if not record_divergence:
            raise
        if dist.main:
            _write_diverged(cfg, diverged, history, out)
            log(f"{out}: diverged at epoch {diverged.epoch}, step {diverged.step}; recorded in metrics.json")
        dist.barrier()
        return out
    except BaseException:
        observer.failed(sys.exc_info()[1])
        raise

    model = method.finalize(model, ctx)
    train_time = clock() - started
    if dist.main:
        metrics = _final_evaluation(model, method, splits, val_loader, test_loader, ctx, cfg, channels_last,
                                    dense_macs, dense_params, out)
        metrics.update({"wall_time_s": train_time, "epochs_trained": len(history),
                        "optimizer_steps": len(history) * len(train_loader)})
        _write_final(model, method, splits, cfg, dense_macs, metrics, out)
        observer.finished(out, model, _numeric(metrics), splits, step=len(history))  # after the last epoch
        split = "test" if test_loader is not None else "val"
        log(f"{out}: {split} top-1 {metrics[f'{split}_top1']:.2f} %, MACs {metrics['macs'] / 1e6:.3f} M "
            f"({metrics['macs_reduction'] * 100:.1f} % fewer), {train_time:.1f} s")
    dist.barrier()
    return out


def _epoch_line(row: dict, cfg: dict) -> str:
    extras = " ".join(f"{k} {v:.4g}" for k, v in row.items()
                      if k not in ("epoch", "train_loss", "train_top1", "val_top1", "lr", "time_s")
                      and isinstance(v, (int, float)))
    return (f"epoch {row['epoch'] + 1}/{cfg['train']['epochs']} loss {row['train_loss']:.4f} "
            f"train {row['train_top1']:.2f} % val {row.get('val_top1', float('nan')):.2f} % "
            f"lr {row['lr']:.4g} {extras}").rstrip()


def _train_epoch(forward_model, model, method, optimizer, scheduler, loader, ctx, cfg, channels_last, dist):
    model.train()
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(ctx.epoch)
    total_loss, correct, seen, logs_sum = 0.0, 0, 0, {}
    iterator = loader
    if _progress(cfg, dist):
        from tqdm import tqdm

        iterator = tqdm(loader, desc=f"epoch {ctx.epoch + 1}/{ctx.epochs}", leave=False, dynamic_ncols=True)
    clip = cfg["train"]["grad_clip"]
    for step, (images, targets) in enumerate(iterator):
        ctx.step = step
        images = images.to(ctx.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(ctx.device, non_blocking=True)
        with ctx.autocast():
            loss, logits, logs = method.training_loss(forward_model, images, targets, ctx)
        loss_value = loss.detach().float().item()
        if not np.isfinite(loss_value):
            raise TrainingDiverged(
                f"non-finite loss ({loss_value}) at epoch {ctx.epoch + 1}, step {step + 1}: training stopped; "
                "lower train.lr or set train.grad_clip, then delete the run folder and re-run",
                epoch=ctx.epoch + 1, step=step + 1, loss=loss_value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(model, ctx)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        method.after_step(model, ctx)
        total_loss += loss_value * len(targets)
        correct += (logits.detach().argmax(1) == targets).sum().item()
        seen += len(targets)
        for k, v in logs.items():
            logs_sum[k] = logs_sum.get(k, 0.0) + float(v) * len(targets)
    if seen == 0:
        raise UserError("the training split yields no full batch: lower train.batch_size or use more data")
    row = {"epoch": ctx.epoch, "train_loss": total_loss / seen, "train_top1": 100.0 * correct / seen,
           "lr": optimizer.param_groups[0]["lr"]}
    row.update({k: v / seen for k, v in logs_sum.items()})
    return row


def _dense_losses(cfg: dict):
    """The dense model's per-instance test CE, for the MACs-difficulty correlation."""
    import pandas as pd

    source = cfg["difficulty_from"] or cfg["init_from"]
    if not source:
        return None
    path = Path(source)
    path = (path if path.is_dir() else path.parent) / "instances_test.csv"
    return pd.read_csv(path) if path.is_file() else None


def _final_evaluation(model, method, splits, val_loader, test_loader, ctx, cfg, channels_last,
                      dense_macs, dense_params, out: Path) -> dict:
    counter = InstanceMacs(model, splits.input_size, ctx.device)
    val = evaluate(model, method, val_loader, counter, ctx.device, ctx.autocast,
                   splits.severity.get("val"), channels_last)
    write_instances(val, out / "instances_val.csv")
    val_summary = summarize(val, dense_macs, "val")
    if test_loader is None:  # validation only: MACs and their reduction are the validation split's
        metrics = {**val_summary, "val_macs_reduction": val_summary["macs_reduction"]}
    else:
        test = evaluate(model, method, test_loader, counter, ctx.device, ctx.autocast,
                        splits.severity.get("test"), channels_last)
        write_instances(test, out / "instances_test.csv")
        metrics = summarize(test, dense_macs, "test", _dense_losses(cfg))
        metrics.update({"val_top1": val_summary["val_top1"], "val_top5": val_summary["val_top5"],
                        "val_macs_reduction": val_summary["macs_reduction"]})
    params = sum(p.numel() for p in model.parameters())
    metrics.update({
        "dataset": cfg["dataset"], "backbone": cfg["backbone"], "method": cfg["method"],
        "dynamic": method.dynamic, "budget": cfg["budget"], "seed": cfg["seed"], "run_id": run_id(cfg).to_dict(),
        **method.final_metrics(),
        "params": params, "params_dense": dense_params, "method_info": method.describe(),
        "config": cfg, "versions": _versions(),
    })
    return metrics


def _write_final(model, method, splits, cfg, dense_macs, metrics, out: Path) -> None:
    atomic_save({"format": MODEL_FORMAT, "config": cfg, "model": model.state_dict(),
                 "method_state": method.state_dict(), "num_classes": splits.num_classes,
                 "input_size": list(splits.input_size), "dense_macs": dense_macs}, out / "model.pt")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=str))


def _write_diverged(cfg: dict, diverged: TrainingDiverged, history: list[dict], out: Path) -> None:
    # No model.pt, so the folder never counts as finished (finished_run) and nothing downstream evaluates it;
    # the checkpoint goes too, since resuming from the epoch before a divergence only diverges again.
    (out / "checkpoint.pt").unlink(missing_ok=True)
    metrics = {"status": "diverged", "diverged_at": {"epoch": diverged.epoch, "step": diverged.step},
               "loss": str(diverged.loss), "message": str(diverged), "method": cfg["method"],
               "budget": cfg["budget"], "seed": cfg["seed"], "run_id": run_id(cfg).to_dict(),
               "epochs_trained": len(history), "config": cfg}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=str))


def _numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def evaluate_run(path: str | Path, split: str = "test", out_file: Optional[Path] = None,
                 device: str = "cpu", data_overrides: Optional[dict] = None) -> dict:
    """Evaluate a saved model on a split; writes the per-instance file, returns the summary."""
    model, method, cfg, saved = load_model(path, device)
    data_cfg = {**cfg["data"], **(data_overrides or {})}
    splits = build_dataset(cfg["dataset"], data_cfg, seed=cfg["seed"])
    if split not in ("val", "test"):
        raise UserError(f"unknown split '{split}'; valid splits: test, val")
    dataset = getattr(splits, split)
    loader = DataLoader(dataset, batch_size=cfg["train"]["eval_batch_size"], shuffle=False)
    dev = torch.device(device)
    counter = InstanceMacs(model, splits.input_size, dev)
    table = evaluate(model, method, loader, counter, dev, _autocast_factory(cfg, dev), splits.severity.get(split))
    summary = summarize(table, saved["dense_macs"], split, _dense_losses(cfg) if split == "test" else None)
    run_dir = Path(path) if Path(path).is_dir() else Path(path).parent
    write_instances(table, out_file or run_dir / f"instances_{split}.csv")
    return summary
