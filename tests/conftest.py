import pytest


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch):
    """Keep token files out of the user's cache; shared across a test session for speed."""
    path = tmp_path_factory.getbasetemp() / "token-cache"
    monkeypatch.setenv("ATTNLM_CACHE", str(path))
    return path
