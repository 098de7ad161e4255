"""Node commands for the CLI: serve, jobs, retry, check-config, echo, send (see qsmnode.cli)."""


def register(subparsers, formatter_class) -> None:
    """Add the node's subcommands to ``subparsers``; each sets ``func(args) -> int``."""
