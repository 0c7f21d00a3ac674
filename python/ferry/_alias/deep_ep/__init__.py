"""``deep_ep`` as Ferry provides it: ``ferry.deep_ep`` under DeepEP's import name, for code that
imports ``deep_ep`` and is not to be changed (vLLM, SGLang). Opt in by putting this package's
directory first on PYTHONPATH (``python -m ferry.deep_ep`` prints it; python/README.md has the
command lines). Where a real DeepEP is installed too, importing this fails, naming it, unless
FERRY_DEEP_EP_OVERRIDE=1 says that Ferry's is meant: one never replaces the other silently.
"""

import importlib.machinery as _machinery
import os as _os
import sys as _sys


def _real_deep_ep():
    """DeepEP's own package further down the path, if one is installed."""
    alias_dir = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    rest = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != alias_dir]
    return _machinery.PathFinder.find_spec("deep_ep", rest)


_real = _real_deep_ep()
if _real is not None and _os.environ.get("FERRY_DEEP_EP_OVERRIDE") != "1":
    raise ImportError(
        f"deep_ep: DeepEP is installed ({_real.origin or _real.submodule_search_locations}) and Ferry's deep_ep alias "
        f"({_os.path.dirname(_os.path.abspath(__file__))}) comes first on the path. Remove the alias from PYTHONPATH "
        "to use DeepEP, or set FERRY_DEEP_EP_OVERRIDE=1 to use Ferry's")

from ferry.deep_ep import Buffer, Config, EventOverlap, topk_idx_t  # noqa: E402

__version__ = "ferry"
__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t"]
