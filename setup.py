"""Build hook: a wheel carries the gRPC code generated from proto/, so an installed service never writes
into site-packages (read-only in a container) and needs no protos at run time.

Everything else about the package is declared in pyproject.toml. An editable install skips this step:
there ``service.grpc`` generates into the source tree on first import, and regenerates when a proto
changes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _codegen():
    # Loaded by path: importing the ``service`` package would need its run-time dependencies, which a
    # build environment does not have.
    spec = importlib.util.spec_from_file_location("_c2p_codegen", ROOT / "service" / "grpc" / "codegen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        codegen = _codegen()
        out = Path(self.build_lib) / "service" / "grpc" / "gen"
        with codegen._locked(out):
            codegen.generate(ROOT / "proto", out, codegen.PACKAGE)


setup(cmdclass={"build_py": BuildPyWithProtos})
