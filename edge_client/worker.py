"""Placeholder: the ZeroMQ edge worker (`fwdllm client run`) lands with the federation work."""

import click

from fwdllm.errors import UserError


@click.command("run")
def run_cmd() -> None:
    """Join an aggregator and train (not implemented yet)."""
    raise UserError("fwdllm client run is not implemented yet")
