"""Build script: the pure-Python package plus the C++ extension `ttc_fast._C` (block manager,
CPU sampler filter).

Install with `pip install --no-build-isolation -e .` after `pip install torch==2.13.0 pybind11`:
the extension uses pybind11 only (no libtorch), so torch never enters the build environment.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "ttc_fast._C",
        sources=["csrc/block_manager.cpp", "csrc/gumbel_sample.cpp", "csrc/bindings.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    packages=["ttc_fast", "ttc_fast.prm", "ttc_fast.strategies", "ttc_fast.toy", "ttc_fast.kernels"],
    package_dir={"ttc_fast": "ttc_fast", "ttc_fast.kernels": "kernels"},
    # The built-in toy checkpoints (HF format) ship inside the package: builtin:NAME; and the
    # search-and-learn preset's data file; the toy task's routing map (Routed.toy()).
    package_data={"ttc_fast": ["builtin/*/*", "sal_preset.json", "toy/routing.json"]},
)
