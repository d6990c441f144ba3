"""The canonical hook point names and where each sits in a block, without torch: the command line lists them
in its parser before anything heavy is imported. ``engine.capture.hookpoints`` resolves them on a model (its
docstring describes each point)."""

from __future__ import annotations

from typing import NamedTuple


class CanonicalPoint(NamedTuple):
    """Where a canonical point is: the adapter attribute naming a module of the block ("" for the block
    itself), whether its ``input`` or ``output`` is captured, and the TransformerLens hook suffix."""

    where: str
    capture: str
    tl_suffix: str


CANONICAL_POINTS: dict[str, CanonicalPoint] = {
    "residual": CanonicalPoint("", "output", "hook_resid_post"),
    "mlp_hidden": CanonicalPoint("down_proj", "input", "mlp.hook_post"),
    "mlp_out": CanonicalPoint("mlp", "output", "hook_mlp_out"),
    "attn_out": CanonicalPoint("attn", "output", "hook_attn_out"),
    "resid_pre": CanonicalPoint("", "input", "hook_resid_pre"),
    "resid_mid": CanonicalPoint("mlp_norm", "input", "hook_resid_mid"),
    "mlp_in": CanonicalPoint("mlp", "input", "ln2.hook_normalized"),
}
