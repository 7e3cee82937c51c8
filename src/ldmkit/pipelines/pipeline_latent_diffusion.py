"""Text-to-image latent diffusion (Rombach et al. 2022, Sec. 3.3 and 4.3)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import LDMKitError
from ..models import AutoencoderKL, LDMBertModel, UNet2DConditionModel, VQModel
from .checks import check_image_size, check_latents, check_output_type, check_positive_int
from .denoising import CALLBACK_TENSORS, Guidance, Sampling, legacy_callback
from .pipeline_utils import DiffusionPipeline


def _as_prompt_list(prompt, name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list | tuple) or not all(isinstance(p, str) for p in prompts):
        raise LDMKitError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}.")
    if len(prompts) == 0:
        raise LDMKitError(f"{name} is an empty list: give at least one prompt.")
    return list(prompts)


class _Texts:
    """The call's prompts (or embeddings) and negative prompts, checked once for the whole call, then taken
    chunk by chunk (:meth:`take`)."""

    def __init__(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, need_cond: bool):
        for name, emb in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if emb is not None and not (isinstance(emb, torch.Tensor) and emb.is_floating_point() and emb.ndim == 3):
                raise LDMKitError(f"{name} must be a float tensor (batch, tokens, channels), got "
                                  f"{getattr(emb, 'shape', type(emb).__name__)}.")
            if emb is not None and not torch.isfinite(emb).all():
                raise LDMKitError(f"{name} contains NaN or infinite values.")
        self.prompts = _as_prompt_list(prompt, "prompt") if prompt_embeds is None else None
        if self.prompts is not None and need_cond and not all(p.strip() for p in self.prompts):
            raise LDMKitError("prompt is empty: write a prompt (or use guidance_scale=0 for a sample that ignores it).")
        self.count = len(self.prompts) if self.prompts is not None else prompt_embeds.shape[0]
        self.negatives = None
        if negative_prompt is not None:
            negatives = _as_prompt_list(negative_prompt, "negative_prompt")
            self.negatives = negatives * self.count if len(negatives) == 1 else negatives
            if len(self.negatives) != self.count:
                raise LDMKitError(f"negative_prompt has {len(negatives)} entries but prompt has {self.count}: "
                                  "give one negative prompt, or one per prompt.")
        self.embeds, self.negative_embeds = prompt_embeds, negative_prompt_embeds

    def take(self, start: int, stop: int) -> dict:
        """:meth:`LDMTextToImagePipeline.encode_prompt`'s text arguments for prompts ``start:stop``."""
        values = (self.prompts, self.negatives, self.embeds, self.negative_embeds)
        names = ("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds")
        return {k: None if v is None else v[start:stop] for k, v in zip(names, values)}


class LDMTextToImagePipeline(DiffusionPipeline, compvis_family="text-to-image"):
    """Text-to-image LDM: LDMBert encodes the prompt, the UNet denoises latents with cross-attention,
    the autoencoder decodes them.

    Components (the folder names of CompVis/ldm-text2im-large-256): ``vqvae`` (an AutoencoderKL despite
    the name), ``bert`` (LDMBertModel), ``tokenizer``, ``unet`` (UNet2DConditionModel), ``scheduler``.
    """

    # What encodes prompts and nothing else: assembly.staged loads these alone, encodes, and frees them.
    text_components = ("bert", "tokenizer")

    def __init__(self, vqvae: AutoencoderKL | VQModel, bert: LDMBertModel, tokenizer, unet: UNet2DConditionModel,
                 scheduler):
        super().__init__(vqvae=vqvae, bert=bert, tokenizer=tokenizer, unet=unet, scheduler=scheduler)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vqvae.config.block_out_channels) - 1)

    @property
    def max_length(self) -> int:
        # Prompts are padded to the encoder's full length and the padding is attended, as in the original
        # (and diffusers' hard-coded 77): the pad length changes the embedding, so it must be this one.
        return self.bert.config.max_position_embeddings

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        if self.bert is None or self.tokenizer is None:
            raise LDMKitError("This pipeline was loaded without its text encoder (bert=None or tokenizer=None), so "
                              "it cannot encode prompts: pass prompt_embeds= (and negative_prompt_embeds=), or "
                              "load it with its bert and tokenizer.")
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        return self.bert(tokens.input_ids.to(self.bert.device))[0]

    def encode_prompt(self, prompt, num_images_per_prompt: int = 1, negative_prompt=None,
                      prompt_embeds=None, negative_prompt_embeds=None, need_uncond: bool = True,
                      need_cond: bool = True):
        """Return ``(cond, uncond)`` embeddings, each repeated ``num_images_per_prompt`` times (or None
        where not needed). The unconditional text is ``negative_prompt``, or "" as the original."""
        if prompt_embeds is None:
            prompts = _as_prompt_list(prompt, "prompt")
            for p in prompts:
                if not p.strip() and need_cond:
                    raise LDMKitError("prompt is empty: write a prompt (or use guidance_scale=0 for a sample "
                                      "that ignores it).")
        batch = len(prompts) if prompt_embeds is None else prompt_embeds.shape[0]
        if negative_prompt is not None:
            negatives = _as_prompt_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1 and batch > 1:
                negatives = negatives * batch
            if len(negatives) != batch:
                raise LDMKitError(f"negative_prompt has {len(negatives)} entries but prompt has {batch}: "
                                  "give one negative prompt, or one per prompt.")
        else:
            negatives = [""] * batch

        to_encode: list[str] = []
        if prompt_embeds is None and need_cond:
            to_encode += prompts
        if negative_prompt_embeds is None and need_uncond:
            to_encode += negatives
        encoded = self._encode_text(to_encode) if to_encode else None  # one batched encoder call
        cond = uncond = None
        if need_cond:
            cond = prompt_embeds if prompt_embeds is not None else encoded[:batch]
        if need_uncond:
            uncond = negative_prompt_embeds if negative_prompt_embeds is not None else encoded[-batch:]
        width = None if self.unet is None else self.unet.config.cross_attention_dim  # None: encoding alone
        for name, emb in (("prompt_embeds", cond), ("negative_prompt_embeds", uncond)):
            if emb is not None and (emb.ndim != 3 or emb.shape[0] != batch
                                    or (width is not None and emb.shape[-1] != width)):
                raise LDMKitError(f"{name} has shape {tuple(emb.shape)}; expected ({batch}, tokens, "
                                  f"{width}).")
        if cond is not None and uncond is not None and cond.shape != uncond.shape:
            raise LDMKitError(f"prompt_embeds {tuple(cond.shape)} and negative_prompt_embeds "
                              f"{tuple(uncond.shape)} must have the same shape.")

        def repeat(e):
            return None if e is None else e.repeat_interleave(num_images_per_prompt, dim=0)

        return repeat(cond), repeat(uncond)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
        max_batch_size: int | None = None,
        **kwargs,
    ):
        """Generate images from text.

        Guidance is classifier-free (Ho & Salimans 2021): ``e = e_u + s (e_c - e_u)`` for every ``s >= 0``;
        ``s == 1`` skips the unconditional pass and ``s == 0`` the conditional one. ``guidance_interval=(lo, hi)``
        guides only the steps with noise level ``lo < sigma_t <= hi`` (Kynkaenniemi et al. 2024; see
        ``denoising.Guidance``); the others run the conditional pass alone.

        ``callback_on_step_end(pipe, step_index, timestep, tensors)`` is called after every step with the
        tensors named in ``callback_on_step_end_tensor_inputs``; a dict it returns replaces them.
        Prompts are processed ``max_batch_size`` images at a time (default: ``pipe.max_batch_size``, 16), each
        chunk with its own rows' generators and converted to ``output_type`` as it is done, so memory does not
        grow with the number of prompts (with guidance the UNet sees twice the chunk).
        Returns ``ImagePipelineOutput(images)`` (or a tuple if ``return_dict=False``); ``output_type`` is
        "pil", "np" (N, H, W, C in [0, 1]), "pt" (N, C, H, W in [0, 1]) or "latent".
        """
        check_output_type(output_type)
        if (prompt is None) == (prompt_embeds is None):
            raise LDMKitError("Pass either prompt or prompt_embeds (exactly one of them).")
        guidance = Guidance(guidance_scale, guidance_interval)
        n = check_positive_int("num_images_per_prompt", num_images_per_prompt)
        height, width = self._check_size(height, width)
        sampling = Sampling(num_inference_steps, eta, generator, callback_on_step_end,
                            tuple(callback_on_step_end_tensor_inputs), legacy_callback(self.__call__, kwargs))
        texts = _Texts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance.need_cond)
        sampling.check(total := texts.count * n, CALLBACK_TENSORS)
        factor = self.vae_scale_factor
        shape = (total, self.unet.config.in_channels, height // factor, width // factor)
        layout = f"(batch, latent channels, height / {factor}, width / {factor})"
        if latents is not None:  # the whole x_T is checked before the first chunk runs
            latents = check_latents(latents, shape, layout, None, None)

        def run(rows: range, chunk: Sampling) -> torch.Tensor:
            x_t = None if latents is None else latents[rows.start:rows.stop]
            return self._chunk(rows, chunk, texts.take(rows.start // n, -(-rows.stop // n)), n, guidance,
                               (len(rows), *shape[1:]), x_t, layout, output_type)

        return self.run_chunks(total, max_batch_size, sampling, run, output_type, return_dict)

    def _chunk(self, rows: range, sampling: Sampling, texts: dict, n: int, guidance: Guidance, shape: tuple,
               latents, layout: str, output_type: str) -> torch.Tensor:
        """The images of ``rows``: their prompts (``texts``) encoded once each and repeated ``n`` times, as for
        a whole call, then x_T, the loop and the decode."""
        offset = rows.start % n
        cond, uncond = self.encode_prompt(**texts, num_images_per_prompt=n, need_uncond=guidance.need_uncond,
                                          need_cond=guidance.need_cond)
        context = guidance.context(*(None if e is None else e[offset:offset + len(rows)] for e in (uncond, cond)))
        latents = self.initial_latents(shape, latents, sampling, self.unet.device, context.dtype, layout,
                                       passes=2 if guidance.both else 1)

        def model(x, t):
            return self.unet(self.scheduler.scale_model_input(x, t), t,
                             encoder_hidden_states=guidance.select(context)).sample

        return self.sample(latents, guidance.wrap(model, self.scheduler), sampling, output_type)

    def _check_size(self, height, width) -> tuple[int, int]:
        factor, sample_size = self.vae_scale_factor, self.unet.config.sample_size
        if (height is None or width is None) and not isinstance(sample_size, int):
            raise LDMKitError(f"The UNet's config gives no sample_size ({sample_size!r}), so there is no default "
                              "image size: pass height and width.")
        height = sample_size * factor if height is None else height
        width = sample_size * factor if width is None else width
        return check_image_size("height", height, factor), check_image_size("width", width, factor)
