"""In a real browser: what a newcomer sees of a tiny finished run (issue 20, item 6).

Headless Chromium (Debian's ``chromium``, driven by Playwright from PyPI; never
Playwright's own browser download) opens

- the MLflow UI, started as the README says (``mlflow ui --backend-store-uri
  sqlite:///results/mlflow.db`` in the project folder), on a store that two tiny
  digits-c runs wrote: dense, then ManiDP at budget 0.5 from it, under their
  parent run, as the workflow logs them;
- a Snakemake report (``--report``, Snakemake's own page) of the workflow's
  table rule on those runs: ``manidp table``'s paper-layout HTML table as the
  report item, captioned with the workflow's ``report/table.rst``.

Every page is screenshotted into the module's temporary folder (``*.png``).
Skipped, saying why, where Chromium or Playwright is not installed.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, small_run_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: `apt-get install chromium` (Debian's package) "
                                                "lets this test drive a real browser"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="no Playwright: `pip install -e '.[dev]'` brings it "
                                                             "(the test uses the system's chromium, never "
                                                             "`playwright install`)")

ROOT = Path(__file__).resolve().parents[1]
TABLE_CAPTION = ROOT / "workflow" / "report" / "table.rst"
PARENT = "digits-c / cifar_resnet20"
DENSE, METHOD = "dense s0", "manidp b0.5 s0"
RUN_DIRS = {DENSE: "runs/digits-c/cifar_resnet20/dense/seed0", METHOD: "runs/digits-c/cifar_resnet20/manidp-b0.5/seed0"}
# The React pages load their data after the HTML; on a busy 2-core machine that takes seconds.
WAIT_MS = 90_000

# The workflow's table rule (workflow/rules/report.smk) on the tiny run's folders: `manidp table` writes the
# paper-layout table as CSV, Markdown, LaTeX and HTML; the HTML is the report item, with the workflow's caption.
SNAKEFILE = """\
rule table:
    output:
        csv="results/digits-c_table.csv",
        md="results/digits-c_table.md",
        tex="results/digits-c_table.tex",
        full="results/digits-c_table_full.md",
        html=report("results/digits-c_table.html", caption={caption!r}, category="Tables", subcategory="digits-c"),
    shell:
        "{python} -m manidp table --dataset digits-c --runs {runs} --profiles --out {{output.csv}}"
"""


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow ui exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.3)
    pytest.fail(f"mlflow ui did not listen within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def project(tmp_path_factory, data_cache):
    """A project folder after a tiny tracked run, with the MLflow UI on it and its report being built:
    (folder, UI address, the report's snakemake process)."""
    from manidp import engine, tracking

    folder = tmp_path_factory.mktemp("project")
    (folder / "results").mkdir()
    uri = f"sqlite:///{folder / 'results' / 'mlflow.db'}"
    port = free_port()
    ui_log, report_log = folder / "mlflow_ui.log", folder / "snakemake.log"
    ui = report = None
    try:
        with contextlib.chdir(folder):  # artifacts go to mlruns/ here, as in the folder Snakemake runs in
            tracking.init_store(uri, ("digits-c",))
            parent = tracking.parent_run("digits-c", "cifar_resnet20", uri)
            # The UI starts (tens of seconds on a busy machine) while the runs train; they show up when done.
            ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                                   "sqlite:///results/mlflow.db", "--host", "127.0.0.1", "--port", str(port)],
                                  cwd=folder, stdout=ui_log.open("w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)  # its workers: one process group
            tracked = {"train.epochs": 1, "train.batch_size": 32, "data.max_train": 64, "data.max_eval": 32,
                       "tracking.enabled": True, "tracking.uri": uri, "tracking.parent_run_id": parent}
            # As `manidp train` runs: the engine with the MLflow observer.
            dense = engine.train(small_run_config(folder / RUN_DIRS[DENSE], data_cache, **tracked),
                                 tracking.MlflowObserver())
            engine.train(small_run_config(folder / RUN_DIRS[METHOD], data_cache, method="manidp", budget=0.5,
                                          init_from=str(dense), **tracked), tracking.MlflowObserver())
        (folder / "Snakefile").write_text(SNAKEFILE.format(caption=str(TABLE_CAPTION), python=sys.executable,
                                                           runs=" ".join(RUN_DIRS.values())))
        # The report builds while the MLflow pages are checked.
        report = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1", "--report", "report.html",
                                   "--report-after-run"], cwd=folder, stdout=report_log.open("w"),
                                  stderr=subprocess.STDOUT)
        _wait_for_port(port, ui, ui_log)
        yield folder, f"http://127.0.0.1:{port}", report
    finally:
        if report is not None and report.poll() is None:
            report.kill()
            report.wait(timeout=30)
        if ui is not None:
            with contextlib.suppress(ProcessLookupError):  # a throwaway server: no need for a graceful stop
                os.killpg(ui.pid, signal.SIGKILL)
            ui.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh browser profile per test: the UI keeps its view state (expanded rows, filters) per profile."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(WAIT_MS)
    yield context.new_page()
    context.close()


@pytest.fixture(scope="module")
def screenshots(project) -> Path:
    return project[0]


def test_documented_url_shows_the_runs_table_with_method_first_names(project, page, screenshots):
    _, address, _ = project
    page.goto(f"{address}/#/experiments/1/runs")  # the URL README and results/README give
    page.wait_for_selector(f"text={PARENT}")
    assert "/#/experiments/1/runs" in page.url  # not redirected to the GenAI overview
    page.get_by_role("heading", name="Training runs").wait_for()  # wait_for: until visible, else it fails
    page.screenshot(path=screenshots / "1_runs_table.png")
    # The children sit under their parent row until its expander is clicked.
    parent_row = page.locator("[role=row]", has_text=PARENT)
    parent_row.locator("[col-id*='Run Name'] button").click()
    for name in (METHOD, DENSE):
        page.get_by_role("link", name=name, exact=True).wait_for()
    page.screenshot(path=screenshots / "2_runs_expanded.png")
    # The README's way to compare methods at one budget: a search on tags.budget.
    search = page.get_by_test_id("search-box")
    search.fill("tags.budget = '0.5'")
    search.press("Enter")
    page.get_by_role("link", name=DENSE, exact=True).wait_for(state="detached")
    page.get_by_role("link", name=METHOD, exact=True).wait_for()
    page.screenshot(path=screenshots / "3_runs_at_budget.png")


def test_run_page_lists_its_datasets_and_logged_model(project, page, screenshots):
    _, address, _ = project
    page.goto(f"{address}/#/experiments/1/runs")
    page.wait_for_selector(f"text={PARENT}")
    page.locator("[role=row]", has_text=PARENT).locator("[col-id*='Run Name'] button").click()
    page.get_by_role("link", name=METHOD, exact=True).click()
    page.get_by_role("heading", name=METHOD).wait_for()  # the run's page (the table also shows digits-c/train)
    page.get_by_text("About this run").wait_for()
    page.get_by_text("digits-c/train").first.wait_for()
    page.get_by_role("link", name=PARENT).wait_for()  # the parent run's name arrives after the run's own data
    about = page.inner_text("body")
    for text in ("Parent run", PARENT, "Source", "manidp train", "Datasets", "digits-c/train", "Training"):
        assert text in about, text
    page.get_by_text("+2", exact=True).click()  # the other two splits
    for split, context in (("digits-c/val", "Validation"), ("digits-c/test", "Testing")):
        page.get_by_text(split).first.wait_for()
        assert context in page.inner_text("body"), context
    page.screenshot(path=screenshots / "4_run_datasets.png")
    page.keyboard.press("Escape")
    models = page.get_by_text("Logged models (1)")
    models.scroll_into_view_if_needed()
    page.screenshot(path=screenshots / "5_run_logged_model.png")
    # Open the run's model: the logged model's page names the run it came from.
    page.locator("a[href*='/models/m-']:not([target=_blank])", has_text="model").click()  # not a metric's link
    page.wait_for_selector("text=About this logged model")
    page.get_by_role("link", name=METHOD, exact=True).first.wait_for()
    page.screenshot(path=screenshots / "6_logged_model.png")


def test_report_page_shows_the_table(project, page, screenshots):
    folder, _, report = project
    assert report.wait(timeout=300) == 0, (folder / "snakemake.log").read_text()[-4000:]
    page.goto((folder / "report.html").as_uri())
    page.get_by_text("Results", exact=True).click()
    page.get_by_text("Tables", exact=True).click()
    row = page.locator("tr", has_text="digits-c_table.html")
    row.locator("a[iconname=eye]").click()  # the item opens in the page, not as a download
    table = page.frame_locator("iframe").first.locator("table")
    table.wait_for()
    text = table.inner_text()
    for cell in ("Top-1 pruned (%)", "Top-5 gap", "MACs red. (%)", "cifar_resnet20", "manidp", "yes", "ours"):
        assert cell in text, text
    assert "as in the paper's Tables 1 and 4" in text  # the table's own caption
    page.screenshot(path=screenshots / "7_report_table.png")
    row.locator("a[iconname=information-circle]").click()  # the item's caption, from workflow/report/table.rst
    page.get_by_text("The results table in the layout of the paper's Tables 1 and 4").wait_for()
    page.screenshot(path=screenshots / "8_report_caption.png")
