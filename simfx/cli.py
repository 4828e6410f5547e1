"""The ``simfx`` command.

``simfx inspect MODEL``
    Transform a model and show what the pass did: the :func:`simfx.explain`
    report on stdout, and on request a Markdown/text report, an SVG of the
    rewritten graph and the report as JSON.
``simfx demo``
    Train a torchvision ResNet-18 with and without SIM on scikit-learn's digits
    on CPU (about two minutes) and plot the curves.

Errors print one line on stderr and exit with status 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

_EPILOG_INSPECT = """examples:
  simfx inspect torchvision:resnet50
  simfx inspect timm:convnext_tiny --input-shape 1,3,224,224 --svg convnext.svg
  simfx inspect torchvision:vit_b_16 --model-arg image_size=64 --input-shape 2,3,64,64
  simfx inspect models.py:build --blocks 'layer*.*' --exclude layer4.1 --report sim.md --json sim.json
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage stays available through --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _selectors(values: list[str] | None):
    """Repeated or comma-separated globs -> a selector list (None when not given)."""
    if not values:
        return None
    return [s.strip() for v in values for s in v.split(",") if s.strip()]


def _inspect(args: argparse.Namespace) -> int:
    import torch

    import simfx
    from .model_spec import load_model, parse_model_args, parse_shape

    loaded = load_model(args.model, parse_model_args(args.model_arg))
    if args.input_shape:
        example = (torch.randn(*parse_shape(args.input_shape)),)
    elif loaded.example_inputs is not None:
        example = loaded.example_inputs
    else:
        example = (torch.randn(*loaded.default_shape),)
    options = {}
    if args.blocks:
        options["blocks"] = _selectors(args.blocks)
    if args.exclude:
        options["exclude"] = _selectors(args.exclude)
    if args.objective:
        options["objective"] = args.objective
    if args.token_ratio is not None:
        options["token_ratio"] = args.token_ratio
    sim = simfx.transform(loaded.model, example, **options)
    report = simfx.explain(sim, example, name=args.model)
    print(report.to_markdown() if args.markdown else report)
    written = []
    if args.report:
        path = Path(args.report)
        markdown = path.suffix.lower() in (".md", ".markdown")
        _write(path, report.to_markdown() if markdown else str(report) + "\n")
        written.append(path)
    if args.json:
        data = report.to_dict()
        data["graph_diff"] = _diff_dict(simfx.graph_diff(sim))
        _write(Path(args.json), json.dumps(data, indent=2) + "\n")
        written.append(Path(args.json))
    if args.svg:
        written.append(simfx.draw(sim, args.svg, full=args.full, engine=args.engine, example_inputs=example))
    for path in written:
        print(f"wrote {path}")
    return 0


def _diff_dict(diff) -> dict:
    return {
        "added_nodes": list(diff.added_nodes),
        "added_edges": [list(e) for e in diff.added_edges],
        "removed_edges": [list(e) for e in diff.removed_edges],
    }


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        epochs=args.epochs,
        batch_size=args.batch_size,
        image_size=args.image_size,
        beta=args.beta,
        seed=args.seed,
        subset=args.subset,
        out=args.out,
        progress=not args.no_progress,
    )
    return 0


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="simfx", description="Self Identity Mapping (SIM) as a torch.fx pass.")
    parser.add_argument("--version", action="version", version=f"simfx {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    inspect = sub.add_parser(
        "inspect",
        help="transform a model and report what the pass did (blocks, sizes, FLOPs, rejected candidates)",
        description="Transform MODEL with simfx and print the explain report; optionally write a report, "
                    "an SVG of the rewritten graph and JSON.",
        epilog=_EPILOG_INSPECT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("model", metavar="MODEL",
                         help="torchvision:NAME, timm:NAME, path/to/file.py:factory or package.module:factory")
    inspect.add_argument("--input-shape", metavar="B,C,H,W",
                         help="example input shape (default: 2,3,224,224, or the timm model's input size)")
    inspect.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                         help="keyword argument for the model constructor or factory (repeatable)")
    inspect.add_argument("--blocks", action="append", metavar="GLOB",
                         help="blocks to give SIM, as name globs (repeatable or comma-separated; default: auto)")
    inspect.add_argument("--exclude", action="append", metavar="GLOB", help="blocks to leave out (name globs)")
    inspect.add_argument("--objective", help="objective for every block (default rho_sim)")
    inspect.add_argument("--token-ratio", type=float, help="share of tokens sampled per step (default 0.2)")
    inspect.add_argument("--report", metavar="FILE", help="write the report (.md: Markdown, else plain text)")
    inspect.add_argument("--svg", metavar="FILE", help="draw the rewritten graph (.svg, or .png/.dot)")
    inspect.add_argument("--json", metavar="FILE", help="write the report and the graph diff as JSON")
    inspect.add_argument("--full", action="store_true", help="draw every graph node instead of one box per block")
    inspect.add_argument("--engine", choices=("auto", "dot", "matplotlib"), default="auto",
                         help="drawing engine: graphviz dot if installed (auto), or the built-in layout")
    inspect.add_argument("--markdown", action="store_true", help="print the report as Markdown")
    inspect.set_defaults(run=_inspect)

    demo = sub.add_parser(
        "demo",
        help="train a ResNet-18 with and without SIM on scikit-learn digits (CPU, about two minutes)",
        description="Transform a torchvision ResNet-18, train it on scikit-learn's 8x8 digits (upsampled) with "
                    "and without SIM, print task loss, SIM loss and test accuracy for both, and plot the curves.",
    )
    demo.add_argument("--epochs", type=_positive(int), default=3, help="epochs per arm (default 3)")
    demo.add_argument("--batch-size", type=_positive(int), default=64, help="batch size (default 64)")
    demo.add_argument("--image-size", type=_positive(int), default=48, help="image side after resizing (default 48)")
    demo.add_argument("--beta", type=_positive(float), default=5e-3, help="SIM loss weight (default 0.005)")
    demo.add_argument("--subset", type=_positive(int), help="use only this many training images (quick runs)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--out", default="simfx-demo/curves.png", help="PNG of the curves (default simfx-demo/curves.png)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # `simfx inspect ... | head`: the reader left, nothing to report
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print(f"simfx {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one clear line, non-zero exit
        print(f"simfx {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    """The summary line of an error plus its last line, which in simfx's errors says what to do."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    first = lines[0]
    if len(lines) > 1 and first.endswith(":"):
        # "...rejected:" introduces a list that is left out here: drop that sentence.
        first = first.rsplit(". ", 1)[0].rstrip(":") + "."
    return first if len(lines) == 1 else f"{first} {lines[-1]}"


if __name__ == "__main__":
    raise SystemExit(main())
