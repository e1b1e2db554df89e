"""Errors a user can fix: the commands print them as one line, never as a traceback from inside torch."""

import argparse
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional


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


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def ours(error: BaseException) -> Optional[LthmamlError]:
    """The :class:`LthmamlError` behind ``error`` (itself, or one it was raised from), if any.

    jsonargparse wraps what a class's ``__init__`` raises into a Union error of many lines; the
    innermost error of ours is what the user needs.
    """
    return next((e for e in _chain(error) if isinstance(e, LthmamlError)), None)


_VALUE_NAMES = (
    ("learning rate", "lr", "a learning rate > 0"),
    ("epsilon", "eps", "an eps > 0"),
    ("beta parameter", "betas", "betas in [0, 1)"),
    ("weight_decay", "weight_decay", "a weight_decay >= 0"),
    ("momentum", "momentum", "a momentum >= 0"),
)
"""Words of torch's optimizer checks (``Invalid learning rate: -1.0``) -> the init_args key they
check and the values it takes."""


@contextmanager
def checked_values(option: str) -> Iterator[None]:
    """A ValueError raised while building what ``option`` configures (an optimizer or scheduler
    the LightningCLI way, ``model.init_args.optimizer``) as a ConfigError naming the option.

    torch checks an optimizer's values only when the optimizer is built, inside ``fit``, so the
    CLI's parser never sees them; the key (``...init_args.lr``) is read from torch's message.
    """
    try:
        yield
    except ValueError as error:
        if isinstance(error, LthmamlError):
            raise
        text = " ".join(str(error).split()) or type(error).__name__
        found = next((item for item in _VALUE_NAMES if item[0] in text.lower()), None)
        if found is None:
            raise ConfigError(f"{option}: {text}; give values it accepts") from None
        raise ConfigError(f"{option}.init_args.{found[1]}: {text}; give {found[2]}") from None


_PARSER_KEY = re.compile(r'^\s*Parser key "([^"]+)":')
_NOISE = re.compile(
    r"^\s*(Does not validate against any of the Union subtypes|Problem with given class_path)"
)


def argument_error_line(error: BaseException) -> str:
    """jsonargparse's error as one line: the option's full key and the innermost reason.

    Its message nests one ``Parser key "x":`` level per class (``model`` -> ``inner_lr``) around
    the reason, and its cause chain holds each level; the keys are joined into the option name
    (``model.init_args.inner_lr``) and the deepest reason follows it.
    """
    keys: list[str] = []
    reason = ""
    for link in _chain(error):
        lines = [line.strip() for line in str(link).splitlines() if line.strip()]
        if not lines:
            continue
        match = _PARSER_KEY.match(lines[0])
        if match and (not keys or keys[-1] != match.group(1)):
            keys.append(match.group(1))
        elif lines[0].startswith("Problem with given class_path") and keys and keys[-1] != "init_args":
            keys.append("init_args")
        text = next((line for line in lines if not _PARSER_KEY.match(line) and not _NOISE.match(line)), "")
        if text and not text.startswith(("Subtypes:", "Errors:", "- ", "Given value")):
            reason = text
    reason = reason or " ".join(str(error).split())
    option = ".".join(keys)
    return f"{option}: {reason}" if option and option not in reason else reason


@contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """A user-fixable error becomes ``<prog>: error: <message>`` on one stderr line, exit status 2.

    That is an :class:`LthmamlError`, also when a library wrapped it (jsonargparse does, for what a
    configured class raises), and an :class:`argparse.ArgumentError` (an unknown option or a value
    of the wrong type, from a parser built with ``exit_on_error=False``): the option and the reason,
    not the usage. Lives here, not in the CLI module, so commands that do not load Lightning can
    use it too.
    """
    try:
        yield
    except Exception as error:
        found = ours(error)
        if found is not None:
            message = str(found)
        elif isinstance(error, argparse.ArgumentError):
            message = f"{argument_error_line(error)} (--help lists the options)"
        else:
            raise
        print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
        raise SystemExit(2) from None
