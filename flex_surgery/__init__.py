"""flex_surgery: read, edit and temporarily modify sharded PyTorch models as if on one GPU."""

__version__ = "0.1.0"
