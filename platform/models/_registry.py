"""Name -> constructor table, so configs and checkpoints can name a backbone instead of importing it."""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable
from numbers import Real

from torch import nn

from faceforge.models.layers import ACTIVATIONS, MIN_INPUT_SIZE

ModelFn = Callable[..., nn.Module]
_MODELS: dict[str, ModelFn] = {}


def register(fn: ModelFn) -> ModelFn:
    """Register a constructor under its function name.

    Constructors take keyword-only embedding_dim, width, input_size and act.
    """
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered names matching a shell-style pattern, e.g. 'mobile*'."""
    return sorted(fnmatch.filter(_MODELS, pattern))


def create(
    name: str,
    *,
    embedding_dim: int = 512,
    width: float = 1.0,
    input_size: int = 112,
    act: str = "prelu",
    **kwargs: object,
) -> nn.Module:
    """Build a backbone mapping B x 3 x input_size x input_size in [-1, 1] to B x embedding_dim.

    The arguments are kept on the model as `model.config`, so `create(**model.config)` rebuilds it.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
    if isinstance(width, bool) or not isinstance(width, Real) or not 0 < width < math.inf:
        raise ValueError(f"width must be a positive finite number, got {width!r}")
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < MIN_INPUT_SIZE:
        raise ValueError(f"input_size must be an int >= {MIN_INPUT_SIZE}, got {input_size!r}")
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")
    options = dict(embedding_dim=embedding_dim, width=float(width), input_size=input_size, act=act, **kwargs)
    model = _MODELS[name](**options)
    model.config = copy.deepcopy({"name": name, **options})  # the caller's lists (hidden=) may change later
    return model
