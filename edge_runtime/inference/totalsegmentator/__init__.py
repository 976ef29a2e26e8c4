"""TotalSegmentator's multi-part prediction in the runtime (no torch): a package whose manifest has a
``"totalsegmentator"`` section runs every part's nnU-Net pipeline (:mod:`edge_runtime.inference.nnunet`) inside
TotalSegmentator's own reorientation and resampling, and merges the parts as TotalSegmentator does. Modules:
``settings`` (the manifest section), ``pipeline`` (the whole case)."""
