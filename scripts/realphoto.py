"""The real-photo efficacy table (issue 18): every cell a victim trained here, on the CPU.

    python scripts/realphoto.py --work /work/yard --jobs 2            # run what is missing
    python scripts/realphoto.py --work /work/yard --table-only        # rebuild the table

Setting (the "yardstick"): Flickr8K train (``../shared/data/flickr8k-train``, 5,999 photos) is
protected by each method of :data:`ROWS`; a data user may apply each countermeasure of
:data:`COLUMNS` to the published set; an ``mme-tiny-vit`` victim (64 px, 2 epochs, batch 128,
lr 1e-3) is trained on the result and judged on Flickr8K dev (1,000 photos). Two more victims
per row: a different architecture (``mme-tiny-rn``) and a victim pre-trained on the clean photos
of one half of the train split, then fine-tuned on the other half (protected, or clean for the
reference). "% of clean" = rsum/chance divided by that of the victim trained the same way on
clean data.

Every step is a command of ``mme`` run in its own process at one thread, ``--jobs`` at a time;
its output is kept under ``--work`` and a finished step is not run again (delete its folder to
redo it). Victims are keyed by the hash of the data they train on, so two columns that give the
same bytes (``oracle-strip`` on a method without trigger words) share one victim. Wall seconds
of every step go to ``<work>/realphoto.json`` with the cells; the Markdown table to
``--out`` (default ``reports/realphoto/table.md``) with the commit it was run at.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VICTIM = ["--epochs", "2", "--batch-size", "128", "--lr", "1e-3", "--threads", "1"]


def keyed_flags(rounds: int, surrogate_steps: int, pattern_steps: int) -> list[str]:
    """`mme poison` flags of a keyed row: its schedule, the rest as the keyed defaults."""
    return [
        *("--method", "keyed", "--model", "mme-tiny-vit", "--rounds", str(rounds)),
        *("--surrogate-steps", str(surrogate_steps), "--surrogate-lr", "0.001"),
        *("--pattern-steps", str(pattern_steps), "--pattern-grid", "16", "--pattern-lr", "0.05"),
        *("--pattern-init", "2", "--key-min-captions", "2", "--key-min-images", "auto"),
    ]


# name -> extra `mme poison` flags (on top of params.yaml's poison section); None: clean data
ROWS: dict[str, list[str] | None] = {
    "clean": None,
    # MEM as on main before issue 18 (params.yaml's profile then): T=3, M=40, H=2, k=3, start
    "mem": [
        "--method",
        "mem",
        "--model",
        "mme-tiny-vit",
        "--rounds",
        "3",
        "--surrogate-steps",
        "40",
        "--surrogate-lr",
        "0.001",
        "--trigger-len",
        "3",
        "--trigger-rounds",
        "2",
        "--candidates",
        "16",
        "--trigger-position",
        "start",
    ],
    # keyed (issue 18): captions unchanged, noise from per-word patterns; the research
    # prototype's best schedule (docs/research-log.md kem-g16r10): T=10, M=60, 40 pattern steps
    "keyed": keyed_flags(10, 60, 40),
    # keyed on the short schedule of params.yaml (make run) and of mme protect's cpu profile:
    # T=6, M=40, 30 pattern steps
    "keyed-fast": keyed_flags(6, 40, 30),
}


COLUMNS = [
    "none",
    "oracle-strip",
    "detect-trigger",
    "detect-ngram",
    "jpeg:75",
    "img2dataset",
    "iss",
]
PRIVATE_COLUMNS = {"oracle-strip"}
# image countermeasures also applied to the clean set: what each costs a victim by itself
CLEAN_COLUMNS = [
    "jpeg:75",
    "img2dataset",
    "iss",
]  # countermeasures that need the private folder (upper bounds)


@dataclass
class Job:
    name: str
    argv: list[str]
    done: Path  # exists when the job has finished
    deps: list[str] = field(default_factory=list)
    seconds: float | None = None


def mme(*args: str) -> list[str]:
    return [sys.executable, "-m", "mme", *args]


def data_key(folder: Path) -> str:
    """Hash of the train shards' hashes in ``folder``'s manifest: same bytes, same key."""
    manifest = json.loads((folder / "manifest.json").read_text())
    shas = [s["sha256"] for s in manifest["splits"]["train"]["shards"]]
    return hashlib.sha256("".join(shas).encode()).hexdigest()[:16]


def half_ids(ids: list[str], half: str) -> set[str]:
    """Half ``a`` or ``b`` of the ids, by a hash of each id (stable, about 50/50)."""
    pick = {i for i in ids if hashlib.sha256(i.encode()).digest()[0] % 2 == 0}
    return pick if half == "a" else set(ids) - pick


def write_half(src: Path, dst: Path, half: str) -> None:
    """The train split of ``src`` restricted to one half of the ids (same sample bytes)."""
    sys.path.insert(0, str(ROOT))
    from mme import shards
    from mme.manifest import write_manifest

    samples = list(shards.iter_samples(src, "train"))
    keep = half_ids([s.id for s in samples], half)
    writer = shards.ShardWriter(dst, "train", 500)
    for s in samples:
        if s.id in keep:
            writer.write(s)
    records = writer.close()
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["splits"] = {
        "train": {"images": writer.n_samples, "captions": writer.n_captions, "shards": records}
    }
    manifest["half"] = half
    write_manifest(dst, manifest)


class Table:
    def __init__(self, work: Path, rows: dict[str, list[str] | None], columns: list[str]):
        self.work, self.rows, self.columns = work, rows, columns
        self.jobs: dict[str, Job] = {}
        self.record_path = work / "realphoto.json"
        self.record = json.loads(self.record_path.read_text()) if self.record_path.exists() else {}
        self.record.setdefault("seconds", {})

    # -- paths -------------------------------------------------------------------------------
    @property
    def clean(self) -> Path:
        return self.work / "shards"

    def protected(self, row: str) -> Path:
        return self.clean if self.rows[row] is None else self.work / "prot" / row

    def attacked(self, row: str, col: str) -> Path:
        if col == "none":
            return self.protected(row)
        return self.work / "attacked" / row / col.replace(":", "")

    # -- jobs --------------------------------------------------------------------------------
    def add(self, job: Job) -> None:
        self.jobs[job.name] = job

    def plan(self) -> None:
        clean = self.clean
        if not (clean / "manifest.json").exists():
            self.add(
                Job(
                    "prepare",
                    mme(
                        "prepare",
                        "--params",
                        "none",
                        "--source",
                        "csv",
                        "--train-csv",
                        str(SHARED / "flickr8k-train" / "captions.csv"),
                        "--test-csv",
                        str(SHARED / "flickr8k-dev" / "captions.csv"),
                        "--out",
                        str(clean),
                        "--shard-size",
                        "500",
                    ),
                    clean / "manifest.json",
                )
            )
        for row, flags in self.rows.items():
            if flags is None:
                continue
            out = self.protected(row)
            self.add(
                Job(
                    f"poison/{row}",
                    mme(
                        "poison",
                        "--params",
                        str(ROOT / "params.yaml"),
                        "--clean",
                        str(clean),
                        "--out",
                        str(out),
                        "--private",
                        str(self.work / "priv" / row),
                        "--threads",
                        "1",
                        "--write-workers",
                        "1",
                        *flags,
                    ),
                    out / "manifest.json",
                    self.deps("prepare"),
                )
            )
            for col in self.columns:
                if col != "none":
                    self.add_attack(row, col, [f"poison/{row}"])
            self.add_native(row)
            for half in ("a", "b"):
                self.add_half(row, half)
        for half in ("a", "b"):
            self.add_half("clean", half)
        for col in set(CLEAN_COLUMNS) & set(self.columns):
            self.add_attack("clean", col, self.deps("prepare"))

    def add_native(self, row: str) -> None:
        """Issue 19: the set as a data owner publishes it (each photo at its own size, noise
        mapped onto it: ``mme export --native``), read back by ``prepare --source folder``."""
        folder, shards = self.work / "native" / row / "folder", self.native(row)
        export = mme(
            "export",
            "--protected",
            str(self.protected(row)),
            "--native",
            "--clean",
            str(self.clean),
            "--private",
            str(self.work / "priv" / row),
            "--format",
            "folder",
            "--out",
            str(folder),
        )
        prepare = mme(
            "prepare",
            "--params",
            "none",
            "--source",
            "folder",
            "--input",
            str(folder),
            "--out",
            str(shards),
            "--shard-size",
            "500",
        )
        self.add(
            Job(
                f"native/{row}",
                ["bash", "-c", f"{' '.join(export)} && {' '.join(prepare)}"],
                shards / "manifest.json",
                [f"poison/{row}"],
            )
        )

    def native(self, row: str) -> Path:
        return self.work / "native" / row / "shards"

    def add_attack(self, row: str, col: str, deps: list[str]) -> None:
        """``mme attack`` of ``col`` on ``row``'s published set (the clean set for ``clean``)."""
        dst = self.attacked(row, col)
        private = ["--private", str(self.work / "priv" / row)] if col in PRIVATE_COLUMNS else []
        argv = mme(
            "attack",
            "--params",
            "none",
            "--transform",
            col,
            "--protected",
            str(self.protected(row)),
            "--out",
            str(dst),
            *private,
        )
        self.add(Job(f"attack/{row}/{col}", argv, dst / "manifest.json", deps))

    def deps(self, *names: str) -> list[str]:
        return [n for n in names if n in self.jobs]

    def add_half(self, row: str, half: str) -> None:
        src, dst = self.protected(row), self.work / "halves" / f"{row}-{half}"
        dep = [] if self.rows.get(row) is None else [f"poison/{row}"]
        self.add(
            Job(
                f"half/{row}/{half}",
                [
                    sys.executable,
                    __file__,
                    "--work",
                    str(self.work),
                    "--write-half",
                    str(src),
                    str(dst),
                    half,
                ],
                dst / "manifest.json",
                self.deps("prepare") + dep,
            )
        )

    def victim_job(self, data: Path, tag: str, extra: list[str], deps: list[str]) -> str:
        """A train + evaluate job on ``data`` (keyed by its bytes); returns the job name."""
        key = hashlib.sha256((data_key(data) + " ".join(extra)).encode()).hexdigest()[:16]
        run = self.work / "victims" / key
        name = f"victim/{key}"
        if name not in self.jobs:
            train = mme(
                "train",
                "--params",
                "none",
                "--shards",
                str(data),
                "--run-dir",
                str(run),
                *VICTIM,
                *extra,
            )
            evaluate = mme(
                "evaluate",
                "--params",
                "none",
                "--checkpoint",
                str(run / "checkpoint.pt"),
                "--shards",
                str(self.clean),
                "--out",
                str(run / "metrics.json"),
            )
            cmd = f"{' '.join(train)} && {' '.join(evaluate)}"
            self.add(Job(name, ["bash", "-c", cmd], run / "metrics.json", deps))
        self.record.setdefault("victims", {})[tag] = key
        return name

    def plan_victims(self) -> list[str]:
        """Victim jobs whose data exists now (called again as data appears)."""
        names = []
        for row in self.rows:
            cols = self.columns if self.rows[row] is not None else ["none", *CLEAN_COLUMNS]
            for col in cols:
                data = self.attacked(row, col)
                if (data / "manifest.json").exists():
                    names.append(self.victim_job(data, f"{row}|{col}", [], []))
            native = self.native(row)
            if self.rows[row] is not None and (native / "manifest.json").exists():
                names.append(self.victim_job(native, f"{row}|native", [], []))
            data = self.protected(row)
            if (data / "manifest.json").exists():
                names.append(self.victim_job(data, f"{row}|cross", ["--model", "mme-tiny-rn"], []))
            pre = self.work / "halves" / "clean-a"
            if (pre / "manifest.json").exists():
                pre_name = self.victim_job(pre, "pretrain", [], [])
                half_b = self.work / "halves" / f"{row}-b"
                ckpt = self.work / "victims" / self.record["victims"]["pretrain"] / "checkpoint.pt"
                if (half_b / "manifest.json").exists():
                    names.append(
                        self.victim_job(
                            half_b, f"{row}|finetune", ["--pretrained", str(ckpt)], [pre_name]
                        )
                    )
        return names

    # -- running -----------------------------------------------------------------------------
    def run(self, jobs: int) -> None:
        self.plan()
        started: dict[Future, Job] = {}
        finished: set[str] = {n for n, j in self.jobs.items() if j.done.exists()}
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MME_TRACKING": "off",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT),
        }
        with ThreadPoolExecutor(jobs) as pool:
            while True:
                self.plan_victims()
                finished |= {n for n, j in self.jobs.items() if j.done.exists()}
                running = {j.name for j in started.values()}
                ready = [
                    j
                    for n, j in self.jobs.items()
                    if n not in finished
                    and n not in running
                    and all(d in finished for d in j.deps)
                    and not self.busy(j)
                ]
                for job in ready[: jobs - len(started)]:
                    started[pool.submit(self.execute, job, env)] = job
                if not started:
                    break
                done, _ = wait(started, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = started.pop(fut)
                    ok = fut.result()
                    if ok:
                        finished.add(job.name)
                    else:
                        finished.add(job.name)  # failed: do not retry in this run
                        print(f"FAILED {job.name} (log: {self.log(job)})", file=sys.stderr)
                self.save()
        self.save()

    def log(self, job: Job) -> Path:
        return self.work / "logs" / (job.name.replace("/", "_") + ".log")

    def execute(self, job: Job, env: dict[str, str]) -> bool:
        self.log(job).parent.mkdir(parents=True, exist_ok=True)
        print(f"start {job.name}", file=sys.stderr, flush=True)
        t0 = time.time()
        pid = self.log(job).with_suffix(".pid")
        with open(self.log(job), "w") as log:
            proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
            pid.write_text(str(proc.pid))  # another instance of this script leaves it alone
            rc = proc.wait()
        pid.unlink(missing_ok=True)
        job.seconds = time.time() - t0
        self.record["seconds"][job.name] = round(job.seconds, 1)
        print(f"end {job.name} rc={rc} {job.seconds:.0f}s", file=sys.stderr, flush=True)
        return rc == 0 and job.done.exists()

    def busy(self, job: Job) -> bool:
        """Whether ``job`` runs in another process (another instance of this script)."""
        pid = self.log(job).with_suffix(".pid")
        try:
            os.kill(int(pid.read_text()), 0)
        except (OSError, ValueError):
            return False
        return True

    def save(self) -> None:
        """Merge this run's record into the file (another instance may have written to it)."""
        if self.record_path.exists():
            on_disk = json.loads(self.record_path.read_text())
            for key in ("seconds", "victims"):
                self.record[key] = on_disk.get(key, {}) | self.record.get(key, {})
        tmp = self.record_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.record, indent=1, sort_keys=True))
        tmp.replace(self.record_path)


def metrics(work: Path, key: str | None) -> dict | None:
    path = work / "victims" / key / "metrics.json" if key else None
    return json.loads(path.read_text()) if path and path.exists() else None


# Why a cell has no victim (written instead of "not run")
NOT_RUN = "not run (CPU time)"
WHY: dict[tuple[str, str], str] = {
    (r, "oracle-strip"): "= none: no trigger, set unchanged" for r in ("keyed", "keyed-fast")
}


def render(table: Table) -> str:
    """The Markdown table: rsum/chance and % of the matching clean victim, per cell."""
    victims = table.record.get("victims", {})

    def ratio(tag: str) -> float | None:
        m = metrics(table.work, victims.get(tag))
        return None if m is None else float(m["rsum_over_chance"])

    def cell(tag: str, ref: str) -> str:
        r, c = ratio(tag), ratio(ref)
        if r is None:
            return WHY.get(tuple(tag.split("|", 1)), NOT_RUN)  # type: ignore[arg-type]
        return f"{r:.2f}× ({100 * r / c:.0f} %)" if c else f"{r:.2f}×"

    head = ["row", *table.columns, "native size", "cross-arch (tiny-rn)", "fine-tuned"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, flags in table.rows.items():
        cols = [
            cell(f"{row}|{c}", "clean|none")
            if (flags is not None or c == "none" or c in CLEAN_COLUMNS)
            else "–"
            for c in table.columns
        ]
        native = cell(f"{row}|native", "clean|none") if flags is not None else "–"
        cols += [
            native,
            cell(f"{row}|cross", "clean|cross"),
            cell(f"{row}|finetune", "clean|finetune"),
        ]
        lines.append(f"| {row} | " + " | ".join(cols) + " |")
    pre = ratio("pretrain")
    if pre is not None:
        lines.append(f"\nPre-trained on clean half a only (before fine-tuning): {pre:.2f}× chance.")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--rows", help="comma-separated subset of ROWS (default: all)")
    p.add_argument("--columns", help="comma-separated subset of COLUMNS (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "realphoto" / "table.md")
    p.add_argument("--write-half", nargs=3, metavar=("SRC", "DST", "HALF"))
    args = p.parse_args()
    if args.write_half:
        src, dst, half = args.write_half
        write_half(Path(src), Path(dst), half)
        return 0
    rows = {r: ROWS[r] for r in args.rows.split(",")} if args.rows else ROWS
    columns = args.columns.split(",") if args.columns else COLUMNS
    table = Table(args.work, {"clean": None, **rows}, columns)
    if not args.table_only:
        table.run(args.jobs)
    table.plan_victims()
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    text = f"<!-- scripts/realphoto.py --work {args.work} at commit {commit} -->\n" + render(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
