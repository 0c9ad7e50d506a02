"""The dataset registry: which files make up each dataset, where they come from, how to check them.

Every dataset has a list of accepted **layouts** in priority order. A layout is the interactions
file plus the files that give item titles, each named with its reader format (see
``paperlib.data.readers``) and, where known, a checksum. The official format comes first, then the
community formats (SASRec pairs, S3-Rec/ICLRec one-user-a-line), then RecBole atomic files. A
gzipped and a plain copy of a file are both accepted (``foo.txt`` or ``foo.txt.gz``).

Checksums (all lowercase hex):

* ``sha256``: of the *decompressed* content (the file as its source publishes it);
* ``git_blob``: ``git hash-object`` of the decompressed content, where only that is known;
* ``md5``: of the file itself, for the GroupLens zips (GroupLens publishes ``<zip>.md5``).

Downloads (``DatasetSpec.downloads``) always carry a checksum; ``official_urls`` are listed for
reference and in error messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FileSpec", "TitleSource", "Layout", "Download", "DatasetSpec", "DATASETS"]


@dataclass(frozen=True)
class FileSpec:
    """One file of a layout.

    Attributes:
        name: file name inside ``<folder>/<dataset>/``; ``x`` also matches ``x.gz`` and vice versa
            (not for ``.zip``).
        fmt: reader format, a key of ``readers.INTERACTION_READERS`` or ``readers.TITLE_READERS``.
        member: path inside a zip archive (``name`` is then the ``.zip``), else None.
        sha256: sha256 of the decompressed content, if known.
        git_blob: git blob id of the decompressed content, if known.
        md5: md5 of the file itself (zips), if known.
    """

    name: str
    fmt: str
    member: str | None = None
    sha256: str | None = None
    git_blob: str | None = None
    md5: str | None = None

    def describe(self) -> str:
        """Human-readable name, e.g. ``ml-1m.zip (ml-1m/ratings.dat)``."""
        return f"{self.name} ({self.member})" if self.member else self.name


@dataclass(frozen=True)
class TitleSource:
    """Files that together give item titles keyed by the layout's raw item ids.

    Most sources are one file; ``p5-datamaps+recbole-item`` joins two (id -> ASIN -> title).
    """

    fmt: str
    files: tuple[FileSpec, ...]

    def describe(self) -> str:
        return " + ".join(f.describe() for f in self.files)


@dataclass(frozen=True)
class Layout:
    """An accepted set of files for a dataset.

    Attributes:
        name: short label, e.g. ``"official"``, ``"sasrec"``.
        interactions: the file with the (user, item[, timestamp]) interactions; required.
        titles: alternative title sources in priority order (optional files: a layout is usable
            without them, ``load_titles`` then says which file is missing).
        note: where this format comes from.
    """

    name: str
    interactions: FileSpec
    titles: tuple[TitleSource, ...] = ()
    note: str = ""

    @property
    def files(self) -> tuple[FileSpec, ...]:
        """Every file the layout can use: the interactions file first, then the title files."""
        out = [self.interactions]
        for src in self.titles:
            out += [f for f in src.files if f not in out]
        return tuple(out)

    def describe(self) -> str:
        text = f"{self.name}: {self.interactions.describe()}"
        if self.titles:
            text += " (titles: " + " or ".join(s.describe() for s in self.titles) + ")"
        return text


@dataclass(frozen=True)
class Download:
    """A file fetched automatically into the cache, verified before it is kept.

    Exactly one of ``sha256`` / ``md5`` is set; it is the hash of the downloaded bytes.
    """

    url: str
    filename: str
    sha256: str | None = None
    md5: str | None = None

    def __post_init__(self) -> None:
        if (self.sha256 is None) == (self.md5 is None):
            raise ValueError(f"download {self.url}: give exactly one of sha256 / md5")


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the project knows about one dataset.

    Attributes:
        name: registry key, also the folder name under ``$PAPERLIB_DATA`` and the cache.
        description: one line for tables and ``paperlib list``.
        max_len: maximum history length the models see (Mamba4Rec: 200 ML, 50 Amazon).
        kcore: k of the iterative k-core filter on users and items (RecBole ``[k,inf)``).
        citation: what to cite and the terms of use.
        layouts: accepted file layouts, in priority order.
        downloads: files fetched into the cache when nothing is found locally.
        official_urls: the publisher's URLs, for reference and error messages.
    """

    name: str
    description: str
    max_len: int
    kcore: int
    citation: str
    layouts: tuple[Layout, ...]
    downloads: tuple[Download, ...]
    official_urls: tuple[str, ...] = field(default=())

    def accepted_files(self) -> list[str]:
        """One line per layout naming its files, for error messages."""
        return [layout.describe() for layout in self.layouts]


# --------------------------------------------------------------------------------------------
# MovieLens

_GROUPLENS = "https://files.grouplens.org/datasets/movielens"
_ML_TERMS = (
    "F. M. Harper, J. A. Konstan, 'The MovieLens Datasets: History and Context', ACM TiiS 5(4), "
    "2015, doi:10.1145/2827872. Terms (GroupLens README): research use only, no redistribution "
    "without permission, no commercial use."
)

_ML1M_MOVIES = FileSpec(
    "movies.dat", "ml1m-movies", sha256="0140fc2356357c1a851d0f52e893a1e4d3696df632c4141cea8d5bc3d621f0b9"
)
_ML1M_ZIP_MD5 = "c4d9eecfca2ab87c1945afe126590906"

ML_1M = DatasetSpec(
    name="ml-1m",
    description="MovieLens 1M: 1,000,209 ratings of 3,706 movies by 6,040 users (GroupLens, 2003)",
    max_len=200,
    kcore=5,
    citation=_ML_TERMS,
    layouts=(
        Layout(
            "official",
            FileSpec("ratings.dat", "ml1m-ratings", git_blob="77a7c4b150f588c23bb9e1f068aa996c0b413695"),
            (TitleSource("ml1m-movies", (_ML1M_MOVIES,)),),
            note="GroupLens ml-1m.zip, extracted",
        ),
        Layout(
            "official-zip",
            FileSpec("ml-1m.zip", "ml1m-ratings", member="ml-1m/ratings.dat", md5=_ML1M_ZIP_MD5),
            (
                TitleSource(
                    "ml1m-movies", (FileSpec("ml-1m.zip", "ml1m-movies", member="ml-1m/movies.dat", md5=_ML1M_ZIP_MD5),)
                ),
            ),
            note="GroupLens ml-1m.zip as downloaded",
        ),
        Layout(
            "sequences",
            FileSpec(
                "ml-1m_sequences.txt.gz",
                "sasrec-pairs",
                sha256="41a314c194a8e7e282088f90f8e6b70fc075d63ce72f969745bc8945155c11e8",
            ),
            (TitleSource("ml1m-movies", (_ML1M_MOVIES,)),),
            note="one 'user movie' pair a line in time order, original ids (derived from a community preprocessing)",
        ),
        Layout(
            "recbole",
            FileSpec("ml-1m.inter", "recbole-inter"),
            (
                TitleSource("recbole-item", (FileSpec("ml-1m.item", "recbole-item"),)),
                TitleSource("ml1m-movies", (_ML1M_MOVIES,)),
            ),
            note="RecBole atomic files",
        ),
    ),
    downloads=(Download(f"{_GROUPLENS}/ml-1m.zip", "ml-1m.zip", md5=_ML1M_ZIP_MD5),),
    official_urls=(f"{_GROUPLENS}/ml-1m.zip", f"{_GROUPLENS}/ml-1m.zip.md5"),
)

_ML100K_ZIP_MD5 = "0e33842e24a9c977be4e0107933c0723"
_ML100K_UITEM = FileSpec(
    "u.item", "ml100k-uitem", sha256="553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701"
)

ML_100K = DatasetSpec(
    name="ml-100k",
    description="MovieLens 100K: 100,000 ratings of 1,682 movies by 943 users (GroupLens, 1998)",
    max_len=200,
    kcore=5,
    citation=_ML_TERMS,
    layouts=(
        Layout(
            "official",
            FileSpec("u.data", "ml100k-udata", sha256="06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"),
            (TitleSource("ml100k-uitem", (_ML100K_UITEM,)),),
            note="GroupLens ml-100k.zip, extracted",
        ),
        Layout(
            "official-zip",
            FileSpec("ml-100k.zip", "ml100k-udata", member="ml-100k/u.data", md5=_ML100K_ZIP_MD5),
            (
                TitleSource(
                    "ml100k-uitem",
                    (FileSpec("ml-100k.zip", "ml100k-uitem", member="ml-100k/u.item", md5=_ML100K_ZIP_MD5),),
                ),
            ),
            note="GroupLens ml-100k.zip as downloaded",
        ),
        Layout(
            "recbole",
            FileSpec("ml-100k.inter", "recbole-inter"),
            (
                TitleSource("recbole-item", (FileSpec("ml-100k.item", "recbole-item"),)),
                TitleSource("ml100k-uitem", (_ML100K_UITEM,)),
            ),
            note="RecBole atomic files",
        ),
    ),
    downloads=(Download(f"{_GROUPLENS}/ml-100k.zip", "ml-100k.zip", md5=_ML100K_ZIP_MD5),),
    official_urls=(f"{_GROUPLENS}/ml-100k.zip", f"{_GROUPLENS}/ml-100k.zip.md5"),
)

# --------------------------------------------------------------------------------------------
# Amazon reviews 2014 (McAuley lab)
#
# Decision: the official 2014 files (snap.stanford.edu / jmcauley.ucsd.edu) have no published
# checksum, so the automatic download cannot verify them. It fetches instead the community copies
# whose exact content is pinned by a git commit and by the sha256 of its decompressed content
# (the file exactly as that commit holds it): ICLRec's Beauty.txt with P5's
# datamaps.json + RecBole_SAE's Amazon_Beauty.item for titles, and SASRec's Video.txt. Their
# iterative 5-core equals the official reviews_*_5 5-core (README, "Verified"). The official files
# are still accepted when a user puts them in $PAPERLIB_DATA/<dataset>/ and are listed below.

_SNAP = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
_MCAULEY = "https://jmcauley.ucsd.edu/data/amazon/links.html"
_GH = "https://raw.githubusercontent.com"
_AMAZON_TERMS = (
    "R. He, J. McAuley, 'Ups and downs: Modeling the visual evolution of fashion trends with "
    "one-class collaborative filtering', WWW 2016; J. McAuley, C. Targett, Q. Shi, A. van den Hengel, "
    "'Image-based recommendations on styles and substitutes', SIGIR 2015. Terms: research use."
)

_BEAUTY_TXT_SHA = "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8"
_BEAUTY_DATAMAPS_SHA = "715ab04838ff1ba21238475ed453a89e8c30aa6214b904d27a79e4168fc7b612"
_BEAUTY_ITEM_SHA = "e56c8cbc404b0d82bc30ce9f063e06c0e93615c859c9ca9a522c669d79b74478"
_BEAUTY_META = FileSpec("meta_Beauty.json.gz", "amazon-meta")
_BEAUTY_RECBOLE_ITEM = FileSpec("Amazon_Beauty.item", "recbole-item", sha256=_BEAUTY_ITEM_SHA)

AMAZON_BEAUTY = DatasetSpec(
    name="amazon-beauty",
    description="Amazon Beauty 2014, 5-core: 198,502 reviews of 12,101 products by 22,363 users",
    max_len=50,
    kcore=5,
    citation=_AMAZON_TERMS
    + " Community format: S3-Rec (Zhou et al., CIKM 2020) / ICLRec (Chen et al., WWW 2022); titles via P5 (Geng et al., RecSys 2022).",
    layouts=(
        Layout(
            "official",
            FileSpec("reviews_Beauty_5.json.gz", "amazon-reviews"),
            (TitleSource("amazon-meta", (_BEAUTY_META,)),),
            note="McAuley lab 2014 5-core reviews and metadata",
        ),
        Layout(
            "sequences",
            FileSpec("Beauty.txt", "user-sequences", sha256=_BEAUTY_TXT_SHA),
            (
                TitleSource(
                    "beauty-titles-tsv",
                    (
                        FileSpec(
                            "beauty_item_titles.tsv",
                            "beauty-titles-tsv",
                            sha256="1937a7a1fe3be4a99a929e89565471ed2d685bec133a6da7f3c7d88bdb613f5b",
                        ),
                    ),
                ),
                TitleSource(
                    "p5-datamaps+recbole-item",
                    (FileSpec("datamaps.json", "p5-datamaps", sha256=_BEAUTY_DATAMAPS_SHA), _BEAUTY_RECBOLE_ITEM),
                ),
            ),
            note="S3-Rec/ICLRec one user a line; titles joined from P5 datamaps and RecBole item file",
        ),
        Layout(
            "recbole",
            FileSpec("Amazon_Beauty.inter", "recbole-inter"),
            (TitleSource("recbole-item", (_BEAUTY_RECBOLE_ITEM,)), TitleSource("amazon-meta", (_BEAUTY_META,))),
            note="RecBole atomic files (item ids are ASINs)",
        ),
        Layout(
            "recbole-alt",
            FileSpec("amazon-beauty.inter", "recbole-inter"),
            (TitleSource("recbole-item", (FileSpec("amazon-beauty.item", "recbole-item"),)),),
            note="RecBole atomic files named after the registry key",
        ),
    ),
    downloads=(
        Download(
            f"{_GH}/salesforce/ICLRec/2890e6c3ff6a22c6699fc19cb863b66786c1cde4/data/Beauty.txt",
            "Beauty.txt",
            sha256=_BEAUTY_TXT_SHA,
        ),
        Download(
            f"{_GH}/Wenyueh/LLM-RecSys-ID/2200ad9fef647ef755c01d6d7e5c5de3082606c5/data/beauty/datamaps.json",
            "datamaps.json",
            sha256=_BEAUTY_DATAMAPS_SHA,
        ),
        Download(
            f"{_GH}/parepic/RecBole_SAE/3a92f34eb0ffd107edc34d06066f58d0a2fa3fa6/dataset/Amazon_Beauty/Amazon_Beauty.item",
            "Amazon_Beauty.item",
            sha256=_BEAUTY_ITEM_SHA,
        ),
    ),
    official_urls=(f"{_SNAP}/reviews_Beauty_5.json.gz", f"{_SNAP}/meta_Beauty.json.gz", _MCAULEY),
)

_VIDEO_TXT_SHA = "b7376fe24430743f411dc7f567285657b2adb3f74361cc7ba0aee94f3024b651"

AMAZON_VIDEO_GAMES = DatasetSpec(
    name="amazon-video-games",
    description="Amazon Video Games 2014, 5-core: 231,780 reviews of 10,672 products by 24,303 users",
    max_len=50,
    kcore=5,
    citation=_AMAZON_TERMS + " Community format: SASRec (Kang, McAuley, ICDM 2018) 'Games'.",
    layouts=(
        Layout(
            "official",
            FileSpec("reviews_Video_Games_5.json.gz", "amazon-reviews"),
            (TitleSource("amazon-meta", (FileSpec("meta_Video_Games.json.gz", "amazon-meta"),)),),
            note="McAuley lab 2014 5-core reviews and metadata",
        ),
        Layout(
            "sasrec",
            FileSpec("Video.txt", "sasrec-pairs", sha256=_VIDEO_TXT_SHA),
            (),  # no item -> ASIN map exists for these ids, hence no titles
            note="SASRec 'user item' pairs in time order (single-pass filter; iterative 5-core = official)",
        ),
        Layout(
            "recbole",
            FileSpec("Amazon_Video_Games.inter", "recbole-inter"),
            (
                TitleSource("recbole-item", (FileSpec("Amazon_Video_Games.item", "recbole-item"),)),
                TitleSource("amazon-meta", (FileSpec("meta_Video_Games.json.gz", "amazon-meta"),)),
            ),
            note="RecBole atomic files (item ids are ASINs)",
        ),
        Layout(
            "recbole-alt",
            FileSpec("amazon-video-games.inter", "recbole-inter"),
            (TitleSource("recbole-item", (FileSpec("amazon-video-games.item", "recbole-item"),)),),
            note="RecBole atomic files named after the registry key",
        ),
    ),
    downloads=(
        Download(
            f"{_GH}/kang205/SASRec/e3738967fddab206d6eeb4fda433e7a7034dd8b1/data/Video.txt",
            "Video.txt",
            sha256=_VIDEO_TXT_SHA,
        ),
    ),
    official_urls=(f"{_SNAP}/reviews_Video_Games_5.json.gz", f"{_SNAP}/meta_Video_Games.json.gz", _MCAULEY),
)

#: Registry key -> spec. Keys are also the folder names under $PAPERLIB_DATA and the cache.
DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (ML_1M, ML_100K, AMAZON_BEAUTY, AMAZON_VIDEO_GAMES)}
