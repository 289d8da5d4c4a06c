"""`python -m gg_jax.pretrained`: list the released checkpoints, tell about one, fetch one.

    python -m gg_jax.pretrained list                    # the table, with the published accuracy
    python -m gg_jax.pretrained info NAME               # sources (Drive, Baidu code), licence, preprocessing
    python -m gg_jax.pretrained fetch NAME [--from_file PATH] [--cache_dir DIR] [--quiet]

Every error a user can fix is one `error:` line and exit status 1 (`gg_jax.cli.run_tool`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from gg_jax import cli, pretrained
from gg_jax.pretrained.registry import NOT_AVAILABLE


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m gg_jax.pretrained",
        description="The authors' released checkpoints: list them, or download, verify, convert and cache one.",
    )
    p.add_argument("--cache_dir", default=None, help="cache root (default: $GG_JAX_CACHE, else ~/.cache/gg_jax)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the entries, with their published accuracy")
    info = sub.add_parser("info", help="everything about one entry")
    info.add_argument("name")
    fetch = sub.add_parser("fetch", help="download (or take --from_file), verify, convert and cache one entry")
    fetch.add_argument("name")
    fetch.add_argument("--from_file", default=None, help="the entry's file, downloaded by hand (Baidu Pan, offline)")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar and no messages")
    return p


def table(cache_dir: str | None = None) -> str:
    """The registry as a Markdown table (what `list` prints)."""
    rows = [
        "| name | model | classes | top-1 / top-5 error (%) | protocol | download | cached |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in pretrained.names():
        e = pretrained.entry(name)
        where = ["URL"] * bool(e.urls) + ["Google Drive"] * bool(e.google_drive_id) + ["Baidu"] * bool(e.baidu_url)
        p = e.published
        rows.append(
            f"| {name} | {e.architecture} | {e.num_classes} | {p.top1_error:g} / {p.top5_error:g} | "
            f"{'10 crops' if p.ten_crop else '1 crop'} | {', '.join(where)} | "
            f"{'yes' if pretrained.cached(name, cache_dir) else 'no'} |"
        )
    lines = rows + ["", "Listed but not loadable:"] + [f"  {k}: {v}" for k, v in NOT_AVAILABLE.items()]
    return "\n".join(lines)


def describe(name: str, cache_dir: str | None = None) -> str:
    """Everything about entry `name` (what `info` prints)."""
    e = pretrained.entry(name)
    p = e.published
    target = os.path.join(pretrained.cache_root(cache_dir), "downloads", e.file_name)
    lines = [
        f"{e.name}: {e.architecture}, {e.num_classes} classes ({e.classes})",
        f"  published: top-1 error {p.top1_error:g} %, top-5 error {p.top5_error:g} % ({p.protocol}; {p.source})",
        f"  evaluate on: {e.dataset}; preprocessing: {e.preprocessing}",
        f"  file: {e.file_name}; sha256: {e.sha256 or 'not published'}; key convention: {e.convention}",
        *(f"  source: {s}" for s in e.sources()),
        f"  licence: {e.licence}",
    ]
    if e.model_options:
        lines.append("  model options: " + ", ".join(f"{k}={v!r}" for k, v in e.model_options.items()))
    if e.init_from_backbone_only:
        lines.append("  as config.init_from: the backbone only (the head and classifier stay fresh)")
    if e.notes:
        lines.append(f"  notes: {e.notes}")
    out = pretrained.cached(name, cache_dir)
    lines.append(f"  cached: {out}" if out else f"  cached: no (the file goes to {target})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        print(table(args.cache_dir))
    elif args.command == "info":
        print(describe(args.name, args.cache_dir))
    else:
        out = pretrained.fetch(args.name, from_file=args.from_file, cache_dir=args.cache_dir, progress=not args.quiet)
        print(out)
    return 0
