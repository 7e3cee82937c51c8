"""The assembly: pipelines built from files and written back, one layer above the pipelines.

``pretrained`` reads and writes the diffusers layout (``model_index.json`` and one folder per component),
``single_file`` builds the pipeline of an original CompVis checkpoint, ``staged`` loads a text-to-image
pipeline text encoder first (encode, free, then the image networks). They need the concrete classes
(pipelines, models, schedulers, the tokenizer), so they import them at the top, and nothing below imports
them back: ``DiffusionPipeline.from_pretrained`` / ``from_single_file`` / ``save_pretrained`` reach them
through the loaders these modules register in ``ldmkit.registry`` when imported. ``ldmkit/__init__.py``
imports this package, so any ``import ldmkit...`` has registered them.
"""

from . import pretrained, single_file  # noqa: F401  (importing them registers the loaders)
