"""Shared fixtures: tiny random pipelines built with diffusers' own classes (the reference, built in
reference_models.py), the CompVis fixture gate, threads and network isolation."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from compvis_fixtures import require_fixtures
from reference_models import (
    build_diffusers_text2img,
    build_diffusers_unet2d,
    build_diffusers_vq,
    diffusers_ddim,
    perturb,
)

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cuda`` tests are skipped where torch sees no CUDA GPU (benchmarks/gpu_check.sh runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_text2img_dir(tmp_path_factory):
    return build_diffusers_text2img(tmp_path_factory.mktemp("text2img"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of training tests: tiny models gain little from a second thread, and on a
    shared CI machine OpenMP threads that wait for each other while other jobs hold the cores can slow
    training down tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test on any attempt to open a network connection."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def _converted_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("converted-cache")


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch, _converted_cache):
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # The CLI and the server keep converted weights (ldmkit.loading.converted): in the session's folder, not
    # the user's ~/.cache (subprocesses inherit it).
    monkeypatch.setenv("LDMKIT_CONVERTED_CACHE", str(_converted_cache))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", os.environ.get("TOKENIZERS_PARALLELISM", "false"))


@pytest.fixture(scope="session")
def tiny_superres_dir(tmp_path_factory):
    from diffusers import LDMSuperResolutionPipeline

    vq, unet = build_diffusers_vq(), build_diffusers_unet2d(6)
    perturb(vq, unet)
    folder = tmp_path_factory.mktemp("superres") / "pipe"
    LDMSuperResolutionPipeline(vqvae=vq, unet=unet, scheduler=diffusers_ddim()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_uncond_dir(tmp_path_factory):
    from diffusers import LDMPipeline

    vq, unet = build_diffusers_vq(), build_diffusers_unet2d(3)
    perturb(vq, unet)
    folder = tmp_path_factory.mktemp("uncond") / "pipe"
    LDMPipeline(vqvae=vq, unet=unet, scheduler=diffusers_ddim()).save_pretrained(folder)
    return folder


@pytest.fixture
def compvis_fixtures_present():
    """Used through compvis_fixtures.requires_fixtures: skip without the CompVis fixtures, fail under CI."""
    require_fixtures()
