"""Downloads and time of a fit whose training images come from S3, as a worker fits (one loader each).

    python bench/fit_downloads.py --data ../shared/datasets/mvtec_ad/bottle/train/good
    python bench/fit_downloads.py --images 200            # generated 256 x 256 parts

Starts a moto S3 server on loopback (`moto_server`), uploads the images, then fits the default model
(`resize=auto`) on loaders that read each object through `common.storage`, as `workers/fitting.py`
does, in turns with spooling on (the default: each loader called once) and off (the fit before
`common/engine/spool.py`: every image read for its size, then again for its features). Counts the S3
GETs and bytes, and times the fit.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchlib import HostShares, record  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def images_to_upload(a: argparse.Namespace) -> list[tuple[str, bytes]]:
    if a.data:
        files = sorted(p for p in Path(a.data).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        return [(p.name, p.read_bytes()) for p in files]
    from common.synthetic import encoded_parts

    return [(f"{i:05d}.png", data) for i, data in enumerate(encoded_parts(a.images, 256, seed=0))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a folder of training images (default: generated parts)")
    p.add_argument("--images", type=int, default=200, help="generated parts when --data is not given")
    p.add_argument("--rounds", type=int, default=2, help="fits per arm, in turns")
    p.add_argument("--out", type=Path, default=REPO / "bench/out/fit_downloads.jsonl")
    a = p.parse_args()
    port = free_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    moto = start_moto(port)
    try:
        run(a)
    finally:
        moto.terminate()
        moto.wait(10)


def run(a: argparse.Namespace) -> None:
    import boto3

    import common.engine.patchcore as patchcore_module
    from common.engine.config import PatchCoreConfig
    from common.engine.patchcore import PatchCore
    from common.engine.spool import needs_spool
    from common.storage import S3Storage, list_uris, open_storage, read_uri

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench-train")
    root = "s3://bench-train/train"
    storage = open_storage(root)
    uploads = images_to_upload(a)
    for name, data in uploads:
        storage.put_bytes(name, data)
    uris = list_uris(root)
    total_mb = sum(len(d) for _, d in uploads) / 2**20

    counted = {"gets": 0, "bytes": 0}
    original = S3Storage.get_bytes

    def counting_get(self, key, max_bytes=None):
        data = original(self, key, max_bytes)
        counted["gets"] += 1
        counted["bytes"] += len(data)
        return data

    S3Storage.get_bytes = counting_get
    arms = {"spool": needs_spool, "no_spool": lambda images: False}
    for round_ in range(a.rounds):
        for arm, rule in arms.items():
            patchcore_module.needs_spool = rule
            counted.update(gets=0, bytes=0)
            model = PatchCore(PatchCoreConfig())
            with tempfile.TemporaryDirectory() as scratch:
                host, t = HostShares(), time.perf_counter()
                stats = model.fit([lambda u=u: read_uri(u) for u in uris], scratch_dir=scratch)
                wall = time.perf_counter() - t
            record({"arm": arm, "round": round_, "images": len(uris), "train_mb": round(total_mb, 1),
                    "s3_gets": counted["gets"], "s3_mb": round(counted["bytes"] / 2**20, 1),
                    "fit_s": round(wall, 1), "extract_s": stats["extract_seconds"],
                    "resize": model.config.resize, "bank": stats["bank_size"],
                    "loadavg": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(), **host.shares()}, a.out)


if __name__ == "__main__":
    main()
