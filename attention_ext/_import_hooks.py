"""Run a callback when a module is first imported, without importing it.

``when_imported(name, callback, what)`` calls ``callback(module)`` now if ``name`` is imported already, else
right after the module's own code has run, the first time anything imports it. One finder on
``sys.meta_path`` serves every registration (transformers' attention interface in hf.py, DTensor's
sharding rules in _dtensor.py); it removes itself once nothing is pending. A callback that raises never
breaks the user's import: it becomes a warning naming ``what``.
"""
import importlib.abc
import sys
import threading
import warnings

_lock = threading.Lock()
_pending = {}  # module name -> [(callback, what)]


def _run(callback, module, what):
    try:
        callback(module)
    except Exception as e:  # never break the user's import
        warnings.warn(f"attention_ext: could not register {what} ({e!r})")


class _Loader(importlib.abc.Loader):
    """Wraps a module's loader to run the callbacks once the module has executed."""

    def __init__(self, loader, callbacks):
        self._loader = loader
        self._callbacks = callbacks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        # the wrapper has served its purpose: give the module its real loader back
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        for callback, what in self._callbacks:
            _run(callback, module, what)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _PostImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        with _lock:
            callbacks = _pending.pop(fullname, [])
            if not _pending:
                try:
                    sys.meta_path.remove(self)
                except ValueError:
                    pass
        spec.loader = _Loader(spec.loader, callbacks)
        return spec


def when_imported(name, callback, what):
    """callback(module) once ``name`` is imported: now if it is, else right after its first import."""
    module = sys.modules.get(name)
    if module is not None:
        _run(callback, module, what)
        return
    with _lock:
        _pending.setdefault(name, []).append((callback, what))
        if not any(isinstance(f, _PostImportHook) for f in sys.meta_path):
            sys.meta_path.insert(0, _PostImportHook())
