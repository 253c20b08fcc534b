"""The review page end to end: headless Chromium (Debian's `chromium`, driven by Playwright from PyPI through
`executable_path`; Playwright's own browser download is never used) against the real service (`pbrf-audit
serve`: uvicorn and a Celery worker on the embedded backend) with an API key configured.

A digits MLP is audited with `loo` by the real worker; its dataset and model names carry HTML. The page is
loaded, the key entered, the audit opened; the names must show as text (no element made, no dialog), three
flags are reviewed by keyboard (accept the suggestion, keep the label, unsure), the corrected labels are
exported with the button, and the downloaded CSV must hold exactly the accepted correction. The key must
appear in no URL and no log line. A screenshot and the download are kept in var/test-artifacts/."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, Service, _service_env
from tests.helpers import all_pages, export_onnx, npz_bytes, wait_for_audit

CHROMIUM = os.environ.get("PBRF_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "var" / "test-artifacts"
SECRET = "pbrf_review-page-secret-7f3a9c01d2e4"
DATASET_NAME = "digits <img src=x onerror=alert(1)>"
MODEL_NAME = "mlp <script>alert(2)</script>"
FOCUSED = re.compile(r"\bfocused\b")

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed: `make install-test` (the test extra) installs it")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no chromium at {CHROMIUM}: `make browser` installs Debian's chromium with apt-get (needs root); "
                "Playwright's browser download is not used", allow_module_level=True)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keyed_service(tmp_path_factory):
    """The embedded service with one static API key (tenant `reviewer`)."""
    svc = Service(_service_env("embedded", None) | {"PBRF_API_KEYS": f"reviewer:{SECRET}"},
                  tmp_path_factory.mktemp("review-page"))
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def audited(keyed_service, tmp_path_factory):
    """A succeeded `loo` audit of noisy digits (1500 examples of 64 features), its flags and the labels."""
    from tests.digits import noisy_digits, train_mlp

    x, y, _, _, _, _ = noisy_digits(seed=0)
    model = train_mlp(x, y, hidden=32, epochs=300, weight_decay=1e-3)
    import torch

    path = export_onnx(model, torch.from_numpy(x[:2]), tmp_path_factory.mktemp("page-model") / "digits.onnx",
                       dynamo=False)
    with keyed_service.client() as client:
        client.headers["Authorization"] = f"Bearer {SECRET}"
        with open(path, "rb") as f:
            r = client.post("/v1/models", files={"file": ("digits.onnx", f)}, data={"name": MODEL_NAME})
        assert r.status_code == 201, r.text
        model_id = r.json()["id"]
        r = client.post("/v1/datasets", files={"file": ("digits.npz", npz_bytes(inputs=x, labels=y))},
                        data={"name": DATASET_NAME})
        assert r.status_code == 201, r.text
        dataset_id = r.json()["id"]
        r = client.post("/v1/audits", json={"model_id": model_id, "dataset_id": dataset_id, "method": "loo",
                                            "weight_decay": 1e-3})
        assert r.status_code == 202, r.text
        body, _ = wait_for_audit(client, r.json()["id"], interval=0.5)
        assert body["status"] == "succeeded", body
        flags = all_pages(client, f"/v1/audits/{body['id']}/flags", limit=1000)
    return {"audit": body, "model_id": model_id, "dataset_id": dataset_id, "flags": flags, "labels": y}


def test_review_by_keyboard_and_export(keyed_service, audited):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    flags = audited["flags"]
    assert len(flags) >= 3
    first, second, third = flags[:3]
    suggested = first["suggested_label"]
    assert suggested is not None and suggested != first["given_label"], first
    base = keyed_service.url

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        context = browser.new_context(accept_downloads=True, viewport={"width": 1440, "height": 1000})
        page = context.new_page()
        dialogs, page_errors, console, requests = [], [], [], []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.on("pageerror", lambda error: page_errors.append(str(error)))
        page.on("console", lambda message: console.append((message.type, message.text)))
        page.on("request", lambda request: requests.append((time.monotonic(), request.url, request.headers)))
        try:
            page.goto(base + "/")
            expect(page).to_have_url(base + "/ui")
            # the server needs a key: the page says so
            expect(page.locator("#message")).to_contain_text("needs an API key")

            page.fill("#api-key", SECRET)
            page.click("#key-save")
            keyed_at = time.monotonic()
            expect(page.locator("#api-key")).to_have_value("")  # kept in sessionStorage, not in the page
            assert page.evaluate("sessionStorage.getItem('pbrf-audit.api-key')") == SECRET
            entry = page.locator("#audits li", has_text=DATASET_NAME)
            expect(entry).to_have_count(1)
            expect(entry.locator(".status")).to_have_text("succeeded")
            expect(entry).to_contain_text(MODEL_NAME)
            entry.click()

            # names with HTML render as text: the characters are shown, no element was made from them
            expect(page.locator("#review-title")).to_have_text(DATASET_NAME)
            expect(page.locator("#review-meta")).to_contain_text(MODEL_NAME)
            assert page.locator("img").count() == 0 and page.locator("script:not([src])").count() == 0

            cards = page.locator("#flags .flag")
            expect(cards.first).to_be_visible()
            assert cards.count() == min(48, len(flags))
            # digits' 64 features drawn as 8x8 images, for every card on the first page
            expect(page.locator("#flags .flag canvas.pixels")).to_have_count(cards.count())
            assert page.locator("#flags .flag canvas.pixels").first.evaluate("c => [c.width, c.height]") == [8, 8]
            expect(page.locator("#drawing-rule")).to_contain_text("8×8")
            card = [cards.nth(k) for k in range(3)]
            expect(card[0]).to_have_class(FOCUSED)
            expect(card[0].locator(".rank")).to_have_text("#1")
            expect(card[0].locator(".head")).to_contain_text(f"example {first['index']}")
            expect(card[0].locator(".given")).to_have_text(str(first["given_label"]))
            expect(card[0].locator(".suggested")).to_have_text(str(suggested))
            expect(page.locator("#histogram-caption")).to_contain_text(f"Scores of all {len(audited['labels'])}")
            expect(page.locator(".keys")).to_contain_text("accept the suggestion")

            # three flags by keyboard: accept the suggestion, keep the label, unsure (each moves on)
            page.keyboard.press("a")
            page.keyboard.press("k")
            page.keyboard.press("u")
            expect(card[0].locator(".verdict")).to_have_text(f"mislabeled → {suggested}")
            expect(card[1].locator(".verdict")).to_have_text("correct (label kept)")
            expect(card[2].locator(".verdict")).to_have_text("unsure")
            expect(cards.nth(3)).to_have_class(FOCUSED)
            page.keyboard.press("ArrowLeft")
            expect(card[2]).to_have_class(FOCUSED)
            expect(card[2]).to_have_class(re.compile(r"\bv-unsure\b"))
            page.keyboard.press("j")
            expect(cards.nth(3)).to_have_class(FOCUSED)
            # a digit relabels to that class; x withdraws the verdict again
            fourth = flags[3]
            digit = next(d for d in range(10) if d != fourth["given_label"])
            page.keyboard.press(str(digit))
            expect(cards.nth(3).locator(".verdict")).to_have_text(f"mislabeled → {digit}")
            expect(cards.nth(4)).to_have_class(FOCUSED)
            page.keyboard.press("ArrowLeft")
            page.keyboard.press("x")
            expect(cards.nth(3).locator(".verdict")).to_have_text("not reviewed")
            expect(page.locator("#review-progress")).to_contain_text("Reviewed 3 of")

            with page.expect_download() as download_info:
                page.click("#export-csv")
            download = download_info.value
            saved = ARTIFACTS / "review-page-labels.csv"
            download.save_as(saved)
            expect(page.locator("#message")).to_contain_text("1 accepted correction applied")
            page.screenshot(path=str(ARTIFACTS / "review-page.png"))

            # live status: a new audit shows up on Refresh and is polled until it ends; then polling stops
            with keyed_service.client() as client:
                client.headers["Authorization"] = f"Bearer {SECRET}"
                r = client.post("/v1/audits", json={"model_id": audited["model_id"],
                                                    "dataset_id": audited["dataset_id"], "method": "identity"})
                assert r.status_code == 202, r.text
                second_audit = r.json()["id"]
            page.click("#audits-refresh")
            entries = page.locator("#audits li")
            expect(entries).to_have_count(2)
            expect(page.locator(f'#audits li[data-audit="{second_audit}"] .status')).to_have_text(
                "succeeded", timeout=120_000)
            expect(page.locator(f'#audits li[data-audit="{second_audit}"]')).to_contain_text("100%")
            settled = time.monotonic()
            page.wait_for_timeout(4500)
            assert not [url for at, url, _ in requests if at > settled + 0.5 and "/v1/audits?" in url], \
                "the page kept polling after every audit had ended"
        finally:
            context.close()
            browser.close()

    # the exported labels: exactly the accepted correction
    rows = list(csv.DictReader(io.StringIO(saved.read_text())))
    labels = audited["labels"]
    assert len(rows) == len(labels)
    changed = [(int(r["index"]), int(r["label"]), int(r["original_label"])) for r in rows if r["label"] != r["original_label"]]
    assert changed == [(first["index"], suggested, first["given_label"])]
    assert [int(r["original_label"]) for r in rows] == labels.tolist()

    # the verdicts went through the API
    with keyed_service.client() as client:
        client.headers["Authorization"] = f"Bearer {SECRET}"
        listed = {f["index"]: f for f in all_pages(client, f"/v1/audits/{audited['audit']['id']}/flags", limit=1000)}
    assert (listed[first["index"]]["verdict"], listed[first["index"]]["corrected_label"]) == ("mislabeled", suggested)
    assert (listed[second["index"]]["verdict"], listed[second["index"]]["corrected_label"]) == ("correct", None)
    assert listed[third["index"]]["verdict"] == "unsure"
    assert sum(1 for f in listed.values() if f["verdict"]) == 3

    # nothing fired, nothing refused, nothing from elsewhere, and the key only ever in the header
    assert dialogs == [], dialogs
    assert page_errors == [], page_errors
    refused = [text for kind, text in console if kind == "error" and "Failed to load resource" not in text]
    assert refused == [], refused  # a CSP violation or a script error would be logged here
    assert requests and all(url.startswith(base + "/") or url.startswith("blob:") for _, url, _ in requests), \
        {url for _, url, _ in requests}
    assert not [url for _, url, _ in requests if SECRET in url]
    api_requests = [headers for at, url, headers in requests if "/v1/" in url and at > keyed_at]
    assert api_requests and all(h.get("authorization") == f"Bearer {SECRET}" for h in api_requests)
    time.sleep(0.5)
    assert SECRET not in keyed_service.logs()
    assert (ARTIFACTS / "review-page.png").stat().st_size > 10_000
    shutil.copy(keyed_service.log_path, ARTIFACTS / "review-page-service.log")
