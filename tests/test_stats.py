"""The statistics behind every accuracy claim: t quantiles, mean/std, paired differences with a 95% CI."""

import math

import pytest

from tpcvit.stats import mean_std, paired_difference, t_cdf, t_quantile


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)
    assert t_cdf(expected, df) == pytest.approx(0.975, abs=1e-5)
    assert t_cdf(-expected, df) == pytest.approx(0.025, abs=1e-5)


def test_mean_std_uses_the_sample_deviation():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_paired_difference_gives_the_known_interval():
    # differences 1, 2, 3: mean 2, sd 1, n 3 -> 2 +- 4.3027 / sqrt(3)
    d = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    half = 4.3027 / math.sqrt(3)
    assert (d.mean, d.low, d.high) == pytest.approx((2.0, 2.0 - half, 2.0 + half), abs=1e-3)
    assert d.verdict == "within noise"  # the interval [-0.48, 4.48] includes 0
    assert paired_difference([11.0, 11.1, 10.9], [10.0]).verdict == "better"  # one deterministic value, paired
    assert paired_difference([9.0, 9.1, 8.9], [10.0, 10.0, 10.0]).verdict == "worse"
    # two seeds that differ by the same amount: a zero-width interval, which must not read as "better"
    assert paired_difference([11.0, 12.0], [10.0, 11.0]).verdict == "2 seeds: no claim (needs 3)"
    with pytest.raises(ValueError, match="equal"):
        paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])


def test_evidence_never_compares_a_run_that_cannot_spend_its_budget():
    from tpcvit.evidence import _fmt_diff, summarize

    def run(method, seed, top1, ratio, knob, budget=0.6):
        return {"method": method, "budget": budget, "seed": seed, "top1": top1, "gmacs": ratio, "gmacs_ratio": ratio,
                "knob": knob}

    runs = [run("tpc", s, 90.0 + s, 0.60, 0.5) for s in range(3)] + [run("evit", s, 88.0, 0.58, 0.7) for s in range(3)]
    # seed 1 keeps every token its schedule allows (knob at the top) and still spends only 56%
    runs += [run("tpc-pool2", s, 89.0, *((0.56, 0.998) if s == 1 else (0.60, 0.9))) for s in range(3)]
    summary = summarize({"runs": runs, "budgets": [0.6]})
    assert summary["tpc_vs_peers"]["evit"]["0.6"]["mean"] == 3.0  # 2 pt off but its knob could move: compared
    assert summary["claims"]["tpc-pool2"]["0.6"]["missed_budget"] == ["tpc-pool2"]
    assert _fmt_diff(summary["claims"]["tpc-pool2"]["0.6"]) == "not compared: tpc-pool2 cannot spend the budget"
    runs[-2] = run("tpc-pool2", 1, 89.0, 0.595, 0.998)  # at the top of its knob but within 1% of dense: compared
    assert summarize({"runs": runs, "budgets": [0.6]})["claims"]["tpc-pool2"]["0.6"]["n"] == 3


def test_median_interval_uses_the_binomial_order_statistics():
    from tpcvit.stats import median_interval

    values = [float(v) for v in range(1, 10)]  # n = 9: P(Bin <= 1) = 10/512 <= 0.025 < P(Bin <= 2): (x_2, x_8)
    assert median_interval(values) == (5.0, 2.0, 8.0)
    assert median_interval(list(range(1, 7))) == (3.5, 1, 6)  # n = 6: 1/64 <= 0.025, the extremes
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) == (3.0, None, None)  # n = 5: 1/32 > 0.025, no interval
    assert median_interval([3.0, 1.0, 2.0, 100.0] * 10)[1:] == (2.0, 3.0)  # an outlier round does not widen it
