"""Errors a user can fix: the commands print them as one line, never as a traceback from inside torch."""

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class LthmamlError(Exception):
    """Bad input or configuration. The message names the file or option and the fix."""


class ConfigError(LthmamlError, ValueError):
    """An option, or a combination of options, that cannot work."""


class DataError(LthmamlError, ValueError):
    """A data root, folder, or file that cannot be read as asked."""


class TrainingError(LthmamlError, RuntimeError):
    """Training that cannot go on (a non-finite loss or gradient); the message names the step."""


def non_finite_message(what: str, step: int, epoch: int, lr_options: str) -> str:
    """The one line a diverged fit ends with: where, what was kept, and what to change."""
    return (
        f"non-finite {what} at global step {step} (epoch {epoch}); the weights were not updated and "
        f"the last epoch's last.ckpt is kept: lower {lr_options}, or set a gradient clip "
        "(model.init_args.gradient_clip_val for MAML, trainer.gradient_clip_val otherwise), then "
        "resume with --ckpt_path <run>/checkpoints/last.ckpt"
    )


@contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """A user-fixable error becomes ``<prog>: error: <message>`` on one stderr line, exit status 2.

    Lives here, not in the CLI module, so commands that do not load Lightning can use it too.
    """
    try:
        yield
    except LthmamlError as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None
