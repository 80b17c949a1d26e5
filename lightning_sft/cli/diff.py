"""``lightning-sft diff inspect|apply|revert``: sparse diff files from the command line.

``inspect`` prints what a diff holds and how compact it is; ``apply`` / ``revert`` load a Hugging Face
model directory (or a shipped model name), change it in place in memory, and write the result to a
new directory (weights, config and every other file of the source), atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lightning_sft.assets import resolve_model_dir
from lightning_sft.sparse_ft.diff import DiffError, SparseDiff
from lightning_sft.sparse_ft.diff_file import read_diff
from lightning_sft.sparse_ft.diff_module import apply_diff, revert_diff
from lightning_sft.usage import UsageParser

# Files of a model directory that save_pretrained writes itself; everything else is copied over.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_WRITTEN = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def describe(diff: SparseDiff, path: Path) -> dict[str, Any]:
    """What ``inspect`` prints, as JSON-serialisable data."""
    size = path.stat().st_size
    return {
        "file": str(path),
        "file_bytes": size,
        "ideal_bytes": diff.ideal_bytes,
        "size_vs_ideal": size / diff.ideal_bytes if diff.ideal_bytes else None,
        "nnz": diff.nnz,
        "density": diff.density,
        "fixups": sum(t.fixup_positions.numel() for t in diff.tensors.values()),
        "base_fingerprint": diff.base_fingerprint,
        "tuned_fingerprint": diff.tuned_fingerprint,
        **diff.info,
        "tensors": {
            name: {"shape": list(t.shape), "nnz": t.indices.numel(), "density": t.indices.numel() / t.numel,
                   "fixups": t.fixup_positions.numel()}
            for name, t in diff.tensors.items()
        },
    }


def format_description(report: dict[str, Any]) -> str:
    info = ", ".join(f"{key} {report[key]}" for key in ("source", "selection", "dtype") if key in report)
    lines = [
        f"{report['file']}: {report['file_bytes']:,} bytes, {report['size_vs_ideal']:.2f}x the values alone"
        f" ({report['ideal_bytes']:,} bytes)",
        f"{report['nnz']:,} changed entries in {len(report['tensors'])} tensors, density {report['density']:.4%},"
        f" {report['fixups']:,} exact-revert fixups; {info}",
        f"base fingerprint {report['base_fingerprint'][:16]}..., tuned {report['tuned_fingerprint'][:16]}...",
    ]
    width = max(len(name) for name in report["tensors"])
    lines += [
        f"  {name:<{width}}  {'x'.join(map(str, t['shape'])):>11}  {t['nnz']:>9,}  {t['density']:>8.3%}"
        for name, t in report["tensors"].items()
    ]
    return "\n".join(lines)


def load_model(model: str) -> Any:
    """The model of a Hugging Face directory (or shipped name), in the dtype it was saved in."""
    import transformers
    from transformers import AutoConfig, AutoModel

    directory = resolve_model_dir(model)
    if directory is None or not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{model!r} is not a model directory (config.json + weights) or a shipped model name.")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    return (model_class or AutoModel).from_pretrained(directory, local_files_only=True, dtype="auto"), directory


def write_model(model: Any, source: Path, out: Path) -> None:
    """Save ``model`` with every other file of ``source`` into ``out``, which appears only when complete."""
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new output directory (nothing was written).")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        for item in source.iterdir():
            if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and item.name not in _WRITTEN:
                shutil.copy2(item, staging / item.name)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_parser() -> UsageParser:
    parser = UsageParser(prog="lightning-sft diff", description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="action", required=True)
    inspect = actions.add_parser("inspect", help="print a diff's contents, size and fingerprints")
    inspect.add_argument("diff", type=Path, help="the .safetensors diff file")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for action, verb in (("apply", "add the diff to"), ("revert", "subtract the diff from")):
        sub = actions.add_parser(action, help=f"{verb} a model directory and write the result")
        sub.add_argument("diff", type=Path, help="the .safetensors diff file")
        sub.add_argument("--model", required=True, help="a Hugging Face model directory or a shipped model name")
        sub.add_argument("--out", required=True, type=Path, help="the new directory to write the result to")
        sub.add_argument("--no-verify-base", action="store_true",
                         help="skip the base checks (fingerprint, changed entries): apply to another base on purpose")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.action == "inspect":
            report = describe(read_diff(args.diff), args.diff)
            print(json.dumps(report, indent=2) if args.json else format_description(report))
            return 0
        if args.out.exists():
            raise FileExistsError(f"{args.out} already exists; choose a new output directory (nothing was written).")
        model, source = load_model(args.model)
        change = apply_diff if args.action == "apply" else revert_diff
        diff = change(model, args.diff, verify_base=not args.no_verify_base)
        write_model(model, source, args.out)
    except (DiffError, FileNotFoundError, FileExistsError) as error:
        parser.exit(2, f"lightning-sft diff {args.action}: error: {error}\n")
    done = "applied to" if args.action == "apply" else "reverted from"
    print(f"{args.diff} ({diff.nnz:,} entries) {done} {args.model}; wrote {args.out}")
    return 0
