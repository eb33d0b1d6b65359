"""The ``verl.plugins`` entry point of rspo (``pip install rspo[verl]``).

verl imports every ``verl.plugins`` entry point from ``verl/__init__.py``, in every process that imports
verl (driver, task runner, every Ray worker), before any of its submodules, and swallows an import error at
DEBUG level. So this module is light and cannot fail: it imports nothing of verl and nothing heavy of ours;
it only arranges that, when verl's actor worker module is imported, its ``init_model`` is wrapped by
:func:`rspo.integrations.verl.patch_actor_worker`, and that verl's legacy trainer, when imported, refuses a
config with the section (:func:`rspo.integrations.verl.reject_legacy_trainer`). Nothing changes unless the
run's config has the ``actor_rollout_ref.rspo`` section (see :mod:`rspo.integrations.verl`).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from collections.abc import Callable

log = logging.getLogger("rspo.verl")
WORKERS_MODULE = "verl.workers.engine_workers"
LEGACY_TRAINER_MODULE = "verl.trainer.ppo.ray_trainer"


def _patch_workers(module) -> None:
    from rspo.integrations.verl import patch_actor_worker

    patch_actor_worker(module.ActorRolloutRefWorker)


def _patch_legacy_trainer(module) -> None:
    from rspo.integrations.verl import reject_legacy_trainer

    reject_legacy_trainer(module.RayPPOTrainer)


PATCHES: dict[str, Callable] = {WORKERS_MODULE: _patch_workers, LEGACY_TRAINER_MODULE: _patch_legacy_trainer}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback(module)`` right after ``name`` is imported (the next finders find it)."""

    def __init__(self, name: str, callback: Callable) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        loader, callback = spec.loader, self.callback

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                try:
                    callback(module)
                except Exception:  # verl would hide it at DEBUG: say it loudly, then fail the import
                    log.exception("rspo: patching %s failed", fullname)
                    raise

        spec.loader = _Loader()
        return spec


def install() -> None:
    """Patch each module of ``PATCHES`` now if verl has already imported it, else right after its import."""
    hooked = {f.name for f in sys.meta_path if isinstance(f, _AfterImport)}
    for name, patch in PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
        elif name not in hooked:
            sys.meta_path.insert(0, _AfterImport(name, patch))


install()
