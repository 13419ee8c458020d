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


def pytest_collection_modifyitems(config, items):
    """The longest file (test_learning.py, ~10 min on the 2-core CI machine, half the suite) first: under `-n 2 --dist
    loadfile` its worker starts on it while the other takes the rest, instead of the learning run starting last and
    running alone. The rest keep their order."""
    items.sort(key=lambda item: item.path.name != "test_learning.py")
