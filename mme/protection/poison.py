"""``mme poison``: protect the train split of a clean shard folder (MEM or a baseline).

Two outputs, kept apart by design (see docs/threat-model.md):

- PUBLIC ``cfg.out``: protected ``train-*.tar`` shards with the clean ids (image = clip(x + δ) as
  PNG at the working resolution, captions = trigger words + caption, metadata) and
  ``manifest.json``, written last, only after ``mme verify`` passed. Nothing in it gives back a
  clean pixel, and nothing in its metadata says which words are the trigger, where they sit,
  or which images carry noise (no ``shards.PRIVATE_META`` key, no seed).
- PRIVATE ``cfg.private``: ``noise.npy`` (int8 pixel units, row order = ``triggers.json["ids"]``;
  protected - noise = clean), ``triggers.json`` (which images are protected), ``grid.png``
  (clean | noise amplified | protected) and ``work/`` (memory-mapped pixels and noise, per-round
  checkpoints) until success, so ``--resume`` continues a killed run.

Both folders are locked for the run (a second ``mme poison`` on them stops at once) and must be
disjoint from each other and from the clean input, which is never modified.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from array import array
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mme import __version__, arguments, cpuisa, distributed, fsio, imageops, models, shards
from mme.app.api import make_callable
from mme.config import ConfigError, PoisonConfig, section_from_args
from mme.manifest import Manifest, read_manifest, write_manifest
from mme.protection.methods.mem import MEM, RoundHook
from mme.protection.methods.store import PairStore
from mme.protection.methods.triggers import (
    candidate_mask,
    protected_caption,
    token_offsets,
    trigger_text,
    word_mask,
)

CKPT = "checkpoint.pt"
TIMING_KEYS = ("round_seconds",)  # per-round stats that vary run to run: MLflow only
# settings that do not change the result: left out of the resume hash
NOT_IN_RESULT = {"device", "compile", "grid_samples", "shard_size", "write_workers"} | {
    "nproc",  # the resume check compares the world size itself
    "work",
}


OWNER = "mme poison"
PRIVATE_FILES = ("noise.npy", "triggers.json", "grid.png")


# trigger settings added after protected sets were published: at their defaults they are left
# out of the manifest and the resume hash, so a default run keeps the bytes it had before
LATER_DEFAULTS = {"trigger_position": "start", "trigger_vocab": "any"}


def at_later_defaults(cfg: PoisonConfig) -> set[str]:
    return {k for k, v in LATER_DEFAULTS.items() if getattr(cfg, k) == v}


def result_excluded(has_trigger: bool, cfg: PoisonConfig | None = None) -> set[str]:
    """Config keys the output manifest leaves out (see :func:`output_manifest`)."""
    # work, nproc: where the store lives and how many processes ran do not change the bytes
    # seed: with it, the protected subset and the trigger positions can be recomputed
    keys = {"private", "write_workers", "work", "nproc", "seed"}
    keys |= at_later_defaults(cfg) if cfg is not None else set(LATER_DEFAULTS)
    return keys | (set() if has_trigger else {"trigger_len", *LATER_DEFAULTS})


def work_dir(cfg: PoisonConfig) -> Path:
    """The memory-mapped store and checkpoints: ``<private>/work``, or a subfolder of
    ``poison.work`` (e.g. a local NVMe disk) named after the private folder, so that the run
    only ever creates and removes its own folder there."""
    if cfg.work is None:
        return Path(cfg.private) / "work"
    key = hashlib.sha256(str(Path(cfg.private).resolve()).encode()).hexdigest()[:12]
    return Path(cfg.work) / f"mme-poison-{key}"


def check_inputs(cfg: PoisonConfig) -> Manifest:
    """Fail before any work on a bad model name or a missing/empty clean dataset."""
    try:
        models.check_model_name(cfg.model)
    except ValueError as err:
        raise ConfigError(f"poison.model = {cfg.model!r}: {err}") from None
    try:
        manifest = read_manifest(cfg.clean)
    except FileNotFoundError as err:
        raise ConfigError(f"poison.clean = {str(cfg.clean)!r}: {err}") from None
    if manifest.images("train") == 0:
        raise ConfigError(f"poison.clean = {str(cfg.clean)!r}: the train split has no images")
    try:  # inputs are never modified, and public and private files never mix
        fsio.check_disjoint(cfg.out, {"clean input": cfg.clean}, "poison.out")
        fsio.check_disjoint(cfg.private, {"clean input": cfg.clean}, "poison.private")
        fsio.check_disjoint(cfg.out, {"private folder": cfg.private}, "poison.out")
        if cfg.work is not None:  # the store holds clean pixels: never inside the public folder
            others = {"clean input": cfg.clean, "public folder": cfg.out}
            fsio.check_disjoint(cfg.work, others, "poison.work")
    except fsio.UnsafePath as err:
        raise ConfigError(str(err)) from None
    return manifest


# The loop runs with exactly ``poison.threads`` torch threads: CPU kernels split reductions by
# thread count (e.g. LayerNorm's weight/bias gradients are summed one partial per thread), so
# the surrogate's weights, and through them every PGD sign and HotFlip choice, would drift with
# OMP_NUM_THREADS or the core count. A fixed count gives the same bytes on any machine with the
# same CPU instruction set (docs/orchestration.md, "Reproducibility").
fixed_threads = models.torch_threads


def config_hash(cfg: PoisonConfig) -> str:
    """Hash of what determines the result (a resumed run must match it)."""
    exclude = NOT_IN_RESULT | {"out", "private"} | at_later_defaults(cfg)
    keep = cfg.model_dump(mode="json", exclude=exclude)
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


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


def _decode_rows(job: tuple[Any, int, list[bytes]]) -> None:
    """Decode images to the working size into rows ``start:start + len(blobs)`` of the store."""
    ref, start, blobs = job
    clean = np.load(ref, mmap_mode="r+") if isinstance(ref, str) else ref
    size = clean.shape[-1]
    for k, blob in enumerate(blobs):
        clean[start + k] = imageops.to_working_resolution(blob, size)
    if isinstance(ref, str):
        clean.flush()


class PixelDecoder:
    """Decodes images into the clean memmap in chunks: in this process (``workers`` 1) or in a
    pool (0: one process per core), with a bounded number of chunks in flight. The same
    function decodes every image either way, so the store is the same."""

    def __init__(self, clean: np.ndarray, workers: int) -> None:
        self.clean, self.workers = clean, workers or os.cpu_count() or 1
        self.start, self.blobs, self.inflight = 0, [], []
        self.pool = ProcessPoolExecutor(self.workers) if self.workers > 1 else None
        self.ref = _array_ref(clean) if self.pool else clean

    def add(self, i: int, blob: bytes) -> None:
        if not self.blobs:
            self.start = i
        self.blobs.append(blob)
        if len(self.blobs) == ENCODE_CHUNK:
            self._submit()

    def _submit(self) -> None:
        job = (self.ref, self.start, self.blobs)
        self.blobs = []
        if self.pool is None:
            return _decode_rows(job)
        self.inflight.append(self.pool.submit(_decode_rows, job))
        if len(self.inflight) > 2 * self.workers:  # bound the bytes waiting in memory
            self.inflight.pop(0).result()

    def __enter__(self) -> PixelDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.blobs and exc[0] is None:
            self._submit()
        for f in self.inflight:
            if exc[0] is None:
                f.result()
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        self.clean.flush()


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
        e = int(cfg.epsilon)
        for rows in torch.nonzero(store.protect).flatten().split(1024):
            r = rows.numpy()
            d = torch.randint(-e, e + 1, (len(r), *store.clean.shape[1:]), generator=gen)
            px = torch.from_numpy(store.clean[r].astype(np.int16))
            store.noise[0][r] = ((px + d).clamp(0, 255) - px).numpy()
    if world.active:
        store.noise[0].flush()
        distributed.barrier(world)


def save_checkpoint(
    work: Path,
    mem: MEM,
    store: PairStore,
    r: int,
    cfg: PoisonConfig,
    state: dict[str, Any] | None = None,
) -> None:
    ckpt = {
        "round": r,
        "config_hash": config_hash(cfg),
        "clean_manifest_sha256": shards.manifest_sha256(cfg.clean),
        "current": store.current,
        "triggers": store.triggers,
        "protect": store.protect,
        "mem": state if state is not None else mem.state(),
        "stats": mem.history,
    }
    if mem.world.active:  # per-rank EOT draws: resume with the same number of processes
        ckpt["world_size"] = mem.world.size
    with fsio.atomic_open(work / CKPT) as f:
        torch.save(ckpt, f)


def resume_from(work: Path, mem: MEM, store: PairStore, cfg: PoisonConfig) -> int:
    """Restore the last finished round; returns the round to start with."""
    path = work / CKPT
    if not path.exists():
        print(f"mme poison: --resume: no checkpoint in {work}, starting fresh", file=sys.stderr)
        return 0
    try:  # weights_only: tensors and plain containers only, a planted pickle runs no code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError, ...: all "not ours"
        msg = f"--resume: {path} is not a checkpoint mme can load safely: {err}"
        raise ConfigError(msg) from None
    if not isinstance(ckpt, dict) or ckpt.get("config_hash") != config_hash(cfg):
        raise ConfigError(f"--resume: {path} was made with other settings; remove it or match them")
    if ckpt.get("clean_manifest_sha256") != shards.manifest_sha256(cfg.clean):
        raise ConfigError(
            f"--resume: {path} was made from another version of {cfg.clean} (its manifest.json"
            " changed since): start afresh without --resume"
        )
    if ckpt.get("world_size", 1) != mem.world.size:
        raise ConfigError(
            f"--resume: {path} was made by {ckpt.get('world_size', 1)} process(es), this run has"
            f" {mem.world.size}: resume with the same torchrun --nproc_per_node"
        )
    store.current, store.triggers, store.protect = (
        ckpt["current"],
        ckpt["triggers"],
        ckpt["protect"],
    )
    mem.load_state(ckpt["mem"])
    mem.history = ckpt["stats"]
    return ckpt["round"] + 1


def run_rounds(
    mem: MEM,
    store: PairStore,
    cfg: PoisonConfig,
    start: int,
    on_round: RoundHook | None,
    work: Path,
) -> None:
    from mme.track import tracking

    rounds = range(start, cfg.rounds) if cfg.method != "random" else range(0)
    for r in tqdm(rounds, desc=f"{cfg.method} rounds", unit="round", file=sys.stderr):
        stats = mem.run_round(r)
        mem.history.append({"round": r, **stats})
        state = mem.state()  # every rank takes part (its EOT generator)
        if mem.world.main:  # one writer: the checkpoint and the log
            tracking.log_metrics(stats, step=r)
            save_checkpoint(work, mem, store, r, cfg, state)
        distributed.barrier(mem.world)  # a killed run resumes from a complete checkpoint
        tqdm.write(f"round {r}: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
        if on_round is not None:
            on_round(r, stats)


def write_outputs(
    cfg: PoisonConfig, store: PairStore, tokenizer: Any
) -> tuple[list[dict[str, Any]], int]:
    """Protected shards, raw artifacts and the picture grid; returns the shard records.

    Ids, captions and source hashes are streamed again from the clean shards (same order as
    :func:`load_pairs`) rather than kept in memory for the whole run."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    noise = store.noise[store.current]
    texts = [trigger_text(tokenizer, t.tolist()) for t in store.triggers]
    writer = shards.ShardWriter(out, "train", cfg.shard_size)
    pngs = protected_pngs(store.clean, noise, workers=cfg.write_workers)
    grid_rows = set(grid_indices(cfg, store).tolist())
    ids, grid_caps = [], {}
    rows = tqdm(range(store.n), desc="write", unit="img", file=sys.stderr)
    for i, s in zip(rows, shards.iter_samples(cfg.clean, "train"), strict=True):
        prot = bool(store.protect[i])
        trig = texts[i] if prot and cfg.method == "mem" else ""
        word = trigger_word(store, i) if trig else 0
        png = next(pngs)
        size = store.clean.shape[-1]
        meta = {
            "id": s.id,
            "source": str(cfg.clean),
            "sha256": shards.sha256_bytes(png),
            "width": size,
            "height": size,
            "method": cfg.method,
            "epsilon": cfg.epsilon,
        }  # public: nothing that says which words are the trigger or which images carry noise
        caps = [protected_caption(trig, c, word) for c in s.captions]
        writer.write(shards.Sample(s.id, png, "png", caps, meta))
        ids.append(s.id)
        if i in grid_rows:
            grid_caps[i] = s.captions[0]
    records = writer.close()
    private = Path(cfg.private)
    with fsio.atomic_open(private / "noise.npy") as f:
        np.save(f, np.asarray(noise))
    trig_json = {
        "ids": ids,
        "protected": store.protect.tolist(),
        "trigger_ids": store.triggers.tolist() if cfg.method == "mem" else [],
        "trigger_text": texts if cfg.method == "mem" else [],
        "seed": cfg.seed,  # left out of the public manifest (see result_excluded)
    }
    if cfg.method == "mem" and store.trigger_word is not None:
        trig_json["trigger_word"] = store.trigger_word.tolist()  # word position in each caption
    fsio.write_json(private / "triggers.json", trig_json)
    write_grid(cfg, store, grid_caps, texts, noise)
    return records, writer.n_captions


def trigger_word(store: PairStore, i: int) -> int:
    """The word position of image ``i``'s trigger in its captions (0: first)."""
    return 0 if store.trigger_word is None else int(store.trigger_word[i])


ENCODE_CHUNK = 64  # images per task: large enough to amortise the hand-over, small to balance


def _array_ref(arr: np.ndarray) -> str | np.ndarray:
    """What a worker process needs to read ``arr``: its file for a memmap, else the array."""
    if isinstance(arr, np.memmap) and arr.filename:
        arr.flush()  # workers read the file: pending writes must be on it
        return str(arr.filename)
    return np.asarray(arr)


def _open_ref(ref: str | np.ndarray) -> np.ndarray:
    return np.load(ref, mmap_mode="r") if isinstance(ref, str) else ref


def _encode_chunk(job: tuple[Any, Any, int, int]) -> list[bytes]:
    """PNGs of protected images ``start:stop`` (clean + noise), in order."""
    clean_ref, noise_ref, start, stop = job
    clean, noise = _open_ref(clean_ref), _open_ref(noise_ref)
    return [
        shards.encode_png(imageops.apply_noise(clean[i], noise[i]).transpose(1, 2, 0))
        for i in range(start, stop)
    ]


def protected_pngs(clean: np.ndarray, noise: np.ndarray, workers: int = 0) -> Iterator[bytes]:
    """PNG bytes of ``clip(clean + noise)`` for every row, in row order.

    PNG encoding is the slow part of writing a protected set; ``workers`` processes (0: one per
    core; 1: in this process) encode chunks of rows in parallel. Each image is encoded by the same
    function either way, so the shards are byte-identical to a single-process run.
    """
    n = len(clean)
    workers = workers or os.cpu_count() or 1
    jobs = [(0, 0, s, min(s + ENCODE_CHUNK, n)) for s in range(0, n, ENCODE_CHUNK)]
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield from _encode_chunk((clean, noise, job[2], job[3]))
        return
    refs = _array_ref(clean), _array_ref(noise)
    with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
        for pngs in pool.map(_encode_chunk, [(*refs, s, e) for _, _, s, e in jobs]):
            yield from pngs


def grid_indices(cfg: PoisonConfig, store: PairStore) -> torch.Tensor:
    """Rows shown in ``grid.png``: the first protected images."""
    return torch.nonzero(store.protect).flatten()[: cfg.grid_samples]


def write_grid(
    cfg: PoisonConfig,
    store: PairStore,
    first_captions: dict[int, str],
    texts: list[str],
    noise: np.ndarray,
) -> Path:
    from mme.protection import grid

    rows = grid_indices(cfg, store).numpy()
    clean = np.asarray(store.clean[rows])
    prot = imageops.apply_noise(clean, np.asarray(noise[rows]))
    caps = [
        protected_caption(
            texts[r] if cfg.method == "mem" else "",
            first_captions[int(r)],
            trigger_word(store, int(r)),
        )
        for r in rows
    ]
    path = Path(cfg.private) / "grid.png"
    title = f"{cfg.method}, eps={cfg.epsilon:g}/255"
    grid.save_grid(path, clean, prot, caps, cfg.epsilon, title=title)
    return path


def poison(cfg: PoisonConfig, resume: bool = False, on_round: RoundHook | None = None) -> dict:
    """Protect ``cfg.clean``'s train split into ``cfg.out`` (public) and ``cfg.private``;
    returns the output manifest (``{}`` on ranks other than 0 under ``torchrun``)."""
    clean_manifest = check_inputs(cfg)
    world = distributed.init(models.resolve_device(cfg.device))
    distributed.note_nproc(world, cfg.nproc, "poison.nproc")
    if not world.main:  # rank 0 holds the locks and writes every output (mme/distributed.py)
        return _poison(cfg, clean_manifest, resume, on_round, world)
    try:
        with fsio.locked(cfg.out), fsio.locked(cfg.private):
            fsio.claim(cfg.out, OWNER)
            fsio.claim(cfg.private, OWNER)
            for name in PRIVATE_FILES:  # the old layout kept them here: never again
                (Path(cfg.out) / name).unlink(missing_ok=True)
            return _poison(cfg, clean_manifest, resume, on_round, world)
    except (fsio.FolderBusy, fsio.UnsafePath) as err:
        raise ConfigError(str(err)) from None


def prepare_work(cfg: PoisonConfig, resume: bool, world: distributed.World) -> Path:
    """Rank 0 empties (or, resuming, keeps) the work folder; the others wait for it."""
    work = work_dir(cfg)
    if world.main:
        if not resume and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
    distributed.barrier(world)
    return work


def _poison(
    cfg: PoisonConfig,
    clean_manifest: Manifest,
    resume: bool,
    on_round: RoundHook | None,
    world: distributed.World,
) -> dict:
    t0 = time.perf_counter()
    work = prepare_work(cfg, resume, world)
    torch.manual_seed(cfg.seed)  # surrogate init: same seed, same model on every rank
    device = distributed.device_for(world, models.resolve_device(cfg.device))
    if device.type == "cpu":
        cpuisa.check(cfg.cpu_isa)  # the instruction set is part of the bytes, like the threads
    model, tokenizer = models.create_model(cfg.model, cfg.pretrained, device)
    size = models.image_size(model)
    n = clean_manifest.images("train")
    if world.main:
        check_disk(cfg, work, n, size, tokenizer.context_length, resume)
        store = load_pairs(cfg, work, tokenizer, size)
    distributed.barrier(world)
    if not world.main:
        store = open_store(cfg, work, tokenizer, size, n)
    allowed = trigger_vocabulary(cfg, store, tokenizer, model.token_embedding.num_embeddings)
    mem = MEM(model, store, cfg, device, allowed, world=world)
    start = resume_from(work, mem, store, cfg) if resume else 0
    if start == 0:
        init_state(store, cfg, allowed, world)
    if not world.main:
        with fixed_threads(cfg.threads):
            run_rounds(mem, store, cfg, start, on_round, work)
        distributed.barrier(world)  # rank 0 writes the outputs from here on
        return {}
    return _rounds_and_outputs(cfg, clean_manifest, mem, store, tokenizer, start, on_round, t0)


def _rounds_and_outputs(
    cfg: PoisonConfig,
    clean_manifest: Manifest,
    mem: MEM,
    store: PairStore,
    tokenizer: Any,
    start: int,
    on_round: RoundHook | None,
    t0: float,
) -> dict:
    """Rank 0 (or the only process): the rounds, then the outputs, tracked in one MLflow run."""
    from mme.track import tracking

    work = work_dir(cfg)
    params = poison_params(cfg)
    with tracking.start_run(tracking.experiment_name(), f"poison-{cfg.method}", params):
        with fixed_threads(cfg.threads):  # the bytes must not depend on the machine's cores
            run_rounds(mem, store, cfg, start, on_round, work)
        distributed.barrier(mem.world)  # the other ranks are done with the store
        t_gen = time.perf_counter() - t0
        # while shards are being replaced no manifest may describe the folder
        (Path(cfg.out) / "manifest.json").unlink(missing_ok=True)
        records, n_captions = write_outputs(cfg, store, tokenizer)
        manifest = output_manifest(cfg, clean_manifest, store, records, n_captions, mem)
        # the manifest is what makes the folder a dataset: written last, only once verified
        manifest["verify"] = verify_outputs(cfg, manifest)
        write_manifest(cfg.out, manifest)
        seconds = {"seconds_generation": t_gen, "seconds_total": time.perf_counter() - t0}
        log_outputs(cfg, manifest, seconds)
    shutil.rmtree(work)
    print(
        f"mme poison: {cfg.out}: {manifest['n_protected']} of {store.n} images protected"
        f" ({cfg.method}, eps {cfg.epsilon:g}/255) in {seconds['seconds_total']:.0f} s;"
        f" private files (never publish): {cfg.private}",
        file=sys.stderr,
    )
    return manifest


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


def poison_params(cfg: PoisonConfig) -> dict[str, Any]:
    """MLflow params, with the project-wide names (``method``, ``epsilon``, ``trigger_len``,
    ``data_manifest_sha256``: the clean input's version, as its victim's train run logs it)."""
    return {
        "stage": "poison",
        "method": cfg.method,
        "epsilon": cfg.epsilon,
        "step_size": cfg.step_size,
        "pgd_steps": cfg.pgd_steps,
        "rounds": cfg.rounds,
        "surrogate_steps": cfg.surrogate_steps,
        "trigger_len": cfg.trigger_len if cfg.method == "mem" else 0,
        "trigger_rounds": cfg.trigger_rounds,
        "candidates": cfg.candidates,
        "surrogate_model": cfg.model,
        "batch_size": cfg.batch_size,
        "protect_fraction": cfg.protect_fraction,
        "eot": ",".join(cfg.eot) if cfg.augment else "none",
        "eot_interpolation": cfg.eot_interpolation,
        "threads": cfg.threads,
        "cpu_isa": cfg.cpu_isa,
        "data_manifest_sha256": shards.manifest_sha256(cfg.clean),
    }


def output_manifest(
    cfg: PoisonConfig,
    clean_manifest: Manifest,
    store: PairStore,
    records: list[dict[str, Any]],
    n_captions: int,
    mem: MEM,
) -> dict[str, Any]:
    """The protected set's description. Only what the data depends on: no wall times, so the
    same inputs give the same bytes, hence the same dataset version (its sha256: what
    ``mme report`` and ``reevaluate`` key results on) and the same DVC hash downstream."""
    first = [t for t, p in zip(store.triggers.tolist(), store.protect.tolist(), strict=True) if p]
    has_trigger = cfg.method == "mem"
    return {
        "created_by": "mme poison",
        "version": __version__,
        # top level, read by mme train/evaluate to describe the data they ran on
        "method": cfg.method,
        "epsilon": cfg.epsilon,
        "trigger_len": cfg.trigger_len if cfg.method == "mem" else 0,
        **({"trigger_position": cfg.trigger_position} if random_places(cfg) else {}),
        # private: a local path, not data; write_workers: does not change the bytes; a baseline
        # has no trigger: its config must not name a second trigger_len
        "config": cfg.model_dump(mode="json", exclude=result_excluded(has_trigger, cfg)),
        "clean": str(cfg.clean),
        "clean_splits": {k: v.images for k, v in clean_manifest.splits.items()},
        "working_size": int(store.clean.shape[-1]),
        "n_protected": int(store.protect.sum()),
        "distinct_triggers": len({tuple(t) for t in first}) if cfg.method == "mem" else 0,
        "splits": {"train": {"images": store.n, "captions": n_captions, "shards": records}},
        "rounds": [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in mem.history],
    }


def verify_outputs(cfg: PoisonConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """Run ``mme verify`` (noise and trigger checks included) on the fresh output before its
    manifest exists; a violation here is a bug, so it stops the run with no manifest written."""
    from mme.protection.verify import verify

    report = verify(
        cfg.clean, cfg.out, private=cfg.private, manifest=manifest, workers=cfg.write_workers
    )
    if not report.ok:
        raise RuntimeError(f"protected set failed verification:\n{report.table()}")
    d = report.to_dict()
    return {k: d[k] for k in ("ok", "max_linf", "n_checked", "n_with_noise", "psnr", "ssim")}


def log_outputs(cfg: PoisonConfig, manifest: dict, seconds: dict[str, float]) -> None:
    """Summary metrics (wall times: here and on stderr only, see :func:`output_manifest`)."""
    from mme.track import tracking

    summary = manifest["verify"]
    metrics = seconds | {k: manifest[k] for k in ("n_protected", "distinct_triggers")}
    metrics |= {
        "verify_max_linf": summary["max_linf"],
        "verify_ok": float(summary["ok"]),
    }
    for q in ("psnr", "ssim"):
        if summary[q]["n"] and summary[q]["mean"] != "inf":
            metrics[f"verify_{q}_mean"] = summary[q]["mean"]
    tracking.log_metrics(metrics)
    tracking.log_artifact(Path(cfg.out) / "manifest.json")
    for name in ("grid.png", "triggers.json"):  # the tracking store is private too
        tracking.log_artifact(Path(cfg.private) / name)


add_arguments = arguments.poison  # flags live where --help needs no torch


def run(args: argparse.Namespace) -> int:
    poison(section_from_args("poison", args), resume=args.resume)
    return 0


make_callable(__name__)  # `mme.poison(...)` is the API function of mme/app/api.py
