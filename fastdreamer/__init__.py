"""fastdreamer: the fastest faithful DreamerV3 trainer on one GPU."""

import os as _os

# Installed, setup.py maps fastdreamer.kernels onto the top-level kernels/ folder. Run from a source tree
# (PYTHONPATH=repo, as on the GPU machine), the same mapping comes from adding the repo root to our path.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
_source_tree = _os.path.isfile(_os.path.join(_root, "setup.py"))
if _source_tree and _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)

__version__ = "0.1.0"
