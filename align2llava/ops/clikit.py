"""Small helpers shared by the stage scripts and the `align2llava` command."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from align2llava.errors import Align2LlavaError


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("urllib3", "filelock", "alembic", "httpx", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors into one-line `Error: ...` messages (exit 1)."""
    try:
        yield
    except Align2LlavaError as exc:
        raise click.ClickException(str(exc)) from None
