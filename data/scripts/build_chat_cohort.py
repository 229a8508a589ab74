"""Build data/corpora/chat/: the 12 largest real senders of BYU's Chit-Chat Challenge (PyPI chitchat-dataset 0.9.0,
MIT; Myers, Etchart & Fulda 2020), one file per sender, their own messages in time order.

    pip download --no-deps chitchat-dataset==0.9.0 -d /tmp/chit && python data/scripts/build_chat_cohort.py /tmp/chit/*.whl

Excluded by inspection (printed below): a sender whose messages are templated sentences ("The purple pasta talked
softly.": a script, not a person) and a sender whose text is mostly runs of "a a a a" (70 % unique messages).
Checked: no two kept senders share more than 2 % of their distinct messages longer than 25 characters.
A sender's file keeps their LATEST messages up to CAP bytes (cut at a message boundary), so that the held-out last
20 % is their latest messages, as for every corpus. A blank line separates conversations.
"""
from __future__ import annotations

import collections
import itertools
import json
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "corpora" / "chat"
KEEP, MIN_BYTES, CAP = 12, 100_000, 400_000
EXCLUDE = {"ed35a50a": "templated sentences (a script)", "60576dcf": "mostly 'a a a a' spam"}


def messages(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read("chitchat_dataset/dataset.json"))
    by_sender = collections.defaultdict(list)
    for cid, conv in data.items():
        for ti, turn in enumerate(conv["messages"]):
            for mi, m in enumerate(turn):
                by_sender[m["sender"]].append((m["timestamp"].rstrip("Z"), cid, ti, mi, m["text"].strip()))
    return {s: sorted(v) for s, v in by_sender.items()}


def render(rows: list) -> str:
    lines, last = [], None
    for _, cid, _, _, text in rows:
        if not text:
            continue
        if last is not None and cid != last:
            lines.append("")
        lines.append(text)
        last = cid
    return "\n".join(lines) + "\n"


def latest(text: str, cap: int) -> str:
    data = text.encode()
    if len(data) <= cap:
        return text
    cut = data[-cap:]
    return cut[cut.index(b"\n") + 1:].decode()


def overlap(a: list, b: list) -> float:
    sa, sb = ({r[-1] for r in x if len(r[-1]) > 25} for x in (a, b))
    return len(sa & sb) / max(1, min(len(sa), len(sb)))


def main(wheel: str) -> None:
    by_sender = messages(Path(wheel))
    size = {s: len(render(v).encode()) for s, v in by_sender.items()}
    big = sorted((s for s in by_sender if size[s] >= MIN_BYTES), key=lambda s: -size[s])
    print(f"{len(big)} senders with >= {MIN_BYTES} bytes")
    kept = [s for s in big if s[:8] not in EXCLUDE][:KEEP]
    for s in big:
        if s[:8] in EXCLUDE:
            print(f"excluded {s[:8]}: {EXCLUDE[s[:8]]}")
    worst = max(overlap(by_sender[a], by_sender[b]) for a, b in itertools.combinations(kept, 2))
    assert worst <= 0.02, worst
    OUT.mkdir(parents=True, exist_ok=True)
    for s in kept:
        text = latest(render(by_sender[s]), CAP)
        (OUT / f"sender_{s[:8]}.txt").write_text(text)
        print(f"sender_{s[:8]}: {len(by_sender[s])} messages, {size[s]} bytes -> {len(text.encode())} bytes kept")
    print(f"max pairwise message overlap {worst:.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
