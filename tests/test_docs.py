"""The docs pages work with no internet: every asset they load comes from Hearth."""

from __future__ import annotations

import re

import httpx
import pytest

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
