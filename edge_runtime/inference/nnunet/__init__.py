"""nnU-Net v2's predictor pipeline in the runtime (no torch): a package whose manifest has an ``"nnunet"`` section
is segmented as ``nnUNetPredictor`` segments it. Modules: ``settings`` (the manifest section), ``resampling``,
``preprocessing``, ``prediction`` (sliding window, mirroring), ``pipeline`` (the whole case)."""
