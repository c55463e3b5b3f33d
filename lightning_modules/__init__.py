"""LightningModules: thin orchestration over plain components in ``components/``."""

from lightning_modules.asr_ctc import AsrCtc
from lightning_modules.base import MatryoshkaEmbedder
from lightning_modules.dual_encoder import DualEncoder
from lightning_modules.late_fusion import LateFusion
from lightning_modules.pipelined import Pipelined
from lightning_modules.text_only import TextOnly
from lightning_modules.unit_fusion import UnitFusion

__all__ = ["AsrCtc", "DualEncoder", "LateFusion", "MatryoshkaEmbedder", "Pipelined", "TextOnly", "UnitFusion"]
