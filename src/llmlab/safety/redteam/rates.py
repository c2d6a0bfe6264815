"""Rates with 95% Wilson intervals, and differences of rates with Newcombe's interval: every safety number
the red-team reports carries one."""

from __future__ import annotations

import math

from llmlab.safety.stats import wilson_interval


def rate(successes: int, n: int) -> dict:
    """{n, successes, rate, ci95}; rate and ci95 are None when there were no trials."""
    if not n:
        return {"n": 0, "successes": 0, "rate": None, "ci95": None}
    p = successes / n
    lo, hi = wilson_interval(successes, n)
    # at 0 or n successes the bound equals the rate up to rounding (2.8e-17 for 0/12): keep the rate inside
    return {"n": n, "successes": successes, "rate": p, "ci95": [min(lo, p), max(hi, p)]}


def rate_difference(a: dict, b: dict) -> dict:
    """a - b with Newcombe's (1998) hybrid score interval built from the two Wilson intervals."""
    if not a["n"] or not b["n"]:
        return {"difference": None, "ci95": None}
    (la, ua), (lb, ub) = a["ci95"], b["ci95"]
    pa, pb = a["rate"], b["rate"]
    d = pa - pb
    return {"difference": d, "ci95": [d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2),
                                      d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)]}


def fmt(r: dict) -> str:
    """"0.25 [0.05, 0.70] (1/4)" for a table."""
    if not r["n"]:
        return "n/a (0 trials)"
    lo, hi = r["ci95"]
    return f"{r['rate']:.2f} [{lo:.2f}, {hi:.2f}] ({r['successes']}/{r['n']})"


def fmt_difference(d: dict) -> str:
    if d["difference"] is None:
        return "n/a"
    lo, hi = d["ci95"]
    return f"{d['difference']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
