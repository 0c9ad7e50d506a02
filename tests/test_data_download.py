"""Lookup order, verified download from a local HTTP server, and the errors when data is missing."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from paperlib.data import DATASETS, DataError, Download, locate, load_dataset, load_interactions, load_titles
from paperlib.data import download as dl

pytestmark = pytest.mark.filterwarnings("ignore:.*not the reference copy")

UDATA = "1\t10\t5\t100\n1\t11\t4\t200\n2\t10\t3\t150\n2\t12\t3\t50\n3\t11\t1\t10\n"
UITEM = "10|Movie Ten (1990)|x\n11|Movie Eleven (1991)|x\n12|Movie Twelve (1992)|x\n"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Empty cache in tmp_path, no PAPERLIB_DATA, no progress bars, localhost never proxied."""
    monkeypatch.setenv("PAPERLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PAPERLIB_DATA", raising=False)
    monkeypatch.delenv("PAPERLIB_OFFLINE", raising=False)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    return tmp_path


def ml100k_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-100k/u.data", UDATA)
        zf.writestr("ml-100k/u.item", UITEM)
    return buf.getvalue()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        _Quiet.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (base URL, folder)."""
    root = tmp_path / "www"
    root.mkdir()
    _Quiet.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def point_downloads(monkeypatch, name: str, downloads: tuple[Download, ...]) -> None:
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], downloads=downloads))


def cache_files(tmp_path: Path, name: str) -> list[str]:
    folder = tmp_path / "cache" / name
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_success_then_cache(server, monkeypatch, tmp_path):
    base, root = server
    data = ml100k_zip()
    (root / "ml-100k.zip").write_bytes(data)
    point_downloads(monkeypatch, "ml-100k", (Download(f"{base}/ml-100k.zip", "ml-100k.zip", md5=hashlib.md5(data).hexdigest()),))
    with pytest.warns(UserWarning, match="not the reference copy"):  # a test zip, not GroupLens' file
        df = load_interactions("ml-100k")
    assert len(df) == 5 and cache_files(tmp_path, "ml-100k") == ["ml-100k.zip"]
    assert str(locate("ml-100k")).startswith("official-zip layout")
    assert load_titles("ml-100k") == {"10": "Movie Ten (1990)", "11": "Movie Eleven (1991)", "12": "Movie Twelve (1992)"}
    assert _Quiet.requests == ["/ml-100k.zip"]
    load_interactions("ml-100k")  # from the cache now: no second request
    assert _Quiet.requests == ["/ml-100k.zip"]


def test_download_sha256_plain_file(server, monkeypatch, tmp_path):
    base, root = server
    text = b"1 5\n1 6\n1 7\n2 5\n"
    (root / "Video.txt").write_bytes(text)
    point_downloads(monkeypatch, "amazon-video-games", (Download(f"{base}/Video.txt", "Video.txt", sha256=hashlib.sha256(text).hexdigest()),))
    with pytest.warns(UserWarning, match="content sha256 expected"):
        df = load_interactions("amazon-video-games")
    assert len(df) == 4 and cache_files(tmp_path, "amazon-video-games") == ["Video.txt"]
    assert load_titles("amazon-video-games") is None  # SASRec's file has no titles


def test_interrupted_download_completed_for_titles(server, monkeypatch, tmp_path):
    # the cache holds Beauty.txt only (an earlier download stopped): titles fetch the other two files
    base, root = server
    files = {
        "Beauty.txt": b"1 1 2 3\n2 2 3 1\n",
        "datamaps.json": b'{"id2item": {"1": "B01", "2": "B02", "3": "B03"}}',
        "Amazon_Beauty.item": b"item_id:token\ttitle:token\nB01\tLipstick\nB02\tShampoo\nB03\t\n",
    }
    for fname, data in files.items():
        (root / fname).write_bytes(data)
    downloads = tuple(Download(f"{base}/{f}", f, sha256=hashlib.sha256(d).hexdigest()) for f, d in files.items())
    point_downloads(monkeypatch, "amazon-beauty", downloads)
    (tmp_path / "cache" / "amazon-beauty").mkdir(parents=True)
    (tmp_path / "cache" / "amazon-beauty" / "Beauty.txt").write_bytes(files["Beauty.txt"])
    data = load_dataset("amazon-beauty", k=0)
    assert data.titles == {1: "Lipstick", 2: "Shampoo"}
    assert sorted(_Quiet.requests) == ["/Amazon_Beauty.item", "/datamaps.json"]
    assert cache_files(tmp_path, "amazon-beauty") == ["Amazon_Beauty.item", "Beauty.txt", "datamaps.json"]


def test_checksum_mismatch_leaves_nothing(server, monkeypatch, tmp_path):
    base, root = server
    (root / "ml-100k.zip").write_bytes(ml100k_zip())
    point_downloads(monkeypatch, "ml-100k", (Download(f"{base}/ml-100k.zip", "ml-100k.zip", md5="0" * 32),))
    with pytest.raises(DataError) as info:
        load_interactions("ml-100k")
    msg = str(info.value)
    assert "checksum mismatch" in msg and "expected md5 " + "0" * 32 in msg
    assert hashlib.md5(ml100k_zip()).hexdigest() in msg  # the actual hash
    assert cache_files(tmp_path, "ml-100k") == []  # neither the file nor a .part remains


def test_server_down_gives_clear_error(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ml-100k.zip"
    point_downloads(monkeypatch, "ml-100k", (Download(url, "ml-100k.zip", md5="0" * 32),))
    with pytest.raises(DataError) as info:
        load_dataset("ml-100k")
    msg = str(info.value)
    assert "the download failed" in msg and url in msg
    assert "u.data" in msg and "ml-100k.zip" in msg and str(tmp_path / "cache" / "ml-100k") in msg
    assert cache_files(tmp_path, "ml-100k") == []


def test_http_404(server, monkeypatch, tmp_path):
    base, _ = server
    point_downloads(monkeypatch, "ml-100k", (Download(f"{base}/missing.zip", "ml-100k.zip", md5="0" * 32),))
    with pytest.raises(DataError, match="could not download .*missing.zip"):
        load_interactions("ml-100k")
    assert cache_files(tmp_path, "ml-100k") == []


@pytest.mark.parametrize("name", list(DATASETS))
def test_no_data_no_network_message(monkeypatch, tmp_path, name):
    monkeypatch.setenv("PAPERLIB_OFFLINE", "1")
    monkeypatch.setenv("PAPERLIB_DATA", str(tmp_path / "data"))
    with pytest.raises(DataError) as info:
        load_dataset(name)
    msg = str(info.value)
    spec = DATASETS[name]
    for layout in spec.layouts:
        assert layout.interactions.name in msg
    assert str(tmp_path / "data" / name) in msg and str(tmp_path / "cache" / name) in msg
    assert all(d.url in msg for d in spec.downloads) and spec.official_urls[0] in msg
    assert "PAPERLIB_OFFLINE" in msg


def test_download_false_argument(tmp_path):
    with pytest.raises(DataError, match="downloads are off"):
        load_interactions("ml-1m", download=False)


def test_lookup_order_data_dir_then_cache(monkeypatch, tmp_path):
    data, cache = tmp_path / "data" / "ml-100k", tmp_path / "cache" / "ml-100k"
    cache.mkdir(parents=True)
    (cache / "u.data").write_text(UDATA)
    assert len(load_interactions("ml-100k", download=False)) == 5  # cache, PAPERLIB_DATA unset
    monkeypatch.setenv("PAPERLIB_DATA", str(tmp_path / "data"))
    assert len(load_interactions("ml-100k", download=False)) == 5  # data folder empty: cache
    data.mkdir(parents=True)
    (data / "u.data.gz").write_bytes(gzip.compress(UDATA.encode()[: UDATA.index("3\t11")]))
    found = locate("ml-100k", download=False)
    assert found.folder == data and found.interactions.name == "u.data.gz"
    assert len(load_interactions("ml-100k")) == 4  # PAPERLIB_DATA wins; gz variant accepted


def test_layout_priority_and_missing_titles(monkeypatch, tmp_path):
    folder = tmp_path / "data" / "ml-1m"
    folder.mkdir(parents=True)
    monkeypatch.setenv("PAPERLIB_DATA", str(tmp_path / "data"))
    (folder / "ml-1m_sequences.txt").write_text("1 10\n1 11\n1 12\n")
    assert locate("ml-1m").layout.name == "sequences"
    with pytest.raises(DataError, match=r"no title file next to .*put movies.dat"):
        load_titles("ml-1m")
    with pytest.warns(UserWarning, match="Loading without titles"):
        assert load_dataset("ml-1m", k=0).titles is None
    (folder / "ratings.dat").write_text("1::10::5::1\n1::11::5::2\n1::12::5::3\n")
    assert locate("ml-1m").layout.name == "official"  # the official format comes first


def test_unknown_dataset():
    for fn in (load_interactions, load_titles, load_dataset, locate):
        with pytest.raises(DataError, match=r"unknown dataset 'movielens'.*ml-1m, ml-100k, amazon-beauty, amazon-video-games"):
            fn("movielens")


def test_registry_entries():
    assert set(DATASETS) == {"ml-1m", "ml-100k", "amazon-beauty", "amazon-video-games"}
    for name, spec in DATASETS.items():
        assert spec.name == name and spec.kcore == 5
        assert spec.max_len == (200 if name.startswith("ml") else 50)
        assert spec.downloads and all(d.sha256 or d.md5 for d in spec.downloads)
        assert spec.official_urls and spec.citation
        assert spec.layouts[0].name == "official"
        # the downloads make up a layout, with its titles where the layout has any
        names = {d.filename for d in spec.downloads}
        layout = next(x for x in spec.layouts if x.interactions.name.removesuffix(".gz") in names)
        assert not layout.titles or any(all(f.name in names for f in src.files) for src in layout.titles)
    assert DATASETS["ml-1m"].downloads[0].md5 == "c4d9eecfca2ab87c1945afe126590906"
    assert DATASETS["ml-100k"].downloads[0].md5 == "0e33842e24a9c977be4e0107933c0723"
    with pytest.raises(ValueError, match="exactly one of"):
        Download("http://x", "x")
    # the module attribute stays the module (not shadowed by a function of the same name)
    assert hasattr(dl, "fetch") and hasattr(dl, "locate")
