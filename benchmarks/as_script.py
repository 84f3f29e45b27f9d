"""Run an entry module of ``benchmarks`` that was started as a file (``python benchmarks/bench_memory.py ...``).

Python then puts ``benchmarks/`` itself, not the repository root, on the import path, so the package's relative
imports cannot work. Each entry module starts with

    if __name__ == '__main__' and not __package__:  # run as a file
        import as_script
        as_script.run(__file__)

and ``run`` loads the package from its folder (no change to ``sys.path``) and runs the file as
``benchmarks.<name>``, exactly as ``python -m benchmarks.<name>`` would (conv2former must be importable: installed,
``pip install -e .``, or the working directory on the path).
"""
from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path
from typing import NoReturn

__all__ = ['run']


def run(file: str) -> NoReturn:
    """Run ``file`` (an entry module of the package) as ``benchmarks.<its stem>`` under ``__main__``; exit with
    its status."""
    path = Path(file).resolve()
    if 'benchmarks' not in sys.modules:
        spec = importlib.util.spec_from_file_location('benchmarks', path.parent / '__init__.py',
                                                      submodule_search_locations=[str(path.parent)])
        package = importlib.util.module_from_spec(spec)
        sys.modules['benchmarks'] = package
        spec.loader.exec_module(package)
    runpy.run_module(f'benchmarks.{path.stem}', run_name='__main__', alter_sys=True)
    sys.exit(0)
