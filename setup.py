# Placeholder build driver; replaced by the CMake-driven build of mops_fast._C.
from setuptools import setup

setup()
