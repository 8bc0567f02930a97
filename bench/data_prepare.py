"""Tokenize-and-shard throughput of `megacore data prepare` against raw sentencepiece encoding.

Reference, in the same process: the same cleaned documents encoded by SentencePieceProcessor on one
thread, nothing else. Measured: prepare with one tokenizer worker (the tokenizer already trained), so
reading, cleaning, splitting, encoding, Arrow writing, hashing and fsync are all counted. The figure
is CPU seconds (all processes) per MB of text, ours against the reference: "overhead per core".
Wall-clock MB/s with one worker per core is printed too.

    python bench/data_prepare.py [--corpus shakespeare linux-doc]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from corpora import CORPORA
from report import record

from data_pipeline.cleaning import Cleaner
from data_pipeline.prepare import prepare
from data_pipeline.sources import iter_documents
from data_pipeline.tokenizer import Tokenizer
from megacore.config import DataConfig


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def bench(name: str, sources: list[str], workdir: Path) -> dict:
    cfg = DataConfig(dir=str(workdir / name), sources=sources, vocab_size=8192, prepare_workers=1, shard_mb=16)
    prepare(cfg, log=lambda *_: None)  # trains the tokenizer; later runs reuse it
    cleaner = Cleaner(cfg.normalize, cfg.min_doc_chars, cfg.max_doc_chars, cfg.dedup)
    texts = [c[0] for c in map(cleaner.clean, iter_documents(sources, cfg.text_unit)) if c is not None]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 2**20
    sp = Tokenizer(Path(cfg.dir) / "tokenizer.model").sp

    def rerun(workers: int):
        def run():
            for path in Path(cfg.dir).glob("*.arrow*"):
                path.unlink()
            (Path(cfg.dir) / "manifest.json").unlink(missing_ok=True)
            cfg.prepare_workers = workers
            prepare(cfg, log=lambda *_: None)
        return run

    raw_wall, raw_cpu = measure(lambda: sp.encode(texts, num_threads=1))
    ours_wall, ours_cpu = measure(rerun(1))
    par_wall, _ = measure(rerun(os.cpu_count()))
    return {"corpus": name, "MB": mb, "raw_MBps": mb / raw_wall, "ours_cpu_MBps": mb / ours_cpu,
            "overhead_per_core": ours_cpu / raw_cpu - 1, "ours_wall_MBps_all_cores": mb / par_wall,
            "one_worker_wall_MBps": mb / ours_wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        print(f"{'corpus':<12} {'MB':>6} {'raw sp MB/s':>11} {'ours MB/cpu-s':>13} {'overhead/core':>13} "
              f"{'ours MB/s (' + str(os.cpu_count()) + ' cores)':>20}")
        for name in args.corpus:
            r = bench(name, CORPORA[name](), workdir)
            print(f"{r['corpus']:<12} {r['MB']:>6.1f} {r['raw_MBps']:>11.2f} {r['ours_cpu_MBps']:>13.2f} "
                  f"{r['overhead_per_core']:>+12.0%} {r['ours_wall_MBps_all_cores']:>20.2f}", flush=True)
            record(f"data prepare, {name} ({r['MB']:.1f} MB), 1 worker", f"{r['ours_cpu_MBps']:.2f} MB per CPU-second",
                   f"raw sentencepiece encode: {r['raw_MBps']:.2f} MB/s", f"{r['overhead_per_core']:+.0%} CPU per MB",
                   "<= +20%")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
