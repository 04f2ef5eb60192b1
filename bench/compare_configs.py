"""Run `totalrecall evaluate` for several backbones / stage pairs / input sizes on the shared data.

    python bench/compare_configs.py --data ../shared/datasets --out bench/out/compare.jsonl [--only NAME ...]

Each configuration runs in its own process (so peak RSS is per configuration) and appends one JSON
line; `--table` prints the markdown table used in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# name -> extra `totalrecall evaluate` arguments
CONFIGS: dict[str, list[str]] = {
    "lite0-b2b4-224": [],
    "lite0-b2b4-256": ["--image-size", "256"],
    "lite0-b2b4-288": ["--image-size", "288"],
    "lite0-b2b3-224": ["--layers", "blocks.2,blocks.3"],
    "lite0-b2b5-224": ["--layers", "blocks.2,blocks.5"],
    "lite1-b2b4-224": ["--backbone", "efficientnet_lite1"],
    "lite2-b2b4-224": ["--backbone", "efficientnet_lite2"],
    "lite0-b2b4-224-square": ["--resize", "square"],
    "lite0-paper-protocol": ["--image-size", "256", "--resize", "square", "--center-crop", "224"],
    "lite0-b2b4-224-noeq7": ["--num-neighbors", "0"],
    "lite0-scale-0.5": ["--resize", "scale", "--scale", "0.5"],
    "lite0-scale-0.35": ["--resize", "scale", "--scale", "0.35"],
    "lite0-scale-0.7": ["--resize", "scale", "--scale", "0.7"],
    "lite0-scale-1.0": ["--resize", "scale", "--scale", "1.0"],
    "lite0-scale-0.5-b2b5": ["--resize", "scale", "--scale", "0.5", "--layers", "blocks.2,blocks.5"],
    "lite0-scale-0.35-b2b5": ["--resize", "scale", "--scale", "0.35", "--layers", "blocks.2,blocks.5"],
    "lite0-scale-0.25": ["--resize", "scale", "--scale", "0.25"],
}
DATASETS = {"bottle": ("mvtec_ad", "bottle"), "mtd": ("mtd", "magnetic_tile")}


def run(data: Path, dataset: str, name: str, out: Path) -> None:
    sub, category = DATASETS[dataset]
    tmp = out.with_suffix(f".{dataset}.{name}.json")
    cmd = [sys.executable, "-m", "totalrecall.cli", "evaluate", "--data", str(data / sub), "--category",
           category, "--json", str(tmp), "--quiet", *CONFIGS[name]]
    subprocess.run(cmd, check=True)
    report = json.loads(tmp.read_text())
    tmp.unlink()
    with out.open("a") as f:
        f.write(json.dumps({"name": name, "dataset": dataset, "args": CONFIGS[name], **report}) + "\n")


def table(out: Path) -> str:
    lines = ["| dataset | config | image AUROC | pixel AUROC | AUPRO@0.3 | fit s (coreset s) | score ms/img "
             "| peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for row in map(json.loads, out.read_text().splitlines()):
        lines.append(f"| {row['dataset']} | {row['name']} | {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} "
                     f"| {row['aupro']:.3f} | {row['fit_seconds']:.1f} ({row['coreset_seconds']:.1f}) "
                     f"| {row['score_ms_per_image']:.1f} | {row['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    p.add_argument("--out", type=Path, default=Path("bench/out/compare.jsonl"))
    p.add_argument("--only", nargs="*", default=list(CONFIGS))
    p.add_argument("--datasets", nargs="*", default=list(DATASETS))
    p.add_argument("--table", action="store_true")
    a = p.parse_args()
    if a.table:
        print(table(a.out))
        return
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for name in a.only:
        for dataset in a.datasets:
            run(a.data, dataset, name, a.out)
            print(table(a.out).splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
