"""Triton Inference Server backend: the package's model runs on a (usually GPU) Triton server over gRPC.

The local package still decides everything around the model (preprocessing, patch size, labels); Triton
only maps windows to logits. At construction the runner checks that the server is live and ready, that the
model is ready, and that the served model's signature matches the manifest (input/output names, FP32,
channel counts, fixed spatial dims vs the patch size, and the model's SHA-256 when the entry was written
by ``edge-export triton``). Any mismatch is an error before the first series, never a wrong segmentation.

Tensors always travel as raw binary (gRPC ``raw_input_contents``), or through system shared memory when
``shared_memory="system"`` and the server runs on this host (same ``/dev/shm``). Transient gRPC failures
(``UNAVAILABLE``, ``NOT_FOUND`` while a restarted server loads the model, ``RESOURCE_EXHAUSTED``,
``ABORTED``) are retried ``retries`` times with a short backoff, and after a possible restart the served
model is checked against the manifest again; a request that runs past ``timeout_s`` is not retried (the
server is slow, not gone, and a retry would add load).

``infer_many`` keeps up to ``max_in_flight`` requests outstanding so the server's dynamic batcher can merge
them and the network hop overlaps with compute; ``infer`` (what the sliding window calls) sends one
request, or pipelines the chunks when a batch is larger than the server's ``max_batch_size``.

Modules: ``runner`` (:class:`TritonRunner`), ``served_model`` (the served model against the manifest),
``shm`` (system shared-memory slots), ``retry`` (which gRPC failures are retried, and the backoff).
"""

from __future__ import annotations

from edge_runtime.inference.runner.triton.runner import SHARED_MEMORY_MODES, TritonRunner
from edge_runtime.inference.runner.triton.served_model import SHA_PARAMETER

__all__ = ["SHARED_MEMORY_MODES", "SHA_PARAMETER", "TritonRunner"]
