"""Training: one process or many under torchrun (DistributedDataParallel).

The order of work in :func:`train` is chosen so that a failed run loses nothing: the options, the data
and (when resuming) the checkpoint are checked before anything is written; the run folder is locked for
the run (:class:`~vig_pyg.train.rundir.RunDir`), and every epoch is committed in an order that a kill at
any point cannot leave inconsistent after ``--resume``.
"""

from __future__ import annotations

import logging
import math
import random
import re
import sys
import time
import uuid
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import vig_pyg
from vig_pyg.data.folder import folder_fingerprint
from vig_pyg.data.transforms import batch_transform
from vig_pyg.errors import DataError, PeerError, RunDirError, UsageError, one_line
from vig_pyg.models import create_model
from vig_pyg.train.checkpoint import FORMAT, capture_rng_state, load_checkpoint, restore_rng_state
from vig_pyg.train.config import TrainConfig, check_config, normalise, resume_config
from vig_pyg.train.datasets import Shard, build_datasets, check_same_data, default_workers, scan
from vig_pyg.train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    cleanup,
    is_peer_failure,
    setup_distributed,
)
from vig_pyg.train.evaluate import evaluate, progress_bar
from vig_pyg.train.rundir import RunDir
from vig_pyg.train.schedule import WarmupCosine

__all__ = ["TrainResult", "train"]

log = logging.getLogger("vig_pyg.train")


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        best_top1: best validation top-1 in percent.
        best_epoch: the epoch (1-based) that reached it.
        last_top1: validation top-1 of the last epoch.
        epochs_done: completed epochs of the run (over all invocations).
        out_dir: the run directory.
        history: one metrics row per completed epoch.
    """

    best_top1: float
    best_epoch: int
    last_top1: float
    epochs_done: int
    out_dir: Path
    history: list[dict[str, Any]]

    @property
    def best_checkpoint(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def last_checkpoint(self) -> Path:
        return self.out_dir / "last.pt"


# -- model ----------------------------------------------------------------------------------------------
def _build_model(config: TrainConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    kwargs = {**config.model_kwargs, "drop_path_rate": config.drop_path}
    try:
        model = create_model(config.model, num_classes=num_classes, **kwargs)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    if config.pretrained:
        from vig_pyg.models import load_pretrained

        try:
            load_pretrained(model, config.pretrained)
        except FileNotFoundError as err:
            raise UsageError(f"{err}; check --pretrained") from None
        except (ValueError, ConnectionError) as err:
            raise UsageError(f"--pretrained {config.pretrained}: {err}") from None
    size = tuple(model.img_size)  # type: ignore[attr-defined]
    min_h, min_w = model.min_input_size  # type: ignore[attr-defined]
    if size[0] < min_h or size[1] < min_w:
        raise UsageError(
            f"img_size {size[0]}x{size[1]} is too small for {config.model} with these settings (the last "
            f"graph block would have fewer nodes than k); use --img-size {max(min_h, min_w)} or more, or a "
            "smaller --k"
        )
    return model, kwargs


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Biases, norm scales and the position embedding are not decayed (the usual ViT/ViG recipe).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("pos_embed") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -- one epoch ------------------------------------------------------------------------------------------
def _train_epoch(
    model: nn.Module,
    loader: DataLoader,
    transform: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: WarmupCosine,
    config: TrainConfig,
    info: DistInfo,
    show: bool,
    desc: str,
) -> dict[str, float]:
    model.train()
    device = info.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    bar = progress_bar(loader, show, desc)
    for step, (x, y) in enumerate(bar):
        x = transform(x.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_grad is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
        optimizer.step()
        schedule.step()
        loss_sum += loss.detach().double() * y.size(0)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.size(0)
        if show and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{schedule.lr:.2e}")  # type: ignore[union-attr]
    total_loss, total_correct, total_seen = all_reduce_sum([loss_sum.item(), correct.item(), seen], info)
    return {
        "train_loss": total_loss / max(total_seen, 1),
        "train_top1": 100.0 * total_correct / max(total_seen, 1),
    }


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- the run --------------------------------------------------------------------------------------------
def train(config: TrainConfig, explicit: Collection[str] | None = None) -> TrainResult:
    """Train a model; under torchrun every process calls this and DDP joins them.

    Args:
        config: the run.
        explicit: names of the options the user set (the CLI passes them) so that a resumed run can refuse
            conflicting ones; ``None``: every option that differs from its default.

    Returns:
        The best and last validation scores and the run directory.

    Raises:
        UsageError: bad data, a bad checkpoint, an output directory in the way or in use, a bad option, a
            file that cannot be written, or (under torchrun) another process of the run that stopped.
    """
    already = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        info = setup_distributed(config.device)
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"could not set up training: {one_line(err)}") from None
    try:
        return _train(config, info, explicit)
    except RuntimeError as err:
        if not (info.enabled and is_peer_failure(err)):
            raise
        # gloo's messages start with its source location: "[.../pair.cc:537] Read error ...".
        reason = re.sub(r"^\[[^\]]*\]\s*", "", one_line(err)).split(". ")[0]
        raise PeerError(
            f"another process of the run stopped ({reason}); the checkpoints in {config.out_dir} are "
            "intact: run the same command with --resume to continue"
        ) from None
    finally:
        if not already:
            cleanup()


def _hold_run_dir(config: TrainConfig, info: DistInfo) -> tuple[RunDir | None, bool]:
    """Rank 0 locks and checks the run folder; every rank learns whether there is an epoch to resume."""
    run_dir = RunDir(config.out_dir) if info.is_main else None
    failure: tuple[type[UsageError], str] | None = None
    resuming = False
    if run_dir is not None:
        try:
            run_dir.acquire(create=not config.resume)
            if config.resume:
                resuming = run_dir.can_resume()
                if not resuming:
                    log.info(
                        "no finished epoch to resume in %s: starting the run from the beginning",
                        config.out_dir,
                    )
            else:
                run_dir.check_new_run(config.overwrite)
        except UsageError as err:
            run_dir.release()
            failure = (type(err), str(err))
    failure, resuming = all_gather_objects((failure, resuming), info)[0]
    if failure is not None:
        raise failure[0](failure[1])
    return run_dir, resuming


def _train(config: TrainConfig, info: DistInfo, explicit: Collection[str] | None) -> TrainResult:
    config = normalise(config)
    check_config(config)
    run_dir, resuming = _hold_run_dir(config, info)
    try:
        return _run(config, info, explicit, run_dir, resuming)
    finally:
        if run_dir is not None:
            run_dir.release()


def _run(
    config: TrainConfig,
    info: DistInfo,
    explicit: Collection[str] | None,
    run_dir: RunDir | None,
    resuming: bool,
) -> TrainResult:
    out = Path(config.out_dir)
    ckpt = None
    if resuming:
        ckpt = load_checkpoint(out / "last.pt")
        config = normalise(resume_config(config, ckpt["config"], explicit))
        check_config(config)
        if config.data is not None and not Path(config.data).exists():
            raise DataError(
                f"the run's data folder {config.data} no longer exists; pass --data with the folder's new "
                "place (the same classes and images)"
            )
    if config.sync_bn and info.enabled and info.device.type == "cpu":
        raise UsageError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm has no CPU kernel; drop --sync-bn")

    _seed(config.seed + info.rank)
    splits, classes = scan(config)  # checks the data folder before anything is written
    fingerprint = folder_fingerprint(splits) if splits is not None else None
    if ckpt is not None:
        check_same_data(splits, ckpt.get("data_fingerprint"), ckpt["config"].get("data"), config.data)
        if list(ckpt["class_names"]) != classes:
            raise DataError(
                f"the run was trained on the classes {ckpt['class_names'][:5]}..., the data now has "
                f"{classes[:5]}...; resume on the run's data"
            )
    model, model_kwargs = _build_model(config, len(classes))
    data = build_datasets(config, splits, classes, model)
    if len(data.train) < 2 * info.world_size:  # type: ignore[arg-type]
        raise DataError(f"{len(data.train)} training images are too few for {info.world_size} process(es)")  # type: ignore[arg-type]
    if len(data.val) == 0:  # type: ignore[arg-type]
        raise DataError("the validation set is empty; add images to val/ (or raise --limit-val)")

    device = info.device
    model.to(device)
    if config.sync_bn:
        if info.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.info("--sync-bn has no effect in a single process")
    core = model
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )

    train_sampler = DistributedSampler(
        data.train, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=config.seed
    )
    workers = default_workers(config.workers, in_memory=splits is None)
    per_rank = len(train_sampler)
    train_loader = DataLoader(
        data.train,
        batch_size=min(config.batch_size, per_rank),
        sampler=train_sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        # A last batch of one image would train BatchNorm on one sample; dropping the remainder is usual.
        drop_last=True,
    )
    val_loader = DataLoader(
        data.val,
        batch_size=config.batch_size,
        sampler=Shard(len(data.val), info.rank, info.world_size),  # type: ignore[arg-type]
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    train_tf = batch_transform(data.pre, data.augment).to(device)
    val_tf = batch_transform(data.pre).to(device)

    optimizer = torch.optim.AdamW(_param_groups(core, config.weight_decay), lr=config.lr)
    steps = len(train_loader)
    schedule = WarmupCosine(
        optimizer,
        config.lr,
        total_steps=config.epochs * steps,
        warmup_steps=round(config.warmup_epochs * steps),
        min_lr=config.min_lr,
    )
    history: list[dict[str, Any]] = []
    best_top1, best_epoch, start_epoch = -1.0, 0, 0
    run_id = uuid.uuid4().hex
    if ckpt is not None:
        core.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["scheduler"])
        history = list(ckpt["history"])
        best_top1, best_epoch, start_epoch = (
            float(ckpt["best_top1"]),
            int(ckpt["best_epoch"]),
            int(ckpt["epoch"]),
        )
        run_id = ckpt.get("run_id", run_id)
        rngs = ckpt["rng"]
        if len(rngs) != info.world_size:
            log.warning(
                "resuming with %d process(es) where the run had %d: the data order and augmentation differ "
                "from an uninterrupted run",
                info.world_size,
                len(rngs),
            )
        restore_rng_state(rngs[info.rank % len(rngs)])
        if config.epochs < start_epoch:
            raise RunDirError(
                f"the run in {config.out_dir} has done {start_epoch} epochs already, more than --epochs "
                f"{config.epochs}; pass a larger --epochs or drop it"
            )
        log.info("resuming %s after epoch %d of %d", config.out_dir, start_epoch, config.epochs)

    if run_dir is not None:
        if ckpt is not None:
            run_dir.repair(ckpt, asdict(config))
        else:
            run_dir.clean_temporary()
    barrier(info)
    if info.is_main:
        stats = sum(p.numel() for p in core.parameters())
        log.info(
            "%s (%.2f M parameters) on %s: %d train / %d val images, %d classes, input %dx%d, %d process(es)",
            config.model,
            stats / 1e6,
            "the embedded digits" if config.data is None else config.data,
            len(data.train),  # type: ignore[arg-type]
            len(data.val),  # type: ignore[arg-type]
            len(classes),
            *data.pre.size,
            info.world_size,
        )

    show = info.is_main and (config.progress if config.progress is not None else sys.stderr.isatty())
    end = config.epochs if config.stop_after is None else min(config.epochs, start_epoch + config.stop_after)
    for epoch in range(start_epoch, end):
        t0 = time.perf_counter()
        train_sampler.set_epoch(epoch)
        lr = schedule.lr
        desc = f"epoch {epoch + 1}/{config.epochs}"
        try:
            row: dict[str, Any] = _train_epoch(
                model, train_loader, train_tf, optimizer, schedule, config, info, show, desc
            )
            if not math.isfinite(row["train_loss"]):
                raise UsageError(
                    f"training diverged (loss {row['train_loss']}) in epoch {epoch + 1}; lower --lr, set "
                    "--clip-grad or drop --amp, then start again (the checkpoints of earlier epochs are kept)"
                )
            row.update(evaluate(core, val_loader, val_tf, device, config.amp, info))
        except DataError as err:
            # Raised in a loader worker, the message arrives wrapped in the worker's traceback.
            raise DataError(one_line(err)) from None
        row.pop("count")
        # A validation loss that is not finite (a model that diverged in eval mode) never counts as best.
        scored = math.isfinite(row["val_loss"])
        if not scored and info.is_main:
            log.warning(
                "epoch %d: the validation loss is %s; this epoch is not a candidate for best.pt",
                epoch + 1,
                row["val_loss"],
            )
        is_best = scored and row["val_top1"] > best_top1
        if is_best:
            best_top1, best_epoch = row["val_top1"], epoch + 1
        row = {
            "epoch": epoch + 1,
            **{k: float(v) for k, v in row.items()},
            "lr": float(lr),
            "epoch_time_s": time.perf_counter() - t0,
            "best_val_top1": best_top1 if best_epoch else None,
        }
        history.append(row)
        rngs = all_gather_objects(capture_rng_state(), info)
        if run_dir is not None:
            state = {
                "format": FORMAT,
                "vig_pyg_version": vig_pyg.__version__,
                "run_id": run_id,
                "epoch": epoch + 1,
                "model_name": config.model,
                "model_kwargs": model_kwargs,
                "num_classes": len(classes),
                "class_names": list(classes),
                "preprocessing": data.pre.to_dict(),
                "data_fingerprint": fingerprint,
                "model": core.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": schedule.state_dict(),
                "rng": rngs,
                "world_size": info.world_size,
                "config": asdict(config),
                "history": history,
                "best_top1": best_top1,
                "best_epoch": best_epoch,
                "metrics": row,
            }
            run_dir.commit(state, is_best, asdict(config) if epoch == start_epoch else None)
            log.info(
                "epoch %d/%d  train loss %.3f acc %.1f%%  val loss %.3f top-1 %.1f%% top-5 %.1f%%  "
                "lr %.2e  %.1fs%s",
                epoch + 1,
                config.epochs,
                row["train_loss"],
                row["train_top1"],
                row["val_loss"],
                row["val_top1"],
                row["val_top5"],
                lr,
                row["epoch_time_s"],
                "  *best" if is_best else "",
            )
        barrier(info)
    if info.is_main and best_epoch:
        log.info("best val top-1 %.1f%% at epoch %d; checkpoints in %s", best_top1, best_epoch, out)
    return TrainResult(
        best_top1=best_top1,
        best_epoch=best_epoch,
        last_top1=history[-1]["val_top1"] if history else float("nan"),
        epochs_done=len(history),
        out_dir=out,
        history=history,
    )
