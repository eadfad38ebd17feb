import pytest
import torch

from rankcut.core.errors import RankcutError
from rankcut.core.ranks import (
    RankPolicy,
    check_rank,
    energy_rank,
    factor_params,
    keep_rank,
    resolve_rank,
)


def test_keep_rank_never_exceeds_the_kept_fraction():
    for m, n in [(576, 1536), (64, 160), (7, 3)]:
        for keep in (0.1, 0.5, 0.8, 1.0):
            r = keep_rank(m, n, keep)
            assert r >= 1
            assert factor_params(m, n, r) <= max(keep * m * n, m + n)
            assert factor_params(m, n, r + 1) > keep * m * n


def test_energy_rank_is_the_smallest_rank_holding_the_energy():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squares: 16, 4, 1, 1 of 22
    assert energy_rank(s, 16 / 22) == 1
    assert energy_rank(s, 16 / 22 + 1e-6) == 2
    assert energy_rank(s, 1.0) == 4


@pytest.mark.parametrize("kwargs,message", [
    ({"keep": 0.0}, "outside"), ({"keep": 1.5}, "outside"), ({"energy": -0.1}, "outside"),
    ({"rank": 0}, "positive integer"), ({}, "exactly one"), ({"rank": 4, "keep": 0.5}, "exactly one"),
])
def test_policy_validation(kwargs, message):
    with pytest.raises(RankcutError, match=message):
        RankPolicy(**kwargs)


def test_rank_above_matrix_and_growth_are_refused():
    with pytest.raises(RankcutError, match="larger than"):
        check_rank("w", 64, 160, 65, allow_growth=True)
    with pytest.raises(RankcutError, match="allow-growth"):
        check_rank("w", 64, 160, 50, allow_growth=False)
    check_rank("w", 64, 160, 50, allow_growth=True)
    assert resolve_rank(RankPolicy(rank=(10, 20)), "w", 64, 160) == (10, 20)
