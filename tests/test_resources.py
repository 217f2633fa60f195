"""sshq.model.resources: walltimes and memory sizes as users write them."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sshq.exceptions import InvalidInputError
from sshq.model.resources import format_hms, format_memory_mib, parse_memory, parse_walltime

KiB, MiB, GiB, TiB, PiB = 1024, 1024**2, 1024**3, 1024**4, 1024**5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # MM (a lone number is minutes, as in sbatch --time)
        ("30", timedelta(minutes=30)),
        ("1", timedelta(minutes=1)),
        ("90", timedelta(minutes=90)),
        (" 10 ", timedelta(minutes=10)),
        # MM:SS
        ("05:30", timedelta(minutes=5, seconds=30)),
        ("0:01", timedelta(seconds=1)),
        ("120:00", timedelta(hours=2)),
        # HH:MM:SS
        ("1:02:03", timedelta(hours=1, minutes=2, seconds=3)),
        ("00:00:01", timedelta(seconds=1)),
        ("48:00:00", timedelta(days=2)),
        # D-HH
        ("1-02", timedelta(days=1, hours=2)),
        ("3-0", timedelta(days=3)),
        # D-HH:MM
        ("2-03:04", timedelta(days=2, hours=3, minutes=4)),
        # D-HH:MM:SS
        ("1-02:03:04", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ("0-00:00:05", timedelta(seconds=5)),
        # seconds as numbers
        (3600, timedelta(hours=1)),
        (1, timedelta(seconds=1)),
        (1.5, timedelta(seconds=1.5)),
        # timedelta passes through
        (timedelta(minutes=5), timedelta(minutes=5)),
        (timedelta(microseconds=1), timedelta(microseconds=1)),
    ],
)
def test_walltime_forms(text: object, expected: timedelta) -> None:
    got = parse_walltime(text)  # type: ignore[arg-type]
    assert isinstance(got, timedelta)
    assert got == expected


@pytest.mark.parametrize(
    "text",
    ["", " ", "abc", "1h", "10m", "1.5", "1:2:3:4", "-5", "5-", "-1-00", "1-2-3", "1::2",
     ":30", "1:", "0", "00:00", "00:00:00", "0-00:00:00", 0, -1, -0.5,
     timedelta(0), timedelta(seconds=-1)],
)
def test_walltime_refused(text: object) -> None:
    with pytest.raises(InvalidInputError, match="walltime"):
        parse_walltime(text)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["9999999999999", "99999999999-00:00:00", 10**12])
def test_walltime_too_large_is_invalid_input(text: object) -> None:
    with pytest.raises(InvalidInputError):
        parse_walltime(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("td", "expected"),
    [
        (timedelta(hours=1, minutes=2, seconds=3), "01:02:03"),
        (timedelta(seconds=59), "00:00:59"),
        (timedelta(seconds=0.2), "00:00:01"),  # rounded up
        (timedelta(seconds=60.001), "00:01:01"),
        (timedelta(days=2, seconds=5), "48:00:05"),  # hours beyond 24
        (timedelta(days=10), "240:00:00"),
    ],
)
def test_format_hms(td: timedelta, expected: str) -> None:
    assert format_hms(td) == expected


@pytest.mark.parametrize("text", ["1:02:03", "1-02:03:04", "59", "0:30", "7-00"])
def test_format_hms_round_trips_through_parse(text: str) -> None:
    td = parse_walltime(text)
    assert parse_walltime(format_hms(td)) == td


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 * MiB),
        ("2G", 2 * GiB),
        ("2g", 2 * GiB),
        ("1.5GiB", int(1.5 * GiB)),
        ("1.5gib", int(1.5 * GiB)),
        ("1.5G", int(1.5 * GiB)),
        ("2GB", 2 * GiB),
        ("1024", 1024),
        ("1", 1),
        ("100B", 100),
        ("4K", 4 * KiB),
        ("4KiB", 4 * KiB),
        ("1T", TiB),
        ("1P", PiB),
        (" 2 G ", 2 * GiB),
        ("0.5K", 512),
        (4096, 4096),
        (1, 1),
    ],
)
def test_memory_forms(text: object, expected: int) -> None:
    got = parse_memory(text)  # type: ignore[arg-type]
    assert isinstance(got, int)
    assert got == expected


@pytest.mark.parametrize(
    "text",
    ["", "abc", "G", "2X", "2 G B", "-1G", "1.2.3G", "1e9", "0", "0M", "0.0000001K", "two G",
     "2GG", 0, -5],
)
def test_memory_refused(text: object) -> None:
    with pytest.raises(InvalidInputError, match="memory"):
        parse_memory(text)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["9" * 400, "9" * 400 + "G"])
def test_memory_too_large_is_invalid_input(text: str) -> None:
    with pytest.raises(InvalidInputError):
        parse_memory(text)


@pytest.mark.parametrize(
    ("nbytes", "expected"),
    [(1, 1), (MiB, 1), (MiB + 1, 2), (512 * MiB, 512), (3 * GiB, 3072), (int(1.5 * GiB), 1536)],
)
def test_format_memory_mib_rounds_up(nbytes: int, expected: int) -> None:
    assert format_memory_mib(nbytes) == expected
