"""``lthmaml-data``: fetch the official Omniglot zips, verify them and unpack them, all or nothing.

``lthmaml-data omniglot --root DIR`` leaves, for each of ``images_background`` and
``images_evaluation``::

    DIR/images_background.zip      the verified zip, kept: the Omniglot reader can read it directly,
                                   and it is what later runs re-verify to skip the download
    DIR/images_background/...      the same zip unpacked (``<alphabet>/<character>/<image>.png``)

Each step is atomic, so an interrupted or failed run never leaves something that looks complete:
the zip is streamed to a hidden temporary file in DIR and its SHA-256 checked as it arrives; only
a file of the announced length and the expected digest is renamed to its final name. It is then
unpacked into a hidden temporary folder in DIR, which is renamed to its final name only once
everything is out. On any failure the temporary file and folder are removed and the command exits
with status 2 and one line, ``lthmaml-data: error: ...``, naming the URL or file and the fix.

A zip already in DIR whose digest matches is not downloaded again, and a folder next to it is not
unpacked again (folders are only ever put in place whole, after the zip was verified); ``--force``
does both anew. The URLs default to the official brendenlake/omniglot repository on GitHub;
``--base-url`` or the ``LTHMAML_OMNIGLOT_URL`` environment variable point them at a mirror (the
file names stay the same). The SHA-256 digests are those TensorFlow Datasets pins for these URLs
(``tensorflow_datasets/url_checksums/omniglot.txt``); torchvision's prototype Omniglot dataset
pins the same values. Only the standard library is used. The zip and the folders get the mode any
new file or folder gets (0644, 0755 under the usual umask), not their temporary ones' 0600 and 0700.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Optional

from lthmaml.errors import ConfigError, DataError, LthmamlError
from lthmaml.files import give_default_mode

PROG = "lthmaml-data"
BASE_URL_ENV = "LTHMAML_OMNIGLOT_URL"
OMNIGLOT_BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python"

#: ``{file name: (URL, SHA-256 hex digest)}``: what to fetch and what it must hash to.
OMNIGLOT_FILES: dict[str, tuple[str, str]] = {
    "images_background.zip": (
        f"{OMNIGLOT_BASE_URL}/images_background.zip",
        "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",
    ),
    "images_evaluation.zip": (
        f"{OMNIGLOT_BASE_URL}/images_evaluation.zip",
        "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",
    ),
}

CHUNK = 1 << 16
PROGRESS_EVERY = 2 << 20  # bytes between two progress lines: a few a second on a slow link
TIMEOUT_S = 60.0

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks so a large zip never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_url(url: str, filename: str, base_url: Optional[str]) -> str:
    """The URL to fetch: ``base_url/filename`` when a mirror is given, else the table's URL."""
    if not base_url:
        return url
    return f"{base_url.rstrip('/')}/{filename}"


def _remove(path: Path) -> None:
    """Best-effort removal of a temporary file or folder: cleanup must not hide the real error."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _fetch(url: str, dest: Path, filename: str, expected_sha256: str, log: Log) -> None:
    """Stream ``url`` into ``dest`` (a new temporary file), checking length and digest on the way.

    Raises DataError naming the URL and file on an HTTP or network error, a body shorter than its
    Content-Length, or a digest mismatch; the caller removes ``dest``.
    """
    retry = f"run `{PROG} omniglot` again, or point --base-url / {BASE_URL_ENV} at a mirror"
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError(f"{url}: only http(s) URLs can be fetched; fix --base-url / {BASE_URL_ENV}")
    digest = hashlib.sha256()
    received, total = 0, None
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            log(f"downloading {url}" + (f" ({total / 1e6:.1f} MB)" if total else ""))
            next_report = PROGRESS_EVERY
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if received >= next_report:
                    of_total = f" of {total / 1e6:.1f}" if total else ""
                    log(f"{filename}: {received / 1e6:.1f}{of_total} MB")
                    next_report += PROGRESS_EVERY
    except urllib.error.HTTPError as error:
        raise DataError(
            f"{url}: HTTP {error.code} {error.reason} for {filename}; check the URL, or {retry}"
        ) from None
    except http.client.IncompleteRead as error:
        received += len(error.partial)
        raise DataError(
            f"{url}: download of {filename} cut short at {received} of {total} bytes; {retry}"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise DataError(
            f"{url}: download of {filename} into {dest.parent} failed ({reason}); "
            f"check the network and free space, or {retry}"
        ) from None
    if total is not None and received < total:
        raise DataError(f"{url}: download of {filename} cut short at {received} of {total} bytes; {retry}")
    if digest.hexdigest() != expected_sha256:
        raise DataError(
            f"{url}: SHA-256 of the downloaded {filename} is {digest.hexdigest()}, expected "
            f"{expected_sha256}; it is corrupt or changed upstream, so nothing was kept: {retry}"
        )


def _extract(zip_path: Path, final: Path, log: Log) -> None:
    """Unpack ``zip_path`` into a temporary folder beside ``final``, then rename it into place.

    A zip whose members sit under one folder named like ``final`` (as the official ones do) gives
    that folder; otherwise the members themselves make up ``final``. A zip that cannot be read is
    removed too, even though its digest matched: it could never be used.
    """
    root = final.parent
    scratch: Optional[Path] = None
    old: Optional[Path] = None
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
        try:
            with zipfile.ZipFile(zip_path) as archive:
                for member in archive.namelist():
                    parts = PurePosixPath(member.replace("\\", "/")).parts
                    if member.startswith(("/", "\\")) or ".." in parts or ":" in member:
                        raise zipfile.BadZipFile(f"unsafe member name {member!r}")
                bad = archive.testzip()
                if bad is not None:
                    raise zipfile.BadZipFile(f"member {bad!r} fails its CRC check")
                log(f"extracting {zip_path.name} into {final}")
                archive.extractall(scratch)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as error:
            _remove(zip_path)
            raise DataError(
                f"{zip_path}: not a readable zip ({error}) although its SHA-256 matched, so it was "
                f"removed; run `{PROG} omniglot` again, and if that fails the pinned checksum is wrong"
            ) from None
        nested = scratch / final.name
        tree = nested if nested.is_dir() else scratch
        if final.exists():  # --force, or a folder left by something else: swap, never merge
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=root))
            os.replace(final, old / final.name)
        give_default_mode(tree)  # a temporary folder is 0700, as only its maker could read it
        os.replace(tree, final)
    except OSError as error:
        if old is not None and not final.exists():
            try:
                os.replace(old / final.name, final)
            except OSError:
                old = None  # could not put it back: leave it where it is rather than delete it
        raise DataError(f"{final}: cannot unpack {zip_path.name} here ({error}); check the folder") from None
    finally:
        if scratch is not None:
            _remove(scratch)
        if old is not None:
            _remove(old)


def fetch_file(
    root: Path,
    filename: str,
    url: str,
    sha256: str,
    *,
    force: bool = False,
    log: Log = _stderr,
) -> Path:
    """Make ``root/filename`` a verified copy of ``url`` and ``root/<stem>`` its unpacked content.

    Skips the download when the zip in ``root`` already has the digest, and the unpacking when the
    folder is there too, unless ``force``. Returns the folder. Raises DataError on any failure,
    leaving no temporary file or folder behind.
    """
    root = Path(root)
    zip_path = root / filename
    folder = root / Path(filename).stem
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{root}: cannot create the data root ({error}); choose another --root") from None
    try:
        have_zip = not force and zip_path.is_file() and sha256_of(zip_path) == sha256
        if have_zip and folder.is_dir():
            log(f"{folder} is already there, verified; skipping (--force to fetch again)")
            return folder
        if not have_zip:
            if zip_path.exists() and not force:
                log(f"{zip_path} does not match its SHA-256; fetching it again")
            fd, part_name = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=root)
            os.close(fd)
            part = Path(part_name)
            try:
                _fetch(url, part, filename, sha256, log)
                give_default_mode(part)  # 0600 as a temporary file, 0644 (umask) as the zip
                os.replace(part, zip_path)
            finally:
                _remove(part)
    except OSError as error:
        raise DataError(f"{zip_path}: cannot read or write it ({error}); check permissions") from None
    _extract(zip_path, folder, log)
    return folder


def fetch_all(
    root: Path,
    files: Mapping[str, tuple[str, str]] = OMNIGLOT_FILES,
    *,
    base_url: Optional[str] = None,
    force: bool = False,
    log: Log = _stderr,
) -> list[Path]:
    """Fetch, verify and unpack every ``{filename: (url, sha256)}`` of ``files`` into ``root``.

    ``base_url`` (else ``$LTHMAML_OMNIGLOT_URL``) replaces each URL's folder, keeping the file name:
    the way to use a mirror, or a local server in tests. Returns the unpacked folders.
    """
    base_url = base_url or os.environ.get(BASE_URL_ENV) or None
    return [
        fetch_file(root, name, resolve_url(url, name, base_url), digest, force=force, log=log)
        for name, (url, digest) in files.items()
    ]


def build_parser() -> argparse.ArgumentParser:
    """The ``lthmaml-data`` parser: one subcommand per data set, so more can be added."""
    parser = argparse.ArgumentParser(prog=PROG, description="Download and unpack data sets, verified.")
    sets = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    omniglot = sets.add_parser(
        "omniglot",
        help="the Omniglot background and evaluation zips",
        description="Fetch images_background.zip and images_evaluation.zip, verify their SHA-256, "
        "and unpack them into ROOT/images_background and ROOT/images_evaluation (zips kept).",
    )
    omniglot.add_argument("--root", required=True, type=Path, help="folder to put the zips and folders in")
    omniglot.add_argument("--force", action="store_true", help="download and unpack even if present")
    omniglot.add_argument(
        "--base-url",
        default=None,
        help=f"mirror holding the two zips (default: ${BASE_URL_ENV}, else {OMNIGLOT_BASE_URL})",
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Console entry: 0 when the data is in place, 2 with a one-line error otherwise."""
    args = build_parser().parse_args(argv)
    try:
        folders = fetch_all(args.root, OMNIGLOT_FILES, base_url=args.base_url, force=args.force)
    except LthmamlError as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted; nothing partial was kept, run it again", file=sys.stderr)
        return 130
    for folder in folders:
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
