"""Build the local lm-eval tasks' JSONL from text the repo carries (run from the repo root; deterministic):

    python experiments/lm_eval/build.py

Source: data/corpora/novelist/austen_pride_and_prejudice.txt (Jane Austen, 1813: public domain; see
data/corpora/MANIFEST.md), its held-out slice only: `sharedllm adapt` trains on the first 80 % of a file by
position (`data.split_by_position`), and both tasks take sentences from after 85 %, so an adapter trained on the
file has never seen them.

- austen_next.jsonl (loglikelihood, multiple choice): the first half of a sentence; the choices are its own second
  half and the second halves of three other held-out sentences; the label is the true one's index.
- austen_complete.jsonl (generate_until): a sentence without its last three words; the target is those words.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "data" / "corpora" / "novelist" / "austen_pride_and_prejudice.txt"
START = 0.85  # of the file's characters: inside the held-out last 20 %
N_CHOICE, N_GEN, SEED = 40, 20, 33


def sentences(text: str) -> list[str]:
    """Plain narrative sentences of 8-40 words (no dialogue quotes, no chapter headings), in order."""
    flat = re.sub(r"\s+", " ", text)
    out = []
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
        words = s.split()
        if 8 <= len(words) <= 40 and s[-1] == "." and not re.search(r"[“”\"_*]|CHAPTER|--", s):
            out.append(s)
    return out


def build() -> dict[str, list[dict]]:
    text = SOURCE.read_text(encoding="utf-8")
    pool = sentences(text[int(len(text) * START):])
    rng = random.Random(SEED)
    picked = rng.sample(range(len(pool)), N_CHOICE + N_GEN)
    choice_ids, gen_ids = sorted(picked[:N_CHOICE]), sorted(picked[N_CHOICE:])
    halves = []
    for s in pool:
        w = s.split()
        halves.append((" ".join(w[: len(w) // 2]), " ".join(w[len(w) // 2:])))
    items = []
    for i in choice_ids:
        others = rng.sample([j for j in range(len(pool)) if j != i], 3)
        choices = [halves[i][1]] + [halves[j][1] for j in others]
        order = list(range(4))
        rng.shuffle(order)
        items.append({"id": f"austen-next-{i}", "context": halves[i][0], "choices": [choices[k] for k in order],
                      "label": order.index(0)})
    gens = []
    for i in gen_ids:
        w = pool[i].split()
        gens.append({"id": f"austen-complete-{i}", "context": " ".join(w[:-3]), "target": " ".join(w[-3:])[:-1]})
    return {"austen_next.jsonl": items, "austen_complete.jsonl": gens}


if __name__ == "__main__":
    for name, rows in build().items():
        with open(HERE / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{HERE / name}: {len(rows)} items")
