"""Tests for gendertune.tuning.compare.report: report.html for a hand-made comparison folder, parsed with the standard
library and loaded in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium).
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.figure import Figure

from gendertune.tuning.compare.report import REPORT, write_report

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
MODELS = ["resnet18", "googlenet", "ensemble", "vgg19"]
ERROR = "RuntimeError: CUDA out of memory <allocating 2 GiB> & gave up"


def _png(path: Path, title: str) -> None:
    fig = Figure(figsize=(3.2, 2.0), layout="constrained")
    ax = fig.subplots()
    ax.plot([1, 2, 3], [0.80, 0.88, 0.91], marker="o")
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=60)


def _slices(worst: float) -> dict:
    return {
        "slices": [
            {
                "column": "Eyeglasses",
                "value": "no",
                "n": 180,
                "accuracy": 0.93,
                "ci95": [0.88, 0.96],
                "recall": {"Female": 0.95, "Male": 0.91},
                "ranked": True,
            },
            {
                "column": "Eyeglasses",
                "value": "yes",
                "n": 20,
                "accuracy": 0.75,
                "ci95": [0.53, 0.89],
                "recall": {"Female": None, "Male": 0.75},
                "ranked": False,
            },
            {
                "column": "Young",
                "value": "no",
                "n": 60,
                "accuracy": worst,
                "ci95": [0.76, 0.94],
                "recall": {"Female": 0.88, "Male": 0.86},
                "ranked": True,
            },
        ],
        "min_images": 30,
        "worst_slice": "Young=no",
        "worst_slice_acc": worst,
        "largest_gap": 0.06,
        "largest_gap_column": "Young",
        "class_recall_gap": 0.04,
    }


@pytest.fixture
def comparison(tmp_path) -> Path:
    """A comparison folder as compare writes it, with some optional parts missing or broken: the
    ranked models, then the unranked ensemble, then a failed model; one eval set, utkface."""
    out = tmp_path / "compare"
    common = {"status": "ok", "majority_rate": 0.52, "test_images": 200, "error": ""}
    rows = [
        {
            **common,
            "rank": 1,
            "model": "resnet18",
            "kind": "model",
            "accuracy": 0.924,
            "ci95_low": 0.90,
            "ci95_high": 0.946,
            "macro_f1": 0.923,
            "roc_auc": 0.97,
            "ece": 0.041,
            "ece_calibrated": 0.012,
            "temperature": 1.8,
            "precision_Female": 0.93,
            "recall_Female": 0.95,
            "f1_Female": 0.94,
            "precision_Male": 0.92,
            "recall_Male": 0.91,
            "f1_Male": 0.915,
            "params": 11_177_538,
            "train_seconds": 312.4,
            "inference_images_per_s": 2345.6,
            "trials_run": 8,
            "trials_pruned": 3,
            "best_epoch": 4,
            "best_val_acc": 0.931,
            "best_params": "lr=0.001, batch_size=32, milestones=[3, 6]",
            "user_config": "kept",
            "val_gain_vs_user": 0.03,
            "run_dir": str(out / "models" / "resnet18"),
            "acc_utkface": 0.801,
            "acc_utkface_ci95_low": 0.77,
            "acc_utkface_ci95_high": 0.83,
            "worst_slice": "Young=no",
            "worst_slice_acc": 0.86,
            "class_recall_gap": 0.04,
        },
        {
            **common,
            "rank": 2,
            "model": "googlenet",
            "kind": "model",
            "accuracy": 0.90,
            "ci95_low": 0.86,
            "ci95_high": 0.93,
            "macro_f1": 0.899,
            "mcnemar_p_vs_leader": 0.2,
            "user_config": "kept",
            "final_epochs": 6,
            "epochs_asked": 12,
            "mcnemar_b": 9,
            "mcnemar_c": 4,
        },
        # No eval-set numbers in its metrics.json: the per-set table falls back on these columns.
        {
            **common,
            "model": "ensemble",
            "kind": "ensemble",
            "members": "resnet18+googlenet",
            "accuracy": 0.91,
            "ci95_low": 0.88,
            "ci95_high": 0.935,
            "macro_f1": 0.909,
            "roc_auc": 0.96,
            "ece": 0.05,
            "mcnemar_p_vs_leader": 0.41,
            "acc_utkface": 0.812,
            "acc_utkface_ci95_low": 0.78,
            "acc_utkface_ci95_high": 0.84,
            "macro_f1_utkface": 0.8111,
            "ece_calibrated_utkface": 0.0222,
            "recall_Female_utkface": 0.7777,
            "recall_Male_utkface": 0.8333,
            "worst_slice_utkface": "race=asian",
            "worst_slice_acc_utkface": 0.7012,
            "class_recall_gap_utkface": 0.0556,
            "mcnemar_p_vs_leader_utkface": 0.03,
        },
        {"model": "vgg19", "status": "error", "kind": "model", "error": ERROR},
    ]
    out.mkdir()
    pd.DataFrame(rows).to_csv(out / "leaderboard.csv", index=False)
    for name in ("accuracy_ci.png", "slice_accuracy.png", "eval_utkface_accuracy_ci.png"):
        _png(out / name, name.removesuffix(".png"))
    (out / "accuracy_vs_speed.png").write_bytes(b"not a png: a figure that failed half-way")

    resnet = out / "models" / "resnet18"
    for name in ("accuracy_per_epoch.png", "mistakes_test.png", "mistakes_utkface.png"):
        _png(resnet / name, f"resnet18 {name.removesuffix('.png')}")
    per_class = {
        "Female": {"precision": 0.93, "recall": 0.95, "f1": 0.94, "support": 104},
        "Male": {"precision": 0.92, "recall": 0.91, "f1": 0.915, "support": 96},
    }
    (resnet / "metrics.json").write_text(
        json.dumps(
            {
                "accuracy": 0.924,
                "accuracy_ci95": [0.90, 0.946],
                "per_class": per_class,
                "ece": 0.041,
                "temperature": 1.8,
                "ece_calibrated": 0.012,
                "eval_sets": {
                    "utkface": {
                        "n": 500,
                        "accuracy": 0.801,
                        "accuracy_ci95": [0.77, 0.83],
                        "macro_f1": 0.80,
                        "roc_auc": 0.88,
                        "ece": 0.09,
                        "per_class": per_class,
                        "no_prediction": 7,
                    }
                },
                "slices": {"test": _slices(0.86), "utkface": _slices(0.71)},
            }
        )
    )
    _search(resnet, out)
    (resnet / "history.csv").write_text(
        "epoch,train_loss,train_acc,val_loss,val_acc,lr\n"
        + "".join(f"{e},0.5,0.8,0.4,0.9,0.001\n" for e in range(1, 7))
    )
    # The ensemble has a metrics.json without eval sets or slices; vgg19 has no folder at all.
    (out / "models" / "ensemble").mkdir(parents=True)
    (out / "models" / "ensemble" / "metrics.json").write_text(json.dumps({"accuracy": 0.91, "ece": 0.05}))
    return out


def _search(folder: Path, out: Path) -> None:
    """search.json as compare writes it, and the search's figures drawn from a real Optuna study."""
    import optuna

    from gendertune.tuning.compare import layout
    from gendertune.tuning.search import figures

    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.create_study(study_name="screening", storage=storage, direction="maximize")
    trials = []
    for i, (lr, accs) in enumerate(
        [
            (1e-3, [0.7, 0.8, 0.85]),
            (3e-3, [0.72, 0.83, 0.88]),
            (1e-4, [0.6]),
            (5e-4, [0.68, 0.79, 0.84]),
            (2e-3, [0.71, 0.81, 0.86]),
        ]
    ):
        trial = study.ask(
            {
                "lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                "label_smoothing": optuna.distributions.FloatDistribution(0.0, 0.1),
            }
        )
        for epoch, acc in enumerate(accs, 1):
            trial.report(acc, epoch)
        pruned = len(accs) < 3
        study.tell(
            trial,
            None if pruned else accs[-1],
            state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE,
        )
        trials.append(
            {
                "trial_id": f"t{i}",
                "params": f"lr={lr:g}",
                "fidelity": "32 px x 3 epochs",
                "epochs_run": len(accs),
                "val_acc": accs[-1],
                "status": "pruned" if pruned else "completed",
            }
        )
    curve = {
        "lrs": [1e-6 * 1.2**i for i in range(60)],
        "losses": [0.7 - 0.004 * i for i in range(60)],
        "suggestion": 3e-4,
    }
    figures.plot_lr_curve(curve, folder / layout.LR_CURVE)
    figures.plot_study(
        storage,
        folder,
        history=layout.SEARCH_HISTORY,
        intermediate=layout.SEARCH_INTERMEDIATE,
        importance=layout.SEARCH_IMPORTANCE,
    )
    (folder / layout.SEARCH_SUMMARY).write_text(
        json.dumps(
            {
                "plan": {
                    "regime": "parity",
                    "budget_s": 646,
                    "note": "the budget holds one full run: an lr range test first, then one final run of 12 epochs",
                    "planned_s": {"lr_test": 20, "screening": 80, "full_runs": 540},
                },
                "actual_s": {"planning": 6, "lr_test": 22, "screening": 75, "full_runs": 551},
                "resources": {"cpus": 8, "gpus": 0},
                "kept": True,
                "verdict": "kept: at screening fidelity the best challenger (lr=0.003) scored +3.00 points on "
                "validation vs a threshold of 5.10 (2 unpaired SE)",
                "gain": 0.03,
                "final_seconds": 551,
                "best_params": "lr=0.001, batch_size=32, milestones=[3, 6]",
                "lr_curve": curve,
                "trials": trials,
                "full_runs": [
                    {"label": "incumbent", "params": "lr=0.001", "epochs": 12, "best_val_acc": 0.93, "seconds": 551}
                ],
            }
        )
    )


class _Page(html.parser.HTMLParser):
    """What the tests look at: the leaderboard's body rows, every <img>, every URL-valued attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.images: list[str] = []
        self.urls: list[str] = []
        self.scripts = 0
        self._table: list[str | None] = []  # ids of the open tables
        self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.urls += [value for key, value in attrs if key in ("src", "href") and value]
        if tag == "table":
            self._table.append(attributes.get("id"))
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table[-1:] == ["leaderboard"]:
            self.rows.append({"model": attributes.get("data-model"), "class": attributes.get("class"), "cells": []})
        elif tag == "td" and self.rows and self._table[-1:] == ["leaderboard"] and self._in_body:
            self._cell = []
        elif tag == "img":
            self.images.append(attributes.get("src", ""))
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._table.pop()
        elif tag == "tbody":
            self._in_body = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1]["cells"].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _words(markup: str) -> str:
    """The text a reader sees in a piece of the page (tags dropped, references resolved)."""
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def _parse(path: Path) -> tuple[str, _Page]:
    text = path.read_text()
    page = _Page()
    page.feed(text)
    page.close()
    return text, page


def test_report_is_self_contained_and_has_a_row_per_leaderboard_row(comparison):
    path = write_report(comparison)
    assert path == comparison / REPORT
    text, page = _parse(path)

    models = pd.read_csv(comparison / "leaderboard.csv", keep_default_na=False, na_values=[""])["model"].tolist()
    assert [row["model"] for row in page.rows] == models == MODELS
    leader, second, ensemble, failed = page.rows
    assert "0.9240 (0.9000–0.9460)" in leader["cells"]
    assert "0.8010 (0.7700–0.8300)" in leader["cells"]  # the eval set's accuracy with its CI
    assert "0.0410 → 0.0120" in leader["cells"] and "11.2M" in leader["cells"] and "8 (3)" in leader["cells"]
    assert "kept (+3.0 pt val)" in leader["cells"]
    assert second["cells"][:3] == ["2", "googlenet", "model"] and "0.2" in second["cells"]
    assert "kept (6 of 12 epochs)" in second["cells"]  # the budget held half the schedule
    assert ensemble["cells"][:3] == ["ens.", "ensemble", "ensemble"] and "0.41" in ensemble["cells"]
    assert failed["class"] == "error" and failed["cells"] == ["–", "vgg19", "model", f"error: {ERROR}"]
    assert "<allocating" not in text  # escaped, not markup

    # Three comparison figures, three of resnet18's and its four search figures; the corrupt
    # accuracy_vs_speed.png is left out.
    assert len(page.images) == 10
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert all(url.startswith(("data:", "#")) for url in page.urls)
    assert "http://" not in text and "https://" not in text and page.scripts == 0
    assert text.isascii()

    for section in ('id="domains"', 'id="slices"', 'id="calibration"', 'id="galleries"', 'id="models"'):
        assert section in text
    assert "Eyeglasses=yes (too few)" in text and '<tr class="few">' in text
    assert "<td>batch_size</td><td>32</td>" in text and "<td>milestones</td><td>[3, 6]</td>" in text
    shown = _words(text)
    assert "best epoch: 4 (val acc 0.9310) · epochs trained: 6" in shown
    assert "ensemble of: resnet18 + googlenet" in shown

    # The eval set's own columns are in its table (here from the CSV alone), not among the others.
    domains = _words(text[text.index('id="domains"') : text.index('id="slices"')])
    for value in ("0.8111", "n/a → 0.0222", "0.7777", "0.8333", "race=asian (0.7012)", "0.0556"):
        assert value in domains
    others = text[text.index("<details>") : text.index("</details>")]
    assert "precision_Female" in others and "mcnemar_b" in others
    assert "utkface" not in others and "members" not in others


def test_report_from_a_bare_leaderboard(tmp_path):
    """An old comparison: no kind or eval-set columns, no figures, no model folders."""
    pd.DataFrame(
        [
            {
                "rank": 1,
                "model": "resnet50",
                "status": "ok",
                "accuracy": 0.95,
                "ci95_low": 0.93,
                "ci95_high": 0.97,
                "error": "",
            },
            {
                "rank": None,
                "model": "googlenet",
                "status": "error",
                "accuracy": None,
                "ci95_low": None,
                "ci95_high": None,
                "error": "ValueError: boom",
            },
        ]
    ).to_csv(tmp_path / "leaderboard.csv", index=False)
    text, page = _parse(write_report(tmp_path))
    assert [row["model"] for row in page.rows] == ["resnet50", "googlenet"]
    assert page.rows[0]["cells"] == ["1", "resnet50", "0.9500 (0.9300–0.9700)"]
    assert page.rows[1]["cells"] == ["–", "googlenet", "error: ValueError: boom"]
    assert '<td colspan="1">error: ValueError: boom</td>' in text
    assert page.images == [] and "kind" not in text
    assert 'id="leaderboard"' in text and 'id="slices"' not in text and "<nav>" not in text


def test_report_needs_a_leaderboard(tmp_path):
    with pytest.raises(FileNotFoundError, match="leaderboard.csv"):
        write_report(tmp_path)


# --- in a real browser -----------------------------------------------------------------------


@pytest.fixture
def chromium(tmp_path):
    """A headless Chromium under ChromeDriver, quit whatever the test does."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip("Debian's chromium and chromium-driver are not installed: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # No sandbox: CI runs as root in a container. The background-networking switches keep a
    # machine without network from filling the log with failed update and sync requests.
    for switch in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,900",
    ):
        options.add_argument(switch)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager (which would try to download one) never runs.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        driver.set_page_load_timeout(10)
        yield driver
    finally:
        driver.quit()


def test_report_renders_in_chromium(comparison, chromium, tmp_path):
    path = write_report(comparison)
    chromium.get(path.as_uri())  # returns after the load event: every image decoded or failed

    severe = [entry for entry in chromium.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []
    models = pd.read_csv(comparison / "leaderboard.csv", keep_default_na=False, na_values=[""])["model"].tolist()
    assert (
        chromium.execute_script(
            "return Array.from(document.querySelectorAll('#leaderboard tbody tr'), tr => tr.dataset.model)"
        )
        == models
    )
    images = chromium.execute_script(
        "return Array.from(document.images, img => [img.alt, img.complete && img.naturalWidth > 0])"
    )
    assert images and [alt for alt, loaded in images if not loaded] == []
    # The Search section: the verdict, the trials, and the search's figures, each decoded.
    search = chromium.execute_script(
        "const s = document.querySelector('#search'); return s && [s.innerText, "
        "Array.from(s.querySelectorAll('img'), img => img.naturalWidth > 0 ? img.alt : '')]"
    )
    assert search and "kept: at screening fidelity" in search[0] and "pruned" in search[0]
    assert "Planned with 8 CPU cores." in search[0]  # its share of the cluster
    assert [alt.split(": ")[1].split(" ")[0] for alt in search[1]] == ["lr", "optimisation", "val", "parameter"]
    # data: URIs are not resource fetches; anything else the page loaded would be listed here.
    assert (
        chromium.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'))"
        )
        == []
    )

    # The whole page in one picture: a window as tall as the document (capped).
    height = chromium.execute_script("return document.documentElement.scrollHeight")
    chromium.set_window_size(1280, min(height + 120, 12_000))
    screenshot = tmp_path / "report.png"
    assert chromium.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("GENDERTUNE_SCREENSHOT_DIR"):
        kept = Path(os.environ["GENDERTUNE_SCREENSHOT_DIR"])
        kept.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, kept / "report.png")
