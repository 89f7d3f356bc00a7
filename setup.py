"""Builds jaxlm's optional CPU kernels (jaxlm/kernels/cpu_kernels.cc); the rest is pyproject.toml.

The kernels are an optional extension: on a machine without a C++ compiler the install goes on
without them and jaxlm uses XLA's own dot (jaxlm.kernels.available() is False)."""

import pathlib

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildKernels(build_ext):
    def build_extensions(self):
        import jaxlib  # a build requirement: its XLA FFI headers

        include = str(pathlib.Path(jaxlib.__file__).parent / "include")
        for ext in self.extensions:
            ext.include_dirs.append(include)
        super().build_extensions()

    def get_export_symbols(self, ext):  # a plain shared library loaded by ctypes, not a module
        return []


setup(
    ext_modules=[Extension("jaxlm.kernels._cpu_kernels", ["jaxlm/kernels/cpu_kernels.cc"],
                           language="c++", optional=True,
                           extra_compile_args=["-std=c++17", "-O3", "-march=native"])],
    cmdclass={"build_ext": BuildKernels},
)
