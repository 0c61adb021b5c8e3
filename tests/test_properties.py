"""The conformance properties of docs/spec/variants.md §12, run for every registered variant.

A variant installed as a plugin is tested here the moment it is registered.
"""

import pytest
import torch
from hypothesis import given

import lorazoo
from lorazoo.testing import CHECK_DTYPES, CHECKS, cases

VARIANTS = lorazoo.variants()


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_conformance(variant: str, check: str) -> None:
    fn = CHECKS[check]

    @given(case=cases(dtypes=CHECK_DTYPES.get(check, (torch.float32, torch.bfloat16))))
    def prop(case):
        fn(variant, case)

    prop()
