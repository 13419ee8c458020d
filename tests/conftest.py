import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter. The variable must be set before triton is
# imported anywhere in the test process, hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's `-n 2`) each worker gets its share of torch's threads, and so do the CLI processes
# the tests start (OMP_NUM_THREADS): two workers of two OpenMP threads each on two cores spin in each other's
# barriers (bench/LOG.md measured eager updates 6x slower at 2 threads under load).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _threads = max(1, torch.get_num_threads() // _WORKERS)
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)


# The CLI tests start `python -m fastdreamer.train` and `python -m bench` from the repo root. They inherit this
# PYTHONPATH with the repo in front, so packages found through the caller's PYTHONPATH stay importable (on the GPU
# machine envpool and tyro come from a carried folder on it).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))


# The longest test first (test_learning.py: ~10 min on the 2-core CI machine, a third of the suite's work):
# `--dist worksteal` gives each of the two workers half the list, in order, and a worker that runs out takes half of
# what the other has queued. So one worker starts on the learning run while the other works through its half and then
# the first worker's queue. Measured on the CI machine: 17.3-18 min with `--dist loadfile`, which orders files by
# their number of tests and so ran the learning test last and alone; 12.1 min this way. The rest keep their order.
def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name != "test_learning.py")
