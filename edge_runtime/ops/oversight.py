"""What a site watches over an unattended service: the audit trail and drift, fed from the path of a series.

The service calls one method of :class:`Oversight` at each step that the trail records (start, association,
series taken, result published or refused, delivery, comparison with a reference, stop); after a published
result the series' drift features join the rolling window (:mod:`edge_runtime.quality.drift`) and the
comparison goes to ``/metrics``. Kept apart from :mod:`edge_runtime.service` so that the wiring stays a table of
contents and the two concerns can be read, and tested, in one place.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.ops.atna import AuditSender
from edge_runtime.ops.audit import AuditLog
from edge_runtime.quality.drift import LEVELS, DriftMonitor, series_features

if TYPE_CHECKING:
    from edge_runtime.config import Config
    from edge_runtime.egress.delivery import Delivery
    from edge_runtime.imaging.volume import Volume
    from edge_runtime.inference.package import ModelPackage
    from edge_runtime.ops.telemetry import Metrics
    from edge_runtime.spool.rows import OutboxItem, SeriesRow
    from edge_runtime.spool.store import Spool

log = logging.getLogger(__name__)

AUDIT_NAME = "audit.jsonl"
DRIFT_STATE_NAME = "drift-window.json"


def flat_config(config: Config) -> dict[str, Any]:
    """Every configuration key with its value as text where it is not a plain JSON value (paths, destinations)."""
    flat: dict[str, Any] = {}
    for section in dataclasses.fields(config):
        for f in dataclasses.fields(getattr(config, section.name)):
            value = getattr(getattr(config, section.name), f.name)
            if isinstance(value, tuple):
                flat[f.name] = [v if isinstance(v, (str, int, float, bool)) else str(v) for v in value]
            else:
                flat[f.name] = value if value is None or isinstance(value, (str, int, float, bool)) else str(value)
    return flat


class Oversight:
    """The audit trail and the drift monitor of one service."""

    def __init__(self, config: Config, package: ModelPackage, spool: Spool, metrics: Metrics):
        ops = config.ops
        self.package = package
        self.metrics = metrics
        self.syslog = AuditSender(ops.audit_syslog, ae_title=config.listener.ae_title) if ops.audit_syslog else None
        self.audit = AuditLog(
            ops.audit_log or spool.root / AUDIT_NAME, patient_data=ops.audit_patient_data, forward=self.syslog
        )
        self.drift: DriftMonitor | None = None
        if package.drift_reference is not None:
            self.drift = DriftMonitor(
                package.drift_reference,
                spool.root / DRIFT_STATE_NAME,
                window=ops.drift_window,
                min_series=ops.drift_min_series,
            )
        root = spool.root
        metrics.spool_free_bytes.set_function(lambda: _free_bytes(root))
        metrics.spool_min_free_bytes.set(spool.min_free_bytes)
        self._patient_data = ops.audit_patient_data

    def started(self, config: Config, runner: str) -> None:
        package = self.package
        self.audit.start(
            flat_config(config), model=package.identity, model_sha256=package.model_sha256, runner=runner
        )
        if self.drift is None:
            log.info("the model package carries no drift reference; drift is not monitored")
        else:
            ref = self.drift.reference
            log.info(
                "drift: %d series in the window (of %d) against a reference of %d series",
                len(self.drift.series),
                self.drift.window,
                ref.series,
            )
            self._export(self.drift.evaluate())

    def stopped(self) -> None:
        self.audit.record("stop")
        self.audit.close()
        if self.syslog is not None:
            self.syslog.close()

    # -- the steps of a series -----------------------------------------------------------------------------

    def association(self, event: Mapping[str, str]) -> None:
        self.audit.record("association", **event)

    def series_taken(self, row: SeriesRow) -> None:
        """A complete series taken for processing, with the instances it holds."""
        self.audit.record(
            "series",
            series=row.key_hash,
            generation=row.generation,
            modality=row.modality,
            instances=row.instance_count,
            called_ae=row.called_ae,
            phi=self._uids(row),
        )

    def published(
        self,
        row: SeriesRow,
        result_id: int,
        volume: Volume,
        labels: np.ndarray,
        confidence: np.ndarray | None,
        files: Sequence[Path],
        deliveries: Mapping[str, Sequence[Path]],
    ) -> None:
        """A result published: its files and where they are to go; then the series' drift features."""
        phi = self._uids(row)
        if phi is not None:
            phi["patient_id"] = str(volume.datasets[0].get("PatientID", ""))
        self.audit.record(
            "result",
            series=row.key_hash,
            generation=row.generation,
            result=result_id,
            model=self.package.identity,
            model_sha256=self.package.model_sha256,
            files=sorted({p.name for p in files}),
            destinations={name: sorted(p.name for p in paths) for name, paths in deliveries.items()},
            phi=phi,
        )
        if self.drift is not None:
            features = series_features(volume, labels, self.package, confidence)
            self._export(self.drift.observe(features, series=row.key_hash))

    def refused(self, row: SeriesRow, reason: str) -> None:
        self.audit.record("refused", series=row.key_hash, generation=row.generation, reason=reason, phi=self._uids(row))

    def delivered(self, item: OutboxItem, destination: str, delivery: Delivery) -> None:
        """A result file stored by a destination, or refused by it for good (retries are not recorded)."""
        if delivery.sent or delivery.final:
            outcome = "delivered" if delivery.sent else "refused"
            extra = {} if delivery.sent else {"reason": delivery.why}
            extra["file"], extra["destination"], extra["outcome"] = item.path.name, destination, outcome
            self.audit.record("delivery", result=item.result_id, **extra)

    def compared(self, row: SeriesRow, segs: int) -> None:
        """Reference SEGs pushed back and compared with our result (validation.jsonl has the figures)."""
        self.audit.record("validation", series=row.key_hash, references=segs, model=self.package.identity)

    # -- helpers --------------------------------------------------------------------------------------------

    def _uids(self, row: SeriesRow) -> dict[str, str] | None:
        return {"study_uid": row.study_uid, "series_uid": row.series_uid} if self._patient_data else None

    def _export(self, results: Sequence[Any]) -> None:
        if self.drift is None:
            return
        self.metrics.observe_drift(
            self.package.identity,
            ((r.feature, r.psi, r.p_value, LEVELS.index(r.level)) for r in results),
            len(self.drift.series),
        )


def _free_bytes(root: Path) -> float:
    st = os.statvfs(root)
    return float(st.f_bavail * st.f_frsize)
