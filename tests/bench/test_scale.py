"""The many-institutions benchmark at a tiny size: the key holder's time includes checking the aggregate (the same
two passes the aggregator made, as pipelines/aggregate_envelope.py does before any charge), and a tampered
aggregate is caught by that check rather than timed as if it were honest."""

from __future__ import annotations

import numpy as np
import pytest

import bench.scale as scale


def test_the_key_holder_recomputes_the_aggregate_before_it_decrypts() -> None:
    run = scale.run_size(6, absent_rate=0.2, complete_upto=0, rng=np.random.default_rng(7))
    assert run["exact"] and run["absent"] == 1
    assert run["key_holder_recompute_s"] > 0 and run["key_holder_decrypt_s"] > 0
    assert run["key_holder_s"] == pytest.approx(run["key_holder_recompute_s"] + run["key_holder_decrypt_s"])


def test_an_aggregate_that_differs_from_the_recomputation_stops_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"second": 0}
    honest = scale._second_pass

    def shifted_once(*args: object, **kwargs: object) -> list[bytes]:
        aggregate = honest(*args, **kwargs)  # type: ignore[arg-type]
        calls["second"] += 1
        if calls["second"] == 1:  # the aggregator's pass: an offset in slot 0
            public = args[-1]
            offset = np.zeros(scale.SLOTS, dtype=np.int64)
            offset[0] = 5
            shifted: list[bytes] = scale.he.add_plain(public, aggregate, offset)
            return shifted
        return aggregate

    monkeypatch.setattr(scale, "_second_pass", shifted_once)
    with pytest.raises(RuntimeError, match="recomputed aggregate differs"):
        scale.run_size(5, absent_rate=0.2, complete_upto=0, rng=np.random.default_rng(7))
