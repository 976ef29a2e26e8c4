"""Workstation side: trained PyTorch model -> ONNX -> model package, with proof of parity.

Needs the ``export`` extra (torch, onnx). Loaders turn a source into a ``torch.nn.Module``; savers turn a module
into artefacts; nothing here is imported by ``edge_runtime``.
"""
