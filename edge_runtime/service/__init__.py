"""The daemon, wired together: the path of a series from the listener to the sender, around one spool.

::

    scanner --C-STORE--> ingest.Listener --> spool.Spool --> ingest.SeriesTracker (complete?)
        --> worker: imaging.load_volume --> inference.segment
        --> results.write_segs --> spool outbox (the SEG first) --> results.write_rest --> spool outbox
        --> egress.Sender --C-STORE or STOW-RS--> PACS / viewer / archive (each destination its formats)

Threads and what each owns:

- ``dicom-listener`` (pynetdicom, one thread per association): store and acknowledge instances.
- ``stow-rs`` (when ``stow_port`` is set; one thread per connection): the same, for DICOMweb STOW-RS.
- ``tracker``: queues a series once it is complete on evidence or quiet for ``quiet_seconds``.
- ``decoder``: decodes slices as they arrive, so the worker starts from memory.
- ``worker``: takes queued series one at a time: volume, model, results, published in two steps (files in the
  output folder, rows in the outbox): the SEG(s), sent at once, then the SR and the other objects. A result
  whose second step a crash interrupted is completed at the next start. A SEG series sent to us is a reference
  to compare instead.
- ``sender``: drains the outbox to the destinations.

Modules: :mod:`.wiring` builds the parts and runs the threads; :mod:`.worker` is the worker's series path
(segment, publish in two steps, resume after a crash); :mod:`.studies` holds the series of a model of several
input channels until their study is complete.

Every state lives in the spool's SQLite index, so a restart resumes: receiving series keep their timers,
interrupted jobs are queued again, pending sends are retried.
"""

from edge_runtime.service.wiring import Service
from edge_runtime.service.worker import HOLD_AFTER_SEG_ENV

__all__ = ["HOLD_AFTER_SEG_ENV", "Service"]
