"""Where the bets are: a bets dir, loaded by path the way lm-evaluation-harness loads tasks from an include path.

A bets dir is a folder of bet modules (each defines BET) with an `__init__.py` that lists them in report order,
`BETS = {id: module name}`, and may name its defaults: CORPORA (user corpora), OUT (artefacts), README (a file whose
generated bets block `sharedllm bets report` refreshes), PLOTS (the modules whose plots the report shows first).
Its results are in `results/`, its report in REPORT.md.

Found, first match wins: `--bets-dir DIR`, $SHAREDLLM_BETS_DIR, the source checkout's `experiments/bets` (beside
`src/`), `./experiments/bets`. The bet modules are imported under a private package name, never via sys.path.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import SharedLLMError

ENV = "SHAREDLLM_BETS_DIR"
_CURRENT: list = []  # the catalogue this process uses (set by `use`, else found on first need)


@dataclass(frozen=True)
class Catalogue:
    path: Path

    @property
    def package(self):
        return _load_package(self.path)

    @property
    def bets(self) -> dict:
        """bet id -> module name, in report order."""
        return self.package.BETS

    @property
    def plot_order(self) -> list:
        """Module names in the order the report shows their plots: those the bets dir's PLOTS lists (if it has
        one), then the other bets in report order."""
        first = list(getattr(self.package, "PLOTS", []))
        return first + [m for m in self.bets.values() if m not in first]

    @property
    def results(self) -> Path:
        return self.path / "results"

    @property
    def report(self) -> Path:
        return self.path / "REPORT.md"

    def default(self, name: str) -> Path | None:
        value = getattr(self.package, name, None)
        return Path(value) if value is not None else None

    def module(self, name: str):
        """A module of the bets dir by file name (e.g. "lr_sensitivity")."""
        return importlib.import_module(f"{self.package.__name__}.{name}")


def candidates(given: str | Path | None = None) -> list[tuple[str, Path | None]]:
    """(where, folder) in the order they are tried."""
    checkout = Path(__file__).resolve().parents[3] / "experiments" / "bets"  # src/sharedllm/bets/ -> the checkout
    env = os.environ.get(ENV)
    return [("--bets-dir", Path(given) if given else None), (f"${ENV}", Path(env) if env else None),
            ("the source checkout", checkout), ("the working directory", Path.cwd() / "experiments" / "bets")]


def is_bets_dir(path: Path) -> bool:
    return (path / "__init__.py").is_file()


def find(given: str | Path | None = None) -> Catalogue:
    """The bets dir: `given` (it must be one), else the first of the other candidates that is one."""
    if given and not is_bets_dir(Path(given)):
        raise SharedLLMError(f"--bets-dir {given}: not a bets dir (no __init__.py listing BETS)")
    tried = []
    for where, path in candidates(given):
        if path is not None and is_bets_dir(path):
            return Catalogue(path.resolve())
        tried.append(f"{where} ({path or 'not set'})")
    raise SharedLLMError(f"no bets dir found; looked at: {'; '.join(tried)}. The bets live in the source repository: "
                         "pass --bets-dir <checkout>/experiments/bets (or set $SHAREDLLM_BETS_DIR)")


def use(given: str | Path | None = None) -> Catalogue:
    """Find the bets dir and make it this process's (the CLI calls this with --bets-dir)."""
    _CURRENT[:] = [find(given)]
    return _CURRENT[0]


def current() -> Catalogue:
    return _CURRENT[0] if _CURRENT else use()


def _load_package(path: Path):
    name = "_sharedllm_bets_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                      submodule_search_locations=[str(path)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        if not isinstance(getattr(module, "BETS", None), dict):
            del sys.modules[name]
            raise SharedLLMError(f"{path / '__init__.py'}: defines no BETS = {{id: module name}}")
    return sys.modules[name]
