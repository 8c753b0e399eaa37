"""Images to L2-normalised embeddings with the evaluation preprocessing and flip test-time augmentation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from faceforge.data.image import decode_image
from faceforge.data.transforms import EvalTransform

Embedder = Callable[[torch.Tensor], torch.Tensor | np.ndarray]


class _EvalImages(Dataset[torch.Tensor]):
    """Decodes lazily so DataLoader workers share the JPEG work and memory holds one batch of pixels."""

    def __init__(
        self, images: Sequence[bytes | np.ndarray], transform: EvalTransform, names: Sequence[str] | None
    ) -> None:
        self.images, self.transform, self.names = images, transform, names

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        image, name = self.images[i], self.names[i] if self.names else f"image {i}"
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"{name}: arrays must be RGB uint8 HxWx3, got {image.dtype} {image.shape}")
        else:
            image = decode_image(image, name)
        return self.transform(image)


def _run(model: nn.Module | Embedder, batch: torch.Tensor) -> torch.Tensor:
    embeddings = torch.as_tensor(model(batch)).float()
    if embeddings.ndim != 2 or len(embeddings) != len(batch):
        raise ValueError(f"model must map {len(batch)} images to {len(batch)} x D, got shape {tuple(embeddings.shape)}")
    return embeddings


def embed_images(
    model: nn.Module | Embedder,
    images: Sequence[bytes | np.ndarray],
    *,
    input_size: int,
    crop_fraction: float = 1.0,
    batch_size: int = 64,
    flip: bool = True,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
    with_norms: bool = False,
    names: Sequence[str] | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Embed encoded images or RGB uint8 arrays; returns float32 N x D with unit-norm rows.

    With `flip`, each row is the normalised sum of the embeddings of the image and its mirror, the
    usual LFW test-time augmentation. An nn.Module is moved to `device` and run in eval mode (its
    train/eval mode is restored afterwards); any other callable gets the batch on `device`.
    `with_norms` also returns each image's embedding norm before normalisation (unflipped), the quality signal
    of MagFace-trained models. `names` (a path per image) name an image that cannot be decoded.
    """
    if len(images) == 0:
        raise ValueError("no images to embed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    loader = DataLoader(
        _EvalImages(images, EvalTransform(input_size, crop_fraction), names),
        batch_size=batch_size,
        num_workers=num_workers,
    )
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.to(device).eval()
    chunks, norms = [], []
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="embedding", unit="batch", disable=not progress):
                batch = batch.to(device)
                if flip:
                    both = _run(model, torch.cat([batch, batch.flip(-1)]))
                    plain, embeddings = both[: len(batch)], both[: len(batch)] + both[len(batch) :]
                else:
                    plain = embeddings = _run(model, batch)
                # Scaled by the largest entry first: a norm past float32's range (an untrained or diverging model's
                # 1e20 outputs) would make the row zero, which scores as chance instead of by its direction.
                scale = embeddings.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(embeddings.dtype).tiny)
                chunks.append(nn.functional.normalize(embeddings / scale, dim=1).cpu().numpy())
                norms.append(plain.norm(dim=1).cpu().numpy())
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    features = np.concatenate(chunks)
    return (features, np.concatenate(norms)) if with_norms else features
