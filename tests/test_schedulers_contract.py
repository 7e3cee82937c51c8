"""What every ldmkit scheduler promises: step-count validation, configs that round-trip with diffusers 0.42.1
and swap between schedulers, reuse without leftover state, half precision."""

from __future__ import annotations

import json
import logging

import diffusers
import pytest
import torch

import ldmkit.schedulers as ls
from ldmkit.errors import LDMKitError
from scheduler_utils import (  # pytest puts tests/ (no __init__.py) on sys.path
    SD,
    C,
    assert_same_trajectory,
    fake_model,
    trajectory,
)


def test_half_precision_runs():
    for name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                 "DDIMScheduler"):
        s = getattr(ls, name)(**SD)
        s.set_timesteps(3)
        x = torch.randn(1, C, 4, 4).half()
        for t in s.timesteps:
            x = s.step(fake_model(s.scale_model_input(x, t), t), t, x).prev_sample
        assert x.dtype == torch.float16 and torch.isfinite(x).all()


# ---------------------------------------------------------------------------------------------------------
# Common contract: validation, configs, reuse
# ---------------------------------------------------------------------------------------------------------

ALL = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
       "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
       "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad,match", [(0, "at least 1"), (-3, "at least 1"), (1001, "exceeds"),
                                       (2.5, "must be an int"), ("10", "must be an int"),
                                       (True, "must be an int")])
def test_set_timesteps_validation(name, bad, match):
    s = getattr(ls, name)()
    with pytest.raises(LDMKitError, match=match):
        s.set_timesteps(bad)


@pytest.mark.parametrize("name", ALL)
def test_config_round_trip_with_diffusers(name, tmp_path):
    fields = getattr(ls, name)._config_fields()
    config = dict(SD, steps_offset=1, prediction_type="v_prediction", timestep_spacing="trailing")
    config = {k: v for k, v in config.items() if k in fields}
    ours = getattr(ls, name)(**config)
    ours.save_pretrained(tmp_path / "a")
    data = json.loads((tmp_path / "a" / "scheduler_config.json").read_text())
    assert data["_class_name"] == name and "_diffusers_version" in data
    theirs = getattr(diffusers, name).from_pretrained(tmp_path / "a")
    for k, v in ours.config.items():
        assert theirs.config[k] == v, k
    theirs.save_pretrained(tmp_path / "b")
    back = getattr(ls, name).from_pretrained(tmp_path / "b")
    assert dict(back.config) == dict(ours.config)
    # subfolder and keyword overrides
    ours.save_pretrained(tmp_path / "c" / "scheduler")
    sub = getattr(ls, name).from_pretrained(tmp_path / "c", subfolder="scheduler", beta_end=0.02)
    assert sub.config.beta_end == 0.02 and sub.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("name", ALL)
def test_unknown_config_keys_warn(name, caplog):
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        s = getattr(ls, name).from_config({"num_train_timesteps": 500, "some_future_option": 3,
                                           "_class_name": "X", "_diffusers_version": "9.9"})
    assert s.config.num_train_timesteps == 500
    assert "some_future_option" in caplog.text
    assert "_class_name" not in caplog.text


@pytest.mark.parametrize("name", ALL)
def test_reuse_gives_identical_results(name):
    extra = {"DPMSolverMultistepScheduler": dict(algorithm_type="sde-dpmsolver++", solver_order=3),
             "DPMSolverSinglestepScheduler": dict(algorithm_type="sde-dpmsolver++", solver_order=3),
             "UniPCMultistepScheduler": dict(solver_order=3)}.get(name, {})
    s = getattr(ls, name)(**SD, **extra)
    kw = dict(eta=0.5) if name == "DDIMScheduler" else {}
    a = trajectory(s, 5, seed=7, **kw)
    trajectory(s, 4, seed=1, **kw)
    b = trajectory(s, 5, seed=7, **kw)
    assert_same_trajectory(a, b)


@pytest.mark.parametrize("src", ALL)
@pytest.mark.parametrize("dst", ALL)
def test_from_config_interchange(src, dst, caplog):
    a = getattr(ls, src)(**SD, prediction_type="v_prediction")
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        b = getattr(ls, dst).from_config(a.config)
    assert caplog.text == ""  # sibling fields are dropped quietly, as in diffusers
    assert b.config.beta_schedule == "scaled_linear" and b.config.prediction_type == "v_prediction"
    assert type(b) in a.compatibles
    # and from diffusers' own config object
    c = getattr(ls, dst).from_config(getattr(diffusers, src)(**SD).config)
    assert c.config.beta_end == 0.012


def test_step_before_set_timesteps_errors():
    s = ls.DDIMScheduler()
    x = torch.zeros(1, C, 2, 2)
    with pytest.raises(LDMKitError, match="set_timesteps"):
        s.step(x, 999, x)
