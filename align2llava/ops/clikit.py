"""Small helpers shared by the stage scripts and the `align2llava` command.

Every stage takes the same shared options through `stage_options`:

    @click.command(context_settings=CONTEXT)
    @stage_options("select")                 # --params, --metrics-dir, -v/--verbose
    @click.option("--out-dir", ...)          # its own inputs and outputs
    def main(params_file, metrics_dir, verbose, out_dir): ...
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from align2llava.config import PARAMS_FILE
from align2llava.errors import Align2LlavaError

# Every command answers -h as well as --help.
CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"]}


def stage_options(section: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options every stage takes, named alike: --params FILE, --metrics-dir DIR, -v/--verbose
    (passed to the command as params_file, metrics_dir, verbose)."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("-v", "--verbose", is_flag=True, help="Debug logging.")(f)
        f = click.option("--metrics-dir", type=click.Path(path_type=Path), default=Path("metrics"), metavar="DIR",
                         show_default=True, help=f"Where {section}.json goes (what DVC reads).")(f)
        f = click.option("--params", "params_file", type=click.Path(path_type=Path), default=Path(PARAMS_FILE),
                         metavar="FILE", show_default=True, help=f"The params file (sections `base` and `{section}`).")(f)
        return f

    return decorate


class _Formatter(logging.Formatter):
    """Names a script's `__main__` logger after its module (`python -m stages.score` logs as
    stages.score), so a module's `logging.getLogger(__name__)` reads the same run or imported."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "__main__":
            spec = getattr(sys.modules.get("__main__"), "__spec__", None)
            if spec is not None and spec.name:
                record.name = spec.name
        return super().format(record)


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr (DEBUG with verbose, else INFO); called once in each command's main."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    for noisy in ("urllib3", "filelock", "alembic", "httpx", "git", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors into one-line `Error: ...` messages (exit 1)."""
    try:
        yield
    except Align2LlavaError as exc:
        raise click.ClickException(str(exc)) from None
