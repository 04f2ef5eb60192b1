"""The `totalrecall` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.engine.config import PatchCoreConfig


def add_model_options(p: argparse.ArgumentParser) -> None:
    """PatchCore settings, shared by every command that fits a model."""
    d = PatchCoreConfig()
    p.add_argument("--backbone", default=d.backbone,
                   help="efficientnet_lite0/1/2 (offline), wide_resnet50_2, resnet18")
    p.add_argument("--layers", default=None, help="comma-separated stages (default: stride 8 and 16)")
    p.add_argument("--weights", default=None, help="local state-dict file for the backbone")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--resize", choices=["keep_aspect", "square"], default=d.resize)
    p.add_argument("--center-crop", type=int, default=None, help="paper protocol: --image-size 256 "
                   "--resize square --center-crop 224")
    p.add_argument("--embed-dim", type=int, default=d.embed_dim)
    p.add_argument("--coreset-ratio", type=float, default=d.coreset_ratio)
    p.add_argument("--projection-dim", type=int, default=d.projection_dim)
    p.add_argument("--num-neighbors", type=int, default=d.num_neighbors, help="b of Eq. 7 (0 = off)")
    p.add_argument("--holdout-fraction", type=float, default=d.holdout_fraction)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)


def config_from_args(a: argparse.Namespace) -> PatchCoreConfig:
    return PatchCoreConfig(
        backbone=a.backbone, layers=tuple(a.layers.split(",")) if a.layers else None,
        image_size=a.image_size, resize=a.resize, center_crop=a.center_crop, embed_dim=a.embed_dim,
        coreset_ratio=a.coreset_ratio, projection_dim=a.projection_dim, num_neighbors=a.num_neighbors,
        holdout_fraction=a.holdout_fraction, batch_size=a.batch_size, seed=a.seed,
    )


def cmd_evaluate(a: argparse.Namespace) -> int:
    from common.engine.evaluate import evaluate, format_table

    report = evaluate(a.data, a.category, config_from_args(a), shots=a.shots, weights=a.weights,
                      device=a.device, progress=not a.quiet)
    print(format_table(report))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="totalrecall", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="fit and evaluate on a dataset in MVTec AD layout")
    ev.add_argument("--data", required=True, help="dataset root (DIR/NAME/train/good ...)")
    ev.add_argument("--category", required=True)
    ev.add_argument("--shots", type=int, default=None, help="fit on K training images only")
    ev.add_argument("--json", default=None, help="write the report here")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_options(ev)
    ev.set_defaults(handler=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
