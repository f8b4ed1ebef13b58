"""Readers for the non-synthetic data sources: CSV split files, image folders, WebDataset shards.

Each reader yields :class:`RawItem` s, one per image, in a deterministic order. Readers never
modify their input and never judge it: image bytes are read lazily by ``RawItem.load`` and captions
stay raw bytes, so that every problem (missing file, corrupt image, bad UTF-8, no caption) reaches
:mod:`mme.ingest.hygiene` and is counted there, rather than being silently dropped here.

Every input is treated as hostile: files are read only when they are plain files (no symlink,
FIFO or device; see :func:`mme.fsio.read_regular`) under a byte cap (:mod:`mme.limits`), tars are
opened uncompressed unless their name asks otherwise (``.tar.gz``, ``.tgz``), and a name or cell
that is not valid UTF-8 becomes an item whose loader raises ``Skip("invalid_name")``. Each such
problem is a counted skip of one item, never a crash, a hang or a read outside the input.

Item ids are WebDataset-safe keys (:func:`mme.shards.safe_key`) derived from the image name and
unique within one source. When two names map to the same key, the colliding ones get a longer
variant (the path, then the extension, then a short hash), so the ids of all other items do not
depend on which collisions happen to exist.
"""

from mme.ingest.sources.common import IMAGE_SUFFIXES, WDS_IMAGE_EXTS, RawItem, printable
from mme.ingest.sources.csvfile import iter_csv
from mme.ingest.sources.folder import iter_folder
from mme.ingest.sources.hf import iter_hf
from mme.ingest.sources.webdataset import iter_webdataset

__all__ = [
    "IMAGE_SUFFIXES",
    "WDS_IMAGE_EXTS",
    "RawItem",
    "iter_csv",
    "iter_folder",
    "iter_hf",
    "iter_webdataset",
    "printable",
]
