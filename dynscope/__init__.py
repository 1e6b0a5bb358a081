"""dynscope: train neural networks under dynamical loss functions and study the dynamics."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dynscope")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["__version__", "open_record", "open_records"]


def __getattr__(name: str) -> object:
    # Import the store lazily so `import dynscope` stays cheap for the CLI's --help.
    if name in ("open_record", "open_records"):
        from dynscope import store

        return getattr(store, name)
    raise AttributeError(f"module 'dynscope' has no attribute {name!r}")
