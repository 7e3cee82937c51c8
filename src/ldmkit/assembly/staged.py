"""Text first, then the image networks: one generation in one process at the least peak memory.

A pipeline with a text encoder holds it beside the UNet and the autoencoder, though it runs once per prompt,
before the denoising loop. :func:`encode_then_load` loads the text part alone, encodes the prompts, frees it,
and only then loads the rest, so the process's peak is the larger of the two parts instead of their sum (on
ldm-text2im-large-256, LDMBert is 0.55 B of the 1.5 B parameters). The embeddings come from the same encoder
call the whole pipeline makes (``encode_prompt``, prompts and negatives in one batch), so the images are the
same pixels. This suits a command that makes its images and exits (``ldmkit txt2img``); a server, which
encodes new prompts all the time, keeps the whole pipeline.
"""

from __future__ import annotations

import gc

import torch

from ..loading.diffusers_layout import resolve_pipeline_folder
from ..pipelines.denoising import Guidance
from ..pipelines.pipeline_utils import DiffusionPipeline
from .pretrained import pipeline_class


def pipeline_class_of(name_or_path) -> type[DiffusionPipeline]:
    """The pipeline class ``name_or_path`` holds, from its model_index.json alone (no weights are read)."""
    folder, index = resolve_pipeline_folder(name_or_path)
    return pipeline_class(index.get("_class_name"), folder)


def encode_then_load(name_or_path, device: torch.device, dtype, prompt: str | list[str],
                     negative_prompt: str | list[str] | None, guidance_scale: float, cache_converted: bool = False
                     ) -> tuple[DiffusionPipeline, dict, dict[str, torch.dtype]]:
    """Load the text components of ``name_or_path`` (in ``dtype``, onto ``device``), encode ``prompt`` and
    ``negative_prompt`` as the pipeline would for ``guidance_scale``, free them, then load the other
    components. Returns the pipeline (its text components None), the keywords that take the prompts' place in
    its call (``prompt_embeds``, ``negative_prompt_embeds``) and the text networks' dtypes (for the record of
    the run). A pipeline without text components is loaded whole, and the keywords are the prompts.
    ``cache_converted`` as ``from_pretrained``'s."""
    cls = pipeline_class_of(name_or_path)
    text = tuple(getattr(cls, "text_components", ()))
    if not text:
        pipe = DiffusionPipeline.from_pretrained(name_or_path, torch_dtype=dtype, device_map=device,
                                                cache_converted=cache_converted)
        return pipe, {"prompt": prompt, "negative_prompt": negative_prompt}, {}
    encoder = DiffusionPipeline.from_pretrained(
        name_or_path, torch_dtype=dtype, device_map=device, cache_converted=cache_converted,
        **{name: None for name in cls.component_names() if name not in text})
    guidance = Guidance(guidance_scale)
    with torch.no_grad():  # embeddings with a grad_fn would keep the whole encoder alive through its graph
        cond, uncond = encoder.encode_prompt(prompt, negative_prompt=negative_prompt,
                                             need_uncond=guidance.need_uncond, need_cond=guidance.need_cond)
    if cond is None:  # guidance 0 reads only the unconditional text, but the call needs prompt_embeds in the
        cond = uncond  # prompt's place (its batch size); these are never read
    dtypes = {name: c.dtype for name, c in encoder.components.items() if isinstance(c, torch.nn.Module)}
    del encoder
    gc.collect()  # the encoder's weights go before the UNet's arrive
    pipe = DiffusionPipeline.from_pretrained(name_or_path, torch_dtype=dtype, device_map=device,
                                             cache_converted=cache_converted, **{name: None for name in text})
    return pipe, {"prompt_embeds": cond, "negative_prompt_embeds": uncond}, dtypes

