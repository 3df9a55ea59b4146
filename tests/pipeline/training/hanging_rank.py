"""A faulty rank for launch tests (``launch_training(..., rank_module=...)``): every rank says it started and
records its pid in OUT; rank 1 then hangs, as a rank waiting on a collective that never comes would."""

import os
import sys
import time

rank = int(os.environ.get("RANK", "0"))
out = sys.argv[sys.argv.index("--out") + 1]
with open(os.path.join(out, f"hanging-rank{rank}.pid"), "w") as f:
    f.write(str(os.getpid()))
print(f"rank {rank}: started (pid {os.getpid()})", flush=True)
if rank == 1:
    print("rank 1: waiting for a collective that never comes", flush=True)
    time.sleep(3600)
