"""The low loading layer: files and names, no classes above it.

Hub resolution (``hub``) and upload (``hub_upload``), diffusers' loading keywords (``options``), weight files
(``weights``: diffusers' names, variants and shards), the models bundled with the package (``bundled``), the
diffusers layout on disk (``diffusers_layout``), and the original CompVis checkpoints read as data: their YAML
(``compvis_config``), their state dict (``compvis_checkpoint``) and the key tables that rename it
(``compvis_keys``, ``compvis_unet``, ``compvis_first_stage``, ``compvis_text``).

These modules import nothing of ldmkit above ``errors``, ``io``, ``configuration`` and ``registry``: models,
schedulers and the tokenizer use them to read their own files. Turning files into pipelines needs the
pipeline classes and so sits above them, in ``ldmkit.assembly``.
"""
