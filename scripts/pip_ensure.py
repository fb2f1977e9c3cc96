"""Imports a module for the bench's Python helpers, installing its package with pip first when
it is missing: they run on whatever python3 the machine has."""
import importlib
import subprocess
import sys


def ensure(module, package):
    try:
        return importlib.import_module(module)
    except ImportError:
        pass
    base = [sys.executable, "-m", "pip", "install", "--quiet", package]
    # --break-system-packages for a Debian python3 that refuses plain pip installs (PEP 668).
    if subprocess.call(base) != 0:
        subprocess.check_call(base + ["--break-system-packages"])
    return importlib.import_module(module)
