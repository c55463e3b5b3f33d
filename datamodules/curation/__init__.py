"""From long raw recordings to 3-30 s training clips: Silero-VAD, segments cut at pauses, a quality
filter, optional diarization / separation, parquet shards that ``data.train_data`` streams, a manifest.

    python -m datamodules.curation --input RECORDINGS --output CURATED

See ``docs/curation.md``.
"""

from datamodules.curation.config import CurationConfig
from datamodules.curation.pipeline import curate

__all__ = ["CurationConfig", "curate"]
