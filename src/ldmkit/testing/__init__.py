"""Helpers shared by ldmkit's test suite and its benchmarks, as diffusers has ``diffusers.utils.testing_utils``.

They live in the package so that both import them normally (tests/ and benchmarks/ are not packages). Not
part of the public API: nothing in ldmkit imports them.

- :mod:`.gmm_denoiser`: a Gaussian-mixture "dataset" whose perfect noise-prediction network is known in closed
  form, and the exact probability-flow ODE solution the samplers converge to.
- :mod:`.samplers`: the samplers of the steps-versus-quality study, the pipelines' loop that runs one on a
  model, and the path error against the exact solution.
"""
