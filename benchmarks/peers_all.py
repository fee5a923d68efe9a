"""The peers benchmark in one command: SODA against every peer on the bundled DiT at DDIM-50 and
DDPM-250, on the PixArt-style text model at DDIM-50 and on the SD3-style one at Euler-28, each with
its seed check (a fidelity-only run on other seeds and the ranking's stability across the two seed
sets), then the execution-efficiency study at DiT-XL/2 size.  Every step is
one of the scripts beside this one, run as its docs section names it; each writes its results
under ``results/`` and its docs block, and resumes its own partial file when stopped, so running
this command again continues where it stopped (``--from`` skips the steps already done).

    python benchmarks/peers_all.py           # everything: hours on a 2-core CPU
    python benchmarks/peers_all.py --quick   # the DDIM sweep's --quick run (one point per method,
                                             # 8 images) and the matmul table: under 10 minutes
    python benchmarks/peers_all.py --list    # the steps and their commands, nothing run
    python benchmarks/peers_all.py --from 4  # from the DDPM-250 table on (--list numbers the steps)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED_CHECK = ["--seed", "10000", "--repeats", "0"]


def sweeps(**points: str) -> list[str]:
    """``--sweep method=v1,v2`` flags (two or three points per method around 2x and 3x, where the goal
    check compares)."""
    return [a for m, v in points.items() for a in ("--sweep", f"{m.replace('_', '-')}={v}")]


# the DDIM-50 and Euler-28 tables: 32 images in fp32, timed on batches of 4 (9 pairs each), each
# method at the knob values that land it between 1.5x and 3x on that model (PAB and FasterCache stay
# under 1.5x there: one point each; the forecasting caches, SODA's nearest rivals, at three)
TABLE = ["--n", "32", "--timed-batch", "4", "--dtype", "fp32", "--repeats", "9"]
DIT = [*TABLE, *sweeps(fora="2,3", fora_forecast="2,3,4", toca="3,6", delta_dit="3,6", soda="2,2.5,3",
                      soda_latency="2,2.5,3", fbc="0.04,0.08", pab="2", fastercache="2", taylorseer="2,3,4",
                      magcache="0.02,0.04", dbcache="0.04,0.08", dbcache_taylorseer="0.04,0.08")]
PIXART = ["--model", "fmnist-pixart", *TABLE,
          *sweeps(fora="2,3", fora_forecast="2,3", toca="3,6", delta_dit="3,6", soda="2,2.5,3", soda_latency="2,2.5,3",
                  fbc="0.04,0.08", pab="6", fastercache="2", taylorseer="2,3", magcache="0.02,0.04",
                  dbcache="0.04,0.08", dbcache_taylorseer="0.04,0.08")]
MMDIT = ["--model", "fmnist-mmdit", *TABLE,
         *sweeps(fora="2,3", fora_forecast="2,3", toca="3,6", delta_dit="3,6", soda="2,2.5,3",
                 soda_latency="2,2.5,3", fbc="0.08,0.16", pab="2", fastercache="2", taylorseer="2,3,4",
                 magcache="0.02,0.04", dbcache="0.08,0.16", dbcache_taylorseer="0.08,0.16")]
# DDPM-250: the same, with 5 pairs each (a pair lasts five times as long as at 50 steps, so its
# ratio is steadier) and the knob values that landed each method between 1.5x and 3x at 250 steps
# in the previous table (PAB and FasterCache under 1.5x: one point each); SODA's FLOP budget also
# at 4 (it measured under 3x there), its reuse-only ablation at 2 and 3
DDPM = ["--sampler", "ddpm", "--n", "32", "--timed-batch", "4", "--dtype", "fp32", "--repeats", "5",
        *sweeps(fora="2,3,4", fora_forecast="2,3,4", toca="4,6", delta_dit="6", soda="2,2.5,3,4",
                soda_latency="2,2.5,3", soda_reuse="2,3", fbc="0.04,0.08", pab="6", fastercache="6",
                taylorseer="2,3,4", magcache="0.01,0.02,0.04", dbcache="0.04,0.08", dbcache_taylorseer="0.04,0.08")]
STEPS = [
    ("DDIM-50 table", ["peers.py", *DIT]),
    ("DDIM-50 seed check", ["peers.py", *DIT, *SEED_CHECK]),
    ("DDIM-50 ranking stability", ["peers_stability.py"]),
    ("DDPM-250 table", ["peers.py", *DDPM]),
    ("DDPM-250 seed check", ["peers.py", *DDPM, *SEED_CHECK]),
    ("DDPM-250 ranking stability", ["peers_stability.py", "--sampler", "ddpm"]),
    ("PixArt-style DDIM-50 table", ["peers.py", *PIXART]),
    ("PixArt-style DDIM-50 seed check", ["peers.py", *PIXART, *SEED_CHECK]),
    ("PixArt-style DDIM-50 ranking stability", ["peers_stability.py", "--model", "fmnist-pixart"]),
    ("SD3-style Euler-28 table", ["peers.py", *MMDIT]),
    ("SD3-style Euler-28 seed check", ["peers.py", *MMDIT, *SEED_CHECK]),
    ("SD3-style Euler-28 ranking stability", ["peers_stability.py", "--model", "fmnist-mmdit"]),
    ("DiT-XL/2 latency study", ["xl_latency.py"]),
    ("DiT-XL/2 matmuls by row count", ["xl_rows.py"]),
]
QUICK = [("DDIM-50 quick sweep", ["peers.py", "--quick"]), STEPS[-1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run of the benchmark, under 10 minutes")
    ap.add_argument("--list", action="store_true", help="print the steps and their commands, run nothing")
    ap.add_argument("--from", dest="start", type=int, default=1, help="first step to run (1-based, see --list)")
    args = ap.parse_args()
    steps = QUICK if args.quick else STEPS
    if not 1 <= args.start <= len(steps):
        raise SystemExit(f"--from must be between 1 and {len(steps)} (see --list), got {args.start}")
    for i, (name, cmd) in enumerate(steps, 1):
        line = f"{i}. {name}: python benchmarks/{' '.join(cmd)}"
        if args.list:
            print(line)
            continue
        if i < args.start:
            continue
        print(line, flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, str(HERE / cmd[0]), *cmd[1:]], cwd=HERE.parent)
        if rc:
            raise SystemExit(f"step {i} ({name}) failed with exit code {rc}; fix it and run again with --from {i} "
                             "(the step resumes its partial results)")
        print(f"{i}. {name}: done in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
