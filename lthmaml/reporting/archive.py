"""Keep a finished run's records, without its weights, where docs/results.md is rebuilt from.

The evidence of docs/results.md takes more CPU hours than one sitting on a shared machine has, and
a run folder (``runs/experiments/<name>/version_0``) lives only where it was trained. So when an
experiment finishes, ``make experiments`` copies what the report reads from it (``config.yaml``,
``machine.json``, ``rounds/round_XX/metrics.json``, and the TensorBoard scalars as text in
``scalars.json``: a few hundred KiB, no binary event file, no checkpoint, no mask) into
``docs/results/evidence/<name>/version_0``, and ``make results`` reports from there: experiments
finished in different sittings, or on different machines, end up in one table, and the committed
records are what anyone can check its figures against.

    python -m lthmaml.reporting.archive runs/experiments/dense/version_0 \\
        docs/results/evidence/dense/version_0
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

from lthmaml.errors import DataError, one_line_errors
from lthmaml.reporting.runs import SCALARS_FILE, is_run_dir, read_scalars
from lthmaml.rounds import METRICS_FILE, ROUNDS_FOLDER

PROG = "python -m lthmaml.reporting.archive"
RECORD_PATTERNS = ("config.yaml", "machine.json", f"{ROUNDS_FOLDER}/*/{METRICS_FILE}")
"""What the report reads from a run folder, relative to it, copied as it is; the TensorBoard
events go in as text (:data:`~lthmaml.reporting.runs.SCALARS_FILE`)."""


def record_files(run: Path) -> list[Path]:
    """The files of ``run`` that the report reads, relative to ``run``, sorted."""
    return sorted({file.relative_to(run) for pattern in RECORD_PATTERNS for file in run.glob(pattern)})


def archive_run(run: Path, destination: Path) -> list[Path]:
    """Copy ``run``'s records to ``destination``, replacing what was there; the files copied.

    The copy is written beside ``destination`` and renamed into place, so a kill mid-copy leaves
    the previous archive (or none), never half of one.
    """
    run, destination = Path(run), Path(destination)
    if not run.is_dir() or not is_run_dir(run):
        raise DataError(f"{run}: not a run folder (no config.yaml, rounds/ or TensorBoard events) to archive")
    files = record_files(run)
    staging = destination.with_name(destination.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for file in files:
        (staging / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run / file, staging / file)
    staging.mkdir(parents=True, exist_ok=True)  # a run with no records yet still archives as a folder
    scalars, start = read_scalars(run)
    if scalars:
        (staging / SCALARS_FILE).write_text(json.dumps({"start_time": start, "scalars": scalars}))
        files.append(Path(SCALARS_FILE))
    if destination.exists():
        shutil.rmtree(destination)
    staging.rename(destination)
    return files


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run folder (runs/experiments/<name>/version_0)")
    parser.add_argument(
        "destination", type=Path, help="where its records go (docs/results/evidence/<name>/version_0)"
    )
    args = parser.parse_args(argv)
    with one_line_errors(PROG):
        files = archive_run(args.run, args.destination)
    print(f"{PROG}: {len(files)} record files of {args.run} in {args.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
