import pytest
import torch

from lightfunc.testing import assert_trees_close


def test_equal_trees_pass():
    assert_trees_close(
        {"a": torch.ones(2), "b": [torch.zeros(())]}, {"a": torch.ones(2), "b": [torch.zeros(())]}
    )


def test_a_differing_leaf_is_reported_by_path_with_its_error():
    with pytest.raises(
        AssertionError,
        match=r"1 of 2 leaves differ.*\n  b\[0\]: 1/3 elements differ; max abs diff 0\.5",
    ):
        assert_trees_close(
            {"a": torch.ones(2), "b": [torch.tensor([1.0, 2.0, 3.5])]},
            {"a": torch.ones(2), "b": [torch.tensor([1.0, 2.0, 3.0])]},
        )


def test_tolerances_are_honoured():
    assert_trees_close(torch.tensor([1.0 + 1e-7]), torch.tensor([1.0]), atol=1e-6)
    with pytest.raises(AssertionError):
        assert_trees_close(torch.tensor([1.0 + 1e-5]), torch.tensor([1.0]), atol=1e-6)


def test_structure_and_dtype_mismatches_are_reported():
    with pytest.raises(
        AssertionError, match=r"(?s)tree structures differ.*missing in actual: \['b'\]"
    ):
        assert_trees_close({"a": torch.ones(1)}, {"a": torch.ones(1), "b": torch.ones(1)})
    with pytest.raises(AssertionError, match=r"a: actual .*float64.*expected .*float32"):
        assert_trees_close({"a": torch.ones(1, dtype=torch.float64)}, {"a": torch.ones(1)})
