"""Training recipes: which learning rate a method trains at when none is given.

- `recommended`: the lr per method that the project's lr_sensitivity bet chose for a base on held-out dev text
  (per method, the grid lr with the lowest mean over 3 users of log(dev ppl / base dev ppl); 100 steps, batch
  2 x 256, AdamW betas 0.9/0.95). The default of `sharedllm adapt` and the main rows of `sharedllm demo`.
  Methods the bet has not run (vera, loraxs, road) get `SCREENED_LR` instead: a screening choice from a tiny lr
  screen (one user, one seed, 40 steps; bench/lr_screen.py), marked so in the recipe's note.
- `catalogue`: the research catalogue's one lr for every method, 5e-5 (`TrainConfig`'s default; the bets give
  their lrs explicitly and never read this table).

The numbers below are copied from the committed result experiments/bets/results/lr_sensitivity.json (its
summary: "tuned lr (dev): norm 0.002, lora 0.001, full 5e-05"); the installed package never reads experiments/,
and tests/test_recipes.py checks that this table agrees with that file. A base the bet has not been run on gets
the default base's lrs, marked as transferred (the scale_protocol and chat_cohort bets use them the same way).
"""
from __future__ import annotations

from dataclasses import dataclass

from .train import TrainConfig

CATALOGUE_LR = TrainConfig().lr  # 5e-5
RECIPES = ("recommended", "catalogue")
DEFAULT_BASE = "smollm2-135m-instruct"

# base name -> method -> lr, from experiments/bets/results/lr_sensitivity.json (bet lr_sensitivity v1)
RECOMMENDED_LR: dict[str, dict[str, float]] = {
    "smollm2-135m-instruct": {"norm": 2e-3, "lora": 1e-3, "full": 5e-5},
}
# base name -> method -> lr for methods the lr_sensitivity bet has not run (vera, loraxs, road): a SCREENING choice,
# not a tuned one: bench/lr_screen.py on one user's text (Alice, 60,000 chars), one seed, 40 steps of batch 2 x 128,
# the grid lr with the lowest held-out ppl (the grids and ppls are in docs/LOG.md, 2026-12-07). `recommended` gives
# them only where RECOMMENDED_LR has no entry for the method.
SCREENED_LR: dict[str, dict[str, float]] = {
    "smollm2-135m-instruct": {"vera": 3e-2, "loraxs": 1e-3, "road": 3e-3},
}
SCREEN_SOURCE = "bench/lr_screen.py, docs/LOG.md 2026-12-07"
# base name -> where its row comes from (checked against the file's config and meta by tests/test_recipes.py)
SOURCE: dict[str, dict] = {
    "smollm2-135m-instruct": {
        "file": "experiments/bets/results/lr_sensitivity.json", "bet": "lr_sensitivity", "version": 1,
        "git_commit": "5222963d80", "base_fingerprint":
            "a6bff66cdf6e08e15dbfac226c298f0ee94e8cd403e7586ff8b2461e302663b4",
        "steps": 100, "batch": 2, "seq": 256,
    },
}


@dataclass(frozen=True)
class Recipe:
    name: str  # "recommended" | "catalogue" | "given" (an explicit --lr)
    lr: float
    note: str  # where the lr comes from, one line

    def to_json(self) -> dict:
        return {"recipe": self.name, "lr": self.lr, "lr_source": self.note}


def recipe_lr(method: str, base_name: str, recipe: str = "recommended") -> Recipe:
    """The lr `method` trains at on the base named `base_name` under `recipe` (see the module docstring)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    if recipe == "catalogue":
        return Recipe("catalogue", CATALOGUE_LR, "the research catalogue's lr for every method")
    table_base = base_name if base_name in RECOMMENDED_LR else DEFAULT_BASE
    lrs = RECOMMENDED_LR[table_base]
    if method not in lrs:
        screened = SCREENED_LR.get(table_base, {}).get(method)
        if screened is None:
            return Recipe("catalogue", CATALOGUE_LR, f"no recommended lr for {method}: the catalogue's")
        note = f"a screening choice for {method} on {table_base} (one user, 40 steps; {SCREEN_SOURCE}), not tuned"
        if table_base != base_name:
            note += f", transferred (not screened on {base_name})"
        return Recipe("recommended", screened, note)
    note = f"the lr_sensitivity bet's dev-chosen lr per method on {table_base} ({SOURCE[table_base]['file']})"
    if table_base != base_name:
        note += f", transferred (not tuned on {base_name})"
    return Recipe("recommended", lrs[method], note)


def given_lr(lr: float) -> Recipe:
    return Recipe("given", lr, "--lr")
