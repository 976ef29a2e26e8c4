"""``edge-runtime validate``: offline validation of one or two model configurations against references.

Usage::

    edge-runtime validate FOLDER --out REPORT_DIR [--model PKG [--model PKG2]]
                          [--backend B [--backend B2]] [--device D [--device D2]] [--threads N [--threads N2]]

Each of ``--model``, ``--backend``, ``--device``, ``--threads`` and ``--triton-url`` is given zero times
(default: the bundled package, ``onnxruntime``, ``cpu``, one thread per core), once (shared by every
configuration) or twice (one value per configuration). Two configurations, A and B, are compared case by
case: the report gives the paired difference B - A of every metric.

Input folder
------------
Every file under ``FOLDER`` (recursively) is read as DICOM, headers only; other files are ignored.

* **Image series** are grouped by Series Instance UID. A case is one image series; its name is the folder
  holding its files, relative to ``FOLDER`` (with the series number appended when a folder holds several).
* **Reference DICOM SEGs** (Segmentation Storage or Label Map Segmentation Storage) anywhere under
  ``FOLDER`` are matched to their image series by the Referenced Series Sequence, else by the source
  images their frames reference (Derivation Image Sequence -> Source Image Sequence). When several SEGs
  reference one series, those whose segments are all ``AUTOMATIC`` (model outputs) are set aside; if more
  than one is still left, the case is skipped as ambiguous.
* **Reference label volume** (when no SEG references the series): a file named ``reference.npz`` in the
  folder of the series (that folder must hold only that image series). Keys: ``labels``, an integer array
  shaped like the volume, axes (slice, row, column) with slices in ascending position along the slice
  normal (row direction x column direction), i.e. the order of :attr:`Volume.array` and of the phantom's
  ``labels``; optional ``spacing`` (z, y, x) in mm, checked against the series; optional ``names``, a 1-D
  string array whose item *v* names label value *v* (item 0, the background, is ignored; empty items are
  unnamed). Without ``names`` the values are those of the first configuration's model labels, each value
  named after its label (the bundled model's 1 lung, 2 liver, 3 spleen, 4 kidney, 5 bone are the phantom's),
  so ``python -m phantom DIR --npz DIR/reference.npz`` writes a usable reference (see
  :mod:`edge_runtime.apps.validate.references`). NRRD is not read.

Series without a reference, series the model does not take (modality), volumes the geometry policy refuses
and unreadable references are listed as **skipped** with the reason; a case whose inference or metrics
fail is listed as **failed**.

Label matching
--------------
Per case and configuration, the model's labels (``manifest.json`` ``labels``) are matched to the reference
segments by the rules of :mod:`edge_runtime.quality.matching`, which the in-service comparison shares: by
Segmented Property Type code (SNOMED CT ``SCT``), then by name when exactly one reference structure fits.
Voxels of unmatched model labels count as background; unmatched labels and segments are reported. A structure
is identified across cases and configurations by its reference type code (``SCT:39607008``); a reference
segment without a code (``reference.npz``) takes the code of the model label matched to it by name, and is
``name:<lower-case name>`` when unmatched.

Metrics and statistics
----------------------
Every metric of :func:`edge_runtime.quality.metrics.compare_label_maps` per case and structure (see that module for
the definitions and the empty-mask conventions). Per structure and metric the report gives the number of
cases, mean, median, standard deviation, min, max and the percentile bootstrap confidence interval of the
mean (default 95 %, 2000 resamples, seed 0: reproducible). **Non-finite values** (NaN: an undefined ratio;
inf: a surface distance to an empty mask) are excluded from every statistic and counted (``n_nan``,
``n_inf``). With two configurations the same statistics are given for the paired differences B - A over
the cases where both configurations matched the structure (inf - inf is NaN and so excluded).

Outputs (in ``--out``)
----------------------
* ``report.json``: settings, configurations, every case (matching, metrics, timings), skipped and failed
  cases, the aggregates and paired differences. Strict JSON: non-finite per-case values are written as the
  strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (``float()`` reads them back).
* ``report.md``: the same in tables.
* ``boxplot_<metric>.png`` for Dice, HD95, ASSD and the volume difference: one box per structure (two side
  by side with two configurations), with the cases as points. matplotlib is optional
  (``pip install 'edge-runtime[validate]'``); without it the reports are written without plots and say so.

Exit status: 0 when at least one case was evaluated and none failed, 1 when some case failed, 2 for bad
arguments (no package, unavailable backend, no DICOM series or no case with a reference).

Modules: :mod:`~edge_runtime.apps.validate.discover` (cases and their references),
:mod:`~edge_runtime.apps.validate.references` (reading a reference onto the series' grid),
:mod:`~edge_runtime.apps.validate.configs` (model configurations), :mod:`~edge_runtime.apps.validate.run` (the
run), :mod:`~edge_runtime.apps.validate.stats`, :mod:`~edge_runtime.apps.validate.report` (report.json),
:mod:`~edge_runtime.apps.validate.markdown` (report.md), :mod:`~edge_runtime.apps.validate.plots`,
:mod:`~edge_runtime.apps.validate.cli` (arguments and exit status).
"""

from edge_runtime.apps.validate.cli import add_parser, cmd_validate, main
from edge_runtime.apps.validate.configs import ModelConfig, configs_from_lists
from edge_runtime.apps.validate.discover import Case, Discovery, discover_cases
from edge_runtime.apps.validate.markdown import render_markdown
from edge_runtime.apps.validate.progress import Progress
from edge_runtime.apps.validate.references import Reference, load_reference
from edge_runtime.apps.validate.report import METRICS, PLOT_METRICS
from edge_runtime.apps.validate.run import run_validation
from edge_runtime.apps.validate.stats import bootstrap_ci, summarize
from edge_runtime.errors import ValidationError
from edge_runtime.quality.matching import RefSegment, match_labels, structure_maps

__all__ = [
    "METRICS",
    "PLOT_METRICS",
    "Case",
    "Discovery",
    "ModelConfig",
    "Progress",
    "RefSegment",
    "Reference",
    "ValidationError",
    "add_parser",
    "bootstrap_ci",
    "cmd_validate",
    "configs_from_lists",
    "discover_cases",
    "load_reference",
    "main",
    "match_labels",
    "render_markdown",
    "run_validation",
    "structure_maps",
    "summarize",
]
