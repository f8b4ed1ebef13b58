"""The work store of ``mme poison``: the clean train split, memory-mapped on disk.

:func:`load_pairs` streams the clean shards into it once (pixels at the working size, every
caption's tokens, the per-image trigger places of ``trigger_position: random``); other ranks
:func:`open_store` it. :func:`init_state` draws a fresh start (zero noise, random triggers, the
protected subset); :func:`check_disk` stops a run whose store would not fit.
"""

from __future__ import annotations

import shutil
import sys
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mme import distributed, imageops, shards
from mme.config import ConfigError, PoisonConfig
from mme.manifest import read_manifest
from mme.protection.methods.store import PairStore
from mme.protection.methods.triggers import candidate_mask, token_offsets, word_mask
from mme.protection.pools import PixelDecoder

TOKENS = "tokens_i32.bin"  # (Ncap, L) int32, raw: every caption's token ids, row-major


LOAD_CHUNK = 1024  # images tokenized at once: bounds the host memory of the load pass


def load_pairs(cfg: PoisonConfig, work: Path, tokenizer: Any, size: int) -> PairStore:
    """Stream the clean train split into the memmapped store (pixels + caption tokens).

    Host memory stays flat in the dataset size: pixels go straight to the memmap (decoded by
    ``write_workers`` processes), caption tokens are appended to an int32 file in chunks and
    memory-mapped back; only the per-image caption offsets (8 bytes an image) stay in memory.
    Ids and captions are read again when writing."""
    n = read_manifest(cfg.clean).images("train")
    clean, _ = PairStore.open_arrays(work, n, size, imageops.noise_dtype(cfg.epsilon))
    offsets = np.zeros(n + 1, dtype=np.int64)
    pending: list[str] = []
    places = TriggerPlaces(cfg, tokenizer, n) if random_places(cfg) else None
    i = -1
    with open(work / TOKENS, "wb") as tok_file, PixelDecoder(clean, cfg.write_workers) as pixels:
        it = shards.iter_samples(cfg.clean, "train")
        for i, s in enumerate(tqdm(it, total=n, desc="load", unit="img", file=sys.stderr)):
            if i >= n:
                break
            pixels.add(i, s.image_bytes)
            if places is not None:
                places.add(i, s.captions)
            offsets[i + 1] = offsets[i] + len(s.captions)
            pending.extend(s.captions)
            if (i + 1) % LOAD_CHUNK == 0:
                tok_file.write(tokenizer(pending).numpy().astype(np.int32).tobytes())
                pending = []
        if pending:
            tok_file.write(tokenizer(pending).numpy().astype(np.int32).tobytes())
    if i + 1 != n:
        raise ConfigError(f"{cfg.clean}: manifest lists {n} train images, shards hold {i + 1}")
    np.save(work / "cap_offsets.npy", offsets)
    if places is not None:
        places.save(work)
    return open_store(cfg, work, tokenizer, size, n)


def train_captions(clean: Path) -> list[list[str]]:
    """Every train image's captions, in the store's row order (method keyed's key words)."""
    return [s.captions for s in shards.iter_samples(clean, "train")]


def random_places(cfg: PoisonConfig) -> bool:
    return cfg.method == "mem" and cfg.trigger_position == "random"


class TriggerPlaces:
    """``trigger_position: random``: image ``i``'s trigger goes before word ``p_i`` of each of its
    captions, ``p_i`` uniform over the word boundaries where the trigger still fits in the
    context of every caption of it (``0 .. min words``), drawn once from the seed and kept for
    the whole run. Also records the token column of that boundary in each caption row."""

    def __init__(self, cfg: PoisonConfig, tokenizer: Any, n: int) -> None:
        self.tokenizer = tokenizer
        self.last_col = int(tokenizer.context_length) - 1 - cfg.trigger_len  # EOT after trigger
        self.u = np.random.default_rng([cfg.seed, 11]).random(n)  # one draw per image
        self.words = np.zeros(n, dtype=np.int32)
        self.cols = array("h")  # 2 bytes a caption: host memory stays small

    def add(self, i: int, captions: list[str]) -> None:
        offs = [token_offsets(self.tokenizer, c) for c in captions]
        fits = [sum(1 for t in o if t <= self.last_col) - 1 for o in offs]  # offsets increase
        top = max(0, min(fits, default=0))
        p = int(self.u[i] * (top + 1))
        self.words[i] = p
        self.cols.extend(min(o[min(p, len(o) - 1)], self.last_col) for o in offs)

    def save(self, work: Path) -> None:
        np.save(work / "trigger_word.npy", self.words)
        np.save(work / "trigger_col.npy", np.frombuffer(self.cols, dtype=np.int16))


def caption_vocab(store: PairStore, tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """(V,) bool: the tokens that occur as a whole word in the training captions (the token
    before them ends a word, or is the start token: "board" of "checkerboard" does not count);
    streamed in chunks of caption rows."""
    ends_word = np.zeros(vocab_size, dtype=bool)
    for tid, bpe in tokenizer.decoder.items():
        if tid < vocab_size:
            ends_word[tid] = bpe.endswith("</w>")
    ends_word[tokenizer.sot_token_id] = True
    seen = np.zeros(vocab_size, dtype=bool)
    for start in range(0, len(store.cap_tokens), 65536):
        rows = np.asarray(store.cap_tokens[start : start + 65536]).clip(0, vocab_size - 1)
        seen[np.unique(rows[:, 1:][ends_word[rows[:, :-1]]])] = True
    return torch.from_numpy(seen)


def trigger_vocabulary(cfg: PoisonConfig, store: PairStore, tokenizer: Any, v: int) -> torch.Tensor:
    """(V,) bool: the tokens HotFlip may choose (``poison.trigger_vocab``)."""
    if cfg.trigger_vocab == "any":
        return candidate_mask(tokenizer, v)
    allowed = word_mask(tokenizer, v, caption_vocab(store, tokenizer, v))
    if cfg.method == "mem" and int(allowed.sum()) < cfg.candidates:
        raise ConfigError(
            f"poison.trigger_vocab = words: the training captions hold {int(allowed.sum())}"
            f" usable words, fewer than poison.candidates = {cfg.candidates}"
        )
    return allowed


def open_store(cfg: PoisonConfig, work: Path, tokenizer: Any, size: int, n: int) -> PairStore:
    """The store :func:`load_pairs` wrote to ``work`` (other ranks open it once it is there)."""
    clean, noise = PairStore.open_arrays(work, n, size, imageops.noise_dtype(cfg.epsilon))
    offsets = torch.from_numpy(np.load(work / "cap_offsets.npy"))
    length = int(tokenizer.context_length)
    tokens = np.memmap(work / TOKENS, dtype=np.int32, mode="r", shape=(int(offsets[-1]), length))
    places = {}
    if random_places(cfg):
        for name in ("trigger_word", "trigger_col"):
            places[name] = torch.from_numpy(np.load(work / f"{name}.npy").astype(np.int64))
    return PairStore(
        clean=clean,
        noise=noise,
        current=0,
        cap_tokens=tokens,
        cap_offsets=offsets,
        triggers=torch.zeros(n, cfg.trigger_len, dtype=torch.long),
        protect=torch.ones(n, dtype=torch.bool),
        eot_id=tokenizer.eot_token_id,
        **places,
    )


def init_state(
    store: PairStore,
    cfg: PoisonConfig,
    allowed: torch.Tensor,
    world: distributed.World | None = None,
) -> None:
    """Fresh start: zero noise, random allowed triggers, the protected subset (all by seed).

    Every rank draws the same triggers and subset; only rank 0 writes the shared noise files."""
    world = world or distributed.World()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    if world.main:
        for buf in store.noise:
            buf[:] = 0
    pool = torch.nonzero(allowed).flatten()
    store.triggers = pool[torch.randint(len(pool), store.triggers.shape, generator=gen)]
    n_protect = max(1, round(cfg.protect_fraction * store.n))
    chosen = torch.randperm(store.n, generator=gen)[:n_protect]
    store.protect = torch.zeros(store.n, dtype=torch.bool)
    store.protect[chosen] = True
    if cfg.method == "random" and world.main:  # uniform integer noise in [-ε, ε], in [0, 255]
        # its own seed, from the OS unless given (poison draws it): a public or default seed
        # would let anyone regenerate the noise and subtract it
        gen = torch.Generator().manual_seed(_noise_seed(cfg))
        e = int(cfg.epsilon)
        for rows in torch.nonzero(store.protect).flatten().split(1024):
            r = rows.numpy()
            d = torch.randint(-e, e + 1, (len(r), *store.clean.shape[1:]), generator=gen)
            px = torch.from_numpy(store.clean[r].astype(np.int16))
            store.noise[0][r] = ((px + d).clamp(0, 255) - px).numpy()
    if world.active:
        store.noise[0].flush()
        distributed.barrier(world)


def _noise_seed(cfg: PoisonConfig) -> int:
    if cfg.noise_seed is None:
        raise ValueError("the random baseline needs poison.noise_seed (mme poison draws one)")
    return cfg.noise_seed


def store_bytes(cfg: PoisonConfig, n: int, size: int, context: int, n_captions: int) -> dict:
    """Bytes of the work store by part: clean pixels, two noise buffers, caption tokens."""
    px = n * 3 * size * size
    return {
        "pixels": px,
        "noise": 2 * px * imageops.noise_dtype(cfg.epsilon).itemsize,
        "tokens": n_captions * context * 4 + (n + 1) * 8,
    }


def check_disk(cfg: PoisonConfig, work: Path, n: int, size: int, context: int, resume: bool):
    """Report the store's size up front; stop before any work when its disk is too small."""
    caps = read_manifest(cfg.clean).splits["train"].captions or 5 * n
    need = store_bytes(cfg, n, size, context, int(caps))
    total = sum(need.values())
    have = sum(f.stat().st_size for f in work.iterdir() if f.is_file()) if resume else 0
    free = shutil.disk_usage(work).free
    gb = 1e9
    parts = ", ".join(f"{k} {v / gb:.2f}" for k, v in need.items())
    print(
        f"mme poison: work store {work}: {total / gb:.2f} GB ({parts}); {free / gb:.2f} GB free",
        file=sys.stderr,
    )
    if total - have > free:
        raise ConfigError(
            f"poison.work = {str(work)!r}: the store needs {total / gb:.2f} GB ({parts}) but"
            f" only {free / gb:.2f} GB is free there; give a local disk with room (--work)"
        )
