"""Text first, then the image networks (assembly/staged.py, what ``ldmkit txt2img`` loads with): the same
pixels as the whole pipeline, the text encoder gone before the UNet loads, and a clear error where a pipeline
without its text encoder is asked to encode."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import PIL.Image
import pytest
import torch

from ldmkit import DiffusionPipeline, LDMKitError
from ldmkit.assembly import pretrained
from ldmkit.assembly.staged import encode_then_load
from ldmkit.cli import main
from ldmkit.models import LDMBertModel
from ldmkit.pipelines.presets import dtype_names

CPU = torch.device("cpu")


def whole(folder, prompt, negative, guidance, **kw):
    pipe = DiffusionPipeline.from_pretrained(folder)
    return pipe(prompt, negative_prompt=negative, guidance_scale=guidance, output_type="np", **kw).images


@pytest.mark.parametrize("guidance, negative", [(6.0, None), (6.0, "blurry"), (1.0, None), (0.0, None)])
def test_staged_gives_the_whole_pipelines_pixels(tiny_text2img_dir, guidance, negative):
    prompt = ["a red square", "a blue circle"]
    pipe, texts, dtypes = encode_then_load(tiny_text2img_dir, CPU, torch.float32, prompt, negative, guidance)
    assert pipe.bert is None and pipe.tokenizer is None and set(dtypes) == {"bert"}
    assert set(texts) == {"prompt_embeds", "negative_prompt_embeds"}
    assert (texts["negative_prompt_embeds"] is None) == (guidance == 1.0)
    kw = dict(num_inference_steps=4, num_images_per_prompt=2, output_type="np")
    staged = pipe(**texts, guidance_scale=guidance, generator=torch.Generator().manual_seed(3), **kw).images
    reference = whole(tiny_text2img_dir, prompt, negative, guidance, generator=torch.Generator().manual_seed(3),
                      num_inference_steps=4, num_images_per_prompt=2)
    assert staged.shape == (4, *reference.shape[1:]) and np.array_equal(staged, reference)


def test_the_text_encoder_is_freed_before_the_unet_loads(tiny_text2img_dir, monkeypatch):
    alive_at_unet, bert_weights = [], []
    load = pretrained.load_component

    def watched(folder, name, *args):
        if name == "unet":
            gc.collect()
            alive_at_unet.append(sum(isinstance(o, LDMBertModel) for o in gc.get_objects()))
            alive_at_unet.append([w() is not None for w in bert_weights])
        component = load(folder, name, *args)
        if name == "bert":  # its weights, not only the module: a graph from the embeddings would hold them
            bert_weights.extend(weakref.ref(p) for p in component.parameters())
        return component

    monkeypatch.setattr(pretrained, "load_component", watched)
    gc.collect()
    before = sum(isinstance(o, LDMBertModel) for o in gc.get_objects())
    pipe, texts, _ = encode_then_load(tiny_text2img_dir, CPU, torch.float32, "a red square", None, 6.0)
    assert alive_at_unet == [before, [False] * len(bert_weights)] and bert_weights  # none alive at the UNet
    assert not texts["prompt_embeds"].requires_grad
    assert pipe.unet is not None and texts["prompt_embeds"].shape[0] == 1


def test_a_pipeline_without_text_components_loads_whole(tiny_uncond_dir):
    pipe, texts, dtypes = encode_then_load(tiny_uncond_dir, CPU, torch.float32, "ignored", None, 1.0)
    assert pipe.unet is not None and texts == {"prompt": "ignored", "negative_prompt": None} and dtypes == {}


def test_a_pipeline_loaded_without_bert_says_to_pass_embeddings(tiny_text2img_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir, bert=None, tokenizer=None)
    with pytest.raises(LDMKitError, match="without its text encoder.*prompt_embeds="):
        pipe("a red square", num_inference_steps=2)


def test_the_freed_encoders_dtype_is_recorded(tiny_text2img_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir, bert=None, tokenizer=None, torch_dtype=torch.bfloat16)
    assert dtype_names(pipe) == "bf16" and dtype_names(pipe, {"bert": torch.bfloat16}) == "bf16"
    assert dtype_names(pipe, {"bert": torch.float32}) == {"vqvae": "bf16", "unet": "bf16", "bert": "fp32"}


def test_txt2img_loads_staged_and_its_image_is_the_python_apis(capsys, tiny_text2img_dir, tmp_path):
    assert main(["txt2img", "a red square", "--model", str(tiny_text2img_dir), "--exact", "--steps", "3", "--seed",
                 "4", "--guidance", "5", "--quiet", "-o", str(tmp_path)]) == 0
    path = capsys.readouterr().out.strip().splitlines()[0]
    reference = DiffusionPipeline.from_pretrained(tiny_text2img_dir)(
        "a red square", num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(4)).images
    assert np.array_equal(np.asarray(PIL.Image.open(path)), np.asarray(reference[0]))
