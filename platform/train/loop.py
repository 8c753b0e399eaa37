"""One training process (one rank): build everything from the typed config and run the step loop.

Launched in-process for a single rank, or by torchrun as `python -m faceforge.train.worker` for several.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from faceforge import models
from faceforge.data import DistributedBatchSampler, ImageDecodeError, PKBatchSampler, TrainTransform, open_dataset
from faceforge.data.verification import VerificationSet, load_bin, load_pairs
from faceforge.distill import Distiller, WithIndex
from faceforge.eval import embed_images, evaluate_verification, save_roc_plot
from faceforge.eval.report import pair_scores
from faceforge.heads import batch_hard_triplet_loss, contrastive_loss, margin_spec
from faceforge.models.card import count_macs, count_params, measure_latency_ms
from faceforge.parallel import (
    DistContext,
    HeadOptimizer,
    ShardedMarginSoftmax,
    all_gather_tensor,
    all_reduce_sum,
    clip_grad_norm,
    init_distributed,
    shutdown_distributed,
)
from faceforge.train.allocator import keep_freed_memory
from faceforge.train.checkpoint import LATEST, load_backbone, load_checkpoint, resolve_checkpoint, save_checkpoint
from faceforge.train.config import TrainConfig
from faceforge.train.launch import die_with_parent
from faceforge.train.schedule import lr_at
from faceforge.train.torchrun import STOP_SIGNALS
from faceforge.train.tracking import RunTracker

CARD_LATENCY_RUNS = 20


class _StopSignal:
    """A stop (SIGTERM, Ctrl-C, a hangup) asks for a checkpoint at the next step boundary, not the step killed."""

    def __enter__(self) -> _StopSignal:
        self.requested: str | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = signal.Signals(signum).name


def _loader_worker_leaves_the_group(worker_id: int) -> None:
    """A stop sent to the run's process group (a queue cancel, Ctrl-C) is the rank's to act on: a DataLoader worker
    killed by it would fail the rank mid-checkpoint. The worker still dies with the rank."""
    os.setpgid(0, 0)
    die_with_parent(signal.SIGKILL, os.getppid())


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether any rank raised its flag: every rank must stop at the same step, so flags are summed over ranks."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def train_transform(cfg: TrainConfig) -> TrainTransform:
    aug = cfg.data.augment
    return TrainTransform(
        cfg.model.input_size,
        crop_fraction=cfg.data.crop_fraction,
        flip=aug.flip,
        lowres_prob=aug.lowres_prob,
        lowres_min=aug.lowres_min,
        jitter=aug.jitter,
        grey_prob=aug.grey_prob,
        shift=aug.shift,
        scale=aug.scale,
        rotate=aug.rotate,
    )


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def load_verification_set(cfg: TrainConfig) -> VerificationSet | None:
    if cfg.eval.disabled:
        return None
    if cfg.eval.bin:
        return load_bin(cfg.eval.bin)
    if cfg.eval.pairs:
        return load_pairs(cfg.eval.pairs, cfg.eval.root)
    return None


def evaluate(
    model: nn.Module, vset: VerificationSet, cfg: TrainConfig, ctx: DistContext, roc_path: Path | None
) -> dict[str, float]:
    """Each rank embeds a contiguous slice of the images; rank 0 scores the gathered features."""
    per_rank = math.ceil(len(vset.images) / ctx.world_size)
    share = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
    mine = vset.images[share]
    feats = torch.zeros(per_rank, model.embedding_dim)
    if mine:
        feats[: len(mine)] = torch.from_numpy(
            embed_images(
                model,
                mine,
                input_size=cfg.model.input_size,
                crop_fraction=cfg.eval.crop_fraction,
                batch_size=cfg.eval.batch_size,
                device=ctx.device,
                names=vset.sources[share] if vset.sources else None,
            )
        )
    features = all_gather_tensor(feats.to(ctx.device)).cpu().numpy()[: len(vset.images)]
    metrics = evaluate_verification(features, vset)
    if roc_path is not None and ctx.is_main:
        save_roc_plot(pair_scores(features, vset), vset.issame, roc_path, f"{vset.name}: {cfg.model.name}")
    return metrics


def forward_backward(
    net: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    accumulate: int,
    amp: AbstractContextManager,
    teacher: torch.Tensor | None = None,
) -> float:
    """Gradients of the mean loss over `accumulate` micro-batches; DDP all-reduces only on the last one.

    With distillation, `teacher` holds the teacher's features of the images and is split with them.
    """
    loss_sum = 0.0
    teachers = [None] * accumulate if teacher is None else teacher.chunk(accumulate)
    micro_batches = zip(images.chunk(accumulate), labels.chunk(accumulate), teachers, strict=True)
    for micro, (x, y, t) in enumerate(micro_batches):
        last = micro == accumulate - 1
        sync = net.no_sync() if isinstance(net, DistributedDataParallel) and not last else nullcontext()
        with sync:
            with amp:
                emb = net(x)
            loss = (loss_fn(emb.float(), y) if t is None else loss_fn(emb.float(), y, t)) / accumulate
            loss.backward()
        loss_sum += loss.item()
    return loss_sum


def train(cfg: TrainConfig, run_id: str | None = None) -> dict[str, float]:
    """Run (or resume) training for this rank; returns the final evaluation metrics on rank 0."""
    keep_freed_memory()
    torch.set_num_threads(cfg.trainer.threads)
    ctx = init_distributed(cfg.trainer.device)
    try:
        return _train(cfg, ctx, run_id)
    finally:
        shutdown_distributed()


def _train(cfg: TrainConfig, ctx: DistContext, run_id: str | None) -> dict[str, float]:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    dataset = open_dataset(cfg.data.root, train_transform(cfg))
    # trainer.init_from starts from a checkpoint's backbone (a pruned one keeps its widths); its model.* was adopted.
    init = cfg.trainer.init_from
    model = (load_backbone(init).train() if init else models.create(**asdict(cfg.model))).to(ctx.device)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    net: nn.Module = DistributedDataParallel(model) if ctx.world_size > 1 else model
    # The distiller's projection (student -> teacher width) trains with the backbone but is never saved with it.
    try:
        distiller = Distiller(cfg, dataset, ctx) if cfg.distill.teacher is not None else None
    except ImageDecodeError as err:  # the teacher's pass over the training set, before any step
        unreadable = str(err).strip().splitlines()[-1]
        raise SystemExit(f"{unreadable}: the teacher's features need every training image; fix or remove it") from None
    trainable = [*model.parameters(), *(distiller.parameters() if distiller else [])]
    optimizer = build_optimizer(trainable, cfg)

    head, head_optimizer = None, None
    if cfg.head.type == "margin":
        margin = margin_spec(cfg.head.preset, **cfg.head.margin_parameters())
        head = ShardedMarginSoftmax(
            dataset.num_classes,
            cfg.model.embedding_dim,
            margin,
            cfg.head.sample_rate,
            seed=cfg.seed,
            device=ctx.device,
            matmul_dtype=torch.bfloat16 if cfg.trainer.amp else None,
        )
        head_optimizer = HeadOptimizer(
            head,
            kind=cfg.optim.name,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
            betas=cfg.optim.betas,
        )
        loss_fn = head
    else:
        pair_loss = batch_hard_triplet_loss if cfg.head.type == "triplet" else contrastive_loss

        def loss_fn(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return pair_loss(emb, labels, cfg.head.margin)

    if distiller is not None:
        loss_fn = distiller.wrap(loss_fn)

    checkpoints = out / "checkpoints"
    start_step = 0
    # "auto" resumes from this run's own checkpoints when there are any, which makes reruns idempotent.
    auto_fresh = cfg.trainer.resume == "auto" and not (checkpoints / LATEST).is_file()
    if cfg.trainer.resume and not auto_fresh:
        resume_from = checkpoints if cfg.trainer.resume == "auto" else Path(cfg.trainer.resume)
        start_step = load_checkpoint(
            resume_from, model=model, optimizer=optimizer, head=head, head_optimizer=head_optimizer
        )
        if head is not None:
            head.steps_sampled = start_step * cfg.trainer.accumulate
        if distiller is not None:
            distiller.load(resolve_checkpoint(resume_from))

    if cfg.head.type == "margin":
        sampler = DistributedBatchSampler(
            len(dataset), cfg.per_rank_batch, ctx.world_size, ctx.rank, cfg.seed, start_step=start_step
        )
    else:
        sampler = PKBatchSampler(
            dataset.labels, cfg.head.p, cfg.head.k, ctx.world_size, ctx.rank, cfg.seed, start_step=start_step
        )
    workers = cfg.data.num_workers
    items = dataset if distiller is None else WithIndex(dataset)
    loader = DataLoader(
        items,
        batch_sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=_loader_worker_leaves_the_group,
    )
    batches = iter(loader)

    vset = load_verification_set(cfg)
    tracker = RunTracker(cfg.mlflow.tracking_uri, run_id) if ctx.is_main and run_id else None
    amp = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if cfg.trainer.amp else nullcontext()
    steps, accumulate = cfg.trainer.steps, cfg.trainer.accumulate
    # The head's step can run inside its backward when that backward yields its whole gradient.
    head_step_in_backward = head_optimizer is not None and accumulate == 1 and cfg.trainer.grad_clip == 0
    progress = tqdm(total=steps, initial=start_step, disable=not ctx.is_main, desc="train", dynamic_ncols=True)
    metrics: dict[str, float] = {}
    tick, images_seen = time.perf_counter(), 0
    step = start_step

    def save(step: int) -> None:
        try:
            save_checkpoint(
                checkpoints,
                step,
                model=model,
                optimizer=optimizer,
                head=head,
                head_optimizer=head_optimizer,
                train_config=cfg.to_dict(),
                is_main=ctx.is_main,
                identities=dataset.identity_digest,
                extra=distiller.checkpoint_files() if distiller else None,
            )
        except OSError as err:  # a full disk: the checkpoints before this one are whole, and `latest` names one
            progress.close()
            raise SystemExit(f"step {step}'s checkpoint was not written: {err}; {cfg.resume_hint}") from None

    def evaluate_and_log(roc: Path | None) -> dict[str, float]:
        scores = evaluate(model, vset, cfg, ctx, roc)
        if tracker:
            tracker.metrics({f"eval.{k}": v for k, v in scores.items()}, step)
        return scores

    with _StopSignal() as stop:  # Ctrl-C and SIGTERM mean 'checkpoint and stop' only while steps run
        while step < steps:
            try:
                images, labels, *indices = next(batches)
                unreadable = None
            except ImageDecodeError as err:  # from a DataLoader worker its message ends with the original line
                unreadable = str(err).strip().splitlines()[-1]
            if _any_rank(unreadable is not None, ctx.device):  # every rank stops at this step, checkpointed
                save(step)
                progress.close()
                raise SystemExit(
                    f"{unreadable or 'another rank met an unreadable training image'}; the {step} steps done are "
                    f"checkpointed: fix or remove the file, then {cfg.resume_hint}"
                )
            images = images.to(ctx.device, memory_format=memory_format)
            labels = labels.to(ctx.device)
            lr = lr_at(step, steps, cfg.optim.lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            teacher = distiller.teacher_features(images, *indices) if distiller else None
            if head_step_in_backward:
                head_optimizer.step_in_next_backward(lr)
            loss_sum = forward_backward(net, loss_fn, images, labels, accumulate, amp, teacher)
            if distiller is not None:
                distiller.sync_gradients()
            if cfg.trainer.grad_clip > 0:
                clip_grad_norm(trainable, head, cfg.trainer.grad_clip)
            optimizer.step()
            if head_optimizer is not None and not head_step_in_backward:
                head_optimizer.step(lr)
            step += 1
            images_seen += images.shape[0] * ctx.world_size
            progress.update(1)
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"loss became {loss_sum} at step {step}; lower optim.lr or enable grad_clip")

            if tracker and (step % cfg.trainer.log_every == 0 or step == steps):
                elapsed = time.perf_counter() - tick
                rate = images_seen / elapsed
                distill_terms = distiller.pop_terms() if distiller else {}
                tracker.metrics({"loss": loss_sum, "lr": lr, "img_per_s": rate, **distill_terms}, step)
                progress.set_postfix(loss=f"{loss_sum:.3f}", img_s=f"{rate:.1f}")
                tick, images_seen = time.perf_counter(), 0
            stopping = _any_rank(stop.requested is not None, ctx.device)
            if stopping or step % cfg.trainer.checkpoint_every == 0 or step == steps:
                save(step)
            if stopping:
                progress.close()
                why = stop.requested or "another rank"
                raise SystemExit(f"stopped by {why} at step {step}; {cfg.resume_hint}")
            if vset is not None and cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step < steps:
                evaluate_and_log(None)
    progress.close()
    if vset is not None:  # after the loop: a run resumed from its last checkpoint (killed while evaluating) gets it too
        metrics = evaluate_and_log(out / "roc.png")

    if tracker:
        # The trained backbone's model card; sweep selection reads it for latency and size limits.
        cpu_model = model.cpu()
        card = {
            "model.params": count_params(cpu_model),
            "model.macs": count_macs(cpu_model, cfg.model.input_size),
            "model.latency_ms": measure_latency_ms(cpu_model, cfg.model.input_size, CARD_LATENCY_RUNS),
        }
        tracker.metrics(card, step)
        if (out / "roc.png").exists():
            tracker.artifact(out / "roc.png")
        tracker.artifact(out / "config.yaml")
        if cfg.mlflow.log_model:
            tracker.model(cpu_model, cfg.model.input_size, step)
    return {k: float(np.asarray(v)) for k, v in metrics.items()}
