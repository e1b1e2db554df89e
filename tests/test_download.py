"""``lthmaml-data``: downloads are verified and atomic, against a local HTTP server on 127.0.0.1 only."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lthmaml.data import download
from lthmaml.errors import DataError

MEMBERS = ["alphabet/character/x.png", "alphabet/character/y.png", "other/char2/z.png"]


def make_zip(prefix: str = "") -> bytes:
    """A tiny zip shaped like Omniglot's: ``[prefix/]alphabet/character/image.png``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, member in enumerate(MEMBERS):
            archive.writestr(prefix + member, b"\x89PNG fake " + bytes([i]) * 32)
    return buffer.getvalue()


@dataclass
class Route:
    """What the server answers for one path: a status, a body, and optionally a lying length."""

    body: bytes = b""
    status: int = 200
    length: int | None = None  # Content-Length sent; larger than the body means a truncated reply


@dataclass
class Server:
    """A local server whose routes tests set, counting the requests it gets."""

    base_url: str
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every request on 127.0.0.1, whatever proxy the machine has configured, and bounded."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.delenv(download.BASE_URL_ENV, raising=False)
    monkeypatch.setattr(download, "TIMEOUT_S", 5.0)


@pytest.fixture
def server() -> Iterator[Server]:
    """A ThreadingHTTPServer on 127.0.0.1, port chosen by the OS, shut down after the test."""
    state = Server(base_url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            state.requests.append(self.path)
            route = state.routes.get(self.path.rsplit("/", 1)[-1])
            if route is None or route.status != 200:
                self.send_error(404 if route is None else route.status)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            self.send_header("Content-Length", str(route.length or len(route.body)))
            self.end_headers()
            self.wfile.write(route.body)
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (base signature)
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/omniglot/python"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def table(**bodies: bytes) -> dict[str, tuple[str, str]]:
    """A ``{filename: (url, sha256)}`` table for the given bodies; URLs are replaced by base_url."""
    return {
        f"{name}.zip": (f"https://example.invalid/{name}.zip", hashlib.sha256(body).hexdigest())
        for name, body in bodies.items()
    }


def quiet(line: str) -> None:
    """Swallow progress lines in tests that do not look at them."""


def test_fetches_verifies_extracts_keeps_zip_and_skips_second_time(server: Server, tmp_path: Path) -> None:
    nested, flat = make_zip("images_background/"), make_zip()
    server.routes = {"images_background.zip": Route(nested), "images_evaluation.zip": Route(flat)}
    files = table(images_background=nested, images_evaluation=flat)
    root = tmp_path / "data"

    folders = download.fetch_all(root, files, base_url=server.base_url, log=quiet)

    assert folders == [root / "images_background", root / "images_evaluation"]
    for folder in folders:  # the official nested layout and a flat one both give root/<stem>/alphabet/...
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")) == sorted(MEMBERS)
    assert (root / "images_background.zip").read_bytes() == nested
    assert (root / "images_evaluation.zip").read_bytes() == flat
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["images_background", "images_background.zip", "images_evaluation", "images_evaluation.zip"]
    )
    assert len(server.requests) == 2

    lines: list[str] = []
    download.fetch_all(root, files, base_url=server.base_url, log=lines.append)
    assert len(server.requests) == 2, "verified data must not be fetched again"
    assert all("skipping" in line for line in lines) and len(lines) == 2


def test_env_var_points_at_mirror_and_force_fetches_again(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = make_zip("images_background/")
    server.routes = {"images_background.zip": Route(body)}
    monkeypatch.setenv(download.BASE_URL_ENV, server.base_url + "/")
    files = table(images_background=body)

    download.fetch_all(tmp_path, files, log=quiet)
    (tmp_path / "images_background" / "stale.txt").write_text("left over")
    download.fetch_all(tmp_path, files, force=True, log=quiet)

    assert server.requests == ["/omniglot/python/images_background.zip"] * 2
    assert not (tmp_path / "images_background" / "stale.txt").exists(), "--force replaces, never merges"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images_background", "images_background.zip"]


def test_verified_zip_without_folder_is_unpacked_without_download(server: Server, tmp_path: Path) -> None:
    body = make_zip()
    (tmp_path / "images_evaluation.zip").write_bytes(body)

    download.fetch_all(tmp_path, table(images_evaluation=body), base_url=server.base_url, log=quiet)

    assert server.requests == []
    assert (tmp_path / "images_evaluation" / MEMBERS[0]).is_file()


def test_corrupt_zip_already_present_is_fetched_again(server: Server, tmp_path: Path) -> None:
    body = make_zip()
    server.routes = {"images_evaluation.zip": Route(body)}
    (tmp_path / "images_evaluation.zip").write_bytes(body[:10])

    download.fetch_all(tmp_path, table(images_evaluation=body), base_url=server.base_url, log=quiet)

    assert len(server.requests) == 1
    assert (tmp_path / "images_evaluation.zip").read_bytes() == body


def test_checksum_mismatch_names_file_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    server.routes = {"images_background.zip": Route(make_zip())}
    files = table(images_background=b"what the table expects")

    with pytest.raises(DataError) as caught:
        download.fetch_all(tmp_path, files, base_url=server.base_url, log=quiet)

    message = str(caught.value)
    assert "images_background.zip" in message and "SHA-256" in message and "expected" in message
    assert server.base_url in message
    assert list(tmp_path.iterdir()) == []


def test_truncated_download_is_an_error_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    body = make_zip()
    server.routes = {"images_background.zip": Route(body, length=len(body) + 1000)}

    with pytest.raises(DataError, match=r"images_background\.zip cut short at \d+ of \d+ bytes"):
        download.fetch_all(tmp_path, table(images_background=body), base_url=server.base_url, log=quiet)

    assert list(tmp_path.iterdir()) == []


def test_http_404_is_a_clear_error(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"images_background\.zip: HTTP 404") as caught:
        download.fetch_all(tmp_path, table(images_background=b"x"), base_url=server.base_url, log=quiet)

    assert "--base-url" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_zip_with_right_checksum_leaves_nothing(server: Server, tmp_path: Path) -> None:
    body = b"not a zip at all"
    server.routes = {"images_background.zip": Route(body)}

    with pytest.raises(DataError, match=r"images_background\.zip: not a readable zip .* removed"):
        download.fetch_all(tmp_path, table(images_background=body), base_url=server.base_url, log=quiet)

    assert list(tmp_path.iterdir()) == []  # an unusable zip is not kept, even with a matching digest


def test_progress_lines_go_to_stderr(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    body = make_zip()
    server.routes = {"images_evaluation.zip": Route(body)}
    monkeypatch.setattr(download, "PROGRESS_EVERY", 100)

    download.fetch_all(tmp_path, table(images_evaluation=body), base_url=server.base_url)

    err = capsys.readouterr().err
    assert f"lthmaml-data: downloading {server.base_url}/images_evaluation.zip" in err
    assert "lthmaml-data: images_evaluation.zip: 0.0 of 0.0 MB" in err


def test_main_exits_2_with_one_line_error(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.routes = {"images_background.zip": Route(make_zip())}  # not the real Omniglot zip

    code = download.main(["omniglot", "--root", str(tmp_path / "d"), "--base-url", server.base_url])

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("lthmaml-data: error: ")
    assert "images_background.zip" in lines[0] and "SHA-256" in lines[0]
    assert list((tmp_path / "d").iterdir()) == []


def test_main_succeeds_and_prints_folders(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    body = make_zip("images_background/")
    server.routes = {"images_background.zip": Route(body)}
    monkeypatch.setattr(download, "OMNIGLOT_FILES", table(images_background=body))
    monkeypatch.setenv(download.BASE_URL_ENV, server.base_url)

    assert download.main(["omniglot", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "images_background")]


def test_real_table_pins_both_official_zips() -> None:
    assert set(download.OMNIGLOT_FILES) == {"images_background.zip", "images_evaluation.zip"}
    for name, (url, sha256) in download.OMNIGLOT_FILES.items():
        assert url == f"https://github.com/brendenlake/omniglot/raw/master/python/{name}"
        assert len(sha256) == 64 and int(sha256, 16) >= 0
