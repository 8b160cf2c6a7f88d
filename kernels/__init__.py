"""Fused operators: one dispatch table (op x backend), a float64 reference per op, and the
torch / triton / npu implementations. Users call them through :mod:`optimum_atb.ops`.

Installed as ``optimum_atb.kernels``. When the repository root is on ``sys.path`` (``python -m ...`` from a
checkout), ``import kernels`` finds this folder before Hugging Face's ``kernels`` package, which
transformers (>= 5.25 a dependency) imports as soon as it loads a model. Imported under that top-level
name, this file hands the name over to the installed package (ModuleNotFoundError when there is none) and
defines nothing of its own.
"""

if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _checkout]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (the repository's kernels/ folder is optimum_atb.kernels)",
            name="kernels",
        )
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds after this file
    _spec.loader.exec_module(_module)
