"""The configuration: typed, read-only sections whose fields are the flags and the config-file keys
(flags.py: the mechanism; train.py: the trainer's sections and checks)."""

from __future__ import annotations

from .checks import config_errors
from .flags import build_parser, flat_values, parse_config, read_config_file, resume_values, to_toml
from .train import TrainConfig

__all__ = [
    "TrainConfig",
    "build_parser",
    "config_errors",
    "flat_values",
    "parse_config",
    "parse_train_config",
    "read_config_file",
    "resume_values",
    "to_toml",
]


def parse_train_config(description: str, argv: list[str] | None = None) -> TrainConfig:
    """The trainer's configuration from the command line (and --config FILE), checked once: a problem
    ends in argparse's usage line and one `error:` line naming the flag."""
    from ..errors import UserError

    parser = build_parser(description, TrainConfig)
    try:
        cfg, _ = parse_config(parser, TrainConfig, argv)
    except UserError as e:
        parser.error(str(e))
    errors = config_errors(cfg)
    if errors:
        parser.error(errors[0])
    return cfg
