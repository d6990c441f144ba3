"""``python -m engine models``: the model registry, or one model's hook points per layer."""

from __future__ import annotations

import argparse

from engine.cli.arguments import HelpFormatter
from engine.cli.output import closed_pipe_is_fine, print_table
from engine.errors import HookPointError
from engine.models.registry import list_models


def add_parser(commands, common: argparse.ArgumentParser) -> None:
    models = commands.add_parser("models", parents=[common], formatter_class=HelpFormatter,
                                 help="list the model registry, or one model's hook points")
    models.add_argument("--points", metavar="NAME", help="registry name or local model folder: print its "
                        "hook points per layer (module, width, TransformerLens name) from its config alone")
    models.set_defaults(run=closed_pipe_is_fine(_models))


def _models(args: argparse.Namespace) -> int:
    if args.points is not None:
        return _hook_points(args.points)
    print_table(("name", "arch", "layers", "hidden", "mlp", "probe", "hf_repo_id"),
                [(s.name, s.architecture, str(s.num_layers), str(s.hidden_dim), str(s.mlp_dim),
                  str(s.default_probe_layer), s.hf_repo_id) for s in list_models()])
    return 0


def _hook_points(name_or_path: str) -> int:
    """Print every canonical hook point of a model, per layer, from its architecture config alone."""
    from engine.capture.hookpoints import (
        CANONICAL_POINTS,
        family_of,
        layer_modules,
        measure_widths,
        resolve_hook_points,
    )
    from engine.models.loading import architecture_config, meta_model

    model = meta_model(architecture_config(name_or_path))
    layers = range(len(layer_modules(model)))
    points, missing = [], {}
    for point in CANONICAL_POINTS:
        try:
            resolve_hook_points(model, [0], [point], {})
            points.append(point)
        except HookPointError as error:
            missing[point] = str(error)
    hook_points = resolve_hook_points(model, layers, points, {})
    widths = measure_widths(model, hook_points)
    print(f"{name_or_path}: {family_of(model)}, {len(layers)} layers, {len(points)} points per layer "
          "(from the config on the meta device: no weights read)")
    print_table(("layer", "point", "width", "module (input or output)", "tl_name"),
                [(str(hp.layer), hp.point, str(widths[hp.key]), f"{hp.module_path} ({hp.capture})",
                  hp.tl_name) for hp in hook_points])
    for point, reason in missing.items():
        print(f"{point}: not available: {reason}")
    return 0
