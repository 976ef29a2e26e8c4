"""Ingest: the DICOM listener, its connection guard and the series tracker."""
