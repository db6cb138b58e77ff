"""Benchmarks for the assistant and any OpenAI-compatible model: MMAD, VisA-D&R and zero-shot expert metrics.

`anomaly-assistant eval mmad|visa-dr|zeroshot ...` (see `eval/cli.py` and docs/evaluation.md).
"""
