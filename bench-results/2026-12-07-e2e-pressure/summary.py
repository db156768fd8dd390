"""Medians of pairs.sh's logs: python3 summary.py LOGS FROM TO [RATE]."""
import random
import re
import statistics as st
import sys

logs, lo, hi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rate = sys.argv[4] if len(sys.argv) > 4 else "1000"
rows = []
for side in ["base", "cur"]:
    for i in range(lo, hi + 1):
        t = open(f"{logs}/{rate}-{side}-{i}.log").read()
        m = re.search(r"commit-to-payment-confirmed-mail p50 ([\d.]+) ms, p99 ([\d.]+) ms", t)
        tx = re.search(r"([\d.]+) Postgres transactions per order", t)
        rows.append(dict(side=side, i=i, tx=float(tx.group(1)), p50=float(m.group(1)), p99=float(m.group(2))))


def of(side, key):
    return [r[key] for r in rows if r["side"] == side]


for side in ["base", "cur"]:
    print(f"{side}: {len(of(side, 'p99'))} runs, mail p99 median {st.median(of(side, 'p99')):.1f} ms, "
          f"p50 median {st.median(of(side, 'p50')):.1f} ms, "
          f"Postgres transactions per order median {st.median(of(side, 'tx')):.2f}")
    print("  p99s:", ", ".join(f"{v:.1f}" for v in sorted(of(side, "p99"))))
ratio = st.median(of("cur", "p99")) / st.median(of("base", "p99"))
print(f"p99 ratio of medians {ratio:.2f}, p50 {st.median(of('cur', 'p50')) / st.median(of('base', 'p50')):.2f}")
random.seed(1)
boot = sorted(
    st.median(random.choices(of("cur", "p99"), k=len(of("cur", "p99"))))
    / st.median(random.choices(of("base", "p99"), k=len(of("base", "p99"))))
    for _ in range(4000)
)
print(f"bootstrap 90% interval of the p99 ratio: {boot[200]:.2f} to {boot[3800]:.2f}")
print("by Postgres transactions per order (how large the batches ran):")
for tx in sorted({r["tx"] for r in rows}):
    cells = []
    for side in ["base", "cur"]:
        rr = [r for r in rows if r["side"] == side and r["tx"] == tx]
        cells.append(
            f"{side} {len(rr)} runs, p50 {st.median(r['p50'] for r in rr):.1f}, p99 {st.median(r['p99'] for r in rr):.1f}"
            if rr else f"{side} -"
        )
    print(f"  {tx}: " + "; ".join(cells))
