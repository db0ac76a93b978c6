"""Benchmark harness for zero-shot video object segmentation with diffusion-model features."""

__version__ = "0.1.0"
