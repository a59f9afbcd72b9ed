"""One module per `layergen` subcommand; see layergen/cli.py."""
