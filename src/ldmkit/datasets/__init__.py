"""Building data sets on disk (the Hugging Face imagefolder layout that ``ldmkit train`` reads).

``emoji``: the captioned emoji images rendered from the Noto Color Emoji font (``ldmkit data emoji``).
``toy``: generated coloured shapes with captions, for smoke tests and the toy recipes.

Reading data for training (scanning folders, batching, latent caches) is ``ldmkit.training.data``. Building
sits apart from it: it needs no model and no training extra, only Pillow (and ``ldmkit[data]`` for emoji).
"""
