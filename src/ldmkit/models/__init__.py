"""The networks. One file per network, plus shared blocks (resnet, attention, embeddings)."""

from .modeling_utils import ModelMixin

__all__ = ["ModelMixin"]
