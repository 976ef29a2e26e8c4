"""Reference PyTorch modules used to build the packages that ship with the runtime."""
