"""Caps on what mme reads from untrusted input: one place for every byte and length limit.

Each cap is far above what real image-caption data needs (a 24-megapixel JPEG is ~10 MB, a
long alt-text a few hundred characters) and far below what exhausts memory.
"""

from __future__ import annotations

MAX_FILE_BYTES = 128 << 20  # one image file, or one member of a tar
MAX_CAPTION_FILE_BYTES = 1 << 20  # one folder-source .txt (all captions of an image)
MAX_CAPTION_CHARS = 2000  # one caption, after whitespace is normalised
MAX_CSV_FIELD = 1 << 20  # one CSV cell (Python's default, 128 KiB, breaks on long cells)
MAX_MEMBER_NAME = 1024  # one tar member name
MAX_PIXELS = 89_478_485  # one decoded image of a shard (PIL's own decompression-bomb limit)
MAX_METADATA_LINE = 1 << 20  # one line (one image) of a published folder's metadata.jsonl
# corpus statistics of mme attack's detectors (mme/countermeasures/detect.py): distinct
# lower-cased words and word pairs of one split. Flickr8K's train split (29,995 captions) has
# 7,707 and 59,872, held in 6.4 MiB (~112 bytes per pair, tracemalloc): the pair cap is ~450 MiB
MAX_CORPUS_WORDS = 1_000_000
MAX_CORPUS_BIGRAMS = 4_000_000
MAX_CORPUS_CAPTIONS = 50_000_000  # detect-ngram keeps one 4-byte window start per caption
