"""Issue 5's benchmark in one command: SODA against every peer on the bundled DiT at DDIM-50 and
DDPM-250, each with its seed check (a fidelity-only run on other seeds and the ranking's stability
across the two seed sets), then the execution-efficiency study at DiT-XL/2 size.  Every step is
one of the scripts beside this one, run as its docs section names it; each writes its results
under ``results/`` and its docs block, and resumes its own partial file when stopped, so running
this command again continues where it stopped (``--from`` skips the steps already done).

    python benchmarks/peers_all.py           # everything: hours on a 2-core CPU
    python benchmarks/peers_all.py --quick   # the DDIM sweep's --quick run (one point per method,
                                             # 8 images) and the matmul table: under 10 minutes
    python benchmarks/peers_all.py --list    # the steps and their commands, nothing run
    python benchmarks/peers_all.py --from 4  # from the DDPM-250 table on
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DDPM = ["--sampler", "ddpm", "--n", "32", "--timed-batch", "4", "--dtype", "fp32"]
SEED_CHECK = ["--seed", "10000", "--repeats", "0"]
STEPS = [
    ("DDIM-50 table", ["peers.py"]),
    ("DDIM-50 seed check", ["peers.py", *SEED_CHECK]),
    ("DDIM-50 ranking stability", ["peers_stability.py"]),
    ("DDPM-250 table", ["peers.py", *DDPM]),
    ("DDPM-250 seed check", ["peers.py", *DDPM, *SEED_CHECK]),
    ("DDPM-250 ranking stability", ["peers_stability.py", "--sampler", "ddpm"]),
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
