"""Everything one training rank needs to distil: the frozen teacher, its features, the projection, the loss.

The training loop asks it for the teacher's features of each batch, trains its projection with the student
(gradients averaged over ranks here, since the projection lives outside the backbone's DDP), and saves the
projection next to each checkpoint as `distill.pt` for resuming; the backbone checkpoint and the logged
MLflow model never contain it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from faceforge.data import ImageFolderDataset, RecordDataset
from faceforge.distill.features import FeatureTable, teacher_table
from faceforge.distill.losses import DistillLoss, HeadLoss, centre_classifier, class_centres
from faceforge.distill.teacher import IDENTITY_PREFIX, check_same_teacher, load_teacher, teacher_identity
from faceforge.parallel import DistContext, all_gather_tensor, all_reduce_sum
from faceforge.train.config import ConfigError, TrainConfig

STATE_FILE = "distill.pt"


class WithIndex(Dataset[tuple[Any, int, int]]):
    """Training items with their dataset index appended, to look up cached teacher features."""

    def __init__(self, dataset: ImageFolderDataset | RecordDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Any, int, int]:
        image, label = self.dataset[item]
        return image, label, int(item[0] if isinstance(item, tuple) else item)


def make_projection(student_dim: int, teacher_dim: int, seed: int) -> nn.Module:
    """Student to teacher width, identity when they match; seeded on its own so every rank starts identical."""
    if student_dim == teacher_dim:
        return nn.Identity()
    projection = nn.Linear(student_dim, teacher_dim, bias=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        projection.weight.copy_(torch.randn(teacher_dim, student_dim, generator=generator) / math.sqrt(student_dim))
    return projection


def _check_ranks_agree(identity: str, source: str, ctx: DistContext) -> None:
    """Each rank loads the teacher itself: one re-pointed or retrained between their loads would have the ranks
    distil from different teachers. Every rank sees every identity, so all refuse together and none waits on the
    others in a collective."""
    digest = torch.frombuffer(bytearray.fromhex(identity.removeprefix(IDENTITY_PREFIX)), dtype=torch.int64)
    identities = all_gather_tensor(digest.unsqueeze(0).to(ctx.device))
    if not (identities == identities[0]).all():
        raise ConfigError(
            f"the ranks loaded different weights from distill.teacher {source}: it changed while they started "
            "(an alias re-pointed, a teacher still training into its folder); start again once it is settled"
        )


class Distiller:
    """Built on every rank from `cfg.distill`; the teacher's feature table is computed collectively."""

    def __init__(self, cfg: TrainConfig, dataset: ImageFolderDataset | RecordDataset, ctx: DistContext) -> None:
        settings = cfg.distill
        assert settings.teacher is not None, "Distiller needs distill.teacher"
        self.settings, self.ctx = settings, ctx
        teacher = load_teacher(settings.teacher, cfg.mlflow.tracking_uri, ctx.device)
        self.teacher_id = teacher_identity(teacher)
        _check_ranks_agree(self.teacher_id, settings.teacher, ctx)
        self.teacher_dim, self.teacher_size = teacher.embedding_dim, teacher.input_size
        table, centres = None, None
        if settings.cache or settings.centre_weight > 0:
            table = teacher_table(
                teacher,
                dataset,
                cfg.data.crop_fraction,
                cfg.per_rank_batch,
                cfg.data.num_workers,
                ctx,
                cache_dir=Path(settings.cache_dir) if settings.cache else None,
                teacher_id=self.teacher_id if settings.cache else None,
            )
            if ctx.is_main and table.path is not None:
                print(f"distill: teacher features {'reused from' if table.reused else 'cached to'} {table.path}")
        if settings.centre_weight > 0:
            assert table is not None
            table_centres = class_centres(table.rows, dataset.labels, dataset.num_classes)
            centres = centre_classifier(table_centres, settings.centre_s, settings.centre_m, ctx.device)
        # Cached features replace the teacher; without a cache it runs on every batch for embedding distillation.
        self.table: FeatureTable | None = table if settings.cache else None
        self.teacher = teacher if settings.embedding_weight > 0 and not settings.cache else None
        self.needs_teacher_features = settings.embedding_weight > 0
        self.projection = make_projection(cfg.model.embedding_dim, self.teacher_dim, cfg.seed).to(ctx.device)
        self.centres = centres
        self.loss: DistillLoss | None = None

    def wrap(self, head_loss: HeadLoss) -> DistillLoss:
        """The step's loss: the head's own loss weighted and summed with the distillation terms."""
        self.loss = DistillLoss(
            head_loss=head_loss,
            head_weight=self.settings.head_weight,
            projection=self.projection,
            embedding_weight=self.settings.embedding_weight,
            embedding_loss=self.settings.embedding_loss,
            centres=self.centres,
            centre_weight=self.settings.centre_weight,
        )
        return self.loss

    def pop_terms(self) -> dict[str, float]:
        return {} if self.loss is None else self.loss.pop_terms()

    def parameters(self) -> list[nn.Parameter]:
        """Trained with the student by the backbone's optimizer."""
        return list(self.projection.parameters())

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
        """The teacher's normalised features of a batch: looked up by index when cached, else computed now."""
        if not self.needs_teacher_features:
            return None
        if self.teacher is None:
            assert self.table is not None
            return self.table.lookup(indices).to(self.ctx.device)
        if images.shape[-1] != self.teacher_size:
            images = F.interpolate(images, size=self.teacher_size, mode="bilinear", align_corners=False, antialias=True)
        return F.normalize(self.teacher(images).float(), dim=1)

    def sync_gradients(self) -> None:
        """Average the projection's gradient over ranks, as DDP does for the backbone's."""
        if self.ctx.world_size == 1:
            return
        for param in self.projection.parameters():
            if param.grad is not None:
                all_reduce_sum(param.grad).div_(self.ctx.world_size)

    def checkpoint_files(self) -> dict[str, dict[str, Any]]:
        """What a checkpoint keeps to resume: the projection, and which teacher it was trained against."""
        return {STATE_FILE: {"projection": self.projection.state_dict(), "teacher": self.teacher_id}}

    def load(self, checkpoint: Path) -> None:
        """The projection back, once the teacher this rank loaded is found to be the checkpoint's.

        The launcher checked a copy of its own before the ranks started (check_distill_resume); this one trains,
        and its source may have moved since (an alias re-pointed, a teacher still training into its folder).
        """
        path = checkpoint / STATE_FILE
        if not path.is_file():
            if self.parameters():
                raise FileNotFoundError(f"{path} missing: this checkpoint has no distillation projection to resume")
            return
        state = torch.load(path, map_location=self.ctx.device, weights_only=True)
        check_same_teacher(state.get("teacher", ""), self.teacher_id, checkpoint, self.settings.teacher)
        if self.parameters():
            self.projection.load_state_dict(state["projection"])
