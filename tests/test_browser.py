"""Click through the app in headless Chromium (Debian's package, driven by Playwright) and save a
screenshot of each tab: build a corpus, train stage 1 and switch tabs while it trains (Start disabled while it
runs, Stop while it is idle, the form after Resume), look up a voice description and compare two, speak and read
the LLM's answer; start the full recipe, watch its per-stage progress lines and stop it; the quick start from an
empty workspace to a finished tiny recipe and its speech.

Screenshots go to $IRA_SCREENSHOTS (default: the test's temporary folder).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
expect = playwright_api.expect

from conftest import TINY_APP, TINY_STYLE, free_port  # noqa: E402
from ira.hardware import detect_hardware  # noqa: E402
from ui.app import build_app, launch_app  # noqa: E402

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).exists()), None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (Debian package 'chromium'; "
                                                         "scripts/setup_browser.sh installs it as root)")


@pytest.fixture(scope="module")
def served(tiny_stage3, bundled_llm, tmp_path_factory):
    from ira.config import load_config
    from ira.data.dummy import create_dummy_corpus
    from ira.training.stage_style import run_style_training

    root = tmp_path_factory.mktemp("workspace")
    (root / "runs" / "aligned").mkdir(parents=True)
    shutil.copy(tiny_stage3.last_checkpoint, root / "runs" / "aligned" / Path(tiny_stage3.last_checkpoint).name)
    corpus = create_dummy_corpus(root / "data" / "voices", num_clips=9, seed=0)
    style = run_style_training(load_config("cpu", TINY_STYLE + [f"data.dir={corpus}",
                                                                f"training.output_dir={root / 'runs' / 'voice'}"]),
                               cpu=True)
    assert style.ok, style.message
    demo = build_app(root, preset="cpu", overrides=TINY_APP, hardware=detect_hardware())
    launched = launch_app(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield root, launched.local_url, f"runs/aligned/{Path(tiny_stage3.last_checkpoint).name}"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    """One Chromium for the module (Playwright's sync API runs one instance per thread)."""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(url)
    page.get_by_text("IRA · Integrated Reasoning with Audio").wait_for()
    return page


@pytest.fixture(scope="module")
def page(served, browser):
    page = _open(browser, served[1])
    yield page
    page.close()


TINY_RECIPE_APP = TINY_APP + [item for item in TINY_STYLE if item.startswith(("style.", "speech_lm.style_dim"))] + [
    "training.mixed_precision=no", "training.num_epochs=1000"]
"""App overrides for the full recipe: TINY_APP's stage 1, ended by its share of the budget only (not after its
few epochs of a tiny corpus), and a two-step style encoder (the recipe trains every stage with these)."""


@pytest.fixture(scope="module")
def recipe_served(tmp_path_factory):
    from ira.data.dummy import create_dummy_corpus

    root = tmp_path_factory.mktemp("recipe_workspace")
    create_dummy_corpus(root / "data" / "voices", num_clips=16, seed=0)
    demo = build_app(root, preset="cpu", overrides=TINY_RECIPE_APP, hardware=detect_hardware())
    launched = launch_app(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield root, launched.local_url
    demo.close()


@pytest.fixture(scope="module")
def recipe_page(recipe_served, browser):
    page = _open(browser, recipe_served[1])
    yield page
    page.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("IRA_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


LOG_SHOWS_ITS_LAST_LINE = """text => [...document.querySelectorAll('textarea')].some(
    e => e.value.includes(text) && e.scrollTop + e.clientHeight >= e.scrollHeight - 2)"""
"""A textarea holding `text` whose end is in view (the Train tab's log box)."""


ERROR_BADGES = """() => [...document.querySelectorAll('.error')].filter(
    e => e.offsetParent !== null && e.innerText.trim() === 'Error' && !e.closest('[data-testid=toast-body]')).length"""
"""How many components show Gradio's red "Error" status badge (the error's toast aside)."""


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _choose(page, label: str, value: str) -> None:
    """Type a value into a Gradio dropdown (they accept custom values) and confirm it."""
    box = page.get_by_label(label)
    box.click()
    box.fill(value)
    box.press("Enter")


def test_click_through_the_tabs(served, page, shots):
    root, _, aligned = served

    # Data: build the dummy corpus with the button, see its summary and clips.
    _tab(page, "Data")
    page.get_by_label("Dummy corpus (a few clips, seconds)").check()
    # choosing a source fills in its default name from the server: wait for it, or it may overwrite ours
    page.wait_for_function("() => [...document.querySelectorAll('input, textarea')].some(e => e.value === 'dummy')")
    page.get_by_label("Corpus name").fill("clicked")
    page.get_by_role("button", name="Build corpus").click()
    page.wait_for_function("() => document.body.innerText.includes('Corpus clicked') && "
                           "/\\d+ clips kept/.test(document.body.innerText)", timeout=120_000)
    assert (root / "data" / "clicked" / "metadata.csv").is_file()
    page.screenshot(path=str(shots / "1-data.png"), full_page=True)

    # Train: start a real stage-1 run; while it trains another tab answers at once.
    _tab(page, "Train")
    start, stop = (page.get_by_role("button", name=name, exact=True) for name in ("Start", "Stop"))
    expect(stop).to_be_disabled()   # idle: nothing to stop, so Stop cannot be pressed (no red "Error")
    page.get_by_label("1 · SpeechLM pre-training").check()   # the tab opens on the full recipe
    # choosing it fills in the run name from the server: wait for it, or it may overwrite ours
    page.wait_for_function("() => [...document.querySelectorAll('input, textarea')].some(e => e.value === 'stage1')")
    page.get_by_label("Run name").fill("clicked")
    _choose(page, "Corpus (from the Data tab)", "clicked")
    page.get_by_label("Max steps (0: by epochs / the preset's)").fill("100000")
    page.get_by_role("button", name="Start", exact=True).click()
    page.wait_for_function("() => document.body.innerText.includes('RUNNING')", timeout=120_000)
    page.wait_for_function("() => /step [1-9]/.test(document.body.innerText)", timeout=120_000)
    # while it runs: Start is disabled (no "press Resume" for a running job), Stop is enabled
    expect(start).to_be_disabled(timeout=30_000)
    expect(stop).to_be_enabled()
    page.wait_for_timeout(5_000)   # a few refreshes of the plots (every 2 s)
    page.screenshot(path=str(shots / "2-train.png"), full_page=True)
    _tab(page, "Generate")
    # the other tab answers while the job trains (no timing: a busy machine is slow, not broken)
    page.get_by_role("button", name="Speak").wait_for(state="visible", timeout=60_000)
    _tab(page, "Train")
    stop.click()
    page.wait_for_function("() => document.body.innerText.includes('STOPPED')", timeout=120_000)
    assert list((root / "runs" / "clicked").glob("stage1_*.safetensors"))
    expect(stop).to_be_disabled(timeout=30_000)
    expect(start).to_be_enabled()
    # the log box shows its newest lines without scrolling: the stop line is in view
    page.wait_for_function(LOG_SHOWS_ITS_LAST_LINE, arg="Stopped at step", timeout=30_000)
    # a second Start of the same run is refused; its red "Error" badges go at the next refresh
    page.get_by_role("button", name="Start", exact=True).click()
    page.wait_for_function("() => document.body.innerText.includes('press Resume to continue it')", timeout=30_000)
    page.wait_for_timeout(5_000)
    assert page.evaluate(ERROR_BADGES) == 0

    # A reload shows the stopped run with the settings it was started with, and Resume keeps them
    # (not the form's defaults: max steps 0 would have resumed toward the preset's steps).
    page.reload()
    page.get_by_text("IRA · Integrated Reasoning with Audio").wait_for()
    _tab(page, "Train")
    page.wait_for_function("() => document.body.innerText.includes('STOPPED')", timeout=60_000)
    assert page.get_by_label("Run name").input_value() == "clicked"
    page.wait_for_function("() => [...document.querySelectorAll('input')].some(e => e.value === '100000')")
    page.get_by_label("Max steps (0: by epochs / the preset's)").fill("7")   # ignored by Resume
    page.get_by_role("button", name="Resume from the run's latest checkpoint").click()
    page.wait_for_function("() => document.body.innerText.includes('with the settings it was started with')",
                           timeout=60_000)
    page.wait_for_function("() => document.body.innerText.includes('RUNNING')", timeout=120_000)
    job = json.loads((root / "runs" / "clicked" / "job.json").read_text())
    assert "training.max_steps=100000" in job["command"]
    # the form shows what the job runs with, not the 7 typed before Resume; its message outlives the refreshes
    max_steps = page.get_by_label("Max steps (0: by epochs / the preset's)")
    expect(max_steps).to_have_value("100000", timeout=30_000)
    page.wait_for_timeout(5_000)
    assert max_steps.input_value() == "100000"
    assert "with the settings it was started with" in page.inner_text("body")
    expect(start).to_be_disabled()
    page.get_by_role("button", name="Stop", exact=True).click()
    page.wait_for_function("() => document.body.innerText.includes('STOPPED')", timeout=120_000)

    # Voice Style: a description -> the nearest clips of a corpus and the map.
    _tab(page, "Voice Style")
    _choose(page, "Corpus to search", "voices")
    page.get_by_label("Voice description", exact=True).fill("a fast, high-pitched female voice")
    page.get_by_role("button", name="Find voices").click()
    page.wait_for_function("() => /similarity/i.test(document.body.innerText) && "
                           "document.querySelectorAll('table tbody tr').length > 0", timeout=120_000)
    page.get_by_role("button", name="Compare").click()
    page.wait_for_function("() => /cosine/i.test(document.body.innerText)", timeout=60_000)
    page.screenshot(path=str(shots / "3-voice-style.png"), full_page=True)

    # Generate: speak with the aligned checkpoint and read the LLM's answer.
    _tab(page, "Generate")
    _choose(page, "Checkpoint (stage 1, 2 or 3; from workspace/runs)", aligned)
    page.get_by_label("Text to speak").fill("Good morning, how are you?")
    page.get_by_role("button", name="Speak").click()
    page.wait_for_function("() => document.body.innerText.includes('answered in')", timeout=120_000)
    answer = page.get_by_label("The LLM's answer about the speech (it never sees the text)").input_value()
    assert answer.strip()
    # a four-step PPO checkpoint's outputs carry what was measured of them, in plain words, beside them
    shown = page.evaluate("() => document.body.innerText")
    speech = shown.split("answered in", 1)[1]
    assert "Speech: near random" in speech or "Speech: not measured" in speech, speech
    assert "The LLM's answer: " in speech
    page.screenshot(path=str(shots / "4-generate.png"), full_page=True)


def test_full_recipe_starts_shows_each_stage_and_stops(recipe_served, recipe_page, shots):
    """The Stage radio's 'Full recipe': a budget instead of a start checkpoint, one progress line per stage
    while it trains, and Stop ends the stage that runs (here stage 1, after the two-step style encoder)."""
    from ui.train_tab import RECIPE_CHOICE

    root, page = recipe_served[0], recipe_page
    _tab(page, "Train")
    page.get_by_label(RECIPE_CHOICE[0]).check()
    page.get_by_label("Budget (minutes)").wait_for(state="visible")
    assert not page.get_by_label("Start from checkpoint (the previous stage)").is_visible()
    assert not page.get_by_label("Batch size").is_visible()
    # choosing it fills in the run name from the server: wait for it, or it may come after a Start
    page.wait_for_function("() => [...document.querySelectorAll('input, textarea')].some(e => e.value === 'recipe')")
    _choose(page, "Corpus (from the Data tab)", "voices")
    # 4 minutes: the style encoder's 12 s end at its 2 steps; stage 1's 2 minutes leave time to press Stop in it
    page.get_by_label("Budget (minutes)").fill("4")
    page.get_by_role("button", name="Start", exact=True).click()
    page.wait_for_function("() => document.body.innerText.includes('RUNNING')", timeout=120_000)
    page.wait_for_function("() => ['voice style encoder', 'stage 1 (SpeechLM)', 'stage 2 (adapter)', 'stage 3 (PPO)']"
                           ".every(name => document.body.innerText.includes(name))", timeout=60_000)
    page.wait_for_function("() => /stage 1 \\(SpeechLM\\) · running · [0-9.]+ \\/ 2 min · step [1-9]/"
                           ".test(document.body.innerText)", timeout=180_000)
    assert "voice style encoder · done" in page.inner_text("body")
    page.screenshot(path=str(shots / "5-recipe.png"), full_page=True)
    page.get_by_role("button", name="Stop", exact=True).click()
    page.wait_for_function("() => document.body.innerText.includes('STOPPED') && "
                           "document.body.innerText.includes('stage 1 (SpeechLM) · stopped')", timeout=120_000)
    state = json.loads((root / "runs" / "recipe" / "recipe.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done", "stopped", "pending", "pending"]
    assert json.loads((root / "runs" / "recipe" / "job.json").read_text())["stage"] == "recipe"
    assert (root / "runs" / "recipe" / "stage1" / "stage1_latest.safetensors").is_file()


@pytest.fixture(scope="module")
def quick_served(tmp_path_factory):
    """An app on an empty workspace, sized for a whole recipe in minutes (tests/test_recipe.py's tiny stages)."""
    from test_recipe import TINY_RECIPE

    root = tmp_path_factory.mktemp("empty_workspace")
    # the preset's style batch (64): the recipe must fit it to the dummy corpus
    overrides = [item for item in TINY_RECIPE if not item.startswith("style.batch_size=")]
    demo = build_app(root, preset="cpu", overrides=overrides, hardware=detect_hardware())
    launched = launch_app(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield root, launched.local_url
    demo.close()


def test_the_quick_start_goes_from_an_empty_workspace_to_speech(quick_served, browser, shots):
    """The page's quick start, step by step as a newcomer would: 1. build the dummy corpus (11 training clips,
    fewer than the preset's batches: the recipe fits them), 2. the full recipe (the Train tab's default) runs to
    its end, 3. its last checkpoint speaks in the Generate tab."""
    root, url = quick_served
    page = _open(browser, url)
    try:
        assert "Quick start" in page.inner_text("body")
        _tab(page, "Data")
        page.get_by_label("Dummy corpus (a few clips, seconds)").check()
        page.wait_for_function("() => [...document.querySelectorAll('input, textarea')].some(e => e.value === 'dummy')")
        page.get_by_role("button", name="Build corpus").click()
        page.wait_for_function("() => document.body.innerText.includes('Corpus dummy') && "
                               "/\\d+ clips kept/.test(document.body.innerText)", timeout=120_000)

        _tab(page, "Train")
        assert page.get_by_label("Budget (minutes)").is_visible()   # the full recipe is chosen already
        _choose(page, "Corpus (from the Data tab)", "dummy")
        page.get_by_label("Budget (minutes)").fill("20")
        page.get_by_role("button", name="Start", exact=True).click()
        page.wait_for_function("() => document.body.innerText.includes('RUNNING')", timeout=120_000)
        expect(page.get_by_role("button", name="Start", exact=True)).to_be_disabled(timeout=30_000)
        page.wait_for_function("() => document.body.innerText.includes('FINISHED') && "
                               "document.body.innerText.includes('full recipe done')", timeout=900_000)
        page.screenshot(path=str(shots / "6-quick-start-recipe.png"), full_page=True)
        state = json.loads((root / "runs" / "recipe" / "recipe.json").read_text())
        assert [s["status"] for s in state["stages"]] == ["done"] * 4
        log = (root / "runs" / "recipe" / "train.log").read_text()
        assert "style.batch_size" in log and "fewer than the preset's batches" in log   # the fit was said
        final = Path(state["stages"][-1]["checkpoint"])
        final = final if final.is_absolute() else root / final

        _tab(page, "Generate")
        _choose(page, "Checkpoint (stage 1, 2 or 3; from workspace/runs)", str(final.relative_to(root)))
        page.get_by_label("Text to speak").fill("Good morning.")
        page.get_by_role("button", name="Speak").click()
        page.wait_for_function("() => document.body.innerText.includes('answered in')", timeout=180_000)
        page.screenshot(path=str(shots / "7-quick-start-generate.png"), full_page=True)
    finally:
        page.close()
