"""Serve a model package's ONNX model through a real Triton Inference Server (PyTriton), on the CPU.

Run with an interpreter that has ``nvidia-pytriton``, ``onnxruntime`` and ``numpy`` (``scripts/triton-setup``
makes one). PyTriton ships the ``tritonserver`` binary; the model itself runs in PyTriton's Python backend,
which calls ONNX Runtime (CPU) here. Inputs and outputs are named as in the package's manifest, spatial
dimensions are dynamic (-1) and the dynamic batcher is on, so the server looks to a client like the entry
``edge-export triton`` writes for a GPU host.

This script reads ``manifest.json`` with the standard library only: ``edge_runtime`` is not installed in
the server's interpreter. It prints ``TRITON-READY`` on stdout once the model is bound and serving.

Usage::

    python tests/triton_server.py --package DIR --model-name NAME \\
        --grpc-port 8001 --http-port 8000 --metrics-port 8002 [--max-batch-size 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--model-name", default=None, help="default: the manifest's name")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue-delay-us", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--access-token",
        default=None,
        help="protect the shared-memory/repository/statistics endpoints with this token "
        "(header 'triton-access-token'); default: those endpoints are open",
    )
    parser.add_argument("--workspace", type=Path, default=None)
    parser.add_argument("--log-verbose", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.log_verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    manifest = json.loads((args.package / "manifest.json").read_text(encoding="utf-8"))
    model = manifest["model"]
    input_name, output_name = model["input"], model["output"]
    channels = int(model.get("input_channels", 1))
    num_classes = len(manifest["labels"]) + 1
    name = args.model_name or manifest["name"]

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(args.package / model["file"]), options, providers=["CPUExecutionProvider"]
    )

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(inputs[input_name], dtype=np.float32)
        (out,) = session.run([output_name], {input_name: x})
        return {output_name: np.asarray(out, dtype=np.float32)}

    preferred = sorted({b for b in (1, 2, 4, 8, 16, 32) if b <= args.max_batch_size} | {args.max_batch_size})
    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
    )
    security = TritonSecurityConfig(
        access_token=args.access_token,
        # [] means "restrict nothing" (then PyTriton generates no token); the default list guards
        # shared-memory, model-repository, statistics, trace and logging with the token.
        restricted_endpoints=None if args.access_token else [],
    )
    triton = Triton(config=config, workspace=args.workspace, security_config=security)
    triton.bind(
        model_name=name,
        infer_func=infer,
        inputs=[Tensor(name=input_name, dtype=np.float32, shape=(channels, -1, -1, -1))],
        outputs=[Tensor(name=output_name, dtype=np.float32, shape=(num_classes, -1, -1, -1))],
        config=ModelConfig(
            max_batch_size=args.max_batch_size,
            batcher=DynamicBatcher(
                max_queue_delay_microseconds=args.max_queue_delay_us, preferred_batch_size=preferred
            ),
        ),
        strict=True,
    )

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        triton.run()
        print("TRITON-READY", flush=True)
        triton.serve()
    except KeyboardInterrupt:  # SIGTERM or Ctrl-C: the way this server is meant to stop
        pass
    finally:
        triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
