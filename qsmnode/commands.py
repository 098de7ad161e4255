"""File commands for the CLI: ``process`` and ``simulate`` (no network)."""


def register_file_commands(subparsers, formatter_class) -> None:
    """Add ``process`` and ``simulate``; each sets ``func(args) -> int``."""
