"""Train the same SAE from a store two ways and compare: (a) ``ActivationDataset`` with its default settings,
(b) the same rows shuffled uniformly in memory. What users finally judge is the SAE; this measures what the
reader's order does to it (FVU, L0 and dead latents on held-out rows, tokens/s of the training loop).

    python benchmarks/training.py --store-dir ~/.cache/actcap/bench-training --json out.json

Captures real SmolLM2-135M activations (``layer_15/residual``, packed sequences of 512, ``python -m engine
capture`` with early stop) of a corpus split by document: every ``--eval-every``-th document is held out for
evaluation, the rest is trained on. The default corpus is Python's own documentation (the default corpus of
capture jobs) plus the docstrings of the standard library's packages: ~420k tokens, of which ~375k train.
Stores are cached in ``--store-dir`` under a key of everything that shapes their rows (model, layer, hook
point, sequence length, storage dtype, chunk size, the corpus's hash, token limits); without it they go to a
temporary folder. Training is one pass by default (steps x batch = the training rows) over a store 12.8x the
reader's former 4-chunk mixing buffer, where the order the reader serves rows in shows in the SAE.

Exclusion and normalization come from the store and the dataset's defaults; ``--exclude`` overrides the
flags left out (both arms), ``--normalization rows`` computes the scale and mean from the training rows as
excluded instead of the manifest statistics (``--exclude bos first --normalization rows`` reproduces the
normalization of stores whose statistics leave out only attention sinks).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import ActivationDataset, open_store  # noqa: E402
from engine.cli.corpus import docstrings, open_corpus  # noqa: E402
from engine.cli.main import main as capture_command  # noqa: E402
from engine.errors import EngineError  # noqa: E402
from engine.format.layout import STATUS_COMPLETE, STORAGE_DTYPES  # noqa: E402
from engine.read.sae import (  # noqa: E402
    ARCHITECTURES,
    Normalization,
    SaeConfig,
    SaeTrainer,
    SparseAutoencoder,
    batches_of,
    evaluate,
)

SPLITS = ("train", "eval")
# Folders of the standard library whose docstrings are not documentation prose: test suites, and third-party
# packages installed beside it.
SKIPPED_STDLIB_FOLDERS = {"test", "tests", "site-packages", "__pycache__"}


def build_parser(description: str = __doc__, storage_dtype: bool = True) -> argparse.ArgumentParser:
    """The options of this benchmark (``storage_encodings.py`` reuses them; without ``storage_dtype`` there is
    no ``--dtype``: the caller sets ``args.dtype`` itself)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("the stores")
    data.add_argument("--model", default="smollm2-135m", help="registry name or model folder")
    data.add_argument("--layer", type=int, default=15)
    data.add_argument("--hook", default="residual", help="canonical hook point")
    data.add_argument("--seq-len", type=int, default=512)
    if storage_dtype:
        data.add_argument("--dtype", default="float16", choices=list(STORAGE_DTYPES),
                          help="the training rows' encoding (CaptureConfig dtype); part of the cache key")
    data.add_argument("--chunk-tokens", type=int, default=8192)
    data.add_argument("--outlier-norm-ratio", default="10",
                      help="the capture's outlier rule (python -m engine capture --outlier-norm-ratio)")
    data.add_argument("--capture-batch-size", type=int, default=8)
    data.add_argument("--data", default=None, help="a corpus as `python -m engine capture --data` takes it "
                      "(default: Python's documentation and the standard library's package docstrings)")
    data.add_argument("--eval-every", type=int, default=10, help="every N-th document is held out")
    data.add_argument("--train-tokens", type=int, default=None, help="cap on captured training tokens")
    data.add_argument("--eval-tokens", type=int, default=None, help="cap on captured held-out tokens")
    data.add_argument("--store-dir", default=None, help="cache of stores, reused between runs")
    data.add_argument("--weights", default="required", choices=["auto", "random", "required"])
    rows = p.add_argument_group("the training rows (default: the store's and the dataset's)")
    rows.add_argument("--exclude", nargs="*", default=None, metavar="FLAG",
                      help="flags left out in both arms (default: ActivationDataset's default)")
    rows.add_argument("--normalization", choices=["store", "rows"], default="store",
                      help="scale and mean from the manifest statistics, or from the training rows (as "
                      "excluded)")
    sae = p.add_argument_group("the SAE (engine.read.sae)")
    sae.add_argument("--architecture", choices=list(ARCHITECTURES), default="topk")
    sae.add_argument("--d-sae", type=int, default=2304, help="latents")
    sae.add_argument("--k", type=int, default=32)
    sae.add_argument("--l1-coefficient", type=float, default=1.0)
    sae.add_argument("--lr", type=float, default=1e-3)
    sae.add_argument("--batch-size", type=int, default=512)
    sae.add_argument("--steps", type=int, default=None, help="default: one pass over the training rows")
    sae.add_argument("--seed", type=int, default=0)
    sae.add_argument("--dead-window", type=int, default=100_000,
                     help="training rows in which a latent must fire not to count as dead in training")
    sae.add_argument("--save-dir", default=None, help="save each arm's SAE here (SAELens' layout)")
    p.add_argument("--json", default=None)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# ---- the corpus and its stores -------------------------------------------------------------------------


def stdlib_package_docstrings() -> Iterator[str]:
    """Docstrings of the standard library's packages (the default corpus has only its top-level modules)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for source in sorted(root.glob("*/**/*.py")):
        if not SKIPPED_STDLIB_FOLDERS & set(source.relative_to(root).parts[:-1]):
            yield from docstrings(source)


def corpus_documents(data: str | None) -> Iterator[str]:
    yield from open_corpus(data).documents()
    if data is None:
        yield from stdlib_package_docstrings()


def write_corpus(data: str | None, eval_every: int, folder: Path) -> tuple[dict[str, Path], str]:
    """The corpus split by document into ``train.jsonl`` and ``eval.jsonl``. Returns their paths and the
    corpus's hash (of both files: the documents and the split)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {split: folder / f"corpus-{split}.jsonl" for split in SPLITS}
    digest = hashlib.sha256()
    with paths["train"].open("w") as train, paths["eval"].open("w") as held_out:
        for index, text in enumerate(corpus_documents(data)):
            line = json.dumps({"text": text}) + "\n"
            (held_out if index % eval_every == eval_every - 1 else train).write(line)
            digest.update(f"{index % eval_every == eval_every - 1}:{line}".encode())
    return paths, digest.hexdigest()[:16]


def cache_key(args: argparse.Namespace, corpus_hash: str) -> str:
    """Everything that shapes the stores' rows, as a folder name."""
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.model).name)
    return (f"{model}-layer{args.layer}-{args.hook}-seq{args.seq_len}-{args.dtype}-chunk{args.chunk_tokens}"
            f"-outlier{args.outlier_norm_ratio}-corpus{corpus_hash}-train{args.train_tokens or 'all'}"
            f"-eval{args.eval_tokens or 'all'}")


def capture(args: argparse.Namespace, corpus: Path, out: Path, max_tokens: int | None) -> None:
    """One store with the command line users run (``engine.cli.main``, in this process; early stop: layers
    after ``--layer`` never run). A store left incomplete by an interrupted run is resumed."""
    argv = ["capture", "--model", args.model, "--data", str(corpus), "--layers", str(args.layer), "--hooks",
            args.hook, "--seq-len", str(args.seq_len), "--batch-size", str(args.capture_batch_size),
            "--dtype", args.dtype, "--chunk-tokens", str(args.chunk_tokens), "--weights", args.weights,
            "--outlier-norm-ratio", args.outlier_norm_ratio,
            "--out", str(out), "--resume-or-start", "--no-progress"]
    if max_tokens is not None:
        argv += ["--max-tokens", str(max_tokens)]
    print(f"[capture] python -m engine {shlex.join(argv)}", flush=True)
    status = capture_command(argv)
    if status != 0:
        raise SystemExit(f"the capture of {out} failed (exit status {status}); its error is above")


def is_complete(path: Path) -> bool:
    try:
        return open_store(path).status == STATUS_COMPLETE
    except EngineError:  # no store yet, or one cut short before its manifest: capture starts or resumes it
        return False


def prepare_stores(args: argparse.Namespace, root: Path) -> dict[str, Path]:
    """The training and held-out stores, captured unless ``root`` already holds them complete."""
    corpus, corpus_hash = write_corpus(args.data, args.eval_every, root / "corpus")
    folder = root / cache_key(args, corpus_hash)
    stores = {split: folder / f"{split}.zarr" for split in SPLITS}
    limits = {"train": args.train_tokens, "eval": args.eval_tokens}
    for split, path in stores.items():
        if is_complete(path):
            print(f"[capture] reusing {path}")
        else:
            capture(args, corpus[split], path, limits[split])
    return stores


# ---- the two arms ----------------------------------------------------------------------------------------


def exclusion(args: argparse.Namespace) -> dict:
    """ActivationDataset's exclude argument: none (its default) unless ``--exclude`` was given."""
    return {} if args.exclude is None else {"exclude": tuple(args.exclude)}


def read_rows(store: Path, key: str, args: argparse.Namespace) -> torch.Tensor:
    """Every row the dataset serves (its exclusion), in store order, as float32 in memory."""
    data = ActivationDataset(store, key, batch_size=65536, shuffle=False, **exclusion(args))
    return torch.cat(list(data))


def uniform_batches(rows: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Whole batches of uniformly shuffled rows, epoch after epoch (each a new permutation)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(rows.shape[0], generator=generator)
        for start in range(0, rows.shape[0] - batch_size + 1, batch_size):
            yield rows.index_select(0, order[start:start + batch_size])


def train_arm(name: str, batches: Iterator[torch.Tensor], config: SaeConfig, norm: Normalization, steps: int,
              held_out: torch.Tensor, args: argparse.Namespace) -> dict:
    """One SAE trained from ``batches``, evaluated on the held-out rows; returns its results."""
    sae = SparseAutoencoder(config, norm.mean * norm.scaling_factor)

    def log(step: int, loss: float, l0: float) -> None:
        print(f"[{name}] step {step:5d}  median loss {loss:9.3f}  L0 {l0:6.1f}", flush=True)

    run = SaeTrainer(sae, norm.scaling_factor).train(batches, steps, log, log_every=max(steps // 8, 1))
    evaluation = evaluate(sae, batches_of(held_out, 4096), norm.scaling_factor)
    if args.save_dir:
        sae.save(Path(args.save_dir) / name, norm.scaling_factor, {"model_name": args.model, "arm": name})
    tail = run.losses[-max(len(run.losses) // 10, 1):]
    return {"fvu": evaluation.fvu, "l0": evaluation.l0, "dead_latents": evaluation.dead_latents,
            "dead_in_training": run.dead_in_training, "tokens_per_s": run.tokens_per_s,
            "train_seconds": run.seconds, "steps": run.steps, "rows_trained": run.rows,
            "train_l0": run.l0, "loss_first": run.losses[0],
            "loss_median_last_tenth": statistics.median(tail)}  # a mean would follow the few outlier batches


def git_commit() -> str:
    """HEAD, with ``-dirty`` when the work tree differs from it."""
    def git(*command: str) -> str:
        return subprocess.run(["git", *command], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def normalization(args: argparse.Namespace, store: Path, key: str, rows: torch.Tensor) -> Normalization:
    """``--normalization``: from the store's manifest statistics, or from the training rows in memory."""
    if args.normalization == "store":
        return Normalization.of_store(store, key)
    return Normalization.of_rows(rows)


def sae_config(args: argparse.Namespace, d_in: int) -> SaeConfig:
    return SaeConfig(d_in, args.d_sae, args.architecture, k=args.k, l1_coefficient=args.l1_coefficient,
                     lr=args.lr, seed=args.seed, dead_window=args.dead_window)


def run(args: argparse.Namespace, stores: dict[str, Path]) -> dict:
    key = f"layer_{args.layer}/{args.hook}"
    rows, held_out = read_rows(stores["train"], key, args), read_rows(stores["eval"], key, args)
    norm = normalization(args, stores["train"], key, rows)
    dataset = ActivationDataset(stores["train"], key, batch_size=args.batch_size, seed=args.seed,
                                **exclusion(args))
    steps = args.steps or rows.shape[0] // args.batch_size
    config = sae_config(args, rows.shape[1])
    window_rows = dataset.window_chunks * dataset.chunk_tokens
    window = ("the whole store" if window_rows >= rows.shape[0]
              else f"{window_rows:,} rows, 1/{rows.shape[0] / window_rows:.1f} of the store")
    print(f"[training] {rows.shape[0]:,} training rows, {held_out.shape[0]:,} held out; {steps} steps of "
          f"{args.batch_size} ({steps * args.batch_size / rows.shape[0]:.2f} passes); the reader's shuffle "
          f"window holds {window}; "
          f"normalization from {norm.source}: scale {norm.scaling_factor:.4f}", flush=True)
    arms = {"dataset": train_arm("dataset", dataset.endless_batches(), config, norm, steps, held_out, args),
            "uniform": train_arm("uniform", uniform_batches(rows, args.batch_size, args.seed), config, norm,
                                 steps, held_out, args)}
    a, b = arms["dataset"], arms["uniform"]
    return {
        "command": args.command, "git_commit": args.git_commit, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "stores": {split: str(path) for split, path in stores.items()},
        "key": key, "storage_dtype": args.dtype, "train_rows": rows.shape[0], "eval_rows": held_out.shape[0],
        "exclude": "dataset default" if args.exclude is None else args.exclude,
        "normalization": {"source": norm.source, "scaling_factor": norm.scaling_factor},
        "reader_window_rows": window_rows, "store_over_window": rows.shape[0] / window_rows,
        "batch_size": args.batch_size, "steps": steps, "passes": steps * args.batch_size / rows.shape[0],
        "sae": dataclasses.asdict(config), "arms": arms,
        "ratios": {"fvu": a["fvu"] / b["fvu"], "l0": a["l0"] / b["l0"],
                   "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"]},
        "dead_latents_difference": a["dead_latents"] - b["dead_latents"],
        "target_met": a["fvu"] <= 1.02 * b["fvu"] and a["dead_latents"] <= b["dead_latents"],
    }


def report(result: dict) -> None:
    print(f"[result] {result['key']} {result['storage_dtype']}, {result['train_rows']:,} training rows, "
          f"{result['steps']} steps of {result['batch_size']}, held out {result['eval_rows']:,} rows "
          "(tokens/s: wall clock of the training loop, on a shared machine)")
    print(f"{'arm':<10}{'FVU':>9}{'L0':>8}{'dead':>7}{'dead in training':>18}{'tokens/s':>11}")
    for name, arm in result["arms"].items():
        print(f"{name:<10}{arm['fvu']:>9.4f}{arm['l0']:>8.1f}{arm['dead_latents']:>7}"
              f"{arm['dead_in_training']:>18}{arm['tokens_per_s']:>11,.0f}")
    ratios = result["ratios"]
    print(f"{'ratio':<10}{ratios['fvu']:>9.4f}{ratios['l0']:>8.3f}{result['dead_latents_difference']:>+7}"
          f"{'':>18}{ratios['tokens_per_s']:>11.3f}")
    print(f"[target] dataset within 2% of uniform on FVU, dead latents no higher: "
          f"{'met' if result['target_met'] else 'NOT met'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/training.py", *(sys.argv[1:] if argv is None else argv)])
    args.git_commit = git_commit()  # the code that runs: read now, not after a run that commits may outlast
    root = (Path(args.store_dir).expanduser() if args.store_dir
            else Path(tempfile.mkdtemp(prefix="actcap_training_")))
    try:
        result = run(args, prepare_stores(args, root))
    finally:
        if not args.store_dir:
            shutil.rmtree(root, ignore_errors=True)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
