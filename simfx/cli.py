"""The ``simfx`` command: ``simfx demo`` (the README's main job)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simfx", description="Self Identity Mapping as a torch.fx pass.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="transform a torchvision ResNet-18 and train it a few steps on CPU")
    demo.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as error:  # one clear line, non-zero exit
        print(f"simfx {args.command}: error: {error}".splitlines()[0], file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
