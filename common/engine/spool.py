"""Fetch each training image once into a scratch folder, for a fit that reads every image twice.

With `resize="auto"` a fit reads every image's size before it extracts any feature (the resize it
picks depends on all of them), so an image given as a loader (a download from S3, in a worker) would be
fetched twice, and a third time for in-sample calibration. Spooling calls each loader once, writes what
it returns to local disk, and hands the fit file paths instead: the same bytes for both passes, one
download each, and RAM stays bounded (the folder holds the training set's encoded size).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import numpy as np
from tqdm import tqdm

from common.engine.loader import IMAGE_ERRORS, ImageSource


def needs_spool(images: Sequence[ImageSource]) -> bool:
    return any(callable(source) for source in images)


def spool(images: Sequence[ImageSource], folder: Path, reserve_bytes: int = 0, threads: int = 8,
          progress: bool = False) -> list[ImageSource]:
    """`images` with every loader called once (in parallel): bytes it returns become a file in
    `folder` and arrays a .npy file, replaced by their path or a loader of that file; a loader that
    fails is replaced by one that raises the same error again. Other sources are kept as they are.

    The disk is never filled for this: an image that would leave less than `reserve_bytes` free (the
    fit's feature store still needs room), or that cannot be written, keeps its loader, which the fit
    then calls again."""
    def fetch(item: tuple[int, ImageSource]) -> ImageSource:
        pos, source = item
        if not callable(source):
            return source
        try:
            data = source()
        except IMAGE_ERRORS as exc:
            return _raiser(exc)
        if not isinstance(data, bytes | np.ndarray):
            return data  # a path or another source: read as given
        is_array = isinstance(data, np.ndarray)
        path = folder / (f"{pos:07d}.npy" if is_array else f"{pos:07d}")
        try:
            if shutil.disk_usage(folder).free - (data.nbytes if is_array else len(data)) < reserve_bytes:
                return source
            if not is_array:
                path.write_bytes(data)
                return path
            np.save(path, data, allow_pickle=False)
        except OSError:
            path.unlink(missing_ok=True)
            return source
        return lambda: np.load(path, allow_pickle=False)

    with ThreadPoolExecutor(max_workers=threads) as pool, \
            tqdm(total=len(images), desc="download", disable=not progress, unit="img") as bar:
        out = []
        for source in pool.map(fetch, enumerate(images)):
            out.append(source)
            bar.update(1)
        return out


def _raiser(exc: Exception) -> Callable[[], NoReturn]:
    def load() -> NoReturn:
        raise exc

    return load
