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
MAX_METADATA_LINE = 1 << 20  # one line (one image) of a published folder's metadata.jsonl
