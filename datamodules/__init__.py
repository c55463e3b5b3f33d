"""LightningDataModules: streaming training pairs, BEIR-style eval sets, demo data."""

from datamodules.pairs import StreamingPairDataModule

__all__ = ["StreamingPairDataModule"]
