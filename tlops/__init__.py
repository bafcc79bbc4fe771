"""tlops: the pipeline wiring (config, stages, tracking, CLI) around `components`."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tlops")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0.0.0+unknown"
