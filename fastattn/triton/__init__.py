"""Triton kernels, one file per kernel family. Imported lazily by the op layer, so that
fastattn imports without triton installed."""
