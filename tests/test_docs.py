"""The docs pages work with no internet: every asset they load comes from Hearth."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.sync_api import Browser

from tests.conftest import ARTIFACTS, Stack

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("page", "asset"), [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc")]
)
def test_docs_pages_load_only_local_assets(client: httpx.Client, page: str, asset: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    html = response.text
    sources = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)["\']', html)
    sources += re.findall(r"url:\s*['\"]([^'\"]+)['\"]", html)
    assert any(asset in source for source in sources)
    for source in sources:
        assert not source.startswith(("http://", "https://", "//")), f"{page} loads {source}"
        assert client.get(source).status_code == 200, source


def test_the_openapi_document_lists_every_route(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/embeddings",
        "/v1/images/generations",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/events",
        "/v1/files/{file_id}",
        "/v1/models",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path


def test_the_openapi_document_lists_the_errors_hearth_answers(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            where = f"{method.upper()} {path}"
            assert "422" not in codes, where  # bad input is a 400 with Hearth's envelope
            if path.startswith("/v1/"):
                assert {"401", "429", "503"} <= codes, where
            if "requestBody" in operation:
                assert {"400", "409", "413"} <= codes, where
            for code in codes - {"200", "202"}:
                content = operation["responses"][code].get("content", {})
                if path.startswith("/v1/"):
                    schema = content["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (where, code)
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_the_openapi_document_shows_the_api_key_on_the_v1_routes(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    scheme = document["components"]["securitySchemes"]["HTTPBearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            if path.startswith("/v1/"):
                assert operation.get("security") == [{"HTTPBearer": []}], where
            else:  # probes, metrics, the playground page: no key
                assert "security" not in operation, where


@pytest.mark.parametrize(
    ("page", "marker"), [("/docs", ".opblock"), ("/redoc", "[data-section-id]")]
)
def test_docs_render_in_a_browser_with_nothing_from_outside(
    stack: Stack, browser: Browser, page: str, marker: str
) -> None:
    tab = browser.new_page()
    requested: list[str] = []  # requests that went out; ones the page's CSP stopped did not
    tab.on("requestfinished", lambda request: requested.append(request.url))
    tab.on(
        "requestfailed",
        lambda request: None if request.failure == "csp" else requested.append(request.url),
    )
    try:
        tab.goto(f"{stack.url}{page}")
        tab.wait_for_selector(marker, timeout=20_000)
        text = tab.inner_text("body")
        for path in ("/v1/embeddings", "/v1/images/generations", "/v1/jobs"):
            assert path in text, f"{page} does not show {path}"
        ARTIFACTS.mkdir(exist_ok=True)
        tab.screenshot(path=str(ARTIFACTS / f"{page.strip('/')}.png"))
    finally:
        tab.close()
    outside = [url for url in requested if not url.startswith((stack.url, "data:", "blob:"))]
    assert not outside, f"{page} asked other servers for {outside}"
