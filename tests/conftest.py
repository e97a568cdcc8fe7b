import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without CUDA the Triton kernels run in Triton's interpreter. Triton reads this when it is
    # first imported, by whichever test (torch itself may import it), so it is set before all.
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch):
    """Keep token files out of the user's cache; shared across a test session for speed."""
    path = tmp_path_factory.getbasetemp() / "token-cache"
    monkeypatch.setenv("ATTNLM_CACHE", str(path))
    return path


@pytest.fixture
def one_thread():
    """Small models gain nothing from threads, and a busy machine makes them much slower:
    `pytestmark = pytest.mark.usefixtures("one_thread")` in a module runs its tests on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
