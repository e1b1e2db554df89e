"""Run folders and checkpoints, as the ``lthmaml`` commands use them: which checkpoint
``--ckpt_path`` names (``last``: the newest run's), which run folder a checkpoint belongs to (so
a resumed fit, a test and a predict of it write there), where the logger will write, and whether
those places can be written at all, checked before any work."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_info

from lthmaml.errors import ConfigError, DataError
from lthmaml.files import write_blocker
from lthmaml.meta.module import missing_class, predates_format


# ---------------------------------------------------------------------------------- checkpoints
def _plain(value: Any) -> Any:
    """A config value as plain JSON types, so a parsed config compares with a checkpoint's hparams."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    return json.loads(json.dumps(value, default=str))


def _describe_net(net: dict) -> str:
    name = str(net.get("class_path", "?")).rsplit(".", 1)[-1]
    return f"{name}({json.dumps(net.get('init_args') or {}, sort_keys=True)})"


def check_ckpt_path(config: Namespace, subcommand: str, needs_checkpoint: tuple[str, ...]) -> None:
    """``--ckpt_path`` names a readable checkpoint of the configured net (``last`` is resolved).

    Lightning would raise a raw ``FileNotFoundError`` or unpickling error, start afresh on a
    ``last`` it cannot find, silently swap the checkpoint's net in for the configured one, or fail
    inside jsonargparse on a class the checkpoint names that this lthmaml does not have.
    """
    ckpt = config.get("ckpt_path")
    if ckpt is None:
        if subcommand in needs_checkpoint:
            raise ConfigError(
                f"{subcommand} needs --ckpt_path <run>/checkpoints/<file>.ckpt: without it the net is "
                "randomly initialised"
            )
        return
    if ckpt == "last":
        config["ckpt_path"] = ckpt = str(last_checkpoint(config))
        rank_zero_info(f"--ckpt_path last: {ckpt}")
    elif ckpt in ("best", "hpc", "registry") or "://" in ckpt:
        return  # Lightning's own lookups
    path = Path(ckpt)
    if not path.is_file():
        raise DataError(f"--ckpt_path {path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(
            f"--ckpt_path {path}: not a readable checkpoint ({reason}); it may be truncated: give an "
            "earlier one, e.g. <run>/checkpoints/last.ckpt"
        ) from None
    hparams = (checkpoint.get("hyper_parameters") or {}) if isinstance(checkpoint, dict) else {}
    stale = missing_class(hparams)
    if stale is not None:  # Lightning would fail on it in jsonargparse, naming a config option
        raise DataError(predates_format(f"--ckpt_path {path}", f"it names {stale}"))
    saved = hparams.get("net")
    model = config.get("model")
    configured = model.get("init_args", Namespace()).get("net") if isinstance(model, Namespace) else None
    if not isinstance(saved, dict) or configured is None:
        return
    saved, configured = _plain(saved), _plain(configured)
    same_class = (
        str(saved.get("class_path")).rsplit(".", 1)[-1]
        == str(configured.get("class_path")).rsplit(".", 1)[-1]
    )
    if not same_class or (saved.get("init_args") or {}) != (configured.get("init_args") or {}):
        raise ConfigError(
            f"--ckpt_path {path} holds a {_describe_net(saved)} but the config builds "
            f"{_describe_net(configured)}: pass the config the checkpoint was trained with "
            "(config.yaml in its run folder)"
        )


def _version(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def last_checkpoint(config: Namespace) -> Path:
    """What ``--ckpt_path last`` means here: ``last.ckpt`` of the newest run of the same logger
    name (``<save_dir>/<name>/version_N/checkpoints``), or of ``--checkpoint.dirpath``."""
    dirpath = (config.get("checkpoint") or Namespace()).get("dirpath")
    trainer = config.get("trainer") or Namespace()
    logger = trainer.get("logger")
    init = logger.get("init_args") if isinstance(logger, Namespace) else None
    if dirpath:
        candidates, where = [Path(dirpath) / "last.ckpt"], Path(dirpath) / "last.ckpt"
    elif isinstance(init, Namespace) and init.get("save_dir") is not None:
        root = Path(init.get("save_dir")) / (init.get("name") or "")
        runs = sorted((p.parent.parent for p in root.glob("version_*/checkpoints/last.ckpt")), key=_version)
        candidates = [run / "checkpoints" / "last.ckpt" for run in reversed(runs)]
        where = root / "version_*" / "checkpoints" / "last.ckpt"
    else:
        root = Path(trainer.get("default_root_dir") or ".")
        candidates, where = [root / "checkpoints" / "last.ckpt"], root / "checkpoints" / "last.ckpt"
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise ConfigError(f"--ckpt_path last: there is no {where}: give the path of the run's last.ckpt")
    return found


# ---------------------------------------------------------------------------------- run folders
PREDICTIONS = "predictions.csv"
RUN_MARKERS = ("config.yaml", "hparams.yaml")
"""Files a run folder holds from its start (the CLI's config, the logger's hyperparameters): how a
checkpoint's run folder is recognised."""


def checkpoint_run_folder(ckpt: Path) -> Optional[Path]:
    """The run folder a checkpoint belongs to: the nearest folder above it (``<run>/checkpoints``,
    ``<run>/rounds/round_XX``) that holds a run's files; None for a checkpoint outside one."""
    for folder in list(ckpt.parents)[:3]:
        if folder.name and all((folder / marker).is_file() for marker in RUN_MARKERS):
            return folder
    return None


def logger_args(config: Namespace) -> Optional[Namespace]:
    logger = (config.get("trainer") or Namespace()).get("logger")
    init = logger.get("init_args") if isinstance(logger, Namespace) else None
    return init if isinstance(init, Namespace) and "save_dir" in init else None


def log_into(config: Namespace, run: Path) -> None:
    """Point the configured logger at ``run`` (``save_dir`` its parent, no name, ``version`` its
    folder name), unless the config fixes the version itself."""
    init = logger_args(config)
    if init is None or init.get("version") is not None:
        return
    init["save_dir"], init["name"], init["version"] = str(run.parent), "", run.name


def configured_log_dir(config: Namespace) -> Optional[Path]:
    """The folder the logger will make (its ``save_dir``/``name``, the version not yet known)."""
    init = logger_args(config)
    if init is None:
        root = (config.get("trainer") or Namespace()).get("default_root_dir")
        return Path(root) if root else None
    folder = Path(init.get("save_dir") or ".") / (init.get("name") or "")
    version = init.get("version")
    return (
        folder
        if version is None
        else folder / (version if isinstance(version, str) else f"version_{version}")
    )


def check_log_folder(config: Namespace) -> None:
    """The log folder (and ``--checkpoint.dirpath``) can be made and written, before any work."""
    init = logger_args(config)
    folder = configured_log_dir(config)
    if folder is not None:
        option = "--trainer.logger.init_args.save_dir" if init is not None else "--trainer.default_root_dir"
        check_writable(folder, option, "log folder")
    dirpath = (config.get("checkpoint") or Namespace()).get("dirpath")
    if dirpath:
        check_writable(Path(dirpath), "--checkpoint.dirpath", "checkpoint folder")


def check_writable(path: Path, option: str, what: str, file: bool = False) -> None:
    """``path`` (a folder, or with ``file`` a file) can be made and written: else a one-line
    ConfigError naming ``option`` before any work, not an OSError from inside a library after it."""
    path = Path(path)
    if file and path.is_dir():
        raise ConfigError(f"{option}: {path} is a folder: give a file name")
    reason = write_blocker(path.parent if file else path)
    if reason is not None:
        raise ConfigError(f"{option}: cannot write the {what} {path}: {reason}; choose another place")


def resume_command(prog: str, argv: list[str], last: Path) -> str:
    """The command line that resumes this fit: its own arguments, ``--ckpt_path`` set to ``last``."""
    args: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            args.append(arg)
    return shlex.join([prog, *args, "--ckpt_path", str(last)])
