import httpx
import pytest

from service.app import create_app


@pytest.fixture
async def client():
    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def test_healthz_says_alive(client):
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_not_ready_without_engines_and_uses_the_error_shape(client):
    response = await client.get("/readyz")
    assert response.status_code == 503
    error = response.json()["error"]
    assert set(error) == {"code", "message", "param", "request_id"}
    assert error["code"] == "not_ready"
