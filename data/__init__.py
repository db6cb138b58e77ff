"""Datasets for training: Anomaly-Instruct / LLaVA conversation JSON and mixtures, MVTec AD / VisA folders,
synthetic defects, and conversations generated from labelled folders."""

from .errors import DataError

__all__ = ["DataError"]
