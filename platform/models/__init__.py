"""Backbone registry: every face-embedding network, built by name with `create`, plus their model cards."""

from faceforge.models import iresnet, mobilefacenet, mobilenet, shufflefacenet, squeezenet, xception
from faceforge.models._registry import create, list_models, register
from faceforge.models.card import ModelCard, cards_markdown, model_card, write_model_cards

# timm-style short name; left out of __all__ so `import *` cannot shadow the builtin.
list = list_models

__all__ = [
    "ModelCard",
    "cards_markdown",
    "create",
    "iresnet",
    "list_models",
    "mobilefacenet",
    "mobilenet",
    "model_card",
    "register",
    "shufflefacenet",
    "squeezenet",
    "write_model_cards",
    "xception",
]
