"""fqa: forward query allocation (pure PyTorch; the Ray layer lives in cluster/)."""

__version__ = "0.1.0"
