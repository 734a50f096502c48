"""llmlab: DVC pipelines for LLM safety experiments on one shared core library."""

import os

# OpenMP threads that spin while waiting for work collapse when a CPU is shared (parallel
# `dvc queue` workers, tests beside a run): a LoRA step of the embedded model measured 8-25 s
# with spinning threads and 3-5 s with passive ones on a loaded 2-core machine. It must be set
# before torch loads its OpenMP runtime, and every stage imports this package first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
