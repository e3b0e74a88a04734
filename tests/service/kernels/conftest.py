from __future__ import annotations

import pytest

from tests.service.kernels.host_kernels import HostRowKernel, build_host_library


@pytest.fixture(scope="session")
def host_kernel(tmp_path_factory: pytest.TempPathFactory) -> HostRowKernel:
    return HostRowKernel(build_host_library(tmp_path_factory.mktemp("host-kernels")))
