"""The tiny random pipelines of every kind (ldmkit.testing.tiny_pipelines), under the tests' short name."""

from ldmkit.testing.tiny_pipelines import class_conditional, inpaint, superres, text2img, uncond

__all__ = ["class_conditional", "inpaint", "superres", "text2img", "uncond"]
