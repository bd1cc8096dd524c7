"""The `gendertune` command line: one subcommand per stage, flags mapped onto stage configs.

Every flag defaults to None so that "not given" is distinguishable from a value: the stage config
then resolves defaults < --config file < flags (gendertune.config.StageConfig.resolve).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from gendertune.console import print_progress_to_stdout
from gendertune.errors import GendertuneError, StageFailed

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
        help="dedupe, verify, crop and split a folder of face images (Ray tasks)",
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
    parser.add_argument("--align", choices=["faces", "none"],
                        help="faces = detect each face and align it by its landmarks (default); none = centre square")
    parser.add_argument("--no-face", dest="no_face", choices=["keep", "reject"],
                        help="an image with no face found: keep its centre square (default) or reject it")
    parser.add_argument("--face-zoom", dest="face_zoom", type=float,
                        help="aligned framing: 1 = CelebA's (face, hair, chin; default), > 1 tighter, < 1 looser")
    parser.add_argument("--detector", choices=["hog", "hog+cnn"],
                        help="face detector: hog (default) or hog+cnn (dlib's CNN where HOG finds nothing; slower)")
    parser.add_argument("--detect-max-side", dest="detect_max_side", type=int,
                        help="detect faces on photos downscaled to this side (default 1024)")
    parser.add_argument("--face-min-score", dest="face_min_score", type=float,
                        help="ignore HOG detections scoring below this (default 0.2; false positives score ~0-0.1)")
    parser.add_argument("--out", help="output folder (created atomically) or object-store URI (s3://, gs://)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace an existing prep output")
    parser.add_argument("--config", help="JSON/TOML config file with a [prep] section")
    parser.set_defaults(handler=_run_prep)


def _run_prep(args: argparse.Namespace) -> int:
    from data_prep.config import PrepConfig
    from data_prep.pipeline import run_prep

    names = ["data", "labels", "attribute", "image_column", "split", "ratios", "image_size", "seed",
             "parallelism", "align", "no_face", "face_zoom", "detector", "detect_max_side", "face_min_score", "out", "overwrite"]
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


def _augment(text: str) -> dict[str, float]:
    """`none`, or comma-separated NAME=STRENGTH pairs, e.g. hflip=0.5,rotation=10."""
    from tuning.train_config import AUGMENTATIONS

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


TRAIN_FLAGS = ["data", "out", "model", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "schedule",
               "warmup_epochs", "label_smoothing", "grad_clip", "image_size", "workers", "cpus_per_worker", "placement_strategy", "gpu",
               "precision", "pretrained", "weights", "seed", "deterministic", "max_failures", "val_fraction", "eval_sets"]


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `train` and the search commands (each overrides one TrainConfig field)."""
    parser.add_argument("--data", help="a `gendertune prep` output folder")
    parser.add_argument("--epochs", type=int, help="epochs (default 5)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="batch size per worker (default 64)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    parser.add_argument("--optimizer", choices=["adamw", "adam", "sgd"], help="optimizer (default adamw; sgd = nesterov momentum 0.9)")
    parser.add_argument("--weight-decay", dest="weight_decay", type=float, help="weight decay, not on biases/norms (default 0.05)")
    parser.add_argument("--schedule", choices=["cosine", "step", "constant"], help="lr schedule after warmup (default cosine)")
    parser.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, help="linear warmup length in epochs (default 0.5)")
    parser.add_argument("--label-smoothing", dest="label_smoothing", type=float, help="label smoothing (default 0)")
    parser.add_argument("--grad-clip", dest="grad_clip", type=float, help="max gradient norm, 0 = off (default 0)")
    parser.add_argument("--image-size", dest="image_size", type=int, help="training image size (default: the prepared size)")
    parser.add_argument("--workers", type=int, help="Ray Train workers (DDP; default 1)")
    parser.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float, help="CPUs reserved per worker (default 1)")
    parser.add_argument("--placement-strategy", dest="placement_strategy", choices=["PACK", "SPREAD"],
                        help="PACK workers onto few nodes (default) or SPREAD them over nodes")
    parser.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker (NCCL)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"],
                        help="auto = bf16 where native (recent CPUs, Ampere+ GPUs), else fp16+GradScaler on GPU, else fp32")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", default=None,
                         help="start from ImageNet weights: the torch hub cache, downloaded into it if missing")
    weights.add_argument("--weights", help="start from a state dict file (ImageNet or this project's)")
    parser.add_argument("--augment", type=_augment,
                        help="augmentation strengths: 'none' or e.g. hflip=0.5,rotation=10,color_jitter=0.2,"
                        "random_erasing=0.1,random_resized_crop=0.25,zoom=0.2,translate=0.05,random_border=0.3 (the defaults)")
    parser.add_argument("--val-fraction", dest="val_fraction", type=float,
                        help="share of train carved out for validation when prep made no val split (default 0.1)")
    parser.add_argument("--max-failures", dest="max_failures", type=int, help="worker failures to recover from (default 1)")
    _add_eval_set_flag(parser, dest="eval_sets")
    parser.add_argument("--seed", type=int, help="seed (default 0)")
    parser.add_argument("--deterministic", action="store_true", default=None,
                        help="the same seed gives the same numbers on one machine: deterministic kernels, "
                        "one search trial at a time (slower)")
    parser.add_argument("--config", help="JSON/TOML config file with a [train] section")


def _add_mlflow_flag(parser: argparse.ArgumentParser) -> None:
    # Not a config setting: where a run is tracked must not make its resume refuse the same run.
    parser.add_argument("--mlflow", nargs="?", const="auto", default=None, metavar="URI",
                        help="track in MLflow: each trial's params and per-epoch metrics, per model its final metrics "
                        "and files; URI = http://HOST:5000, sqlite:////PATH/mlflow.db, databricks; without URI: "
                        "OUT/mlflow.db (browse with `mlflow ui --backend-store-uri sqlite:////ABS/OUT/mlflow.db`)")


def _add_eval_set_flag(parser: argparse.ArgumentParser, *, dest: str, required: bool = False) -> None:
    parser.add_argument("--eval-set", dest=dest, action="append", metavar="NAME=DIR", required=required,
                        help="after training, also score on this labelled folder (a CSV with an image column, the "
                        "attribute, and any group columns such as age or race); repeatable")


def _train_overrides(args: argparse.Namespace) -> dict:
    overrides = _overrides(args, [n for n in TRAIN_FLAGS if hasattr(args, n)])
    overrides.update(args.augment or {})
    return overrides


def _add_train(sub) -> None:
    parser = sub.add_parser(
        "train", help="fine-tune one model on a prepared dataset with Ray Train, then evaluate it",
        description="Train one model with Ray Train (DDP over --workers), select the best epoch on the "
        "validation split, evaluate it once on the test split, and write metrics, history, plots and the "
        "model to --out. Re-running with the same --out resumes an interrupted run.",
    )
    parser.add_argument("--model", help="architecture (default resnet50): resnet50, resnet18, googlenet, vgg19, "
                        "efficientnet_b0, convnext_tiny, vit_b_16")
    parser.add_argument("--out", help="run folder or object-store URI (s3://, gs://)")
    _add_train_flags(parser)
    _add_mlflow_flag(parser)
    parser.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from tuning import tracking
    from tuning.train import run_training
    from tuning.train_config import TrainConfig

    config = TrainConfig.resolve(config_file=args.config, overrides=_train_overrides(args))
    run_training(config, tracking_uri=tracking.resolve_uri(args.mlflow, config.out))
    return 0


def _add_predict(sub) -> None:
    parser = sub.add_parser(
        "predict", help="label every face in photos with a trained run",
        description="Detect every face in each photo, align it as the model's training images were, and "
        "print and write one row per face: box, detector score, label, confidence. Folders are searched "
        "for images; many images run as Ray Data batch inference. Unreadable images, and photos with no "
        "face, get an error row.",
    )
    parser.add_argument("--model", required=True, help="a finished `gendertune train` run folder (or its s3:// / gs:// URI)")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE|DIR", help="image files or folders")
    parser.add_argument("--out", help="write the predictions to this CSV")
    parser.add_argument("--faces", choices=["all", "largest"], default="all",
                        help="every face in a photo (default) or only the largest (runs trained on aligned faces)")
    parser.add_argument("--annotate", metavar="DIR", help="write a copy of each image with its faces boxed and labelled")
    parser.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from cluster.storage import write_text_atomic
    from tuning.predict import predict

    table = predict(args.model, args.inputs, every_face=args.faces == "all", annotate_dir=args.annotate)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.out:
        write_text_atomic(args.out, table.to_csv(index=False))
    failed = table.loc[table["error"] != "", "image"].nunique()
    if failed:
        print(f"{failed} of {table['image'].nunique()} image(s) gave no prediction; see the error column", file=sys.stderr)
    return 0


SEARCH_FLAGS = ["trials", "time_budget_s", "max_concurrent", "grace_period", "reduction_factor", "trial_mode"]


def _add_search_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, help="Optuna trials per model (default 8)")
    parser.add_argument("--time-budget-s", dest="time_budget_s", type=float, help="stop starting trials after this long, per model")
    parser.add_argument("--max-concurrent", dest="max_concurrent", type=int, help="trials at once (default: as the CPUs allow)")
    parser.add_argument("--grace-period", dest="grace_period", type=int, help="ASHA: epochs before a trial can be stopped (default 1)")
    parser.add_argument("--reduction-factor", dest="reduction_factor", type=int, help="ASHA reduction factor (default 2)")
    parser.add_argument("--trial-mode", dest="trial_mode", choices=["auto", "train", "inprocess"],
                        help="train = each trial launches a TorchTrainer; inprocess = 1-worker trials run in the "
                        "trial process (no worker start-up); auto = inprocess for 1 worker (default)")


def _add_compare(sub) -> None:
    parser = sub.add_parser(
        "compare", help="search each model with Ray Tune + Optuna and write the comparison leaderboard",
        description="For each model: search hyperparameters (Optuna TPE + ASHA) on the validation split, keep "
        "(or --retrain) the best configuration, evaluate it once on the test split; then rank the models with "
        "confidence intervals and McNemar tests against the leader.",
    )
    parser.add_argument("--models", type=lambda t: tuple(m.strip() for m in t.split(",") if m.strip()),
                        help="comma-separated models (default resnet50,resnet18,googlenet,vgg19)")
    parser.add_argument("--out", help="comparison folder or object-store URI (s3://, gs://)")
    parser.add_argument("--resume", action="store_true", default=None, help="continue an interrupted comparison in --out")
    parser.add_argument("--retrain", action="store_true", default=None, help="retrain the best configuration from scratch")
    parser.add_argument("--ensemble-k", dest="ensemble_k", type=int,
                        help="the ensemble row's members: the top K models (default 0 = every model within the leader's 95%% CI)")
    _add_search_flags(parser)
    _add_train_flags(parser)
    _add_mlflow_flag(parser)
    parser.set_defaults(handler=_run_compare)


def _compare_configs(args: argparse.Namespace):
    from tuning.compare import CompareConfig
    from tuning.search import SearchConfig
    from tuning.train_config import TrainConfig

    compare = CompareConfig.resolve(config_file=args.config,
                                    overrides=_overrides(args, ["data", "out", "models", "resume", "retrain", "ensemble_k"]))
    search = SearchConfig.resolve(config_file=args.config, overrides={**_overrides(args, SEARCH_FLAGS), "seed": args.seed})
    # The base run settings; the search overrides the sampled ones per trial. data/out are per run.
    base = TrainConfig.resolve(config_file=args.config, overrides={**_train_overrides(args), "data": compare.data, "out": compare.out})
    return compare, search, base


def _run_compare(args: argparse.Namespace) -> int:
    from tuning.compare import run_compare
    from tuning.leaderboard import format_table

    from tuning import tracking

    compare, search, base = _compare_configs(args)
    table = run_compare(compare, search, base, tracking_uri=tracking.resolve_uri(args.mlflow, compare.out))
    print(format_table(table))
    return 0


def _add_evaluate(sub) -> None:
    parser = sub.add_parser(
        "evaluate", help="score a trained run on labelled folders of photos (accuracy, slices, calibration)",
        description="Score a finished `gendertune train` run (or a compare model folder) on each --eval-set with the "
        "run's own face alignment and preprocessing; adds the results to the run's metrics.json and writes "
        "eval_<NAME>_predictions.csv and a gallery of its most confident mistakes.",
    )
    parser.add_argument("--model", required=True, help="a finished run folder")
    _add_eval_set_flag(parser, dest="eval_sets", required=True)
    parser.add_argument("--attribute", default="Male", help="the label column in the sets' CSVs (default Male)")
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from tuning import run_layout
    from tuning.eval_sets import evaluate_run, format_scores, load_eval_set

    run_layout.read_metrics(args.model)  # a finished run, or a clear error
    eval_sets = [load_eval_set(spec, attribute=args.attribute) for spec in args.eval_sets]  # all checked first
    for eval_set in eval_sets:
        print(format_scores(eval_set.name, evaluate_run(args.model, eval_set)))
    return 0


def _add_leaderboard(sub) -> None:
    parser = sub.add_parser("leaderboard", help="print a comparison's leaderboard, or write its report.html",
                            description="Print the leaderboard that `gendertune compare` wrote to DIR; "
                            "--format html writes DIR/report.html, one self-contained page.")
    parser.add_argument("dir", metavar="DIR", help="a `gendertune compare` output folder")
    parser.add_argument("--format", choices=["table", "md", "csv", "json", "html"], default="table",
                        help="output format (default table)")
    parser.set_defaults(handler=_run_leaderboard)


def _run_leaderboard(args: argparse.Namespace) -> int:
    from cluster import object_store
    from tuning import leaderboard

    if args.format == "html":
        from tuning.report import write_report

        leaderboard.read_leaderboard(args.dir)  # a clear error when there is none
        print(f"wrote {write_report(args.dir)}")
    elif args.format == "table":
        print(leaderboard.format_table(leaderboard.read_leaderboard(args.dir)))
    else:
        leaderboard.read_leaderboard(args.dir)  # a clear error when there is none
        name = {"md": leaderboard.MD, "csv": leaderboard.CSV, "json": leaderboard.JSON}[args.format]
        print(object_store.read_text(object_store.join(args.dir, name)), end="")
    return 0


def _add_demo(sub) -> None:
    parser = sub.add_parser(
        "demo", help="the whole pipeline on a generated sample: make-sample, prep, compare three of the original notebook's four models (not VGG19: it does not learn in the demo's budget)",
        description="Generate a SYNTHETIC CelebA-layout sample (or use --data), prep it with an identity split, "
        "compare resnet50, resnet18 and googlenet with a small, deterministic search budget, print the leaderboard. "
        "Re-running with the same --out resumes.",
    )
    parser.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    parser.add_argument("--data", help="run on this dataset instead (CelebA layout or images + CSV), e.g. real CelebA")
    parser.add_argument("--labels", help="label file for --data (default: found in --data)")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from tuning.demo import run_demo

    run_demo(out=args.out, data=args.data, labels=args.labels)
    return 0


def _add_address_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)")
    parser.add_argument("--allow-insecure-http", dest="allow_insecure_http", action="store_true",
                        help="allow plain HTTP to a non-loopback address (only on a trusted network with token auth)")


def _add_submit(sub) -> None:
    parser = sub.add_parser(
        "submit", help="run a gendertune command as a job on a Ray cluster",
        description="Submit `gendertune ARGS` to a Ray cluster through the Jobs API, with this project as the "
        "job's working_dir and its dependencies in the runtime_env; prints the job id. Paths in ARGS are read "
        "on the cluster: use shared storage (see the README).",
        usage="gendertune submit [--address URL] [--follow] [--no-install] -- COMMAND [FLAGS ...]",
    )
    _add_address_flags(parser)
    parser.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 only if it SUCCEEDED")
    parser.add_argument("--no-install", dest="install", action="store_false",
                        help="don't pip-install the dependencies in the job's runtime_env (the cluster image has them)")
    parser.add_argument("--job-id", dest="job_id", help="use this submission id instead of a generated one")
    parser.add_argument("job_command", nargs=argparse.REMAINDER, metavar="COMMAND",
                        help="-- then the gendertune command, e.g. -- compare --data ...")
    parser.set_defaults(handler=_run_submit)


def _run_submit(args: argparse.Namespace) -> int:
    from cluster import jobs

    command = args.job_command[1:] if args.job_command[:1] == ["--"] else args.job_command
    address = jobs.resolve_address(args.address, allow_insecure_http=args.allow_insecure_http)
    job_id = jobs.submit(command, address=address, install_dependencies=args.install, job_id=args.job_id)
    print(f"submitted job {job_id} to {address}", flush=True)
    if not args.follow:
        print(f"follow it with: gendertune jobs logs --follow {job_id}")
        return 0
    return _follow(address, job_id)


def _follow(address: str, job_id: str) -> int:
    from cluster import jobs

    try:
        status = jobs.follow(address, job_id)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"stopped following; job {job_id} keeps running (gendertune jobs stop {job_id})") from None
    print(f"job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def _add_jobs(sub) -> None:
    parser = sub.add_parser("jobs", help="status, logs, stop and list of jobs on a Ray cluster",
                            description="Inspect and control jobs submitted with `gendertune submit`.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("status", "print a job's status"), ("logs", "print a job's logs"), ("stop", "stop a job and wait for it to end")):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("job_id", metavar="ID")
        _add_address_flags(action)
        if name == "logs":
            action.add_argument("--follow", action="store_true", help="stream until the job ends")
    _add_address_flags(actions.add_parser("list", help="list the cluster's jobs", description="list the cluster's jobs"))
    parser.set_defaults(handler=_run_jobs)


def _run_jobs(args: argparse.Namespace) -> int:
    from cluster import jobs

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gendertune",
        description="Prepare face images, fine-tune and tune classifiers for gender on Ray, and compare them.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_make_sample, _add_prep, _add_train, _add_predict, _add_evaluate, _add_compare, _add_leaderboard, _add_demo,
                _add_submit, _add_jobs):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print_progress_to_stdout()
    try:
        return args.handler(args)
    # The project's own errors are about input and settings: one line, unless --debug asks for more.
    # Anything else is a bug and keeps its traceback.
    except StageFailed as err:
        if args.debug:
            raise
        print(f"gendertune {args.command}: {err}", file=sys.stderr)
        return 1
    except GendertuneError as err:
        if args.debug:
            raise
        print(f"gendertune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"gendertune {args.command}: interrupted. {err or 'Re-run the same command to resume.'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
