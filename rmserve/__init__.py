"""rmserve: a reward-model inference server for RLHF."""

__version__ = "0.1.0"
