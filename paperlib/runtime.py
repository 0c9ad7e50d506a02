"""Small pieces every part of the project shares: atomic file writes, the progress switch, and the
run keys that tell a resumable run apart from any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

PACKAGE_DIR = Path(__file__).resolve().parent

#: the code that shapes a trained model or its metrics: models, trainer, batches, data processing,
#: metrics, adaptive optimizers and batch-size controllers (paths relative to the package)
TRAINING_CODE: tuple[str, ...] = (
    "models/*.py", "train.py", "data/sequences.py", "data/process.py", "metrics.py", "adaptive/*.py",
)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path`` in one
    rename, so a crash or an exception never leaves half a file (and never clobbers the old one).

    >>> with atomic_write("out.json") as fh:
    ...     fh.write("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def progress_enabled(progress: bool = True) -> bool:
    """Whether to show progress bars: ``progress`` and not silenced by ``TQDM_DISABLE`` (any value
    but empty, 0, false, no or off silences them, as tqdm itself reads it)."""
    return progress and os.environ.get("TQDM_DISABLE", "").strip().lower() in ("", "0", "false", "no", "off")


def code_fingerprint(patterns: Iterable[str] = TRAINING_CODE) -> str:
    """SHA-1 over the source files matching ``patterns`` (globs relative to the package), in a
    fixed order: any edit to the code that shapes a run changes it."""
    digest = hashlib.sha1()
    for pattern in patterns:
        for f in sorted(PACKAGE_DIR.glob(pattern)):
            digest.update(f.relative_to(PACKAGE_DIR).as_posix().encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()


def run_key(*parts: Any, code: Iterable[str] = TRAINING_CODE) -> str:
    """A short key naming one exact run: the JSON of ``parts`` (configs, seed, dataset size…) and
    the fingerprint of the code that shapes it. Checkpoints live under it, so a resumed run never
    continues a run of other settings or other code."""
    text = json.dumps([list(parts), code_fingerprint(code)], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]
