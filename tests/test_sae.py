"""engine.read.sae on a real (tiny, random-weight) store: the usual practice holds through training,
evaluation means what its docstring says, and normalization agrees with the rows the dataset serves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import ActivationDataset, ConfigError
from engine.read.sae import Normalization, SaeConfig, SaeTrainer, SparseAutoencoder, batches_of, evaluate

from helpers import tiny_store

KEY = "layer_1/residual"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("sae") / "s.zarr", forwards=30)


@pytest.fixture(scope="module")
def rows(store):
    return torch.cat(list(ActivationDataset(store, KEY, batch_size=1024, shuffle=False)))


def trained(rows, architecture="topk", steps=30, seed=0, **options):
    norm = Normalization.of_rows(rows)
    sae = SparseAutoencoder(SaeConfig(64, 256, architecture, k=8, seed=seed, **options),
                            norm.mean * norm.scaling_factor)
    trainer = SaeTrainer(sae, norm.scaling_factor)
    generator = torch.Generator().manual_seed(seed)
    batches = (rows[torch.randint(0, rows.shape[0], (128,), generator=generator)] for _ in range(steps))
    return sae, trainer, trainer.train(batches, steps), norm


def test_normalization_of_the_store_is_that_of_the_rows_the_dataset_serves(store, rows):
    from_store, from_rows = Normalization.of_store(store, KEY), Normalization.of_rows(rows)
    assert from_store.scaling_factor == pytest.approx(from_rows.scaling_factor, rel=1e-5)
    torch.testing.assert_close(from_store.mean, from_rows.mean, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_training_keeps_unit_decoder_directions_and_the_loss_falls(rows, architecture):
    sae, _, run, _ = trained(rows, architecture, steps=60, l1_coefficient=1.0)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(256))
    assert sum(run.losses[-5:]) < 0.8 * sum(run.losses[:5]), run.losses
    assert run.steps == 60 and run.rows == 60 * 128


def test_the_gradient_along_each_decoder_direction_is_removed(rows):
    sae, _, _, norm = trained(rows, steps=1)
    x = rows[:64] * norm.scaling_factor
    sae.loss(x, *sae(x)).backward()
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() > 1e-3  # there was something to remove
    sae.remove_parallel_gradient()
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-5


def test_the_encoder_starts_as_the_decoder_transposed_and_b_dec_at_the_mean(rows):
    norm = Normalization.of_rows(rows)
    sae = SparseAutoencoder(SaeConfig(64, 256), norm.mean * norm.scaling_factor)
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    torch.testing.assert_close(sae.b_dec.detach(), norm.mean * norm.scaling_factor)


def test_a_seed_gives_the_same_sae(rows):
    first, second = trained(rows, seed=3)[0], trained(rows, seed=3)[0]
    for name, value in first.state_dict().items():
        torch.testing.assert_close(value, second.state_dict()[name])
    assert not torch.equal(first.W_dec, trained(rows, seed=4)[0].W_dec)


def test_evaluation_is_fvu_l0_and_latents_that_never_fire(rows):
    sae, _, _, norm = trained(rows)
    with torch.no_grad():
        sae.b_enc[:5] = -1e6  # five latents that cannot fire
    evaluation = evaluate(sae, batches_of(rows, 1000), norm.scaling_factor)
    x = rows.double().numpy() * norm.scaling_factor
    with torch.no_grad():
        reconstruction, latents = sae(rows * norm.scaling_factor)
    fvu = ((reconstruction.double().numpy() - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert evaluation.rows == rows.shape[0]
    assert evaluation.fvu == pytest.approx(fvu, rel=1e-4)
    assert evaluation.l0 == pytest.approx((latents > 0).sum(-1).double().mean().item())
    assert evaluation.l0 <= 8 and evaluation.dead_latents == 5 + int(((latents > 0).sum(0)[5:] == 0).sum())


def test_topk_is_k_sparse_and_relu_l1_sparsifies(rows):
    topk = evaluate(trained(rows)[0], batches_of(rows, 1000), trained(rows)[3].scaling_factor)
    assert 7 <= topk.l0 <= 8  # k, less the rare kept pre-activations that are <= 0
    # Adam moves b_enc by about lr a step: 60 steps at 1e-2 are enough for the penalty to show
    weak, strong = (trained(rows, "relu", steps=60, l1_coefficient=c, lr=1e-2)[2].l0 for c in (0.1, 3.0))
    assert strong < 0.5 * weak, (weak, strong)


def test_dead_in_training_counts_latents_silent_over_the_window(rows):
    sae, trainer, run, _ = trained(rows, steps=20, dead_window=128)
    fired_last_step = int((trainer.last_fired == trainer.rows).sum())
    assert run.dead_in_training == 256 - fired_last_step  # the window is the last step's 128 rows
    assert SaeTrainer(SparseAutoencoder(SaeConfig(64, 256)), 1.0).dead_in_training() == 256


@pytest.mark.parametrize("options", [dict(architecture="gated"), dict(k=300), dict(d_sae=0), dict(lr=0.0),
                                     dict(l1_coefficient=-1.0)])
def test_bad_configs_say_what_to_change(options):
    with pytest.raises(ConfigError):
        SaeConfig(**{"d_in": 64, "d_sae": 256, **options})


def test_a_store_without_statistics_says_how_to_normalize(tmp_path):
    path = tiny_store(tmp_path / "n.zarr", forwards=1, statistics=False)
    with pytest.raises(ConfigError, match="of_rows"):
        Normalization.of_store(path, KEY)


def test_normalization_of_rows_is_sqrt_d_over_mean_squared_norm():
    rows = torch.from_numpy(np.random.default_rng(0).normal(3.0, 2.0, (500, 16)).astype(np.float32))
    norm = Normalization.of_rows(rows)
    assert norm.scaling_factor == pytest.approx((16 / (rows.double() ** 2).sum(-1).mean().item()) ** 0.5)
