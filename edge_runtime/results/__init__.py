"""Results: DICOM SEG, TID 1500 SR and measurements written from a segmentation."""
