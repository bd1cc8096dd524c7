"""The comparison's one-page report: OUT/report.html, readable offline in any browser.

Owns the page and nothing else: it lays out what the comparison already wrote (leaderboard.csv,
the leaderboard's figures, and per model metrics.json, search_summary.json, history.csv and the
run's figures) and computes no metric of its own. Self-contained by construction: every figure is
embedded as a base64 `data:` URI, the CSS is inline, there is no script and no external URL, so
the one file can be mailed, archived or opened from a download and reads the same. Only
leaderboard.csv is required; a section with nothing to show is left out, never an error.

    <h1> and one line of context
    leaderboard (table#leaderboard, a row per CSV row with data-model) and the comparison figures
    per evaluation set (domain) · per slice · calibration · galleries of confident mistakes
    per model: best hyperparameters and training curves
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gendertune.cluster.storage import write_text_atomic
from gendertune.tuning.compare import layout
from gendertune.tuning.compare.leaderboard import (
    EVAL_SET_COLUMNS,
    USER_CONFIG_COLUMNS,
    is_missing,
    read_leaderboard,
    user_config_cell,
)
from gendertune.tuning.evaluate import run_layout

REPORT = layout.REPORT
TEST_SET = "test"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ROC_AUC = "ROC\u2011AUC"  # a non-breaking hyphen: a narrow header never splits it as "ROC-" / "AUC"
# An evaluation set NAME is found by its acc_NAME columns and owns _EVAL_SET_COLUMNS and
# recall_<Class>_NAME too: the per-set tables show them, the "other columns" table does not.
_EVAL_COLUMN = re.compile(r"^acc_(.+?)(?:_ci95_(?:low|high))?$")
_EVAL_SET_COLUMNS = EVAL_SET_COLUMNS  # declared where the leaderboard builds them
# "lr=0.001, batch_size=32, milestones=[3, 6]": split only at a comma that starts the next key.
_PARAM_SEPARATOR = re.compile(r",\s*(?=[A-Za-z_][\w.]*=)")
# The columns a failed model's row keeps; its error message spans the rest.
_IDENTITY_COLUMNS = frozenset({"rank", "model", "kind"})
_INTEGER_COLUMNS = frozenset({"trials_run", "trials_pruned", "best_epoch", "test_images", "mcnemar_b", "mcnemar_c"})
# Shown elsewhere on the page (status as the failed rows' colour, the rest per model), so the
# "other columns" table skips them.
_SHOWN_ELSEWHERE = frozenset({"status", "best_params", "members", "run_dir"})

# Any fetch the page might still attempt is refused, and the browser logs it as an error: the
# report's own test loads the page in Chromium and fails on such a console message.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CSS = """
body{margin:0;color:#1f2328;background:#fff;line-height:1.45;
 font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1360px;margin:0 auto;padding:1.5rem 1.25rem 3rem}
h1{font-size:1.6rem;margin:0 0 .25rem}
h2{font-size:1.3rem;margin:2.5rem 0 .75rem;padding-bottom:.3rem;border-bottom:1px solid #d0d7de}
h3{font-size:1.05rem;margin:1.5rem 0 .5rem}
h4{font-size:.95rem;margin:1rem 0 .25rem}
p{margin:.4rem 0}
nav{margin:.5rem 0 1.5rem;font-size:.9rem}
nav a{margin-right:1rem}
.context,.note,figcaption{color:#57606a}
.note,figcaption{font-size:.85rem}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.8rem;margin:.5rem 0 1rem}
th,td{padding:.3rem .5rem;border-bottom:1px solid #d0d7de;text-align:left;vertical-align:top}
th{background:#eaeef2;font-weight:600;vertical-align:bottom}
tbody tr:nth-child(even){background:#f6f8fa}
.num{text-align:right;font-variant-numeric:tabular-nums}
.num span{white-space:nowrap}
tr.error td{color:#82071e}
tr.few td{color:#8c959f;font-style:italic}
figure{margin:1rem 0}
img{max-width:100%;height:auto}
.grid{display:flex;flex-wrap:wrap;gap:0 2.5rem;align-items:flex-start}
.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,480px),1fr));gap:0 2rem}
.figures figure{margin:.75rem 0}
details{margin:.5rem 0 1rem}
summary{cursor:pointer;color:#0969da}
code{font-size:.85rem}
"""


def write_report(out: str | Path) -> Path:
    """Write `out/report.html` for the local comparison folder `out`; returns its path.

    Raises FileNotFoundError when `out` has no leaderboard.csv; anything else may be missing.
    """
    out = Path(out)
    table = read_leaderboard(out)
    rows = [
        {key: (None if is_missing(value) else value) for key, value in record.items()}
        for record in table.to_dict("records")
    ]
    runs = [_Run.read(layout.model_dir(out, str(row["model"])), row) for row in rows]
    eval_sets = _eval_sets(table.columns, runs)
    sections = [
        ("Leaderboard", "top", _leaderboard_section(out, list(table.columns), runs, eval_sets)),
        ("Per evaluation set", "domains", _domains_section(out, list(table.columns), runs, eval_sets)),
        ("Per slice", "slices", _slices_section(out, runs)),
        ("Calibration", "calibration", _calibration_section(out, runs)),
        ("Most confident mistakes", "galleries", _galleries_section(runs, eval_sets)),
        ("Search", "search", _search_section(runs)),
        ("Per model", "models", _models_section(runs)),
    ]
    present = [(title, anchor, body) for title, anchor, body in sections if body]
    nav = "".join(f'<a href="#{anchor}">{_esc(title)}</a>' for title, anchor, _ in present[1:])
    body = "".join(
        f'<section id="{anchor}"><h2>{_esc(title)}</h2>{content}</section>' for title, anchor, content in present
    )
    title = f"Model comparison: {out.absolute().name}"
    page = (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
        f'<body><main><h1>{_esc(title)}</h1><p class="context">{_esc(_context(runs, eval_sets))}</p>'
        f"{f'<nav>{nav}</nav>' if len(present) > 1 else ''}{body}</main></body></html>\n"
    )
    path = out / REPORT
    # Pure ASCII (anything else as a character reference): write_text_atomic encodes with the
    # locale's codec, and a Latin-1 locale cannot encode the page's "–" or "→".
    write_text_atomic(path, page.encode("ascii", "xmlcharrefreplace").decode("ascii"))
    return path


@dataclasses.dataclass
class _Run:
    """One leaderboard row and what its model folder holds (each part empty when absent)."""

    model: str
    row: dict
    folder: Path
    metrics: dict
    search: dict

    @classmethod
    def read(cls, folder: Path, row: dict) -> _Run:
        return cls(
            str(row["model"]),
            row,
            folder,
            _read_json(folder / run_layout.METRICS),
            _read_json(folder / layout.SEARCH_SUMMARY),
        )

    def value(self, key: str) -> Any:
        """The leaderboard's column `key`, else metrics.json's (older leaderboards lack some)."""
        return _first(self.row.get(key), self.metrics.get(key))

    def eval_set(self, name: str) -> dict:
        return _mapping(_mapping(self.metrics.get("eval_sets")).get(name))


# --- sections --------------------------------------------------------------------------------


def _context(runs: Sequence[_Run], eval_sets: Sequence[str]) -> str:
    failed = sum(_failed(run) for run in runs)
    ensembles = sum(run.row.get("kind") == "ensemble" for run in runs)
    parts = [
        f"{len(runs)} model{'s' if len(runs) != 1 else ''}"
        + (f" (incl. {ensembles} ensemble{'s' if ensembles != 1 else ''})" if ensembles else "")
    ]
    scored = next((run for run in runs if _number(run.row.get("test_images")) is not None), None)
    if scored:
        line = f"compared on {_integer(scored.row['test_images'])} test images"
        if _number(scored.row.get("majority_rate")) is not None:
            line += f" (majority-class rate {_decimal(scored.row['majority_rate'])})"
        parts.append(line)
    if eval_sets:
        parts.append(f"also scored on {', '.join(eval_sets)}")
    if failed:
        parts.append(f"{failed} failed")
    return "; ".join(parts) + "."


@dataclasses.dataclass(frozen=True)
class _Column:
    header: str
    numeric: bool
    sources: tuple[str, ...]  # the CSV columns this one shows
    render: Callable[[dict], str]


def _leaderboard_columns(eval_sets: Sequence[str]) -> list[_Column]:
    def accuracy(prefix: str) -> Callable[[dict], str]:
        return lambda r: _with_ci(r.get(prefix), r.get(f"{prefix}_ci95_low"), r.get(f"{prefix}_ci95_high"))

    def rank(r: dict) -> str:
        # The ensemble is listed after the ranked models, unranked, as in leaderboard.md.
        return _integer(r.get("rank")) or ("ens." if r.get("kind") == "ensemble" else "–")

    def p_value(r: dict) -> str:
        if _number(r.get("rank")) == 1:
            return "leader"
        return _significant(r.get("mcnemar_p_vs_leader"))

    return [
        _Column("#", True, ("rank",), rank),
        _Column("model", False, ("model",), lambda r: str(r["model"])),
        _Column("kind", False, ("kind",), lambda r: _text(r.get("kind"))),
        _Column(
            "test accuracy (95% CI)",
            True,
            ("accuracy", "ci95_low", "ci95_high"),
            lambda r: _with_ci(r.get("accuracy"), r.get("ci95_low"), r.get("ci95_high")),
        ),
        *(
            _Column(
                f"{name} accuracy (95% CI)",
                True,
                (f"acc_{name}", f"acc_{name}_ci95_low", f"acc_{name}_ci95_high"),
                accuracy(f"acc_{name}"),
            )
            for name in eval_sets
        ),
        _Column("macro F1", True, ("macro_f1",), lambda r: _decimal(r.get("macro_f1"))),
        _Column(_ROC_AUC, True, ("roc_auc",), lambda r: _decimal(r.get("roc_auc"))),
        _Column(
            "ECE → calibrated",
            True,
            ("ece", "ece_calibrated"),
            lambda r: _before_after(r.get("ece"), r.get("ece_calibrated")),
        ),
        _Column(
            "worst slice (acc)",
            False,
            ("worst_slice", "worst_slice_acc"),
            lambda r: _worst_slice(r.get("worst_slice"), r.get("worst_slice_acc")),
        ),
        _Column("class recall gap", True, ("class_recall_gap",), lambda r: _decimal(r.get("class_recall_gap"))),
        _Column("params", True, ("params",), lambda r: _params(r.get("params"))),
        _Column(
            "inference img/s", True, ("inference_images_per_s",), lambda r: _integer(r.get("inference_images_per_s"))
        ),
        _Column(
            "trials (pruned)",
            True,
            ("trials_run", "trials_pruned"),
            lambda r: _trials(r.get("trials_run"), r.get("trials_pruned")),
        ),
        _Column("your configuration", False, USER_CONFIG_COLUMNS, user_config_cell),
        _Column("McNemar p vs #1", True, ("mcnemar_p_vs_leader",), p_value),
    ]


def _leaderboard_section(out: Path, columns: list[str], runs: Sequence[_Run], eval_sets: Sequence[str]) -> str:
    # A column is shown when the CSV has it; one that is empty in every row says nothing.
    specs = _leaderboard_columns(eval_sets)
    shown = [
        column
        for column in specs
        if column.header == "model" or any(run.row.get(source) is not None for source in column.sources for run in runs)
    ]
    identity = [column for column in shown if column.sources[0] in _IDENTITY_COLUMNS]
    if len(identity) == len(shown) and any(_failed(run) for run in runs):
        shown.append(_Column("error", False, ("error",), lambda r: ""))  # room for the messages
    rows = []
    for run in runs:
        if _failed(run):
            # A failed model has no metrics: its message spans their columns, as in leaderboard.md.
            message = f"error: {run.row['error']}" if run.row.get("error") else "error"
            rows.append((_row_attributes(run, model=True), [c.render(run.row) for c in identity] + [_Span(message)]))
        else:
            rows.append((_row_attributes(run, model=True), [column.render(run.row) for column in shown]))
    parts = [_table([(c.header, c.numeric) for c in shown], rows, table_id="leaderboard")]
    if any(_number(run.row.get("mcnemar_p_vs_leader")) is not None for run in runs):
        parts.append(
            '<p class="note">McNemar\'s test compares each model with #1 on the same test images; '
            "p ≥ 0.05 means the gap may well be chance.</p>"
        )

    skipped = (
        {source for column in specs for source in column.sources}
        | {"error"}
        | _SHOWN_ELSEWHERE
        | {template.format(name) for template in _EVAL_SET_COLUMNS for name in eval_sets}
    )
    other = [
        column
        for column in columns
        if column not in skipped
        and not any(column.startswith("recall_") and column.endswith(f"_{name}") for name in eval_sets)
    ]
    if other:
        extra_rows = [({}, [run.model, *(_cell(name, run.row.get(name)) for name in other)]) for run in runs]
        parts.append(
            "<details><summary>Other leaderboard columns</summary>"
            + _table([("model", False), *((name, True) for name in other)], extra_rows, drop_empty=True)
            + "</details>"
        )
    parts.append(
        _figures(
            [
                _figure(out / layout.ACCURACY_CI, "Test accuracy with 95% CI"),
                _figure(out / layout.ACCURACY_VS_SPEED, "Accuracy against inference throughput"),
                _figure(out / layout.CONFUSION_MATRICES, "Confusion matrices on test (rows: true class)"),
                _figure(out / layout.HISTORIES, "Validation accuracy per epoch"),
            ]
        )
    )
    return "".join(parts)


def _domains_section(out: Path, columns: list[str], runs: Sequence[_Run], eval_sets: Sequence[str]) -> str:
    """A table per evaluation set: metrics.json's numbers, else the leaderboard's NAME columns."""
    test_classes = [column[len("precision_") :] for column in columns if column.startswith("precision_")]
    parts = []
    for name in eval_sets:
        scored = [run for run in runs if run.eval_set(name) or run.row.get(f"acc_{name}") is not None]
        paired = any(run.row.get(f"mcnemar_p_vs_leader_{name}") is not None for run in runs)
        classes = _unique(
            [
                *(key for run in scored for key in _mapping(run.eval_set(name).get("per_class"))),
                *(c for c in test_classes if f"recall_{c}_{name}" in columns),
            ]
        )
        headers = [
            ("model", False),
            ("images", True),
            ("accuracy (95% CI)", True),
            ("macro F1", True),
            (_ROC_AUC, True),
            ("ECE → calibrated", True),
            *((f"recall {c}", True) for c in classes),
            ("worst slice (acc)", False),
            ("class recall gap", True),
            ("no prediction", True),
            ("McNemar p vs #1", True),
        ]
        rows = []
        for run in scored:
            scores, slices = run.eval_set(name), _mapping(_mapping(run.metrics.get("slices")).get(name))
            low, high = _pair(scores.get("accuracy_ci95"))
            per_class = _mapping(scores.get("per_class"))
            p_value = _significant(run.row.get(f"mcnemar_p_vs_leader_{name}"))
            if paired and _number(run.row.get("rank")) == 1:
                p_value = "leader"
            rows.append(
                (
                    _row_attributes(run),
                    [
                        run.model,
                        _integer(scores.get("n")),
                        _with_ci(
                            _first(scores.get("accuracy"), run.row.get(f"acc_{name}")),
                            _first(low, run.row.get(f"acc_{name}_ci95_low")),
                            _first(high, run.row.get(f"acc_{name}_ci95_high")),
                        ),
                        _decimal(_first(scores.get("macro_f1"), run.row.get(f"macro_f1_{name}"))),
                        _decimal(scores.get("roc_auc")),
                        _before_after(
                            scores.get("ece"),
                            _first(scores.get("ece_calibrated"), run.row.get(f"ece_calibrated_{name}")),
                        ),
                        *(
                            _decimal(
                                _first(_mapping(per_class.get(c)).get("recall"), run.row.get(f"recall_{c}_{name}"))
                            )
                            for c in classes
                        ),
                        _worst_slice(
                            _first(slices.get("worst_slice"), run.row.get(f"worst_slice_{name}")),
                            _first(slices.get("worst_slice_acc"), run.row.get(f"worst_slice_acc_{name}")),
                        ),
                        _decimal(_first(slices.get("class_recall_gap"), run.row.get(f"class_recall_gap_{name}"))),
                        _integer(scores.get("no_prediction")),
                        p_value,
                    ],
                )
            )
        if rows:
            parts.append(
                f"<h3>{_esc(name)}</h3>"
                + _table(headers, rows, drop_empty=True)
                + _figure(out / f"eval_{name}_accuracy_ci.png", f"Accuracy on {name} with 95% CI")
            )
    return "".join(parts)


def _slices_section(out: Path, runs: Sequence[_Run]) -> str:
    by_set: dict[str, list[tuple[_Run, dict]]] = {}
    for run in runs:
        for name, report in _mapping(run.metrics.get("slices")).items():
            if isinstance(report, dict) and report.get("slices"):
                by_set.setdefault(str(name), []).append((run, report))
    parts = [_figure(out / layout.SLICE_ACCURACY, "Accuracy per slice and model")]
    if not by_set:
        return parts[0]
    for name in sorted(by_set, key=lambda n: n != TEST_SET):  # stable: test first, the rest as found
        blocks = []
        for run, report in by_set[name]:
            slices = [s for s in report["slices"] if isinstance(s, dict)]
            classes = _unique(key for s in slices for key in _mapping(s.get("recall")))
            headers = [
                ("slice", False),
                ("images", True),
                ("accuracy (95% CI)", True),
                *((f"recall {c}", True) for c in classes),
            ]
            rows = []
            for s in slices:
                ci = _pair(s.get("ci95"))
                few = s.get("ranked") is False
                label = f"{s.get('column', '')}={s.get('value', '')}" + (" (too few)" if few else "")
                rows.append(
                    (
                        {"class": "few"} if few else {},
                        [
                            label,
                            _integer(s.get("n")),
                            _with_ci(s.get("accuracy"), *ci),
                            *(_decimal(_mapping(s.get("recall")).get(c)) for c in classes),
                        ],
                    )
                )
            blocks.append(
                f"<div><h4>{_esc(run.model)}</h4>{_slice_summary(report)}"
                + _table(headers, rows, drop_empty=True)
                + "</div>"
            )
        parts.append(f'<h3>{_esc(name)}</h3><div class="grid">{"".join(blocks)}</div>')
    minimum = next(
        (
            report.get("min_images")
            for entries in by_set.values()
            for _, report in entries
            if _number(report.get("min_images")) is not None
        ),
        None,
    )
    parts.append(
        '<p class="note">Intervals are 95% Wilson intervals. "(too few)" marks a slice '
        + (f"of fewer than {_integer(minimum)} images " if minimum is not None else "too small ")
        + "whose interval is too wide to rank it; it is left out of the worst slice and the gaps.</p>"
    )
    return "".join(parts)


def _slice_summary(report: dict) -> str:
    facts = []
    if report.get("worst_slice"):
        facts.append(f"worst slice {_worst_slice(report['worst_slice'], report.get('worst_slice_acc'))}")
    if _number(report.get("largest_gap")) is not None:
        column = report.get("largest_gap_column")
        facts.append(f"largest gap {_decimal(report['largest_gap'])}" + (f" ({column})" if column else ""))
    if _number(report.get("class_recall_gap")) is not None:
        facts.append(f"class recall gap {_decimal(report['class_recall_gap'])}")
    return f'<p class="note">{_esc(" · ".join(facts))}</p>' if facts else ""


def _calibration_section(out: Path, runs: Sequence[_Run]) -> str:
    headers = [("model", False), ("temperature", True), ("ECE", True), ("ECE calibrated", True)]
    rows = [
        (
            _row_attributes(run),
            [
                run.model,
                _decimal(run.value("temperature"), 3),
                _decimal(run.value("ece")),
                _decimal(run.value("ece_calibrated")),
            ],
        )
        for run in runs
    ]
    rows = [row for row in rows if any(row[1][1:])]
    figure = _figure(out / layout.RELIABILITY, "Reliability diagram on test, before and after temperature scaling")
    if not rows:
        return figure
    return (
        figure
        + _table(headers, rows, drop_empty=True)
        + '<p class="note">ECE: expected calibration error on test (lower is better); calibrated: after '
        "dividing the logits by the temperature fitted on validation.</p>"
    )


def _galleries_section(runs: Sequence[_Run], eval_sets: Sequence[str]) -> str:
    order = {name: i for i, name in enumerate([TEST_SET, *eval_sets])}
    parts = []
    for run in runs:
        galleries = sorted(
            run.folder.glob("mistakes_*.png"), key=lambda p: (order.get(p.stem[len("mistakes_") :], len(order)), p.name)
        )
        figures = [
            _figure(path, f"{run.model}: most confident mistakes on {path.stem[len('mistakes_') :]}")
            for path in galleries
        ]
        if any(figures):
            parts.append(f"<h3>{_esc(run.model)}</h3>{''.join(figures)}")
    return "".join(parts)


def _models_section(runs: Sequence[_Run]) -> str:
    parts = []
    for run in runs:
        facts = []
        if run.row.get("kind") == "ensemble":
            listed = run.metrics.get("members")
            members = _text(run.row.get("members")) or ("+".join(map(str, listed)) if isinstance(listed, list) else "")
            facts.append(("ensemble of", members.replace("+", " + ")) if members else ("kind", "ensemble"))
        trials = _trials(
            _first(run.row.get("trials_run"), run.search.get("trials_run")),
            _first(run.row.get("trials_pruned"), run.search.get("trials_pruned")),
        )
        if trials:
            facts.append(("trials (pruned)", trials))
        best_epoch, best_accuracy = _number(run.row.get("best_epoch")), _number(run.row.get("best_val_acc"))
        if best_epoch is not None:
            facts.append(
                (
                    "best epoch",
                    f"{best_epoch:.0f}" + (f" (val acc {best_accuracy:.4f})" if best_accuracy is not None else ""),
                )
            )
        epochs = _count_rows(run.folder / run_layout.HISTORY)
        if epochs:
            facts.append(("epochs trained", str(epochs)))
        if _number(run.row.get("train_seconds")) is not None:
            facts.append(("training time", f"{_number(run.row['train_seconds']):,.0f} s"))
        if run.row.get("run_dir"):
            facts.append(("run folder", str(run.row["run_dir"])))
        params = _params_table(run.search.get("best_params") or run.row.get("best_params"))
        curves = [
            _figure(run.folder / "accuracy_per_epoch.png", f"{run.model}: accuracy per epoch"),
            _figure(run.folder / "loss_per_epoch.png", f"{run.model}: loss per epoch"),
        ]
        if not (facts or params or any(curves)):
            continue
        listing = " · ".join(f"{key}: {value}" for key, value in facts)
        parts.append(
            f"<h3>{_esc(run.model)}</h3>"
            + (f"<p>{_esc(listing)}</p>" if listing else "")
            + (f"<h4>Best hyperparameters</h4>{params}" if params else "")
            + _figures(curves)
        )
    return "".join(parts)


def _search_section(runs: Sequence[_Run]) -> str:
    """Per model: the plan against what ran, the verdict on the user's configuration, every
    screening trial and full-length run, and the search's figures (written by compare)."""
    parts = []
    for run in runs:
        search = run.search
        plan = _mapping(search.get("plan"))
        if not plan:
            continue
        planned, actual = _mapping(plan.get("planned_s")), _mapping(search.get("actual_s"))
        budget = _number(plan.get("budget_s"))
        resources = _mapping(search.get("resources"))
        cpus, gpus = _number(resources.get("cpus")), _number(resources.get("gpus"))
        parts.append(
            f"<h3>{_esc(run.model)}</h3><p>{_esc(str(plan.get('note', '')).capitalize())}."
            + (f" Budget {budget:,.0f} s." if budget else " No time budget.")
            + (f" Planned with {cpus:.0f} CPU cores" + (f" and {gpus:.0f} GPUs." if gpus else ".") if cpus else "")
            + "</p>"
        )
        parts.append(f"<p><strong>{_esc(str(search.get('verdict', '')))}</strong></p>")
        parts.append(
            _table(
                [("part", False), ("planned s", True), ("ran s", True)],
                [
                    ({}, [name, _integer(planned.get(name)), _integer(actual.get(name))])
                    for name in dict.fromkeys([*planned, *actual])
                ],
            )
        )
        curve = _mapping(search.get("lr_curve"))
        if curve:
            suggested = (
                f"suggested lr {float(curve['suggestion']):.3g}"
                if curve.get("suggestion") is not None
                else "no suggestion (the loss never really fell)"
            )
            parts.append(f"<p>lr range test: {suggested} ({len(curve.get('lrs', []))} steps)</p>")
        trials = search.get("trials") or []
        if trials:
            rows = [
                (
                    {},
                    [
                        str(trial.get("trial_id", "")),
                        str(trial.get("params", "")),
                        str(trial.get("fidelity", "")),
                        _integer(trial.get("epochs_run")),
                        _decimal(trial.get("val_acc")),
                        str(trial.get("status", "")),
                    ],
                )
                for trial in trials
            ]
            parts.append(
                "<h4>Screening trials</h4>"
                + _table(
                    [
                        ("trial", False),
                        ("parameters", False),
                        ("fidelity", False),
                        ("epochs run", True),
                        ("final val acc", True),
                        ("status", False),
                    ],
                    rows,
                )
            )
        full = search.get("full_runs") or []
        if full:
            rows = [
                (
                    {},
                    [
                        str(r.get("label", "")),
                        str(r.get("params", "")),
                        _integer(r.get("epochs")),
                        _decimal(r.get("best_val_acc")),
                        _integer(r.get("seconds")),
                    ],
                )
                for r in full
            ]
            parts.append(
                "<h4>Full-length runs</h4>"
                + _table(
                    [
                        ("run", False),
                        ("parameters", False),
                        ("epochs", True),
                        ("best val acc", True),
                        ("seconds", True),
                    ],
                    rows,
                )
            )
        parts.append(
            _figures(
                [
                    _figure(run.folder / layout.LR_CURVE, f"{run.model}: lr range test"),
                    _figure(run.folder / layout.SEARCH_HISTORY, f"{run.model}: optimisation history (screening)"),
                    _figure(
                        run.folder / layout.SEARCH_INTERMEDIATE,
                        f"{run.model}: val accuracy per screening epoch; pruned trials end early",
                    ),
                    _figure(run.folder / layout.SEARCH_IMPORTANCE, f"{run.model}: parameter importances"),
                ]
            )
        )
    return "".join(parts)


def _params_table(best_params: Any) -> str:
    if isinstance(best_params, dict):
        pairs = [(str(key), str(value)) for key, value in best_params.items()]
    elif best_params:
        items = _PARAM_SEPARATOR.split(str(best_params))
        if not all("=" in item for item in items):
            return f"<p><code>{_esc(str(best_params))}</code></p>"
        pairs = [tuple(part.strip() for part in item.split("=", 1)) for item in items]
    else:
        return ""
    return _table([("parameter", False), ("value", False)], [({}, list(pair)) for pair in pairs])


# --- building blocks -------------------------------------------------------------------------


def _table(
    headers: Sequence[tuple[str, bool]],
    rows: Iterable[tuple[Mapping[str, str], list[str]]],
    *,
    table_id: str | None = None,
    drop_empty: bool = False,
) -> str:
    """A table of plain-text cells (escaped here); `headers` are (title, is numeric) pairs.

    Each row is (attributes of its <tr>, cells); a last cell that is a _Span fills the columns from
    its own to the end. `drop_empty` leaves out a column that is empty in every row, except the
    first, so optional metrics don't leave blank columns behind.
    """
    rows = list(rows)
    keep = [
        i
        for i in range(len(headers))
        if not drop_empty or i == 0 or any(i < len(cells) and cells[i] for _, cells in rows)
    ]
    numeric = {i for i in keep if headers[i][1]}

    def cell(tag: str, i: int, text: str) -> str:
        if i not in numeric:
            return f"<{tag}>{_esc(text)}</{tag}>"
        # Numbers wrap only between words, so "0.9240 (0.9000–0.9460)" may take two lines in a
        # narrow window, but never splits at the dash or inside a number.
        words = " ".join(f"<span>{_esc(word)}</span>" for word in text.split(" ")) if " " in text else _esc(text)
        return f'<{tag} class="num">{words}</{tag}>'

    def row(attributes: Mapping[str, str], cells: list[str]) -> str:
        if cells and isinstance(cells[-1], _Span):
            shown = [i for i in keep if i < len(cells) - 1]
            tail = f'<td colspan="{len(keep) - len(shown)}">{_esc(cells[-1])}</td>'
        else:
            shown, tail = keep, ""
        return (
            "<tr"
            + "".join(f' {key}="{_esc(value)}"' for key, value in attributes.items())
            + ">"
            + "".join(cell("td", i, cells[i]) for i in shown)
            + tail
            + "</tr>"
        )

    head = "<thead><tr>" + "".join(cell("th", i, headers[i][0]) for i in keep) + "</tr></thead>"
    body = "".join(row(attributes, cells) for attributes, cells in rows)
    identifier = f' id="{_esc(table_id)}"' if table_id else ""
    return f'<div class="scroll"><table{identifier}>{head}<tbody>{body}</tbody></table></div>'


class _Span(str):
    """A table's last cell that fills the rest of its row (a failed model's error message)."""


def _row_attributes(run: _Run, *, model: bool = False) -> dict[str, str]:
    attributes = {"data-model": run.model} if model else {}
    if _failed(run):
        attributes["class"] = "error"
    return attributes


def _failed(run: _Run) -> bool:
    return run.row.get("status") == "error"


def _figures(figures: Sequence[str]) -> str:
    """Figures side by side where the page is wide enough."""
    return f'<div class="figures">{"".join(figures)}</div>' if any(figures) else ""


def _figure(path: Path, caption: str) -> str:
    """The PNG at `path` inline as a data: URI, or "" when it is missing or not a PNG."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 24:
        return ""
    # The IHDR chunk comes first: width and height, big-endian, at bytes 16-24. Giving them to the
    # <img> lets the browser lay the page out before it decodes the images.
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    source = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (
        f'<figure><img src="{source}" alt="{_esc(caption)}" width="{width}" height="{height}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def _eval_sets(columns: Iterable[str], runs: Sequence[_Run]) -> list[str]:
    """Evaluation-set names in the leaderboard's column order, then any only metrics.json knows."""
    from_columns = (match.group(1) for match in map(_EVAL_COLUMN.match, columns) if match)
    from_metrics = (str(name) for run in runs for name in _mapping(run.metrics.get("eval_sets")))
    return _unique([*from_columns, *from_metrics])


def _read_json(path: Path) -> dict:
    # A missing file is an optional part left out; a corrupt one is a bug to see, so it raises.
    if not path.is_file():
        return {}
    return _mapping(json.loads(path.read_text()))


def _count_rows(path: Path) -> int | None:
    """Data rows of a CSV (history.csv: one per epoch); None when there is no such file or none."""
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return len(lines) - 1 if len(lines) > 1 else None


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _pair(value: Any) -> tuple[Any, Any]:
    return (value[0], value[1]) if isinstance(value, (list, tuple)) and len(value) == 2 else (None, None)


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _first(*values: Any) -> Any:
    """The first value that is not missing (0 counts), else None."""
    return next((value for value in values if not is_missing(value)), None)


# --- formatting: each returns "" for a missing or non-numeric value --------------------------


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _number(value: Any) -> float | None:
    if is_missing(value) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _text(value: Any) -> str:
    return "" if is_missing(value) else str(value)


def _decimal(value: Any, digits: int = 4) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.{digits}f}"


def _integer(value: Any) -> str:
    number = _number(value)
    return "" if number is None else f"{number:,.0f}"


def _significant(value: Any) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.3g}"


def _with_ci(value: Any, low: Any, high: Any) -> str:
    """A value with its interval, "0.9240 (0.9000–0.9460)"; the bare value when that is missing."""
    if _number(value) is None:
        return ""
    if _number(low) is None or _number(high) is None:
        return _decimal(value)
    return f"{_decimal(value)} ({_decimal(low)}–{_decimal(high)})"


def _before_after(before: Any, after: Any) -> str:
    if _number(after) is None:
        return _decimal(before)
    return f"{_decimal(before) or 'n/a'} → {_decimal(after)}"


def _worst_slice(name: Any, accuracy: Any) -> str:
    if is_missing(name):
        return ""
    return f"{name} ({_decimal(accuracy)})" if _number(accuracy) is not None else str(name)


def _params(value: Any) -> str:
    number = _number(value)
    if number is None:
        return ""
    if number >= 1e6:
        return f"{number / 1e6:.1f}M"
    return f"{number / 1e3:.1f}k" if number >= 1e3 else f"{number:.0f}"


def _trials(run: Any, pruned: Any) -> str:
    if _number(run) is None:
        return ""
    return _integer(run) + (f" ({_integer(pruned)})" if _number(pruned) is not None else "")


def _cell(column: str, value: Any) -> str:
    """A leaderboard value the key columns don't show, formatted by what it holds."""
    number = None if isinstance(value, str) else _number(value)
    if number is None:
        return _text(value)
    if column in _INTEGER_COLUMNS or column.endswith("_seconds") or abs(number) >= 100:
        return f"{number:,.0f}"
    return f"{number:.4f}"
