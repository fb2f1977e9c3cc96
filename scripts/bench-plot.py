#!/usr/bin/env python3
"""Plots a `bracelet-sim bench --steps ...` report: throughput and latency against offered load.

Usage: scripts/bench-plot.py REPORT.json OUT.png [--title TEXT] [--label TEXT]
                             [--compare OTHER.json --compare-label TEXT]

Top: committed heartbeats/s per step against the offered rate, with the limits measured in
the same run (broker pass-through, psql \\copy, naive INSERT-per-message bridge).
Bottom: ingest lag (publish -> committed) and SOS -> SMS latency, p50 and p99, log scale,
with the 500 ms SOS bound.
matplotlib is installed with pip when missing (scripts/bench-ramp.sh does this for you).
"""
import json
import sys

from pip_ensure import ensure


def layout(m):
    """How the run used the machine's cores (machine.cpus, recorded since the twelfth round)."""
    cpus = m.get("cpus") or {}
    pg, bench = cpus.get("postgres"), cpus.get("bench")
    broker = [b for b in cpus.get("broker") or [] if b != pg]
    if pg and pg == bench and broker:
        return (f"{m.get('nproc')} cores: broker on CPU {broker[0]}, "
                f"the rest on CPU {pg}")
    return f"{m.get('nproc')} cores shared by broker, PostgreSQL, bench and service"


def main():
    argv = sys.argv[1:]
    opts = {}
    for key in ("--title", "--label", "--compare", "--compare-label"):
        if key in argv:
            i = argv.index(key)
            opts[key] = argv[i + 1]
            del argv[i:i + 2]
    if len(argv) != 2:
        sys.exit(__doc__)
    title = opts.get("--title")
    src, out = argv
    with open(src) as f:
        r = json.load(f)
    # Refinement steps come after the ramp, at rates between its steps: plot by rate.
    steps = sorted(r.get("steps") or [], key=lambda s: s["offered_per_s"])
    if not steps:
        sys.exit(f"{src}: no steps to plot")
    other = None
    if "--compare" in opts:
        with open(opts["--compare"]) as f:
            other = sorted(json.load(f).get("steps") or [], key=lambda s: s["offered_per_s"])
    label = opts.get("--label", "silverguard")
    other_label = opts.get("--compare-label", "compared run")
    ensure("matplotlib", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s["offered_per_s"] / 1000 for s in steps]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 9), sharex=True)

    committed = [s["committed_per_s"] / 1000 for s in steps]
    top.plot(x, x, ls=":", color="grey", label="offered (ideal)")
    top.plot(x, committed, "o-", color="tab:blue", lw=2, label=f"{label}: committed")
    if other:
        ox = [s["offered_per_s"] / 1000 for s in other]
        top.plot(ox, [s["committed_per_s"] / 1000 for s in other], "o:", color="tab:gray",
                 lw=1.5, label=f"{other_label}: committed")
    for s, cx, cy in zip(steps, x, committed):
        if not s.get("sustained"):
            top.plot([cx], [cy], "x", color="tab:red", ms=10)
    b = r.get("baselines") or {}
    lines = [
        ("broker", "limit_per_s", "tab:green", "broker pass-through (bare subscriber)"),
        ("copy", "rows_per_s", "tab:purple", "PostgreSQL psql \\copy"),
        ("naive", "committed_per_s", "tab:orange", "naive bridge (INSERT per message)"),
    ]
    for key, field, color, what in lines:
        # Reports written before the broker's fixed-rate probes have only the flood's figure.
        v = (b.get(key) or {}).get(field) or (b.get(key) or {}).get("received_per_s" if key == "broker" else field)
        if key == "broker":
            # The limit the broker ratio is against (report.rs, broker_limit: since the
            # eleventh round the higher of the limits measured before and after the ramp).
            # Reports before ratios.broker_limit_per_s give it as best sustained / ratio.
            q = r.get("ratios") or {}
            limit = q.get("broker_limit_per_s") or (
                q["silverguard_per_s"] / q["vs_broker"]
                if q.get("silverguard_per_s") and q.get("vs_broker") else None)
            if limit:
                v = limit
                if b.get("broker_after"):
                    what += ", the ratio's limit of before/after"
        if v:
            top.axhline(v / 1000, color=color, ls="--", label=f"{what}: {v / 1000:.1f}k/s")
    top.set_ylabel("heartbeats/s (thousands)")
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="upper left")
    cpu = [s.get("service_cpu_percent") for s in steps]
    if any(c is not None for c in cpu):
        ax2 = top.twinx()
        ax2.plot(x, [c if c is not None else float("nan") for c in cpu], "s--",
                 color="tab:brown", alpha=0.6, label="silverguard CPU (% of one core)")
        ax2.set_ylabel("silverguard CPU, % of one core", color="tab:brown")
        ax2.set_ylim(0, 200)  # two cores
        ax2.legend(fontsize=8, loc="lower right")

    def series(path, steps=steps):
        out = []
        for s in steps:
            v = s
            for k in path:
                v = (v or {}).get(k)
            out.append(v if v is not None else float("nan"))
        return out

    bottom.plot(x, series(["lag", "latency", "p50_ms"]), "o-", color="tab:blue",
                label=f"{label}: ingest lag p50 (publish -> committed)")
    bottom.plot(x, series(["lag", "latency", "p99_ms"]), "o--", color="tab:blue",
                label=f"{label}: ingest lag p99")
    bottom.plot(x, series(["sos", "latency", "p50_ms"]), "^-", color="tab:red",
                label=f"{label}: SOS -> SMS p50")
    bottom.plot(x, series(["sos", "latency", "p99_ms"]), "^--", color="tab:red",
                label=f"{label}: SOS -> SMS p99")
    if other:
        ox = [s["offered_per_s"] / 1000 for s in other]
        bottom.plot(ox, series(["lag", "latency", "p99_ms"], other), "o:", color="tab:gray",
                    label=f"{other_label}: ingest lag p99")
        bottom.plot(ox, series(["sos", "latency", "p99_ms"], other), "^:", color="tab:pink",
                    label=f"{other_label}: SOS -> SMS p99")
    bottom.axhline(500, color="tab:red", ls=":", label="SOS bound 500 ms")
    bottom.set_yscale("log")
    bottom.set_ylabel("latency, ms (log)")
    bottom.set_xlabel("offered heartbeats/s (thousands)")
    bottom.grid(alpha=0.3, which="both")
    bottom.legend(fontsize=8, loc="upper left")

    s = r.get("settings", {})
    m = r.get("machine", {})
    fig.suptitle(title or (
        f"silverguard ingest: {s.get('devices')} bracelets over {s.get('connections')} "
        f"MQTT connections, {layout(m)}"
    ), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
