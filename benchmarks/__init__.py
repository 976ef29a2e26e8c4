"""Benchmarks of the runtime against real peers and anchors; each script runs as ``python -m benchmarks.NAME``.

Run them from the repository root with the project's venv (``.venv/bin/python -m benchmarks.latency --help``).
The network peers (DCMTK, the service as a subprocess) come from ``tests.peers``, shared with the tests;
what the benchmarks share beyond that is in :mod:`benchmarks.harness` (series, senders, probes) and
:mod:`benchmarks.report` (statistics and the Markdown/JSON results).
"""
