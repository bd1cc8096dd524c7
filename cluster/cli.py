"""The `gendertune` command line: one subcommand per stage, flags mapped onto stage configs.

Every flag defaults to None so that "not given" is distinguishable from a value: the stage config
then resolves defaults < --config file < flags (cluster.config.StageConfig.resolve).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from cluster.config import ConfigError
from cluster.storage import OutputExistsError

Handler = Callable[[argparse.Namespace], int]


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.8,0.2, got {text!r}") from None


def _overrides(args: argparse.Namespace, names: Sequence[str]) -> dict:
    return {name: getattr(args, name) for name in names}


def _add_prep(sub) -> None:
    parser = sub.add_parser(
        "prep",
        help="dedupe, verify, crop and split a folder of face images (Ray Data)",
        description="Turn a folder of face images plus labels into a clean, deduplicated, split, "
        "preprocessed dataset. Accepts CelebA's official layout or a folder plus a CSV.",
    )
    parser.add_argument("--data", help="data folder: img_align_celeba/ + list_attr_celeba.txt, or images + a CSV")
    parser.add_argument("--labels", help="label file (CelebA list_attr format or CSV); default: found in --data")
    parser.add_argument("--attribute", help="the target attribute column (default Male); 1/-1 or 1/0 become 1/0")
    parser.add_argument("--image-column", dest="image_column", help="CSV column with image names (default: auto)")
    parser.add_argument("--split", choices=["random", "official", "identity"], help="split method (default random)")
    parser.add_argument("--ratios", type=_ratios, help="split ratios: 2 = train,test, 3 = train,val,test (default 0.8,0.2)")
    parser.add_argument("--image-size", dest="image_size", type=int, help="square output side in px (default 128)")
    parser.add_argument("--seed", type=int, help="split seed (default 0)")
    parser.add_argument("--parallelism", type=int, help="concurrent decode tasks (default: one per CPU)")
    parser.add_argument("--out", help="output folder (created atomically)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace an existing prep output")
    parser.add_argument("--config", help="JSON/TOML config file with a [prep] section")
    parser.set_defaults(handler=_run_prep)


def _run_prep(args: argparse.Namespace) -> int:
    from data_prep.config import PrepConfig
    from data_prep.pipeline import run_prep

    names = ["data", "labels", "attribute", "image_column", "split", "ratios", "image_size", "seed",
             "parallelism", "out", "overwrite"]
    config = PrepConfig.resolve(config_file=args.config, overrides=_overrides(args, names))
    run_prep(config)
    return 0


def _add_make_sample(sub) -> None:
    parser = sub.add_parser(
        "make-sample",
        help="write a SYNTHETIC CelebA-layout dataset of drawn faces (for tests and the demo)",
        description="Write procedurally drawn faces in CelebA's layout (images + the four label files), "
        "with a few planted exact duplicates and one corrupt file. Synthetic: not real people.",
    )
    parser.add_argument("--out", required=True, help="new folder to write")
    parser.add_argument("--n", type=int, default=1000, help="number of image files (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.set_defaults(handler=_run_make_sample)


def _run_make_sample(args: argparse.Namespace) -> int:
    from data_prep.synthetic import make_sample

    summary = make_sample(args.out, n=args.n, seed=args.seed)
    print(f"wrote {summary.n_images} SYNTHETIC images ({summary.n_male} male, {summary.n_people} people, "
          f"{summary.n_duplicates} planted duplicates, {summary.n_corrupt} corrupt) to {summary.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gendertune",
        description="Prepare face images, fine-tune and tune classifiers for gender on Ray, and compare them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_make_sample, _add_prep):
        add(sub)
    return parser


# Errors a user can fix: print them plainly instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, OutputExistsError, FileNotFoundError, FileExistsError, ValueError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as err:
        print(f"gendertune {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
