"""units.parse_size: GB is 1e9 and GiB 2^30 for every option that takes a size."""

import pytest

from qlora_lite.errors import QloraError
from qlora_lite.utils.units import gib, parse_size


def test_decimal_and_binary_units():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("10kb") == 10_000
    assert parse_size("1GiB") == 2**30 and parse_size("24GiB") == 24 * 2**30 and parse_size("1.5 MiB") == 3 * 2**19
    # A card sold as "24 GB" has 24 GiB; "24GB" is read as 24e9 bytes, 22.35 GiB.
    assert parse_size("24GB") / 2**30 == pytest.approx(22.35, abs=0.01)


def test_bare_numbers_are_bytes():
    assert parse_size(123) == 123 and parse_size("123") == 123 and parse_size("123B") == 123


@pytest.mark.parametrize("bad", ["2 gigs", "lots", "-1GB", "0GB", "24G", 0])
def test_bad_sizes_name_the_option_and_the_units(bad):
    with pytest.raises(QloraError, match="--max-shard-size.*(GiB|bytes)"):
        parse_size(bad, "--max-shard-size")


def test_gib_formats_binary_units():
    assert gib(24 * 2**30) == "24.00 GiB" and gib(3 * 2**20) == "3.0 MiB"


def test_durations_read_hours_minutes_seconds_and_plain_seconds():
    from qlora_lite.utils.units import parse_duration

    assert parse_duration("3h50m") == 3 * 3600 + 50 * 60 and parse_duration("90m") == 5400
    assert parse_duration("45s") == 45 and parse_duration("1d2h") == 93600 and parse_duration("1.5h") == 5400
    assert parse_duration(120) == 120 and parse_duration("120") == 120 and parse_duration(" 2h 5m ") == 7500


@pytest.mark.parametrize("bad", ["3x", "h", "0", "-5", "3h3h", "", "1h-5m"])
def test_bad_durations_name_the_setting_and_the_units(bad):
    from qlora_lite.utils.units import parse_duration

    with pytest.raises(QloraError, match=r"train\.max_time .*(duration|more than 0)"):
        parse_duration(bad, "train.max_time")
