"""``python -m datamodules.curation --input RECORDINGS --output CURATED [--config curation.yaml]``."""

from __future__ import annotations

import json
import logging
import sys

from datamodules.curation.config import CurationConfig
from errors import InputError


def parser():
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings become --help
    parser = ArgumentParser(
        prog="python -m datamodules.curation",
        description="Long recordings -> 3-30 s speech clips in parquet shards that data.train_data reads "
        "(Silero-VAD, cuts at pauses, a quality filter), with a manifest. A second run skips what is done.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of these keys.")
    parser.add_class_arguments(CurationConfig, as_positional=False)
    return parser


def main(args: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from datamodules.curation.pipeline import curate

    namespace = parser().parse_args(args)
    values = {
        key: value for key, value in vars(namespace).items() if key in CurationConfig.__dataclass_fields__
    }
    try:
        manifest = curate(CurationConfig(**values))
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = {
        k: manifest[k]
        for k in (
            "hours_in",
            "hours_kept",
            "segments_kept",
            "segments_dropped",
            "recordings_skipped",
            "quality_method",
            "this_run",
        )
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
