"""The class-label encoder of the class-conditional LDMs (CompVis cin256): one learned vector per class."""

from __future__ import annotations

import torch

from ..errors import LDMKitError
from .embeddings import lookup_table
from .modeling_utils import ModelMixin


# In model_index.json as ["ldmkit", "ClassEmbedder"]: diffusers has no class for it.
class ClassEmbedder(ModelMixin, library="ldmkit"):
    """``tau(y) = E[y]``, a one-token cross-attention context for the UNet (Rombach et al. 2022, sec. 3.3).

    ``forward(class_labels (B,)) -> (B, 1, embed_dim)``. The parameter is ``embedding.weight``
    (``n_classes x embed_dim``), the name the original ``ClassEmbedder`` uses. cin256 has 1001 classes: the
    ImageNet ones and, last, the "null" class trained as the unconditional input for classifier-free
    guidance.

    ``class_names`` (saved in config.json) names the ``n_classes - 1`` real classes in id order, for models
    ldmkit trained (the null class is unnamed); CompVis-converted models have None.
    """

    def __init__(self, n_classes: int = 1001, embed_dim: int = 512, class_names: list[str] | None = None):
        super().__init__()
        if class_names is not None:
            class_names = [str(name) for name in class_names]
            if len(class_names) != n_classes - 1:
                raise LDMKitError(f"ClassEmbedder: class_names has {len(class_names)} names but n_classes="
                                  f"{n_classes} needs {n_classes - 1} (one per class; the last, null class is "
                                  "unnamed). Give one name per class or class_names=None.")
            if len(set(class_names)) != len(class_names):
                raise LDMKitError("ClassEmbedder: class_names has duplicates; each class needs its own name.")
        self.register_config(locals())
        self.embedding = lookup_table(n_classes, embed_dim)

    @property
    def null_class(self) -> int:
        """The label of the unconditional ("null") class: the last one."""
        return self.config.n_classes - 1

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, device=self.embedding.weight.device)
        if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise LDMKitError(f"ClassEmbedder expects a 1-D tensor of integer class labels, got "
                              f"{labels.dtype} of shape {tuple(labels.shape)}.")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.config.n_classes):
            raise LDMKitError(f"class labels must be in [0, {self.config.n_classes - 1}], got "
                              f"{labels.tolist()}.")
        return self.embedding(labels.long())[:, None, :]
