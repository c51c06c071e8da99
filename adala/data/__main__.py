"""``python -m adala.data write SRC OUT --format ...``: a data set on disk to webdataset shards + manifest."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from adala.errors import UserError
from adala.logs import configure_logging

SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)B?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``500M``, ``1.5G``, ``2GB`` (powers of 1000)."""
    match = SIZE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 1G)")
    return int(float(match[1]) * 1000 ** " KMGT".index(match[2].upper() or " "))


def parser() -> argparse.ArgumentParser:
    from adala.data.sources import FORMATS
    from adala.data.sources import __doc__ as layouts

    top = argparse.ArgumentParser(prog="python -m adala.data", description="Write data sets as webdataset shards.")
    commands = top.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write SRC as shards in OUT", description=layouts,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    write.add_argument("src", metavar="SRC", help="the data set's folder (see the layouts above)")
    write.add_argument("out", metavar="OUT", help="folder for <split>-NNNNNN.tar and <split>.manifest.json")
    write.add_argument("--format", required=True, choices=sorted(FORMATS))
    write.add_argument("--split", default="train", help="train (default), val, or the data set's own split name")
    write.add_argument("--labels", help="in1k: labels of a flat validation folder")
    write.add_argument("--samples-per-shard", type=int, default=1000)
    write.add_argument("--shard-bytes", type=parse_size, help="also start a new shard before this size, e.g. 1G")
    write.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="shards written at once")
    order = write.add_mutually_exclusive_group()
    order.add_argument("--seed", type=int, default=0, help="seed of the shuffle across shards (default 0)")
    order.add_argument("--no-shuffle", action="store_true", help="keep the sorted source order")
    return top


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    configure_logging()
    from adala.data.sources import list_source
    from adala.data.writer import WriteOptions, write_listing

    try:
        listing = list_source(args.format, args.src, split=args.split, labels=args.labels)
        if listing.left_out:
            logging.warning("%d image(s) have no annotation and are left out, e.g. %s", len(listing.left_out), listing.left_out[0])
        options = WriteOptions(split=args.split, samples_per_shard=args.samples_per_shard, shard_bytes=args.shard_bytes,
                               processes=args.processes, seed=None if args.no_shuffle else args.seed)
        manifest = write_listing(listing, args.out, options)
    except UserError as err:
        print(f"adala.data: error: {err}", file=sys.stderr)
        return 2
    last = len(manifest["shards"]) - 1
    pattern = Path(args.out) / f"{args.split}-{{000000..{last:06d}}}.tar"
    print(f"{manifest['samples']} samples in {last + 1} shards; use data.train (or data.val)='{pattern}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
