"""The `gendertune` command line: one subcommand per stage, its flags generated from the stage configs.

A stage's flags are its config dataclass's fields (gendertune.base.flags). Every flag defaults to None
so that "not given" is distinguishable from a value: the stage config then resolves
defaults < --config file < flags (gendertune.base.config.StageConfig.resolve).
Only the subcommand being run gets its flags built: that imports its configs' modules (torch, for
the model registry's names), which `gendertune leaderboard`, `jobs` or `--help` should not pay for.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from gendertune.base import flags
from gendertune.base.console import print_progress_to_stdout
from gendertune.base.errors import GendertuneError, StageFailed
from gendertune.cluster.environment import package_version

Handler = Callable[[argparse.Namespace], int]


def _add_config_flag(parser: argparse.ArgumentParser, *configs) -> None:
    sections = [f"[{config.section}]" for config in configs]
    named = (
        f"a {sections[0]} section" if len(sections) == 1 else f"{', '.join(sections[:-1])} and {sections[-1]} sections"
    )
    parser.add_argument("--config", help=f"JSON/TOML config file with {named}")


def _prep_flags(parser: argparse.ArgumentParser) -> None:
    from gendertune.data_prep.config import PrepConfig

    flags.add_flags(parser, PrepConfig)
    _add_config_flag(parser, PrepConfig)


def _run_prep(args: argparse.Namespace) -> int:
    from gendertune.data_prep.config import PrepConfig
    from gendertune.data_prep.pipeline import run_prep

    run_prep(PrepConfig.resolve(config_file=args.config, overrides=flags.overrides(args, PrepConfig)))
    return 0


def _make_sample_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="new folder to write")
    parser.add_argument("--n", type=int, default=1000, help="number of image files (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")


def _run_make_sample(args: argparse.Namespace) -> int:
    from gendertune.data_prep.synthetic import make_sample

    summary = make_sample(args.out, n=args.n, seed=args.seed)
    print(
        f"wrote {summary.n_images} SYNTHETIC images ({summary.n_male} male, {summary.n_people} people, "
        f"{summary.n_duplicates} planted duplicates, {summary.n_corrupt} corrupt) to {summary.path}"
    )
    return 0


def _augment(text: str) -> dict[str, float]:
    """`none`, or comma-separated NAME=STRENGTH pairs, e.g. hflip=0.5,rotation=10."""
    from gendertune.models.transforms import AUGMENTATIONS

    if text.strip().lower() == "none":
        return dict.fromkeys(AUGMENTATIONS, 0.0)
    strengths = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in AUGMENTATIONS or not value:
            raise argparse.ArgumentTypeError(
                f"--augment takes 'none' or NAME=STRENGTH pairs with NAME in {', '.join(AUGMENTATIONS)}; got {part!r}"
            )
        try:
            strengths[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--augment {name}: {value!r} is not a number") from None
    return strengths


def _add_train_flags(parser: argparse.ArgumentParser, *, skip: Collection[str] = ()) -> None:
    """TrainConfig's flags, less `skip`, and --augment for its augmentation strengths: `train`'s and `compare`'s."""
    from gendertune.models.transforms import AUGMENTATIONS
    from gendertune.tuning.train.config import TrainConfig

    flags.add_flags(parser, TrainConfig, skip=skip)
    declared = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    defaults = ",".join(f"{name}={flags.shown_default(declared[name])}" for name in AUGMENTATIONS)
    parser.add_argument(
        "--augment",
        type=_augment,
        help=f"augmentation strengths, 0 = off: 'none' or NAME=STRENGTH pairs (default {defaults}); "
        "each is also a [train] setting",
    )


def _add_mlflow_flag(parser: argparse.ArgumentParser) -> None:
    # Not a config setting: where a run is tracked must not make its resume refuse the same run.
    parser.add_argument(
        "--mlflow",
        nargs="?",
        const="auto",
        default=None,
        metavar="URI",
        help="track in MLflow: each trial's params and per-epoch metrics, per model its final metrics "
        "and files; URI = http://HOST:5000, sqlite:////PATH/mlflow.db, databricks; without URI: "
        "OUT/mlflow.db (browse with `mlflow ui --backend-store-uri sqlite:////ABS/OUT/mlflow.db`)",
    )


def _train_overrides(args: argparse.Namespace) -> dict:
    from gendertune.tuning.train.config import TrainConfig

    return {**flags.overrides(args, TrainConfig), **(args.augment or {})}


def _train_flags(parser: argparse.ArgumentParser) -> None:
    from gendertune.tuning.train.config import TrainConfig

    _add_train_flags(parser)
    _add_config_flag(parser, TrainConfig)
    _add_mlflow_flag(parser)


def _run_train(args: argparse.Namespace) -> int:
    from gendertune.cluster import tracking
    from gendertune.tuning.train.config import TrainConfig
    from gendertune.tuning.train.run import run_training

    config = TrainConfig.resolve(config_file=args.config, overrides=_train_overrides(args))
    run_training(config, tracking_uri=tracking.resolve_uri(args.mlflow, config.out))
    return 0


class _DeprecatedRunAlias(argparse.Action):
    """`--model RUN` of predict and evaluate, from before `--model` meant an architecture everywhere: still
    accepted, with one line saying to use --run."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"{parser.prog}: --model is deprecated here (it names an architecture in train and compare); use --run",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def _add_run_flag(parser: argparse.ArgumentParser, text: str) -> None:
    run = parser.add_mutually_exclusive_group(required=True)
    run.add_argument("--run", help=text)
    run.add_argument("--model", dest="run", action=_DeprecatedRunAlias, help="deprecated: the same as --run")


def _predict_flags(parser: argparse.ArgumentParser) -> None:
    _add_run_flag(parser, "a finished `gendertune train` run folder (or its s3:// / gs:// URI)")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE|DIR", help="image files or folders")
    parser.add_argument("--out", help="write the predictions to this CSV")
    parser.add_argument(
        "--faces",
        choices=["all", "largest"],
        default="all",
        help="every face in a photo (default) or only the largest (runs trained on aligned faces)",
    )
    parser.add_argument(
        "--annotate", metavar="DIR", help="write a copy of each image with its faces boxed and labelled"
    )


def _run_predict(args: argparse.Namespace) -> int:
    from gendertune.tuning.evaluate.predict import predict

    table = predict(args.run, args.inputs, every_face=args.faces == "all", annotate_dir=args.annotate, csv_out=args.out)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    failed = table.loc[table["error"] != "", "image"].nunique()
    if failed:
        print(
            f"{failed} of {table['image'].nunique()} image(s) gave no prediction; see the error column", file=sys.stderr
        )
    return 0


def _export_flags(parser: argparse.ArgumentParser) -> None:
    from gendertune.tuning.evaluate.export import FORMATS

    parser.add_argument(
        "run", metavar="RUN", help="a finished `gendertune train` run folder (or a compare model folder)"
    )
    parser.add_argument("--format", dest="fmt", choices=FORMATS, required=True, help="the file's format")
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write")


def _run_export(args: argparse.Namespace) -> int:
    from gendertune.tuning.evaluate.export import export_run

    print(f"wrote {export_run(args.run, fmt=args.fmt, out=args.out)}")
    return 0


def _compare_flags(parser: argparse.ArgumentParser) -> None:
    from gendertune.tuning.compare.config import CompareConfig
    from gendertune.tuning.search.config import SearchConfig
    from gendertune.tuning.train.config import TrainConfig

    flags.add_flags(parser, CompareConfig)
    # One --seed, TrainConfig's, sets both seeds; compare's own --data and --out are the runs' too.
    flags.add_flags(parser, SearchConfig, skip={"seed"})
    _add_train_flags(parser, skip={"data", "out", "model"})
    _add_config_flag(parser, CompareConfig, SearchConfig, TrainConfig)
    _add_mlflow_flag(parser)


def _compare_configs(args: argparse.Namespace):
    from gendertune.tuning.compare.config import CompareConfig
    from gendertune.tuning.search.config import SearchConfig
    from gendertune.tuning.train.config import TrainConfig

    compare = CompareConfig.resolve(config_file=args.config, overrides=flags.overrides(args, CompareConfig))
    search = SearchConfig.resolve(config_file=args.config, overrides=flags.overrides(args, SearchConfig))
    # The base run settings; the search overrides the sampled ones per trial. data/out are per run.
    base = TrainConfig.resolve(
        config_file=args.config, overrides={**_train_overrides(args), "data": compare.data, "out": compare.out}
    )
    return compare, search, base


def _run_compare(args: argparse.Namespace) -> int:
    from gendertune.cluster import tracking
    from gendertune.tuning.compare.leaderboard import format_table
    from gendertune.tuning.compare.run import run_compare

    compare, search, base = _compare_configs(args)
    table = run_compare(compare, search, base, tracking_uri=tracking.resolve_uri(args.mlflow, compare.out))
    print(format_table(table))
    return 0


def _evaluate_flags(parser: argparse.ArgumentParser) -> None:
    from gendertune.tuning.train.config import TrainConfig

    _add_run_flag(parser, "a finished run folder")
    flags.add_flags(parser, TrainConfig, only={"eval_sets"}, required={"eval_sets"})
    parser.add_argument("--attribute", default="Male", help="the label column in the sets' CSVs (default Male)")


def _run_evaluate(args: argparse.Namespace) -> int:
    from gendertune.cluster.storage import exclusive
    from gendertune.tuning.evaluate import run_layout
    from gendertune.tuning.evaluate.eval_sets import evaluate_run, format_scores, load_eval_set

    run_layout.read_metrics(args.run)  # a finished run, or a clear error
    eval_sets = [load_eval_set(spec, attribute=args.attribute) for spec in args.eval_sets]  # all checked first
    # It rewrites the run's metrics.json: a second evaluate (or a resumed train) at once would lose one's sets.
    with exclusive(Path(args.run).absolute()):
        for eval_set in eval_sets:
            print(format_scores(eval_set.name, evaluate_run(args.run, eval_set)))
    return 0


def _leaderboard_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="a `gendertune compare` output folder")
    parser.add_argument(
        "--format",
        choices=["table", "md", "csv", "json", "html"],
        default="table",
        help="output format (default table)",
    )


def _run_leaderboard(args: argparse.Namespace) -> int:
    from gendertune.cluster import storage
    from gendertune.tuning.compare import leaderboard

    if args.format == "html":
        from gendertune.tuning.compare.report import write_report

        leaderboard.read_leaderboard(args.dir)  # a clear error when there is none
        print(f"wrote {write_report(args.dir)}")
    elif args.format == "table":
        print(leaderboard.format_table(leaderboard.read_leaderboard(args.dir)))
    else:
        leaderboard.read_leaderboard(args.dir)  # a clear error when there is none
        name = {"md": leaderboard.MD, "csv": leaderboard.CSV, "json": leaderboard.JSON}[args.format]
        print(storage.read_text(storage.join(args.dir, name)), end="")
    return 0


def _demo_flags(parser: argparse.ArgumentParser) -> None:
    from gendertune.data_prep.config import PrepConfig

    parser.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    flags.add_flags(parser, PrepConfig, only={"data", "labels"})  # what the demo's prep reads instead of its sample


def _run_demo(args: argparse.Namespace) -> int:
    from gendertune.tuning.compare.demo import run_demo

    run_demo(out=args.out, data=args.data, labels=args.labels)
    return 0


def _add_address_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)"
    )
    parser.add_argument(
        "--allow-insecure-http",
        dest="allow_insecure_http",
        action="store_true",
        help="allow plain HTTP to a non-loopback address (only on a trusted network with token auth)",
    )


def _submit_flags(parser: argparse.ArgumentParser) -> None:
    _add_address_flags(parser)
    parser.add_argument(
        "--follow", action="store_true", help="stream the job's logs until it ends; exit 0 only if it SUCCEEDED"
    )
    parser.add_argument(
        "--no-install",
        dest="install",
        action="store_false",
        help="don't pip-install the dependencies in the job's runtime_env (the cluster image has them)",
    )
    parser.add_argument("--job-id", dest="job_id", help="use this submission id instead of a generated one")
    parser.add_argument(
        "job_command",
        nargs=argparse.REMAINDER,
        metavar="COMMAND",
        help="-- then the gendertune command, e.g. -- compare --data ...",
    )


def _run_submit(args: argparse.Namespace) -> int:
    from gendertune.cluster import jobs

    command = args.job_command[1:] if args.job_command[:1] == ["--"] else args.job_command
    address = jobs.resolve_address(args.address, allow_insecure_http=args.allow_insecure_http)
    job_id = jobs.submit(command, address=address, install_dependencies=args.install, job_id=args.job_id)
    print(f"submitted job {job_id} to {address}", flush=True)
    if not args.follow:
        print(f"follow it with: gendertune jobs logs --follow {job_id}")
        return 0
    return _follow(address, job_id)


def _follow(address: str, job_id: str) -> int:
    from gendertune.cluster import jobs

    try:
        status = jobs.follow(address, job_id)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"stopped following; job {job_id} keeps running (gendertune jobs stop {job_id})"
        ) from None
    print(f"job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def _jobs_flags(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("status", "print a job's status"),
        ("logs", "print a job's logs"),
        ("stop", "stop a job and wait for it to end"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("job_id", metavar="ID")
        _add_address_flags(action)
        if name == "logs":
            action.add_argument("--follow", action="store_true", help="stream until the job ends")
    _add_address_flags(
        actions.add_parser("list", help="list the cluster's jobs", description="list the cluster's jobs")
    )


def _run_jobs(args: argparse.Namespace) -> int:
    from gendertune.cluster import jobs

    address = jobs.resolve_address(args.address, allow_insecure_http=args.allow_insecure_http)
    if args.action == "list":
        print("\n".join(jobs.list_lines(address)))
    elif args.action == "status":
        print(jobs.status_line(address, args.job_id))
    elif args.action == "logs":
        if args.follow:
            return _follow(address, args.job_id)
        print(jobs.logs(address, args.job_id), end="")
    else:
        print(f"job {args.job_id} {jobs.stop(address, args.job_id)}")
    return 0


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help, its --help description, what adds its flags, what runs it."""

    help: str
    description: str
    add_flags: Callable[[argparse.ArgumentParser], None]
    run: Handler
    usage: str | None = None


COMMANDS = {
    "make-sample": Command(
        "write a SYNTHETIC CelebA-layout dataset of drawn faces (for tests and the demo)",
        "Write procedurally drawn faces in CelebA's layout (images + the four label files), "
        "with a few planted exact duplicates and one corrupt file. Synthetic: not real people.",
        _make_sample_flags,
        _run_make_sample,
    ),
    "prep": Command(
        "dedupe, verify, crop and split a folder of face images (Ray tasks)",
        "Turn a folder of face images plus labels into a clean, deduplicated, split, "
        "preprocessed dataset. Accepts CelebA's official layout or a folder plus a CSV.",
        _prep_flags,
        _run_prep,
    ),
    "train": Command(
        "fine-tune one model on a prepared dataset with Ray Train, then evaluate it",
        "Train one model with Ray Train (DDP over --workers), select the best epoch on the "
        "validation split, evaluate it once on the test split, and write metrics, history, plots and the "
        "model to --out. Re-running with the same --out resumes an interrupted run.",
        _train_flags,
        _run_train,
    ),
    "predict": Command(
        "label every face in photos with a trained run",
        "Detect every face in each photo, align it as the model's training images were, and "
        "print and write one row per face: box, which detector pass found it and its score, label, "
        "confidence. Folders are searched for images; many images run as Ray Data batch inference. "
        "Unreadable images, and photos with no face, get an error row.",
        _predict_flags,
        _run_predict,
    ),
    "evaluate": Command(
        "score a trained run on labelled folders of photos (accuracy, slices, calibration)",
        "Score a finished `gendertune train` run (or a compare model folder) on each --eval-set with the "
        "run's own face alignment and preprocessing; adds the results to the run's metrics.json and writes "
        "eval_<NAME>_predictions.csv and a gallery of its most confident mistakes.",
        _evaluate_flags,
        _run_evaluate,
    ),
    "export": Command(
        "write a trained run as one ONNX or TorchScript file (calibrated, preprocessing inside)",
        "Export a finished run for use without gendertune, Ray or MLflow: the graph takes uint8 face chips "
        "(N x S x S x 3 at the run's prep size) and returns calibrated probabilities (N x 2); the alignment, "
        "sizes, mean/std, class names and temperature are in the file's metadata (ONNX metadata_props, "
        "TorchScript extra file metadata.json). ONNX needs the export extra: pip install 'gendertune[export]'.",
        _export_flags,
        _run_export,
    ),
    "compare": Command(
        "search each model with Ray Tune + Optuna and write the comparison leaderboard",
        "For each model: plan the budget (one full-length run of your configuration is reserved first), "
        "screen cheaply (an lr range test, short low-resolution runs through Ray Tune + Optuna), replace your "
        "configuration only when a challenger beats it by more than the validation noise, train the chosen one "
        "at full length as `train` would, evaluate it once on the test split; then rank the models with "
        "confidence intervals and McNemar tests against the leader.",
        _compare_flags,
        _run_compare,
    ),
    "leaderboard": Command(
        "print a comparison's leaderboard, or write its report.html",
        "Print the leaderboard that `gendertune compare` wrote to DIR; "
        "--format html writes DIR/report.html, one self-contained page.",
        _leaderboard_flags,
        _run_leaderboard,
    ),
    "demo": Command(
        "the whole pipeline on a generated sample: make-sample, prep, compare the original notebook's four models",
        "Generate a SYNTHETIC CelebA-layout sample (or use --data), prep it with an identity split, "
        "compare resnet50, resnet18, googlenet and vgg19_bn with a small, deterministic search budget, print the "
        "leaderboard. "
        "Re-running with the same --out resumes.",
        _demo_flags,
        _run_demo,
    ),
    "submit": Command(
        "run a gendertune command as a job on a Ray cluster",
        "Submit `gendertune ARGS` to a Ray cluster through the Jobs API, with this project as the "
        "job's working_dir and its dependencies in the runtime_env; prints the job id. Paths in ARGS are read "
        "on the cluster: use shared storage (see the README).",
        _submit_flags,
        _run_submit,
        usage="gendertune submit [--address URL] [--follow] [--no-install] -- COMMAND [FLAGS ...]",
    ),
    "jobs": Command(
        "status, logs, stop and list of jobs on a Ray cluster",
        "Inspect and control jobs submitted with `gendertune submit`.",
        _jobs_flags,
        _run_jobs,
    ),
}


def build_parser(flags_for: Collection[str] = tuple(COMMANDS)) -> argparse.ArgumentParser:
    """The command line; only the subcommands in `flags_for` get their flags (the others would
    never parse anything, and building a stage's flags imports its config's module, and with it torch)."""
    parser = argparse.ArgumentParser(
        prog="gendertune",
        description="Prepare face images, fine-tune and tune classifiers for gender on Ray, and compare them.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error too")
    parser.add_argument("--version", action="version", version=f"gendertune {package_version('gendertune')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        subparser = sub.add_parser(name, help=command.help, description=command.description, usage=command.usage)
        if name in flags_for:
            command.add_flags(subparser)
        subparser.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; `argv` None = this process's own command line, which ends with it."""
    own_process = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    # The top level's options take no values, so the first other word is the subcommand.
    args = build_parser(flags_for=[arg for arg in argv if not arg.startswith("-")][:1]).parse_args(argv)
    print_progress_to_stdout()
    try:
        code = _run(args)
    finally:
        if own_process:
            _shut_down_ray()
    if own_process and code == 130:
        # An interrupted command's threads (Ray Data's executor, pyarrow's pools) may still run when
        # the interpreter tears itself down, which once crashed it with a segfault after the hint was
        # printed (exit -11 instead of 130, tests/test_faults.py). Its output is safe by now (staging
        # removed, Ray shut down): leave without that teardown.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _one_line(err: Exception) -> str:
    """The message on one line: a library's text quoted in it (a parser's, a server's) may span several."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _shut_down_ray() -> None:
    """Ray's own atexit shutdown, done here with Ctrl-C ignored: an interrupt landing in it, after
    the command's work was done (or it was already interrupted), crashed the process with Ray's
    traceback or a segfault instead of the command's exit code."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ray.shutdown()


def _run(args: argparse.Namespace) -> int:
    try:
        return args.handler(args)
    # The project's own errors are about input and settings: one line, unless --debug asks for more.
    # Anything else is a bug and keeps its traceback.
    except StageFailed as err:
        if args.debug:
            raise
        print(f"gendertune {args.command}: {_one_line(err)}", file=sys.stderr)
        return 1
    except GendertuneError as err:
        if args.debug:
            raise
        print(f"gendertune {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        # str(): a KeyboardInterrupt with no message is still a true object, so `err or ...` never chose the hint.
        print(
            f"gendertune {args.command}: interrupted. {str(err) or 'Re-run the same command to resume.'}",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
