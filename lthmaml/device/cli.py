"""The ``lthmaml-device`` command: adapt an ONNX artifact to a task folder and predict, in one launch::

    lthmaml-device fit --artifact model.onnx --task task/ [--output predictions.csv] [--threads 1]
                       [--support_augmentation K [--seed SEED]]
    lthmaml-device predict --artifact model.onnx --task task/ [--adapted adapted.npz]

``fit`` adapts to the support set (see :mod:`lthmaml.device.runtime`) and writes the query's
``predictions.csv`` (``runs/device/<task folder name>/`` unless ``--output``), in the columns and
format ``lthmaml-edge`` writes; with a labelled query it prints the query accuracy (or MSE).
``--support_augmentation K`` adds K randomly distorted copies of each support image (Koch et al.'s
affine ranges, drawn from ``--seed``) to what a classification task adapts on: the copies
``lthmaml-edge --data.support_augmentation K --data.val_seed SEED`` adapts on, made by the same
numpy code (:func:`lthmaml.data.affine.support_copies`), so the two predict alike (``predict``
takes it too, for the amortized learners; a regression task ignores it, as ``lthmaml-edge`` does).
``predict`` scores the query with the net as exported, without MAML's or the classifier's
adaptation steps, as ``lthmaml-edge predict`` does with an artifact (the amortized learners adapt
either way: their adaptation is the forward pass). For MAML and the classifier, ``fit`` also
writes the adapted weights as ``adapted.npz`` beside the predictions, bound to the model's graph,
and ``predict --adapted adapted.npz`` scores with them, as ``lthmaml-edge predict`` does with the
``finetuned.safetensors`` its fit wrote: adapt once, predict later without the steps. The last
line gives the start-up (Python, the imports, reading and verifying the model), fit and predict
times.

It loads onnxruntime, numpy and Pillow, never torch or Lightning (``pip install 'lthmaml[device]'``),
and prints bad input as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from lthmaml.device.runtime import ADAPTED_FILE, DeviceModel, read_adapted, scores, write_adapted
from lthmaml.device.task import read_task, with_support_copies
from lthmaml.edge.launch import process_start
from lthmaml.edge.predictions import HEADER, classification_rows, regression_rows, write_csv
from lthmaml.errors import ConfigError, DataError, one_line_errors

PROG = "lthmaml-device"
BATCH_SIZE = 32
"""The query batch size of ``configs/edge/pi.yaml`` (BatchNorm's statistics are a batch's, so the
device batches as ``lthmaml-edge`` does to give its scores)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Adapt an ONNX artifact (lthmaml-export --format onnx) to a task folder and write the "
        "query's predictions.csv, with onnxruntime, numpy and Pillow only.",
        exit_on_error=False,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("fit", "adapt to the support set, then predict the query (one launch)"),
        ("predict", "predict the query with the net as exported (no MAML/classifier steps)"),
    ):
        command = commands.add_parser(name, help=text, description=text, exit_on_error=False)
        command.add_argument("--artifact", type=Path, required=True, help="the .onnx lthmaml-export wrote")
        command.add_argument("--task", type=Path, required=True, help="the task folder (support/, query/)")
        command.add_argument(
            "--output",
            type=Path,
            default=None,
            help="predictions CSV, a .csv path or a folder (default runs/device/<task folder name>/)",
        )
        command.add_argument(
            "--batch_size",
            type=int,
            default=BATCH_SIZE,
            help="query batch size (default %(default)s, as pi.yaml)",
        )
        command.add_argument(
            "--threads", type=int, default=1, help="onnxruntime threads (default %(default)s)"
        )
        command.add_argument(
            "--support_augmentation",
            type=int,
            default=0,
            metavar="K",
            help="adapt on K randomly distorted copies of each support image too (classification; "
            "lthmaml-edge's data.support_augmentation; default %(default)s)",
        )
        command.add_argument(
            "--seed",
            type=int,
            default=0,
            help="seed of the distorted copies (lthmaml-edge's data.val_seed; default %(default)s)",
        )
        if name == "predict":
            command.add_argument(
                "--adapted",
                type=Path,
                default=None,
                help="the adapted.npz a fit of this model wrote (MAML, classifier): score with its weights",
            )
    return parser


def predictions_path(output: Optional[Path], task: Path) -> Path:
    folder = (
        output
        if output is not None
        else Path("runs") / "device" / (task.expanduser().resolve().name or "task")
    )
    return folder if folder.suffix.lower() == ".csv" else folder / "predictions.csv"


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def run(args: argparse.Namespace) -> Path:
    started = time.perf_counter()
    for option in ("batch_size", "threads"):
        if getattr(args, option) < 1:
            raise ConfigError(f"--{option} must be >= 1, got {getattr(args, option)}")
    if args.support_augmentation < 0:
        raise ConfigError(
            f"--support_augmentation must be >= 0 copies (0: none), got {args.support_augmentation}"
        )
    model = DeviceModel(args.artifact, args.threads)
    task = read_task(args.task, model.metadata, str(args.artifact), model.image_size)
    for note in task.notes:
        print(note, file=sys.stderr)
    if "query" not in task.splits:
        raise DataError(f"task folder {args.task} has no query: add query/*.png or query.csv to predict")
    loaded = time.perf_counter()
    adapted = read_adapted(args.adapted, model) if getattr(args, "adapted", None) else None
    task = with_support_copies(task, args.support_augmentation, args.seed)
    outputs, weights = scores(model, task, args.batch_size, adapt=args.command == "fit", weights=adapted)
    fitted = time.perf_counter()
    query = task.splits["query"]
    if model.regression:
        rows = regression_rows(
            query.x.reshape(len(query), -1).tolist(), outputs.reshape(len(query), -1)[:, 0].tolist()
        )
    else:
        probabilities = softmax(outputs)
        rows = classification_rows(
            probabilities.argmax(-1).tolist(), probabilities.max(-1).tolist(), task.labels
        )
    path = predictions_path(args.output, args.task)
    write_csv(path, HEADER[model.metadata.task], [[name, *row] for name, row in zip(query.files, rows)])
    print(f"Wrote {len(rows)} predictions to {path}")
    if weights is not None:
        print(f"Wrote the adapted weights to {write_adapted(path.with_name(ADAPTED_FILE), model, weights)}")
    if query.labelled and model.regression:
        mse = float(np.mean((outputs.reshape(len(query), -1)[:, :1] - query.y) ** 2))
        print(f"Query MSE {mse:.4f} on {len(query)} points")
    elif query.labelled:
        correct = int((outputs.argmax(-1) == query.y).sum())
        print(f"Query accuracy {correct / len(query):.4f} ({correct}/{len(query)})")
    done = time.perf_counter()
    print(
        f"Timings: start-up {loaded - process_start():.2f} s (Python, imports, reading the model and the "
        f"task; {loaded - started:.2f} s of it reading), fit {fitted - loaded:.2f} s, "
        f"predict {done - fitted:.2f} s"
    )
    return path


def return_large_buffers() -> None:
    """Have glibc's malloc give every buffer of 64 KiB or more back to the system when it is freed.

    Its default threshold rises to the size of the largest buffer freed, after which onnxruntime's
    activations (6 MiB a tensor for a 32-image batch of a 64-filter Conv4) are kept on the heap
    between batches and the next batch's land beside them: about 7 MiB more at the peak on a
    20-way 1-shot task. Elsewhere (another C library) this does nothing."""
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main(argv: Optional[list[str]] = None) -> None:
    return_large_buffers()
    with one_line_errors(PROG):
        args = build_parser().parse_args(argv)
        run(args)


if __name__ == "__main__":
    main()
