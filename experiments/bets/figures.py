"""Plot helpers that several bets' `plots` hooks share (matplotlib is imported only when drawing)."""
from __future__ import annotations

from pathlib import Path

from sharedllm.bets.cells import ppl, values


def save(fig, path: Path) -> Path:
    """Lay out, write the PNG atomically (dpi 110) and close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def confusion_plot(cells: list, bet: str, path: Path) -> Path:
    """Rows: adapters (the base first), columns: users' held-out texts; colour: ppl over the base's ppl."""
    import matplotlib.pyplot as plt

    users = values(cells, "user")
    adapters = ["base"] + [a for a in values(cells, "adapter") if a != "base"]
    grid = [[ppl(cells, adapter=a, user=u) / ppl(cells, adapter="base", user=u) for u in users] for a in adapters]
    small = len(users) > 4
    fig, ax = plt.subplots(figsize=(4 + (0.75 if small else 1.5) * len(users), 2.4 + 0.4 * len(adapters)))
    im = ax.imshow(grid, cmap="RdYlGn_r", vmin=min(map(min, grid)), vmax=max(1.0, max(map(max, grid))),
                   aspect="auto")
    for i, a in enumerate(adapters):
        for j, u in enumerate(users):
            ax.text(j, i, f"{ppl(cells, adapter=a, user=u):.{1 if small else 2}f}", ha="center", va="center",
                    fontsize=6 if small else 8, fontweight="bold" if a == u else "normal")
    ax.set_xticks(range(len(users)), users, rotation=40 if small else 15, ha="right" if small else "center")
    ax.set_yticks(range(len(adapters)), adapters)
    ax.set_xlabel("held-out text of user")
    ax.set_ylabel("adapter")
    ax.set_title(f"Bet {bet}: held-out ppl\n(colour: ratio to the base's ppl; bold: own adapter)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.05)
    return save(fig, path)
