"""The dashboard of a tiny organism run, opened in a real headless Chromium (Debian's package, driven by
playwright)."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_on_organism
from playwright.sync_api import sync_playwright

from crosscoder_utils import CrossCoderConfig, TrainConfig
from crosscoder_utils import analysis as A
from crosscoder_utils.analysis import analyse
from crosscoder_utils.dashboard import build_dashboard, contexts_html, read_data
from crosscoder_utils.run import load_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def dashboard(organism, tmp_path_factory):
    train = TrainConfig(tokens_per_step=256, train_tokens=40_000, log_to="none", log_every=50)
    folder = tmp_path_factory.mktemp("dashboard")
    run = train_on_organism(organism, folder, 8000, 0.25, (4, 1024), train, CrossCoderConfig(dict_size=64))
    analysis = analyse(run)
    top = int(analysis.tables["finetuned"].order[0])  # its patching and steering go on its page
    patchings, steerings = (
        [A.patch(analysis, [top], set_sizes=(1,))],
        A.steer(analysis, top, alphas=(0, 1), n_prompts=1),
    )
    return run, build_dashboard(analysis, evidence=A.evidence(patchings, steerings)), (top, patchings[0], steerings[0])


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("no chromium executable: install Debian's chromium package (.ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_page(browser, url):
    page = browser.new_page()
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    return page, errors


def test_the_index_lists_every_live_latent_and_sorts(dashboard, browser):
    run_dir, site, _ = dashboard
    run = load_run(run_dir)
    val = run.store.split_range("val")
    f = run.crosscoder.encode(run.store.read(np.arange(val.start, val.stop)) * run.norm_factors[None, :, None])
    live = set((f > 0).any(0).nonzero().squeeze(1).tolist())
    page, errors = open_page(browser, (site / "index.html").as_uri())
    listed = [int(x) for x in page.locator("#latents tbody tr").evaluate_all("rows => rows.map(r => r.dataset.latent)")]
    assert set(listed) == live and len(listed) == len(live)
    health = json.loads((Path(run_dir) / "health.json").read_text())  # 03's, on the same held-out tokens
    summary = page.inner_text("#summary")
    assert f"{health['dead']} of 64 dead" in summary and f"size {health['effective_size']}." in summary
    assert health["dead"] == 64 - len(live)
    page.click("th[data-key=frequency]")  # descending first
    frequencies = page.locator("#latents tbody tr td:nth-child(5)").all_inner_texts()
    values = [float(text.rstrip("%")) for text in frequencies]
    assert values == sorted(values, reverse=True) and values != [float(t.rstrip("%")) for t in frequencies[::-1]]
    assert errors == []


def test_the_index_searches_the_explanations(dashboard, browser):
    _, site, _ = dashboard
    page, errors = open_page(browser, (site / "index.html").as_uri())
    cells = page.locator("#latents tbody tr td:nth-child(10)").all_inner_texts()
    rules = [text for text in cells if text != "no simple rule" and not text.startswith("too few firings")]
    assert rules and len(set(cells)) > 1  # the organism's latents have different explanations
    page.fill("#explanation-filter", rules[0])
    shown = page.locator("#latents tbody tr td:nth-child(10)").all_inner_texts()
    assert shown == [text for text in cells if rules[0].lower() in text.lower()]
    f1 = page.locator("#latents tbody tr td:nth-child(11)").all_inner_texts()
    assert all(0.5 <= float(value) <= 1 for value in f1)  # a rule is shown only at detection F1 0.5 or more
    assert errors == []


def test_a_latent_page_shows_its_activations(dashboard, browser):
    run_dir, site, _ = dashboard
    run = load_run(run_dir)
    page, errors = open_page(browser, (site / "index.html").as_uri())
    first = page.locator("#latents tbody tr").first
    latent = int(first.get_attribute("data-latent"))
    first.locator("a").click()
    page.wait_for_selector("#top .token")
    assert page.url.endswith(f"latent.html#{latent}") and f"Latent {latent}" in page.inner_text("#title")
    tokens = page.locator("#top .token")
    rows = [int(r) for r in tokens.evaluate_all("spans => spans.map(s => s.dataset.row)")]
    shown = torch.tensor([float(a) for a in tokens.evaluate_all("spans => spans.map(s => s.dataset.act)")])
    f = run.crosscoder.encode(run.store.read(rows) * run.norm_factors[None, :, None])[:, latent]
    torch.testing.assert_close(shown, f, atol=1e-4, rtol=0)
    assert (shown > 0).any() and page.locator("#logits table").count() == 4  # two models, promoted / suppressed
    page.click("#next")
    page.wait_for_function(f"!location.hash.endsWith('#{latent}')")
    assert errors == []


def test_a_tested_latents_page_shows_its_patching_and_steering(dashboard, browser):
    _, site, (top, patching, steering) = dashboard
    page, errors = open_page(browser, (site / "latent.html").as_uri() + f"#{top}")
    page.wait_for_selector("#causal table")
    shown = page.inner_text("#causal")
    closed = patching.of(top).as_row()["closed where it fires"]
    assert f"closed where it fires\t{closed}" in shown and "random latents there" in shown
    assert f"{steering.model}, α = 1\t{steering.continuations[1].strip()}" in shown
    assert f"{steering.other}, its own\t{steering.other_continuation.strip()}" in shown
    page.click("#next")  # a latent not tested: no such section
    page.wait_for_function(f"!location.hash.endsWith('#{top}')")
    page.wait_for_selector("#top .token")
    assert page.inner_text("#causal") == "" and errors == []


def test_contexts_render_inline_for_a_notebook(dashboard):
    _, site, _ = dashboard
    latent = read_data(site / "data/index.js", "LATENTS")[0]["latent"]  # the top of the ranking
    snippet = contexts_html(site, [latent], n_contexts=2)
    assert f"latent {latent}</a>" in snippet and snippet.count("<div") == 2


def test_show_prompt_gives_the_latents_of_both_models_on_any_text(dashboard, organism):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crosscoder_utils.dashboard import show_prompt

    run_dir, _, _ = dashboard
    text = " mia has a green kite. mia goes to the park."
    snippet = show_prompt(run_dir, text, n_latents=1)
    tokenizer = AutoTokenizer.from_pretrained(organism.base)
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
    x = []
    for path in (organism.base, organism.finetuned):  # a plain forward; the residual stream after block 1
        model = AutoModelForCausalLM.from_pretrained(path)
        block = model.transformer.h[1]
        block.register_forward_hook(lambda module, args, out: x.append((out[0] if isinstance(out, tuple) else out)[0]))
        with torch.no_grad():
            model(ids)
    x = torch.stack(x, dim=1)
    values, latents = load_run(run_dir).raw.encode(x).max(dim=1)
    assert snippet.count("<tr>") == 1 + len(ids[0])
    shown = [(int(latent), float(value)) for latent, value in re.findall(r"<td>(\d+)</td><td>([\d.]+)</td>", snippet)]
    expected = [(latent, value) for latent, value in zip(latents.tolist(), values.tolist()) if value > 0]
    assert [latent for latent, _ in shown] == [latent for latent, _ in expected]
    assert all(abs(a - b) < 2e-3 for (_, a), (_, b) in zip(shown, expected))


def test_a_latent_that_is_not_live_gets_a_message_not_an_error(dashboard, browser):
    _, site, _ = dashboard
    page, errors = open_page(browser, (site / "latent.html").as_uri() + "#99999")
    page.wait_for_function("document.getElementById('title').textContent.includes('not a live latent')")
    assert errors == []
