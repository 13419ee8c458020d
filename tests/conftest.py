import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter. The variable must be set before triton is
# imported anywhere in the test process, hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The CLI tests start `python -m fastdreamer.train` and `python -m bench` from the repo root. They inherit this
# PYTHONPATH with the repo in front, so packages found through the caller's PYTHONPATH stay importable (on the GPU
# machine envpool and tyro come from a carried folder on it).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))
