"""The RDP to (epsilon, delta) conversion written out in privacy/accountant.py (so that converting a curve imports
no torch) equals Opacus's, its reference, bit for bit."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.accountant import ORDERS, epsilon_from_rdp, skellam_rdp


def opacus_epsilon(rdp: np.ndarray, delta: float) -> float:
    from opacus.accountants.analysis.rdp import get_privacy_spent

    with warnings.catch_warnings():  # "optimal order is the largest alpha": a remark, not part of the answer
        warnings.simplefilter("ignore")
        epsilon, _ = get_privacy_spent(orders=ORDERS.tolist(), rdp=rdp, delta=delta)
    return float(epsilon)


@settings(max_examples=300, deadline=None)
@given(
    log_variance=st.floats(-1, 9),
    l1=st.floats(0.1, 200),
    l2=st.floats(0.1, 60),
    log_delta=st.floats(-14, -2.1),
    releases=st.integers(1, 1000),
)
def test_the_conversion_equals_opacus(log_variance: float, l1: float, l2: float, log_delta: float,
                                      releases: int) -> None:
    rdp = releases * skellam_rdp(variance=10.0**log_variance, l1=l1, l2=l2)
    delta = 10.0**log_delta
    assert epsilon_from_rdp(rdp, delta=delta) == opacus_epsilon(rdp, delta)


@pytest.mark.parametrize("special", ["inf-at-some-orders", "all-inf", "nan-at-some-orders"])
def test_infinite_and_undefined_orders_are_handled_as_opacus_does(special: str) -> None:
    rdp = skellam_rdp(variance=100.0, l1=2.0, l2=1.5)
    if special == "inf-at-some-orders":
        rdp[-5:] = math.inf
    elif special == "all-inf":
        rdp[:] = math.inf
    else:
        rdp[:3] = math.nan
    assert epsilon_from_rdp(rdp, delta=1e-6) == opacus_epsilon(rdp, 1e-6)


def test_converting_a_curve_imports_no_torch() -> None:
    script = (
        "import sys\nfrom privacy.accountant import epsilon_for\n"
        "epsilon_for(variance=100.0, l1=2.0, l2=1.5, delta=1e-6)\nprint('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
