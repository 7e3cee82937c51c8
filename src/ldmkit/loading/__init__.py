"""Finding and reading weights: Hub resolution, the diffusers layout, original CompVis checkpoints."""
