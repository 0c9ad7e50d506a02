"""Finding a dataset's files: ``$PAPERLIB_DATA/<dataset>/``, then the cache, then a verified download.

Lookup order (DESIGN §3):

1. ``$PAPERLIB_DATA/<dataset>/`` (``paths.data_dir()``): a folder of already-present files;
2. ``<cache>/<dataset>/`` (``paths.cache_dir()``, ``$PAPERLIB_CACHE`` or ``~/.cache/paperlib``);
3. download of ``DatasetSpec.downloads`` into the cache. Each file is written to a temporary file
   in the cache folder, its checksum verified, and only then renamed to its final name, so the
   cache never holds a partial or unverified file.

In each folder the layouts are tried in the registry's priority order; the first whose
interactions file exists wins. ``PAPERLIB_OFFLINE=1`` (or ``download=False``) turns step 3 off.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm  # the plain bar: tqdm.auto warns without ipywidgets in notebooks

from .. import paths
from ..runtime import atomic_write, progress_enabled
from .registry import DATASETS, DatasetSpec, Download, FileSpec, Layout, TitleSource
from .sequences import DataError

__all__ = [
    "DownloadError",
    "Located",
    "get_spec",
    "search_folders",
    "resolve_file",
    "find_layout",
    "locate",
    "fetch",
    "download_dataset",
    "download_allowed",
    "file_digest",
]

#: Seconds without data before a download is abandoned.
TIMEOUT_S = 60.0


class DownloadError(DataError):
    """A download could not be completed (no network, server down, HTTP error)."""


def get_spec(name: str) -> DatasetSpec:
    """The registry entry of ``name``; DataError listing the known names otherwise."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def search_folders(name: str) -> list[Path]:
    """The folders searched for ``name``'s files, in order: ``$PAPERLIB_DATA/<name>`` (if set), cache."""
    folders = []
    data = paths.data_dir()
    if data is not None:
        folders.append(data / name)
    folders.append(paths.cache_dir() / name)
    return folders


def _variants(name: str) -> list[str]:
    if name.endswith(".zip"):
        return [name]
    return [name, name[:-3]] if name.endswith(".gz") else [name, name + ".gz"]


def resolve_file(folder: Path, spec: FileSpec) -> Path | None:
    """The path of ``spec`` in ``folder`` (plain or gzipped variant), or None."""
    for candidate in _variants(spec.name):
        path = folder / candidate
        if path.is_file():
            return path
    return None


@dataclass(frozen=True)
class Located:
    """Where a dataset's files were found.

    Attributes:
        spec: the dataset.
        layout: the layout in use.
        folder: the folder holding its files.
        interactions: path of the interactions file (a zip when ``layout.interactions.member``).
    """

    spec: DatasetSpec
    layout: Layout
    folder: Path
    interactions: Path

    def __str__(self) -> str:
        return f"{self.layout.name} layout: {self.interactions}" + (
            f" ({self.layout.interactions.member})" if self.layout.interactions.member else ""
        )

    def title_files(self) -> tuple[TitleSource, list[tuple[Path, FileSpec]]] | None:
        """The first title source of the layout whose files are all in ``folder``, or None."""
        for source in self.layout.titles:
            found = [(resolve_file(self.folder, f), f) for f in source.files]
            if all(p is not None for p, _ in found):
                return source, [(p, f) for p, f in found]  # type: ignore[misc]
        return None


def find_layout(spec: DatasetSpec, folder: Path) -> Located | None:
    """The first layout of ``spec`` whose interactions file is in ``folder``."""
    if not folder.is_dir():
        return None
    for layout in spec.layouts:
        path = resolve_file(folder, layout.interactions)
        if path is not None:
            return Located(spec, layout, folder, path)
    return None


def download_allowed(download: bool | None = None) -> bool:
    """``download`` if given, else True unless ``PAPERLIB_OFFLINE`` is 1/true/yes/on."""
    if download is not None:
        return bool(download)
    return os.environ.get("PAPERLIB_OFFLINE", "").strip().lower() not in {"1", "true", "yes", "on"}


def missing_message(spec: DatasetSpec, reason: str) -> str:
    """The error text when no files are found: what to put where, and where to get it."""
    data = paths.data_dir()
    target = f"$PAPERLIB_DATA/{spec.name}/ (now {data / spec.name})" if data else f"$PAPERLIB_DATA/{spec.name}/ (PAPERLIB_DATA is not set)"
    lines = [
        f"No files for dataset {spec.name!r} were found, and {reason}.",
        f"Put one of these file sets (plain or .gz) into {target} or into the cache folder "
        f"{paths.cache_dir() / spec.name}/:",
        *(f"  - {line}" for line in spec.accepted_files()),
        "The automatic download (checksum-verified, into the cache folder) fetches:",
        *(f"  - {d.url}  [{'sha256' if d.sha256 else 'md5'} {d.sha256 or d.md5}]" for d in spec.downloads),
        "Official source: " + ", ".join(spec.official_urls),
    ]
    return "\n".join(lines)


def file_digest(path: Path, algo: str) -> str:
    """Hex digest of a file's bytes (as stored, not decompressed)."""
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch(item: Download, folder: Path, timeout: float = TIMEOUT_S) -> Path:
    """Download ``item`` into ``folder``, verify its checksum, and return the final path.

    The bytes go to a hidden ``.part`` file in ``folder`` and are renamed only once the checksum
    matches; on a mismatch or a failed transfer the partial file is deleted.

    Raises:
        DownloadError: the server could not be reached or answered with an error.
        DataError: the checksum did not match (the message names expected and actual hash).
    """
    folder.mkdir(parents=True, exist_ok=True)
    algo, expected = ("sha256", item.sha256) if item.sha256 else ("md5", item.md5)
    digest = hashlib.new(algo)
    final = folder / item.filename
    try:
        # the bytes go to a hidden temporary file, renamed to ``final`` only if the checksum matches
        with atomic_write(final, "wb") as out:
            request = urllib.request.Request(item.url, headers={"User-Agent": "paperlib (ssm4rec companion)"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total, unit="B", unit_scale=True, desc=item.filename, disable=not progress_enabled(),
                    leave=False,
                ) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            actual = digest.hexdigest()
            if actual != expected:
                raise DataError(
                    f"checksum mismatch for {item.url}: expected {algo} {expected}, got {actual}. The download "
                    f"was deleted. Retry; if it persists the file at the source changed: get the original by "
                    f"hand and put it in {folder}/."
                )
    except (urllib.error.URLError, OSError, ValueError) as err:  # URLError/HTTPError/timeouts are OSErrors
        if isinstance(err, DataError):
            raise
        reason = getattr(err, "reason", err)
        raise DownloadError(f"could not download {item.url}: {reason}") from err
    return final


def download_dataset(name: str, folder: Path | None = None) -> Path:
    """Fetch every download of ``name`` not yet in ``folder`` (default: the cache); return the folder."""
    spec = get_spec(name)
    folder = folder or paths.cache_dir() / name
    for item in spec.downloads:
        if resolve_file(folder, FileSpec(item.filename, "")) is None:
            fetch(item, folder)
    return folder


def locate(name: str, download: bool | None = None) -> Located:
    """Find ``name``'s files: ``$PAPERLIB_DATA/<name>/``, the cache, then a download into the cache.

    Args:
        name: registry key.
        download: allow the download step; None means "unless ``PAPERLIB_OFFLINE=1``".

    Raises:
        DataError: unknown name, checksum mismatch, or no files and no download (the message lists
            the accepted files, the folders to put them in and the URLs).
    """
    spec = get_spec(name)
    for folder in search_folders(name):
        found = find_layout(spec, folder)
        if found is not None:
            return found
    if not download_allowed(download):
        raise DataError(missing_message(spec, "downloads are off (PAPERLIB_OFFLINE=1 or download=False)"))
    try:
        folder = download_dataset(name)
    except DownloadError as err:
        raise DataError(missing_message(spec, f"the download failed: {err}")) from err
    found = find_layout(spec, folder)
    if found is None:  # a registry error: the downloads do not make up a layout
        raise DataError(missing_message(spec, f"the downloaded files in {folder} do not form an accepted layout"))
    return found

