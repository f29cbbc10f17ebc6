"""Build hook for the optional native kernels: decoding (``deltahub.codecs._native``) and resident
delta products on CPU (``deltahub.resident._native``).

Everything else is configured in pyproject.toml. The extension is ``optional``: without a C
compiler the install still succeeds and deltahub uses its numpy/torch paths, which compute the
same bits (``deltahub.codecs._accel.native_available()`` tells which one runs).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "deltahub.codecs._native",
            sources=["deltahub/codecs/_native.c"],
            extra_compile_args=["-O3", "-std=c99", "-Wno-psabi"],
            optional=True,
        ),
        Extension(
            "deltahub.resident._native",
            sources=["deltahub/resident/_native.c"],
            extra_compile_args=["-O3", "-std=gnu99", "-Wno-psabi"],
            optional=True,
        ),
    ]
)
