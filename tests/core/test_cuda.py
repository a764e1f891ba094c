from __future__ import annotations

import pytest
from packaging.version import Version

from gpufleet.core.cuda import (
    CUDA_DRIVERS,
    MINOR_VERSION_COMPAT,
    DriverVersion,
    cuda_arch_for_compute_cap,
    first_cuda_for_compute_cap,
    min_driver_for_cuda,
)


@pytest.mark.parametrize(
    ("cuda", "driver"),
    [
        ("13.1", "590.44.01"),
        ("13.0", "580.65.06"),
        ("13.0.1", "580.65.06"),
        ("12.9", "575.51.03"),
        ("12.8", "570.26"),
        ("12.6", "560.28.03"),
        ("12.4", "550.54.14"),
        ("12.0", "525.60.13"),
        ("11.8", "520.61.05"),
    ],
)
def test_min_driver_for_cuda(cuda: str, driver: str) -> None:
    minimum = min_driver_for_cuda(cuda)
    assert str(minimum) == driver
    assert minimum == Version(driver)


@pytest.mark.parametrize(
    ("cuda", "message"),
    [
        ("13.2", "CUDA 13.2 is newer than the driver table's newest toolkit, 13.1"),
        ("12.7", "CUDA 12.7 is not a toolkit in the driver table (11.8 to 13.1)"),
        ("11.4", "CUDA 11.4 is not a toolkit in the driver table (11.8 to 13.1)"),
    ],
)
def test_min_driver_for_cuda_outside_the_table(cuda: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        min_driver_for_cuda(cuda)
    assert str(error.value) == message


def test_driver_table_is_whole_and_ordered() -> None:
    assert len(CUDA_DRIVERS) == 26
    # newest first: no row may need an older driver than the row below it
    drivers = [driver for _, _, driver in CUDA_DRIVERS]
    assert drivers == sorted(drivers, reverse=True)
    releases = {cuda for cuda, _, _ in CUDA_DRIVERS}
    assert releases == {cuda for cuda, update, _ in CUDA_DRIVERS if update == 0}
    assert ("13.0", 2, Version("580.95.05")) in CUDA_DRIVERS


def test_driver_version_prints_as_written() -> None:
    version = DriverVersion("580.65.06")
    assert str(version) == "580.65.06"
    assert version == Version("580.65.6")
    assert Version("580.142") > version > Version("575.57.08")


@pytest.mark.parametrize(
    ("cc", "cuda"),
    [
        ("12.1", "12.9"),
        ("12.0", "12.8"),
        ("9.0", "11.8"),
        ("8.9", "11.8"),
        ("8.7", "11.4"),
        ("8.6", "11.1"),
        ("8.0", "11.0"),
        ("7.5", "10.0"),
        ("7.0", "9.0"),
    ],
)
def test_first_cuda_for_compute_cap(cc: str, cuda: str) -> None:
    assert first_cuda_for_compute_cap(cc) == Version(cuda)


def test_first_cuda_for_unknown_compute_cap() -> None:
    assert first_cuda_for_compute_cap("3.5") is None


@pytest.mark.parametrize(("cc", "arch"), [("12.1", "121"), ("12.0", "120"), ("8.7", "87")])
def test_cuda_arch_for_compute_cap(cc: str, arch: str) -> None:
    assert cuda_arch_for_compute_cap(cc) == arch


@pytest.mark.parametrize("cc", ["sm_121", "121", "12.10", ""])
def test_cuda_arch_for_bad_compute_cap(cc: str) -> None:
    with pytest.raises(ValueError, match="is not a compute capability"):
        cuda_arch_for_compute_cap(cc)


def test_minor_version_compat_ranges() -> None:
    assert MINOR_VERSION_COMPAT[12] == (Version("525"), Version("580"))
    assert MINOR_VERSION_COMPAT[13] == (Version("580"), None)
    # every toolkit's own minimum sits inside its major version's range
    for cuda, _, driver in CUDA_DRIVERS:
        low, high = MINOR_VERSION_COMPAT[Version(cuda).major]
        assert driver >= low and (high is None or driver < high)
