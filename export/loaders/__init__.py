"""Loaders: a trained model in one of the usual shapes -> a ``torch.nn.Module`` in eval mode, plus what the
source itself says about the manifest (geometry, normalisation, label names).

Sources, one module each:

* :func:`load_factory` (module ``factory``) -- an importable callable ``package.module:callable`` with keyword
  arguments and an optional state-dict file;
* :func:`load_torchscript` (``torchscript``) -- a TorchScript file (``torch.jit.load``); MONAI's ``model.ts``
  extra files (``metadata.json``, ``inference.json``) are read for hints when present;
* :func:`load_monai_bundle` (``monai``) -- a MONAI bundle folder: ``configs/inference.json`` (or ``.yaml``)
  with the network definition (``network_def``: ``_target_`` + arguments) and ``models/model.pt`` (a state dict);
* :func:`load_nnunet` (``nnunet``) -- an nnU-Net v2 trained-model folder (``plans.json``, ``dataset.json``,
  ``fold_X/checkpoint_final.pth``), the network rebuilt with ``dynamic_network_architectures``.

Each returns a :class:`LoadedModel`. Its ``hints`` use the manifest's own keys and axis order (z, y, x):
``target_spacing``, ``normalization``, ``patch_size``, ``overlap``, ``blending``, ``batch_size``,
``modalities``, ``label_names`` ({value: name}, background excluded), ``name``, ``version``,
``description``, ``source`` (provenance for the manifest) and ``notes`` (things a user should know, e.g.
steps of the source's pipeline the runtime does not reproduce). Nothing here guesses SNOMED codes.

Shared parts: ``base`` (the result, the error, state dicts), ``axes`` (running a network trained on another
axis order).
"""

from export.loaders.axes import RUNTIME_DIRECTIONS, AxisAdapter, adapt, orientation_adapter
from export.loaders.base import LoadedModel, LoaderError, import_object, load_weights, read_state_dict
from export.loaders.factory import load_factory
from export.loaders.monai import load_monai_bundle, resolve_target
from export.loaders.nnunet import load_nnunet
from export.loaders.torchscript import load_torchscript

__all__ = [
    "RUNTIME_DIRECTIONS",
    "AxisAdapter",
    "LoadedModel",
    "LoaderError",
    "adapt",
    "import_object",
    "load_factory",
    "load_monai_bundle",
    "load_nnunet",
    "load_torchscript",
    "load_weights",
    "orientation_adapter",
    "read_state_dict",
    "resolve_target",
]
