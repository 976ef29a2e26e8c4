"""Edge inference runtime for medical imaging.

A DICOM listener daemon that receives CT/MR series from scanners, segments them with a model package
(ONNX Runtime by default; TensorRT on NVIDIA devices) and sends DICOM SEG with measurements back.
This package never imports torch.
"""

__version__ = "0.1.0"
