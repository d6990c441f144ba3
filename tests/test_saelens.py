"""SAELens reads our stores: its own SAETrainer trains from ActivationDataset, and its own ActivationsStore
loads `python -m engine export --to saelens` (the real sae-lens package, no model, no network)."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import CaptureConfig, CaptureEngine, ConfigError, open_store
from engine.cli.main import main as cli_main
from engine.format.layout import FLAG_BOS, FLAG_FIRST
from engine.read.saelens import export_saelens, scaling_factor

from helpers import ragged_batch, tiny_model, tiny_store

sae_lens = pytest.importorskip("sae_lens")
KEY = "layer_1/residual"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def capture(path, dtype="float16"):
    return tiny_store(path, dtype=dtype)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return capture(tmp_path_factory.mktemp("saelens") / "s.zarr")


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_saelens_trainer_learns_from_the_store(store):
    example = load_example("train_saelens")
    sample = torch.from_numpy(open_store(store)[KEY][:2048].astype(np.float32))
    untrained = sae_lens.StandardTrainingSAE(sae_lens.StandardTrainingSAEConfig(
        d_in=64, d_sae=256, normalize_activations="expected_average_only_in"))
    before = example.unexplained_variance(untrained, sample, 64 ** 0.5 / sample.norm(dim=-1).mean().item())
    sae = example.train(str(store), KEY, steps=40, batch_size=128)
    after = example.unexplained_variance(sae, sample)  # the scaling factor is folded into the trained SAE
    assert after < 0.6 * before, (before, after)


def test_scaling_factor_uses_mean_norm_when_the_store_has_it(store):
    stats = open_store(store).manifest.statistics[KEY]
    expected = 64 ** 0.5 / stats["mean_norm"] if "mean_norm" in stats else None
    assert scaling_factor(store, KEY) == expected


def kept_rows(path) -> tuple[np.ndarray, np.ndarray]:
    """(activations, token ids) of the rows an export keeps by default (attention sinks left out)."""
    opened = open_store(path)
    keep = (opened["tokens/flags"][:] & (FLAG_BOS | FLAG_FIRST)) == 0
    return opened[KEY][:][keep].astype(np.float32), opened["tokens/input_ids"][:][keep]


def read_through_saelens(out, hook_name, context_size, d_in) -> tuple[np.ndarray, np.ndarray]:
    """Every row of an export as SAELens' ActivationsStore loads it (a window per read, to epoch's end)."""
    from sae_lens.training.activations_store import ActivationsStore

    loader = ActivationsStore(
        model=None, dataset=None, streaming=False, hook_name=hook_name, hook_head_index=None,
        context_size=context_size, d_in=d_in, n_batches_in_buffer=2, total_training_tokens=10_000,
        store_batch_size_prompts=1, train_batch_size_tokens=16, prepend_bos=False,
        normalize_activations="none", device=torch.device("cpu"), dtype="float32",
        cached_activations_path=str(out))
    acts, ids = [], []
    while True:
        try:
            batch, token_ids = loader.get_raw_llm_batch(raise_on_epoch_end=True)
        except StopIteration:
            break
        acts.append(batch.numpy())
        ids.append(token_ids.numpy())
    assert next(loader).shape == (16, d_in)  # its training stream (mixing buffer) runs on the export
    return np.concatenate(acts), np.concatenate(ids)


def test_export_loads_through_saelens_every_row_once_shuffled(store, tmp_path):
    out = tmp_path / "cache"
    assert cli_main(["export", str(store), "--to", "saelens", str(out), "--key", KEY,
                     "--context-size", "24"]) == 0
    hook_name = open_store(store).manifest.arrays[KEY]["tl_name"]
    acts, ids = read_through_saelens(out, hook_name, 24, 64)
    rows, row_ids = kept_rows(store)
    assert len(rows) - 24 < len(acts) <= len(rows) and len(acts) % 24 == 0
    stored = [row.tobytes() + token.tobytes() for row, token in zip(rows, row_ids)]
    exported = [row.tobytes() + token.tobytes() for row, token in zip(acts, ids.astype(np.int32))]
    assert not Counter(exported) - Counter(stored), "a row that is not in the store, or exported twice"
    index = {row: i for i, row in enumerate(stored)}  # tokens with the same prefix have equal rows: any one
    order = np.array([index[row] for row in exported])
    assert abs(np.corrcoef(order, np.arange(len(order)))[0, 1]) < 0.5, "rows are in store order"


def test_export_of_bfloat16_needs_a_dtype(tmp_path):
    path = capture(tmp_path / "bf16.zarr", dtype="bfloat16")
    with pytest.raises(ConfigError, match="arrow has no bfloat16: export with dtype='float32'"):
        export_saelens(path, tmp_path / "x", KEY, 16)
    done = export_saelens(path, tmp_path / "f32", KEY, 16, dtype="float32")
    acts, _ = read_through_saelens(done.path, done.hook_name, 16, 64)
    rows = open_store(path)[KEY][:].view(np.int16)
    as_float = torch.from_numpy(rows).view(torch.bfloat16).float().numpy()
    assert {row.tobytes() for row in acts} <= {row.tobytes() for row in as_float}  # exact: bf16 fits float32


def test_export_refuses_a_used_folder_and_unnamed_columns(store, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    assert cli_main(["export", str(store), "--to", "saelens", str(tmp_path / "used"), "--key", KEY,
                     "--context-size", "8"]) == 2
    with pytest.raises(ConfigError, match="context_size must be positive"):
        export_saelens(store, tmp_path / "y", KEY, 0)
    extra = tmp_path / "extra.zarr"
    model = tiny_model("gpt2")
    with CaptureEngine(model, CaptureConfig(extra, capture_residual=False, capture_mlp_hidden=False,
                                            extra_modules={"mlp": "transformer.h.1.mlp"})), torch.no_grad():
        model(**ragged_batch(4, 16))
    with pytest.raises(ConfigError, match="no TransformerLens hook name"):
        export_saelens(extra, tmp_path / "z", "extra/mlp", 8)
    assert export_saelens(extra, tmp_path / "z", "extra/mlp", 8, hook_name="blocks.1.hook_mlp_out").rows > 0


@pytest.mark.parametrize("architecture, saelens_class", [("topk", "TopKSAE"), ("relu", "StandardSAE")])
def test_the_example_sae_loads_in_saelens_and_takes_the_stores_rows(store, tmp_path, architecture,
                                                                    saelens_class):
    """examples/train_sae.py saves engine.read.sae's SAE with the store's scaling folded in: SAELens' own
    load_from_disk gives the same latents and reconstruction on unscaled rows."""
    ours, _, _ = load_example("train_sae").train(str(store), KEY, steps=20, batch_size=128,
                                                 architecture=architecture, k=8, out=str(tmp_path / "sae"),
                                                 log_every=1000)
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    assert type(loaded).__name__ == saelens_class and loaded.cfg.d_sae == 256
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    rows = torch.from_numpy(open_store(store)[KEY][:256].astype(np.float32))
    scale = open_store(store).manifest.statistics[KEY]["norm_scaling_factor"]
    with torch.no_grad():
        reconstruction, latents = ours(rows * scale)
        torch.testing.assert_close(loaded.encode(rows), latents, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded(rows), reconstruction / scale, rtol=1e-4, atol=1e-4)
    if architecture == "topk":
        assert loaded.cfg.k == 8 and int((loaded.encode(rows) > 0).sum(-1).max()) <= 8
