"""A product's labelled validation images, from which each of its fits sets its thresholds.

Layout under the product's validation URI (MVTec AD's test layout, so a dataset's `test` folder with its
`ground_truth` copied in works as is):

    good/...                                       nominal images
    <defect type>/...                              defective images, one folder per type
    ground_truth/<defect type>/<stem>_mask.png     optional defect masks (0/255, or 0/1; any image suffix, in
                                                   any case: `common.engine.mvtec.masks_by_stem`)

The image threshold is F1-optimal over every validation image that decodes, or, with the product's
`max_false_alarms`, the lowest that flags at most that fraction of the nominal images (the validation
folder's and the fit's held-out ones), whatever the folder's mix; the pixel threshold is F1-optimal over
the nominal images and the defective ones that have a mask, and stays at the nominal rule when none has
one (`PatchCore.calibrate_with_labels`). A mask that cannot be read leaves its image out of the pixel
threshold, and the fit's `validation_set` statistics name it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from PIL import Image

from common.engine.mvtec import masks_by_stem, read_mask
from common.engine.patchcore import PatchCore
from common.images import DECODER_FAULTS, IMAGE_SUFFIXES
from common.storage import StorageNotFound, list_uris, listed_uri, open_storage, read_uri, walk_keys
from workers.job_state import name_failures

NOMINAL = "good"
MASKS = "ground_truth"
# What reading one mask may raise; the mask is then left out. ObjectTooLarge is a ValueError; Pillow refuses
# a mask above twice TOTALRECALL_MAX_IMAGE_PIXELS with DecompressionBombError; DECODER_FAULTS are a decoder
# plugin's own failures on a malformed file (as for images)
MASK_ERRORS = (OSError, ValueError, SyntaxError, StorageNotFound, Image.DecompressionBombError, *DECODER_FAULTS)


class ValidationSetError(ValueError):
    """The validation folder cannot be used as laid out (the message says why)."""


@dataclass(frozen=True)
class ValidationSet:
    uri: str
    images: list[str]  # URIs
    labels: list[int]  # 0 nominal, 1 defective
    masks: list[str | None]  # URI of each defective image's mask, if there is one


def list_validation_set(uri: str) -> ValidationSet:
    """The labelled images under `uri` (module docstring); an error if it holds no nominal or no
    defective image, or images outside a label folder."""
    if not list_uris(uri, IMAGE_SUFFIXES):  # never creates a missing local folder, unlike open_storage
        raise ValidationSetError(f"no images under the validation folder {uri}")
    storage = open_storage(uri)
    listed, unreadable = walk_keys(storage)
    if unreadable:  # its images would be left out of the thresholds without a word
        raise ValidationSetError(f"cannot read {', '.join(unreadable[:3])}" + (" ..." if len(unreadable) > 3
                                 else "") + f" under the validation folder {uri} (permission denied)")
    keys = sorted(k for k in listed if k.lower().endswith(IMAGE_SUFFIXES))
    mask_keys = {k for k in keys if k.startswith(MASKS + "/")}
    image_keys = [k for k in keys if k not in mask_keys]
    loose = [k for k in image_keys if "/" not in k]
    if loose:
        raise ValidationSetError(f"validation images must be in {NOMINAL}/ or a defect-type folder under "
                                 f"{uri}; not: {', '.join(loose[:3])}" + (" ..." if len(loose) > 3 else ""))
    labels = [0 if k.split("/", 1)[0] == NOMINAL else 1 for k in image_keys]
    if 0 not in labels or 1 not in labels:
        raise ValidationSetError(f"validation folder {uri} needs nominal images in {NOMINAL}/ and defective "
                                 f"ones in defect-type folders: found {labels.count(0)} and {labels.count(1)}")
    by_stem = masks_by_stem(mask_keys)
    masks = [None if label == 0 else by_stem.get(_mask_stem(k)) for k, label in zip(image_keys, labels, strict=True)]
    return ValidationSet(uri, [listed_uri(storage, k) for k in image_keys], labels,
                         [None if m is None else listed_uri(storage, m) for m in masks])


class _Masks(Sequence):
    """The defect masks of a validation set, each read from storage when it is indexed (so a large set
    never holds them all); one that cannot be read is None, and is listed in `unreadable`."""

    def __init__(self, uris: list[str | None], max_bytes: int) -> None:
        self.uris, self.max_bytes = uris, max_bytes
        self.unreadable: list[dict[str, str]] = []

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i):  # type: ignore[override]  # ints only
        uri = self.uris[i]
        if uri is None:
            return None
        try:
            return read_mask(read_uri(uri, self.max_bytes))
        except MASK_ERRORS as exc:
            self.unreadable.append({"mask": uri, "error": f"{type(exc).__name__}: {exc}"})
            return None


def _mask_stem(image_key: str) -> str:
    """The key of an image's mask less its `_mask<suffix>`: `crack/001.png` -> `ground_truth/crack/001`."""
    path = PurePosixPath(image_key)
    return str(PurePosixPath(MASKS, *path.parent.parts, path.stem))


def calibrate_on_validation_set(model: PatchCore, found: ValidationSet,
                                loader: Callable[[str], Callable[[], bytes]], max_bytes: int,
                                max_false_alarms: float | None = None) -> dict[str, Any]:
    """Set `model`'s thresholds on the validation images `found` (`list_validation_set`): F1-optimal, or
    the image threshold at a false-alarm budget; returns what was used (also in
    `model.stats["validation_set"]`)."""
    masks = _Masks(found.masks, max_bytes)
    model.calibrate_with_labels([loader(u) for u in found.images], masks, found.labels, max_false_alarms)
    summary = model.stats["validation_set"]
    summary["uri"] = found.uri
    summary["unreadable_masks"] = masks.unreadable
    summary["failed_images"] = name_failures(summary["failed_images"], found.images)
    return summary
