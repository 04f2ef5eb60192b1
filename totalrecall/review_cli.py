"""`totalrecall review mark|list|clear`: an inspector's verdicts on scored images (`scheduler.reviews`)."""

from __future__ import annotations

import argparse
import getpass

from common.db import ReviewLabel


def add_review_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("review", help="record an inspector's verdict on scored images; images "
                                   "reviewed good join the next fit's memory bank")
    sub = parser.add_subparsers(dest="review_command", required=True)
    mark = sub.add_parser("mark", help="record a verdict (replaces an earlier one)")
    mark.add_argument("name", metavar="PRODUCT")
    mark.add_argument("images", nargs="+", metavar="IMAGE_URI", help="as `anomaly_history.image_uri` shows it")
    verdict = mark.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--good", dest="label", action="store_const", const=ReviewLabel.GOOD.value,
                         help="a false alarm: a good part; the next fit learns it")
    verdict.add_argument("--defective", dest="label", action="store_const", const=ReviewLabel.DEFECTIVE.value,
                         help="a confirmed defect")
    mark.add_argument("--type", dest="defect_type", metavar="NAME", help="defect type (with --defective)")
    mark.add_argument("--note", help="free text kept with the verdict")
    mark.add_argument("--by", default=_user(), help="who reviewed (default: the login name)")
    mark.set_defaults(handler=_cmd_mark)
    listing = sub.add_parser("list", help="a product's reviews, newest first")
    listing.add_argument("name", metavar="PRODUCT")
    listing.add_argument("--label", choices=[label.value for label in ReviewLabel], help="only this verdict")
    listing.set_defaults(handler=_cmd_list)
    clear = sub.add_parser("clear", help="remove verdicts given by mistake")
    clear.add_argument("name", metavar="PRODUCT")
    clear.add_argument("images", nargs="+", metavar="IMAGE_URI")
    clear.set_defaults(handler=_cmd_clear)
    return parser


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in this environment
        return None


def _cmd_mark(a: argparse.Namespace) -> int:
    from scheduler.reviews import mark

    before = mark(a.name, a.images, a.label, a.defect_type, a.note, a.by)
    changed = sum(1 for label in before.values() if label not in (None, a.label))
    print(f"{len(before)} image(s) of {a.name!r} reviewed {a.label}"
          + (f" ({changed} had another verdict)" if changed else ""))
    if a.label == ReviewLabel.GOOD:
        print(f"the next fit (`totalrecall fit {a.name}`) puts them in its memory bank")
    return 0


def _cmd_list(a: argparse.Namespace) -> int:
    from scheduler.reviews import list_reviews
    from totalrecall.jobs_view import format_table

    rows = [[r.reviewed_at.strftime("%Y-%m-%d %H:%M") if r.reviewed_at else "", r.label, r.defect_type or "",
             r.reviewed_by or "", r.image_uri, r.note or ""] for r in list_reviews(a.name, a.label)]
    print(format_table(["reviewed (UTC)", "verdict", "type", "by", "image", "note"], rows)
          if rows else f"no reviews of {a.name!r}" + (f" with verdict {a.label}" if a.label else ""))
    return 0


def _cmd_clear(a: argparse.Namespace) -> int:
    from scheduler.reviews import clear

    removed, asked = clear(a.name, a.images)
    unreviewed = f" ({asked - removed} of the images given had none)" if removed < asked else ""
    print(f"{removed} review(s) of {a.name!r} removed{unreviewed}")
    return 0
