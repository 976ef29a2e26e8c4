"""The smallest useful pynetdicom C-STORE SCP: write the received bytes to a file, answer success.

The ingest anchor for ``benchmarks.anchors``: no parsing, no fsync, no index, no geometry, no decode.
It accepts every storage SOP class with the uncompressed transfer syntaxes (the syntaxes DCMTK ``storescu``
proposes by default) and writes ``event.encoded_dataset()`` (preamble + file meta + the raw data set bytes
as they arrived, never decoded) to ``OUT/<n>.dcm``. Maximum PDU 131072 by default, the same as the
service's listener, so the comparison isolates what the service does on top of receiving.

    python -m benchmarks.minimal_scp OUT PORT [--ae-title MIN] [--max-pdu 131072]

Stops on SIGTERM/SIGINT. Prints ``listening`` once the port is open.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import sys
import threading
from pathlib import Path

from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("port", type=int)
    ap.add_argument("--ae-title", default="MIN")
    ap.add_argument("--max-pdu", type=int, default=131072, help="0 = unlimited (default 131072, as the service)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    counter = itertools.count()
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        with lock:
            n = next(counter)
        with open(args.out / f"{n:06d}.dcm", "wb") as f:
            f.write(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title=args.ae_title)
    ae.maximum_pdu_size = args.max_pdu
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, UNCOMPRESSED)
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", args.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print("listening", flush=True)
    done.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
