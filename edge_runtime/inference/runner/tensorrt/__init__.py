"""The native TensorRT backend: engine building and keying beside the runner."""
