import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter. The variable must be set before triton is
# imported anywhere in the test process, hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
