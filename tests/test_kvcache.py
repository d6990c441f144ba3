"""Forwards with a KV cache (generate(), decode loops): each row continues its own sequence, row for row, with
the positions of one plain forward over the final tokens; forwards that cannot be placed are refused before
anything of them is stored. The oracle: the rows stored for a generated sequence equal those of one plain
forward over its tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from engine import BatchError, CaptureConfig, CaptureEngine, open_store
from engine.format.layout import FLAG_FIRST, FLAG_LAST
from engine.store.resume import closing_ends

from helpers import tiny_model

KEY = "layer_1/residual"


def config(path, **overrides) -> CaptureConfig:
    return CaptureConfig(path / "s.zarr", layer_indices=[1], points=["residual"], **overrides)


def prompts(batch: int, length: int, padded: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids and mask; ``padded``: row i has i left pads (as generate() wants for batches)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if padded:
        for row in range(batch):
            mask[row, :row] = 0
            ids[row, :row] = 0
    return ids, mask


def plain_rows(model, tokens: torch.Tensor, layer: int = 1) -> np.ndarray:
    """The residual of ``layer`` for one sequence, from one plain forward without a cache, as float16."""
    got = {}
    handle = model.get_submodule(_layer_path(model, layer)).register_forward_hook(
        lambda module, args, output: got.setdefault("x", output[0] if isinstance(output, tuple) else output))
    try:
        with torch.no_grad():
            model(input_ids=tokens[None], use_cache=False)
    finally:
        handle.remove()
    return got["x"][0].to(torch.float16).float().numpy()


def _layer_path(model, layer: int) -> str:
    return f"transformer.h.{layer}" if model.config.model_type == "gpt2" else f"model.layers.{layer}"


def assert_sequences_match_plain_forwards(model, store, sequences: dict[int, torch.Tensor]) -> None:
    """The stored rows of sequence number n, in store order, are positions 0..len-1 of one plain forward over
    its tokens ``sequences[n]``, flagged first / last at its ends only."""
    seq, pos = store["tokens/sequence"][:], store["tokens/position"][:]
    flags, ids = store["tokens/flags"][:], store["tokens/input_ids"][:]
    acts = store[KEY][:].astype(np.float32)
    for number, tokens in sequences.items():
        rows = np.flatnonzero(seq == number)
        n = len(rows)
        assert pos[rows].tolist() == list(range(n)), number
        assert ids[rows].tolist() == tokens[:n].tolist(), number
        assert (flags[rows] & FLAG_FIRST != 0).tolist() == [True] + [False] * (n - 1)
        assert (flags[rows] & FLAG_LAST != 0).tolist() == [False] * (n - 1) + [True]
        np.testing.assert_allclose(acts[rows], plain_rows(model, tokens)[:n], atol=2e-2, rtol=2e-2,
                                   err_msg=f"sequence {number}")


def generated_sequences(out: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row's real tokens: the prompt without its pads, then everything generated."""
    prompt = mask.shape[1]
    return [torch.cat([row[:prompt][mask[i].bool()], row[prompt:]]) for i, row in enumerate(out)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("padded, sampled", [(False, False), (True, False), (True, True)])
def test_generate_stores_each_sequence_as_one_plain_forward(family, padded, sampled, tmp_path):
    model = tiny_model(family)
    ids, mask = prompts(3, 6, padded)
    torch.manual_seed(0)
    with torch.no_grad(), CaptureEngine(model, config(tmp_path, chunk_tokens=8)):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=sampled, pad_token_id=0,
                             eos_token_id=None)
    store = open_store(tmp_path / "s.zarr", verify=True)
    sequences = generated_sequences(out, mask)
    # the last generated token is never fed to the model: each sequence stores all but it
    assert store.num_tokens == sum(len(tokens) - 1 for tokens in sequences)
    assert sorted(set(store["tokens/sequence"][:].tolist())) == [0, 1, 2]
    assert_sequences_match_plain_forwards(model, store, dict(enumerate(sequences)))
    assert store.manifest.sequences == 3


def test_a_hand_written_decode_loop_continues_its_sequences(tmp_path):
    """The first forward makes the cache (none passed), later ones pass it back with the whole mask; then a
    second loop that passes its own DynamicCache from the first forward on."""
    model = tiny_model("llama")
    sequences = []
    with torch.no_grad(), CaptureEngine(model, config(tmp_path)):
        for cache in (None, DynamicCache()):
            ids, mask = prompts(2, 5, padded=True, seed=len(sequences))
            tokens = [ids[row][mask[row].bool()] for row in range(2)]
            out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            for _ in range(4):
                cache = out.past_key_values
                step = out.logits[:, -1:].argmax(-1)
                tokens = [torch.cat([t, s]) for t, s in zip(tokens, step)]
                mask = torch.cat([mask, torch.ones_like(step)], dim=1)
                out = model(input_ids=step, past_key_values=cache, use_cache=True, attention_mask=mask)
            sequences += tokens
    assert_sequences_match_plain_forwards(model, open_store(tmp_path / "s.zarr"), dict(enumerate(sequences)))


def test_beam_search_is_refused_before_its_reordered_forward_is_stored(tmp_path):
    model = tiny_model("gpt2")
    ids, mask = prompts(1, 6, padded=False)
    with torch.no_grad(), CaptureEngine(model, config(tmp_path, chunk_tokens=4)) as cap:
        with pytest.raises(BatchError, match="reorder_cache"):
            model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False,
                           pad_token_id=0)
        cap.flush()
        prefill = open_store(tmp_path / "s.zarr").num_tokens
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    store = open_store(tmp_path / "s.zarr")
    # the beams' prompt forward (two rows) is stored; nothing of the refused forwards is, and the engine
    # captures the next generate() as usual
    assert prefill == 2 * 6 and store.num_tokens == prefill + 6 + 2
    assert store["tokens/sequence"][:].tolist() == [0] * 6 + [1] * 6 + [2] * 8
    assert_sequences_match_plain_forwards(model, store, {2: out[0]})


def test_a_cache_filled_before_the_engine_is_refused(tmp_path):
    model = tiny_model("gpt2")
    ids, mask = prompts(2, 4, padded=False)
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        with CaptureEngine(model, config(tmp_path)):
            with pytest.raises(BatchError, match="did not capture"):
                model(input_ids=ids[:, :1], past_key_values=cache, attention_mask=torch.ones(2, 5))
    assert open_store(tmp_path / "s.zarr").num_tokens == 0


def test_continuing_after_flush_is_refused(tmp_path):
    model = tiny_model("gpt2")
    ids, mask = prompts(2, 4, padded=False)
    with torch.no_grad(), CaptureEngine(model, config(tmp_path)) as cap:
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cap.flush()
        with pytest.raises(BatchError, match="flush"):
            model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
    store = open_store(tmp_path / "s.zarr")
    assert store.num_tokens == 8 and (store["tokens/flags"][:] & FLAG_LAST).nonzero()[0].tolist() == [3, 7]


def test_a_cache_changed_between_forwards_is_refused(tmp_path):
    model = tiny_model("gpt2")
    ids, mask = prompts(2, 4, padded=False)
    with torch.no_grad(), CaptureEngine(model, config(tmp_path)):
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        cache.reorder_cache(torch.tensor([1, 0]))  # its length stays: only the watch on it can tell
        with pytest.raises(BatchError, match="reorder_cache"):
            model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)


class _StopAfter(StoppingCriteria):
    """Fails the generation after ``steps`` decode steps, as a crash mid-generation would end it."""

    def __init__(self, steps: int):
        self.steps = steps

    def __call__(self, input_ids, scores, **kwargs):
        self.steps -= 1
        if self.steps < 0:
            raise RuntimeError("the job died mid-generation (test)")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_a_resume_keeps_no_sequence_of_a_generation_cut_short(tmp_path):
    """The sequences of one generate() interleave row by row: a failure mid-generation must not leave a
    resume point after the end of one of them while another is still open."""
    model = tiny_model("gpt2")
    ids, mask = prompts(2, 6, padded=True)
    cfg = config(tmp_path, chunk_tokens=4)
    with pytest.raises(RuntimeError, match="mid-generation"):
        with torch.no_grad(), CaptureEngine(model, cfg):
            model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
            model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                           eos_token_id=None, stopping_criteria=StoppingCriteriaList([_StopAfter(6)]))
    first_run = 6 + 5 + 3 * 2  # two prompts (one with a left pad) and three decode steps
    with CaptureEngine(model, CaptureConfig(cfg.output_dir, layer_indices=[1], points=["residual"],
                                            chunk_tokens=4, resume=True)) as cap:
        assert cap.resume_sequences == 2
    store = open_store(cfg.output_dir)
    assert store.num_tokens == first_run and set(store["tokens/sequence"][:].tolist()) == {0, 1}


def test_closing_ends_leave_no_sequence_open():
    first, last = FLAG_FIRST, FLAG_LAST
    # sequences 0 and 1 interleave: 0 ends at row 3 while 1 is open, 1 ends at row 4
    flags = np.array([first, 0, first, last, last, first | last], dtype=np.uint8)
    ends, still_open = closing_ends(flags, 0)
    assert ends.tolist() == [4, 5] and still_open == 0
    ends, still_open = closing_ends(flags[:4], 0)
    assert ends.tolist() == [] and still_open == 1


def test_the_first_batch_must_have_the_widths_of_the_models_config(tmp_path):
    """A model whose layers no longer match its config (a tensor-parallel shard holds part of each
    activation) is refused at its first batch, before anything is stored."""
    model = tiny_model("gpt2")
    model.config.n_embd = 128  # the config of the whole model, the shard's layers are 64 wide
    with CaptureEngine(model, config(tmp_path)):
        with pytest.raises(Exception, match="width 64 but the model's config says 128"), torch.no_grad():
            model(input_ids=torch.ones(1, 4, dtype=torch.long))
    assert open_store(tmp_path / "s.zarr").num_tokens == 0


@pytest.mark.slow
def test_generate_with_the_real_smollm2_stores_what_one_plain_forward_computes(tmp_path):
    """The oracle on real weights (SmolLM2-135M, its massive activations included): a left-padded batch of
    two prompts, sampled, at layer 15 of 30."""
    from engine import load_model, load_tokenizer

    model, tokenizer = load_model("smollm2-135m", weights="required"), load_tokenizer("smollm2-135m")
    tokenizer.padding_side = "left"
    batch = tokenizer(["The capital of France is", "def fibonacci(n):\n    "], return_tensors="pt",
                      padding=True)
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[15], points=["residual"])
    torch.manual_seed(0)
    with torch.no_grad(), CaptureEngine(model, cfg):
        out = model.generate(**batch, max_new_tokens=12, do_sample=True, top_k=50,
                             pad_token_id=tokenizer.pad_token_id or 0, eos_token_id=None)
    store = open_store(cfg.output_dir, verify=True)
    seq, pos, acts = store["tokens/sequence"][:], store["tokens/position"][:], store["layer_15/residual"][:]
    for number, tokens in enumerate(generated_sequences(out, batch["attention_mask"])):
        rows = np.flatnonzero(seq == number)
        assert pos[rows].tolist() == list(range(len(tokens) - 1))
        plain = plain_rows(model, tokens, layer=15)[:len(rows)]
        stored = acts[rows].astype(np.float32)
        # relative to each row's norm: the first row is a massive activation (norm ~25,000)
        error = np.linalg.norm(stored - plain, axis=1) / np.linalg.norm(plain, axis=1)
        assert error.max() < 2e-2, error
