"""Start-up hook: registers the sdzoo models with timm in interpreters that never ``import sdzoo``.

The ``sdzoo-autoload.pth`` file that an install of sdzoo puts in site-packages runs ``install()`` at
interpreter start-up. ``install()`` only adds a small finder to ``sys.meta_path`` (no torch, no timm, no
sdzoo: about 0.1 ms at start-up for a regular install). When ``timm`` is first imported, the finder lets the
normal machinery find and run timm, then imports sdzoo, whose model modules register the zoo with timm's
registry. So ``timm.create_model("sd_resnet110_cifar")`` and ``timm.create_model("hf-hub:OWNER/REPO")``
for a repo of an sdzoo architecture work in a fresh interpreter.

Set ``SDZOO_DISABLE_AUTOLOAD=1`` to turn the hook off; ``import sdzoo`` still registers the zoo.

This module is top-level, outside the ``sdzoo`` package, so that importing it does not run
``sdzoo/__init__.py`` (which imports torch).
"""
import os
import sys

DISABLE_ENV = "SDZOO_DISABLE_AUTOLOAD"
_TRUE_VALUES = ("1", "true", "yes", "on")


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in _TRUE_VALUES


class TimmWatcher:
    """A meta path finder that finds nothing itself: it wraps the loader of ``timm`` so that sdzoo is
    imported right after timm's package module has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        spec = _find_with_other_finders(self, fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterTimm(spec.loader)
        return spec


class _RegisterAfterTimm:
    """Loader wrapper: runs timm with its own loader, then registers the zoo."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # timm sees its real loader, so nothing downstream can tell the hook was there.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        uninstall()
        register_zoo()


def _find_with_other_finders(watcher, fullname, path, target):
    for finder in sys.meta_path:
        if finder is watcher or isinstance(finder, TimmWatcher):
            continue
        find_spec = getattr(finder, "find_spec", None)
        spec = find_spec(fullname, path, target) if find_spec is not None else None
        if spec is not None:
            return spec
    return None


def register_zoo() -> None:
    """Import sdzoo (its model modules register with timm). A broken sdzoo must not break ``import timm``."""
    if "sdzoo" in sys.modules:
        return  # already imported, or being imported (it is what imported timm): it registers itself
    try:
        import sdzoo  # noqa: F401
    except Exception as e:  # noqa: BLE001
        import warnings
        warnings.warn(
            f"sdzoo is installed but could not register its models with timm ({type(e).__name__}: {e}). "
            f"Set {DISABLE_ENV}=1 to skip this at start-up.", RuntimeWarning, stacklevel=2)


def install() -> None:
    """Called by the .pth file at start-up: add the watcher unless turned off or timm is already in."""
    if disabled() or any(isinstance(f, TimmWatcher) for f in sys.meta_path):
        return
    if "timm" in sys.modules:
        register_zoo()
        return
    sys.meta_path.insert(0, TimmWatcher())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TimmWatcher)]
