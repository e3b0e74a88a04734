"""The playground's serving, without a browser: off unless configured, its files and headers, and what its HTML
promises (no inline script or style, so the CSP can forbid them; every control labelled). tests/e2e drives the
page itself in headless Chromium."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
import pytest_asyncio

from models.templates import PRESETS
from service.playground import CSP, MEDIA_TYPES, PAGE, UnknownAsset, asset
from tests.service.conftest import running_app

# The async tests share the module's app, so they run in its event loop.
shared_loop = pytest.mark.asyncio(loop_scope="module")

ASSETS = sorted(set(MEDIA_TYPES) - {PAGE})
CONTROLS = ("input", "select", "textarea")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client():
    async with running_app(playground=True) as (_, client):
        yield client


class Page(HTMLParser):
    """The elements of the page, each as (tag, attributes, the labels it sits inside), and scripts' bodies."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None], int]] = []
        self.open_labels = 0
        self.in_script = False
        self.script_text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs), self.open_labels))
        self.open_labels += tag == "label"
        self.in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self.open_labels -= tag == "label"
        if tag == "script":
            self.in_script = False

    def handle_data(self, data: str) -> None:
        if self.in_script:
            self.script_text.append(data)


def parsed(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    return page


def by_id(page: Page, element_id: str) -> tuple[str, dict[str, str | None], int]:
    [element] = [e for e in page.elements if e[1].get("id") == element_id]
    return element


@shared_loop
async def test_nothing_is_served_when_the_playground_is_off():
    async with running_app(playground=False) as (_, client):
        for path in ["/", *(f"/playground/{name}" for name in ASSETS)]:
            response = await client.get(path)
            assert response.status_code == 404, path
            assert response.json()["error"]["code"] == "not_found"
            assert "content-security-policy" not in response.headers


@shared_loop
@pytest.mark.parametrize("path", ["/", *(f"/playground/{name}" for name in ASSETS)])
async def test_the_page_and_its_assets_carry_the_security_headers(client, path: str):
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    name = PAGE if path == "/" else path.rsplit("/", 1)[1]
    assert response.headers["content-type"] == MEDIA_TYPES[name]
    assert response.content == asset(name)[0]


def test_the_csp_allows_only_this_origin_and_no_inline_code():
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'" and directives["form-action"] == "'none'"
    assert "unsafe" not in CSP


@pytest.mark.parametrize(
    "path",
    [
        "/playground/index.html",  # the page is at / only
        "/playground/__init__.py",
        "/playground/missing.js",
        "/playground/..%2F__init__.py",
        "/playground/%2e%2e%2fsettings.py",
    ],
)
@shared_loop
async def test_other_names_are_not_found(client, path: str):
    response = await client.get(path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_asset_reads_only_its_allow_list():
    for name in ("__init__.py", "../settings.py", "", "playground"):
        with pytest.raises(UnknownAsset):
            asset(name)


def test_the_page_has_no_inline_script_or_style():
    html = asset(PAGE)[0].decode()
    page = parsed(html)
    scripts = [attrs for tag, attrs, _ in page.elements if tag == "script"]
    assert scripts and all(attrs.get("src", "").startswith("/playground/") for attrs in scripts)
    assert "".join(page.script_text).strip() == ""
    assert not [tag for tag, _, _ in page.elements if tag == "style"]
    for tag, attrs, _ in page.elements:
        assert "style" not in attrs, tag
        assert not [name for name in attrs if name.startswith("on")], (tag, attrs)
        for name in ("href", "src", "action"):
            assert not (attrs.get(name) or "").lower().startswith("javascript:"), (tag, attrs)


def test_the_page_loads_only_files_the_server_serves():
    page = parsed(asset(PAGE)[0].decode())
    referenced = [attrs.get("src") for tag, attrs, _ in page.elements if tag == "script"]
    referenced += [attrs.get("href") for tag, attrs, _ in page.elements if tag == "link" and attrs.get("rel") != "icon"]
    assert sorted(r.rsplit("/", 1)[1] for r in referenced if r) == ASSETS
    for name in ASSETS:  # no CDN, no other origin
        assert not re.search(r"https?://", asset(name)[0].decode()), name


def test_every_control_has_a_label_and_ids_are_unique():
    page = parsed(asset(PAGE)[0].decode())
    ids = [attrs["id"] for _, attrs, _ in page.elements if attrs.get("id")]
    assert len(ids) == len(set(ids))
    labelled = {attrs.get("for") for tag, attrs, _ in page.elements if tag == "label"}
    controls = [(tag, attrs, inside) for tag, attrs, inside in page.elements if tag in CONTROLS]
    assert len(controls) > 10
    for tag, attrs, inside in controls:
        assert attrs.get("id") in labelled or inside, (tag, attrs)
    assert labelled - {None} <= set(ids), "a label names a control that is not there"


def test_the_page_has_live_regions_for_results_and_errors():
    page = parsed(asset(PAGE)[0].decode())
    for error in ("classify-error", "embed-error", "create-error", "examples-error", "auth-error"):
        assert by_id(page, error)[1].get("role") == "alert", error
    assert by_id(page, "classify-status")[1].get("role") == "status"
    html = asset(PAGE)[0].decode()
    assert '<html lang="en">' in html and 'name="viewport"' in html


@pytest.mark.parametrize("select", ["templates", "new-templates", "embed-templates"])
def test_template_choices_are_the_presets(select: str):
    page = parsed(asset(PAGE)[0].decode())
    start = page.elements.index(by_id(page, select))
    options = []
    for tag, attrs, _ in page.elements[start + 1 :]:
        if tag != "option":
            break
        options.append(attrs.get("value"))
    assert set(options) - {"", "custom"} == set(PRESETS)


def test_the_script_keeps_the_key_in_memory_and_writes_no_markup():
    script = asset("playground.js")[0].decode()
    for forbidden in (
        "localStorage",
        "sessionStorage",
        "document.cookie",
        ".innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
    ):
        assert forbidden not in script, forbidden
    assert "Authorization" in script and "Bearer" in script


@shared_loop
async def test_the_script_calls_only_routes_the_api_has(client):
    script = asset("playground.js")[0].decode()
    paths = set(re.findall(r"""["`](/(?:classify|embed|v1/[a-z]+(?:/[a-z]+)*))["`/]""", script))
    assert {"/classify", "/embed", "/v1/models", "/v1/classifiers"} <= paths
    schema = (await client.get("/openapi.json")).json()["paths"]
    for path in paths:
        assert path in schema or f"{path}/{{name}}" in schema, path


def _luminance(colour: str) -> float:
    channels = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    light, dark = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


@pytest.mark.parametrize(
    ("text", "background"),
    [
        ("--text", "--surface"),
        ("--text", "--background"),
        ("--muted", "--surface"),
        ("--muted", "--background"),
        ("--muted", "--track"),
        ("--accent", "--surface"),
        ("--accent", "--background"),
        ("--accent", "--accent-soft"),
        ("--error", "--error-background"),
        ("--ok", "--surface"),
    ],
)
def test_text_colours_have_a_contrast_of_at_least_4_5(text: str, background: str):
    css = asset("playground.css")[0].decode()
    colours = dict(re.findall(r"(--[a-z-]+):\s*(#[0-9a-f]{6});", css))
    assert contrast(colours[text], colours[background]) >= 4.5, (text, background)
    assert contrast("#ffffff", colours["--accent"]) >= 4.5  # the primary button's label
