"""``edge-export``: build model packages from PyTorch modules.

The one entry point of the workstation half (console script ``edge-export``, or ``python -m export.cli``). Each
command lives beside the code it drives and adds its own subparser with ``set_defaults(func=handler)``; a handler
takes the parsed arguments and returns the exit status (0 done, 1 a gate or a build failed, 2 the request cannot
be served).

Commands:
  default-model   the bundled CT package: the trained phantom U-Net, or ``--kind threshold``
                  (``export.models.default_package``)
  package         a trained model (factory, TorchScript, MONAI bundle, nnU-Net v2) -> a package behind the
                  parity gate (``export.commands``)
  engine          a TensorRT engine in a package (``export.commands``)
  quantize        an INT8 (QDQ) package, gated by Dice against FP32 (``export.commands``)
  triton          a Triton model-repository entry from a package (``export.triton``)
  drift-reference the reference distributions for drift monitoring, in a package's manifest
                  (``export.drift_reference``)

Building the parser is light: torch and onnx are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from edge_runtime.errors import EdgeRuntimeError, StartupError
from export.commands import add_commands
from export.drift_reference import add_drift_reference_parser
from export.models.default_package import add_default_model_parser
from export.triton import add_triton_parser


def build_parser() -> argparse.ArgumentParser:
    """``edge-export`` with every command's subparser."""
    parser = argparse.ArgumentParser(prog="edge-export", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_default_model_parser(subparsers)
    add_commands(subparsers)
    add_triton_parser(subparsers)
    add_drift_reference_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        status: int = args.func(args)
    except StartupError as exc:  # what a handler did not turn into its own status: the request cannot be served
        print(f"edge-export {args.command}: {exc}", file=sys.stderr)
        return 2
    except EdgeRuntimeError as exc:  # e.g. inference failing inside the parity gate: the build failed
        print(f"edge-export {args.command}: {exc}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
