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


# The longest file first (test_learning.py: one test, ~10 min on the 2-core CI machine, nearly half the suite), then
# a light one: under `-n 2 --dist loadfile` xdist gives each worker two files to start with and more only as its
# queue runs low, and a worker runs its queue in order. So the learning run's worker holds just test_plot.py behind
# it while the other worker takes the rest, and joins in once the learning run ends. (Learning last ran alone at the
# end; learning first with a heavy second file held that file's ~3 min back until the learning run ended, 17-18 min
# in all.) The rest keep their order.
_FIRST = {"test_learning.py": 0, "test_plot.py": 1}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: _FIRST.get(item.path.name, len(_FIRST)))
