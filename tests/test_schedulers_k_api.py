"""What the schedulers of issue 16 promise besides their steps: the contract every ldmkit scheduler keeps
(validation, configs that round-trip with diffusers 0.42.1 and swap, reuse, half precision), diffusers'
``compatibles``, EDM Euler from an LDM config, torchsde as an optional dependency, the CLI names, and the
pipeline's generator seeding DPM-Solver SDE's Brownian tree."""

from __future__ import annotations

import json
import logging
import sys

import diffusers
import numpy as np
import pytest
import torch

import ldmkit
import ldmkit.schedulers as ls
from ldmkit import DiffusionPipeline
from ldmkit.cli.generate import set_scheduler
from ldmkit.errors import LDMKitError
from ldmkit.pipelines.presets import SAMPLERS as SCHEDULERS
from scheduler_utils import SD, C, assert_same_trajectory, fake_model, trajectory  # tests/ is on sys.path

NEW = ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler",
       "DPMSolverSDEScheduler", "EDMEulerScheduler"]
OLD = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
       "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
       "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler"]
KARRAS_NEW = [n for n in NEW if n != "EDMEulerScheduler"]  # interchangeable with the LDM schedulers


def test_exported_and_registered():
    from ldmkit.registry import COMPONENTS

    for name in NEW:
        cls = getattr(ldmkit, name)
        assert cls is getattr(ls, name) and name in ldmkit.__all__ and name in ls.__all__
        assert COMPONENTS.get(("diffusers", name)) is cls


@pytest.mark.parametrize("name", NEW + OLD)
def test_compatibles_are_diffusers(name):
    ours = {c.__name__ for c in getattr(ls, name)().compatibles}
    theirs = {c.__name__ for c in getattr(diffusers, name)().compatibles}
    assert ours == theirs


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("bad,match", [(0, "at least 1"), (1001, "exceeds"), (2.5, "must be an int"),
                                       (True, "must be an int")])
def test_set_timesteps_validation(name, bad, match):
    with pytest.raises(LDMKitError, match=match):
        getattr(ls, name)().set_timesteps(bad)


@pytest.mark.parametrize("name,bad", [
    ("KDPM2DiscreteScheduler", dict(prediction_type="sample")),
    ("KDPM2AncestralDiscreteScheduler", dict(use_karras_sigmas=True, use_exponential_sigmas=True)),
    ("DEISMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    ("DEISMultistepScheduler", dict(solver_order=4)),
    ("DPMSolverSDEScheduler", dict(timestep_spacing="middle")),
    ("EDMEulerScheduler", dict(sigma_schedule="linear")),
    ("EDMEulerScheduler", dict(prediction_type="sample")),
])
def test_bad_configs_raise_ldmkit_error(name, bad):
    with pytest.raises(LDMKitError):
        getattr(ls, name)(**bad).set_timesteps(4)


@pytest.mark.parametrize("name", NEW)
def test_config_round_trip_with_diffusers(name, tmp_path):
    fields = getattr(ls, name)._config_fields()
    config = dict(SD, steps_offset=1, prediction_type="v_prediction", timestep_spacing="trailing", sigma_data=1.0,
                  noise_sampler_seed=5, solver_order=3)
    ours = getattr(ls, name)(**{k: v for k, v in config.items() if k in fields})
    ours.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "scheduler_config.json").read_text())["_class_name"] == name
    theirs = getattr(diffusers, name).from_pretrained(tmp_path / "a")
    for k, v in ours.config.items():
        assert theirs.config[k] == v, k
    theirs.save_pretrained(tmp_path / "b")
    assert dict(getattr(ls, name).from_pretrained(tmp_path / "b").config) == dict(ours.config)


@pytest.mark.parametrize("name", NEW)
def test_reuse_gives_identical_results(name):
    s = getattr(ls, name)(**({} if name == "EDMEulerScheduler" else SD))
    a = trajectory(s, 5, seed=7)
    trajectory(s, 4, seed=1)
    assert_same_trajectory(a, trajectory(s, 5, seed=7))


@pytest.mark.parametrize("src", KARRAS_NEW + OLD)
@pytest.mark.parametrize("dst", KARRAS_NEW)
def test_from_config_interchange(src, dst, caplog):
    for a, b in ((src, dst), (dst, src)):
        first = getattr(ls, a)(**SD, prediction_type="v_prediction")
        with caplog.at_level(logging.WARNING, logger="ldmkit"):
            second = getattr(ls, b).from_config(first.config)
        assert caplog.text == ""  # sibling fields are dropped quietly, as in diffusers
        assert second.config.beta_schedule == "scaled_linear" and second.config.prediction_type == "v_prediction"
        assert type(second) in first.compatibles
        assert getattr(ls, b).from_config(getattr(diffusers, a)(**SD).config).config.beta_end == 0.012


def test_edm_euler_from_an_ldm_config_is_diffusers(caplog):
    """EDM Euler is for EDM-preconditioned models: built from an LDM's scheduler config it keeps its own defaults
    and warns about the noise schedule it ignores, as diffusers does; the config's other fields are kept."""
    ddim = ls.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        ours = ls.EDMEulerScheduler.from_config(ddim.config)
    assert "beta_schedule" in caplog.text and "EulerDiscreteScheduler" in caplog.text
    theirs = diffusers.EDMEulerScheduler.from_config(diffusers.DDIMScheduler(**SD).config)
    for key in ls.EDMEulerScheduler._config_fields():
        assert ours.config[key] == theirs.config[key], key
    assert ours.compatibles == [ls.EDMEulerScheduler] and ls.EDMEulerScheduler in ddim.compatibles
    assert ls.DDIMScheduler.from_config(ours.config).config.beta_schedule == "scaled_linear"


def test_dpm_sde_without_torchsde_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchsde", None)  # import torchsde now raises ImportError
    with pytest.raises(LDMKitError, match="pip install torchsde"):
        ls.DPMSolverSDEScheduler()


def test_dpm_sde_seed_list_must_fit_the_batch():
    s = ls.DPMSolverSDEScheduler(noise_sampler_seed=[1, 2, 3])
    s.set_timesteps(3)
    x = torch.zeros(2, C, 4, 4)
    with pytest.raises(LDMKitError, match="3 noise_sampler_seed values for a batch of 2"):
        s.step(x, s.timesteps[0], x)


@pytest.mark.parametrize("name", NEW)
def test_half_precision_runs(name):
    s = getattr(ls, name)(**({} if name == "EDMEulerScheduler" else SD))
    s.set_timesteps(3)
    x = torch.randn(1, C, 4, 4).half()
    for t in s.timesteps:
        x = s.step(fake_model(s.scale_model_input(x, t), t), t, x).prev_sample
    assert x.dtype == torch.float16 and torch.isfinite(x).all()


CLI_NAMES = {"dpm2": ("KDPM2DiscreteScheduler", False), "dpm2-karras": ("KDPM2DiscreteScheduler", True),
             "dpm2-a": ("KDPM2AncestralDiscreteScheduler", False),
             "dpm2-a-karras": ("KDPM2AncestralDiscreteScheduler", True), "deis": ("DEISMultistepScheduler", False),
             "dpm-sde": ("DPMSolverSDEScheduler", False), "dpm-sde-karras": ("DPMSolverSDEScheduler", True)}


def test_cli_names(tiny_text2img_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir)
    original = pipe.scheduler
    beta_end = original.config.beta_end
    for cli_name, (class_name, karras) in CLI_NAMES.items():
        assert SCHEDULERS[cli_name][0] == class_name
        pipe.scheduler = original  # each command starts from the model's own scheduler
        set_scheduler(pipe, cli_name)
        assert type(pipe.scheduler).__name__ == class_name and pipe.scheduler.config.beta_end == beta_end
        assert pipe.scheduler.config.use_karras_sigmas is karras
    assert "EDMEulerScheduler" not in {c for c, _ in SCHEDULERS.values()}  # no LDM pipeline can use it


def _t2i(pipe, seed):
    return pipe(["a red square"], generator=torch.Generator().manual_seed(seed), num_inference_steps=3,
                guidance_scale=3.0, height=32, width=32, output_type="np").images


@torch.no_grad()
def test_pipeline_generator_seeds_the_brownian_tree(tiny_text2img_dir):
    """The pipeline's generator draws the latents, then the tree's seed: the same seed gives the same image, the
    tree seeded by hand from that draw gives it too, another seed another image."""
    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = ls.DPMSolverSDEScheduler.from_config(pipe.scheduler.config)
    first = _t2i(pipe, 4)
    assert np.array_equal(first, _t2i(pipe, 4))
    assert not np.allclose(first, _t2i(pipe, 5))
    g = torch.Generator().manual_seed(4)
    torch.randn((1, 4, 4, 4), generator=g)  # the latents
    tree_seed = torch.randint(0, 2**63 - 1, [], generator=g).item()
    pipe.scheduler = ls.DPMSolverSDEScheduler.from_config(pipe.scheduler.config, noise_sampler_seed=tree_seed)
    assert np.array_equal(first, _t2i(pipe, 4))
