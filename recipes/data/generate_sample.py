"""Writes sample.oasst.jsonl: a small instruction set in OpenAssistant tree format, written for this project.

The facts are common knowledge typed in below; the trees exercise what the oasst source
and the h2oGPT filter chain handle: multi-turn threads, ranked replies, deleted and
unreviewed messages, other languages, a synthetic tree, quality labels, refusals.
Deterministic: `python recipes/data/generate_sample.py` rewrites the same bytes.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

OUT = Path(__file__).with_name("sample.oasst.jsonl")
rng = random.Random(2026)
NAMESPACE = uuid.UUID("6f1c3c1e-0000-4000-8000-000000000000")

CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Brazil": "Brasilia",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "India": "New Delhi",
    "China": "Beijing",
    "Mexico": "Mexico City",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Turkey": "Ankara",
    "Argentina": "Buenos Aires",
    "Colombia": "Bogota",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "Indonesia": "Jakarta",
    "Nigeria": "Abuja",
    "Morocco": "Rabat",
    "Ghana": "Accra",
    "New Zealand": "Wellington",
    "Denmark": "Copenhagen",
    "Belgium": "Brussels",
    "Switzerland": "Bern",
    "Netherlands": "Amsterdam",
    "Czech Republic": "Prague",
}
ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "early": "late",
    "open": "closed",
    "full": "empty",
    "strong": "weak",
    "high": "low",
    "rich": "poor",
    "hard": "soft",
    "loud": "quiet",
    "young": "old",
    "wet": "dry",
    "thick": "thin",
    "near": "far",
    "clean": "dirty",
    "cheap": "expensive",
    "first": "last",
    "inside": "outside",
    "begin": "end",
    "push": "pull",
    "win": "lose",
}
LEGS = {
    "spider": 8,
    "ant": 6,
    "bee": 6,
    "dog": 4,
    "cat": 4,
    "horse": 4,
    "chicken": 2,
    "penguin": 2,
    "octopus": 8,
    "crab": 10,
    "snake": 0,
    "kangaroo": 2,
    "cow": 4,
    "beetle": 6,
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
MONTH_DAYS = [31, "28, or 29 in a leap year", 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
MIXES = {
    ("red", "blue"): "purple",
    ("red", "yellow"): "orange",
    ("blue", "yellow"): "green",
    ("black", "white"): "grey",
    ("red", "white"): "pink",
}
TIPS = [
    (
        "How can I sleep better?",
        "Keep a regular bedtime, keep the bedroom dark and cool, and put screens away an hour before sleep.",
    ),
    (
        "How do I start running?",
        "Start with short runs mixed with walking, three times a week, and add a few minutes each week.",
    ),
    (
        "How can I drink more water?",
        "Keep a bottle on your desk, drink a glass with every meal, and refill it whenever it is empty.",
    ),
    (
        "How do I learn to type faster?",
        "Learn the home-row position, practise ten minutes a day without looking at the keys, and focus on accuracy first.",
    ),
    (
        "How can I focus when studying?",
        "Work in blocks of 25 minutes with short breaks, silence your phone, and keep only the material you need on the desk.",
    ),
    (
        "How do I keep houseplants alive?",
        "Give each plant the light it likes, water only when the top of the soil is dry, and use pots with drainage holes.",
    ),
    (
        "How can I save money on groceries?",
        "Plan meals for the week, shop with a list, and buy staples like rice and beans in bulk.",
    ),
    (
        "How should I prepare for a job interview?",
        "Read about the company, practise answering common questions out loud, and prepare two or three questions of your own.",
    ),
]


def uid(*parts: object) -> str:
    return str(uuid.uuid5(NAMESPACE, "/".join(map(str, parts))))


def msg(
    key: str,
    text: str,
    role: str,
    *,
    rank: int | None = None,
    lang: str = "en",
    quality: float | None = None,
    deleted: bool = False,
    review: bool | None = True,
    synthetic: bool = False,
    replies: list | None = None,
) -> dict:
    labels = {"quality": {"value": quality, "count": 3}} if quality is not None else {}
    return {
        "message_id": uid(key),
        "text": text,
        "role": role,
        "lang": lang,
        "review_count": 3,
        "review_result": review,
        "deleted": deleted,
        "rank": rank,
        "synthetic": synthetic,
        "model_name": "sample-writer" if synthetic else None,
        "labels": labels,
        "replies": replies or [],
    }


def tree(key: str, prompt: dict, state: str = "ready_for_export") -> dict:
    def link(m: dict, parent: str | None) -> None:
        m["parent_id"] = parent
        for r in m["replies"]:
            link(r, m["message_id"])

    link(prompt, None)
    return {"message_tree_id": prompt["message_id"], "tree_state": state, "prompt": prompt}


def q() -> float:
    return round(rng.uniform(0.55, 0.95), 2)


def trees() -> list[dict]:
    out = []
    for i, (country, city) in enumerate(CAPITALS.items()):
        follow = None
        if i % 4 == 0:
            other, other_city = list(CAPITALS.items())[(i + 7) % len(CAPITALS)]
            follow = [
                msg(
                    f"cap{i}f",
                    f"And what is the capital of {other}?",
                    "prompter",
                    replies=[
                        msg(f"cap{i}fa", f"The capital of {other} is {other_city}.", "assistant", rank=0, quality=q())
                    ],
                )
            ]
        out.append(
            tree(
                f"cap{i}",
                msg(
                    f"cap{i}",
                    f"What is the capital of {country}?",
                    "prompter",
                    replies=[
                        msg(
                            f"cap{i}a",
                            f"The capital of {country} is {city}.",
                            "assistant",
                            rank=0,
                            quality=q(),
                            replies=follow,
                        ),
                        msg(f"cap{i}b", f"{city}.", "assistant", rank=1, quality=round(rng.uniform(0.3, 0.6), 2)),
                    ],
                ),
            )
        )
    for i in range(60):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        if i % 2:
            question, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        else:
            question, answer = f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
        out.append(
            tree(
                f"math{i}",
                msg(
                    f"math{i}",
                    question,
                    "prompter",
                    replies=[msg(f"math{i}a", answer, "assistant", rank=0, quality=q())],
                ),
            )
        )
    for i, (word, opposite) in enumerate(ANTONYMS.items()):
        out.append(
            tree(
                f"ant{i}",
                msg(
                    f"ant{i}",
                    f"What is the opposite of '{word}'?",
                    "prompter",
                    replies=[
                        msg(f"ant{i}a", f"The opposite of '{word}' is '{opposite}'.", "assistant", rank=0, quality=q())
                    ],
                ),
            )
        )
    for i, (animal, legs) in enumerate(LEGS.items()):
        limbs = "arms" if animal == "octopus" else "legs"
        text = "A snake has no legs; it moves by bending its body." if legs == 0 else f"A {animal} has {legs} {limbs}."
        out.append(
            tree(
                f"legs{i}",
                msg(
                    f"legs{i}",
                    f"How many {limbs} does a {animal} have?",
                    "prompter",
                    replies=[msg(f"legs{i}a", text, "assistant", rank=0, quality=q())],
                ),
            )
        )
    for i, day in enumerate(DAYS):
        nxt = DAYS[(i + 1) % 7]
        out.append(
            tree(
                f"day{i}",
                msg(
                    f"day{i}",
                    f"Which day comes after {day}?",
                    "prompter",
                    replies=[msg(f"day{i}a", f"{nxt} comes after {day}.", "assistant", rank=0, quality=q())],
                ),
            )
        )
    for i, month in enumerate(MONTHS):
        out.append(
            tree(
                f"mon{i}",
                msg(
                    f"mon{i}",
                    f"How many days does {month} have?",
                    "prompter",
                    replies=[msg(f"mon{i}a", f"{month} has {MONTH_DAYS[i]} days.", "assistant", rank=0, quality=q())],
                ),
            )
        )
    for i, ((x, y), z) in enumerate(MIXES.items()):
        out.append(
            tree(
                f"mix{i}",
                msg(
                    f"mix{i}",
                    f"What color do you get when you mix {x} and {y} paint?",
                    "prompter",
                    replies=[msg(f"mix{i}a", f"Mixing {x} and {y} paint gives {z}.", "assistant", rank=0, quality=q())],
                ),
            )
        )
    for i, (question, answer) in enumerate(TIPS):
        out.append(
            tree(
                f"tip{i}",
                msg(
                    f"tip{i}",
                    question,
                    "prompter",
                    replies=[
                        msg(
                            f"tip{i}a",
                            answer,
                            "assistant",
                            rank=0,
                            quality=q(),
                            replies=[
                                msg(
                                    f"tip{i}f",
                                    "Thanks! Can you make it shorter?",
                                    "prompter",
                                    replies=[
                                        msg(f"tip{i}fa", answer.split(",")[0] + ".", "assistant", rank=0, quality=q())
                                    ],
                                )
                            ],
                        ),
                        msg(
                            f"tip{i}b",
                            "As an AI language model, I cannot give personal advice.",
                            "assistant",
                            rank=1,
                            quality=0.2,
                        ),
                    ],
                ),
            )
        )
    # what the filters are for
    out.append(
        tree(
            "es1",
            msg(
                "es1",
                "¿Cuál es la capital de Francia?",
                "prompter",
                lang="es",
                replies=[msg("es1a", "La capital de Francia es París.", "assistant", rank=0, lang="es", quality=q())],
            ),
        )
    )
    out.append(
        tree(
            "de1",
            msg(
                "de1",
                "Wie viele Tage hat eine Woche?",
                "prompter",
                lang="de",
                replies=[msg("de1a", "Eine Woche hat sieben Tage.", "assistant", rank=0, lang="de", quality=q())],
            ),
        )
    )
    out.append(
        tree(
            "del1",
            msg(
                "del1",
                "What is the capital of Iceland?",
                "prompter",
                replies=[
                    msg("del1a", "The capital of Iceland is Reykjavik.", "assistant", rank=0, quality=q()),
                    msg("del1b", "Reykjavik, obviously, you idiot.", "assistant", rank=1, deleted=True),
                ],
            ),
        )
    )
    out.append(
        tree(
            "rev1",
            msg(
                "rev1",
                "Tell me a fact about the Moon.",
                "prompter",
                replies=[
                    msg("rev1a", "The Moon is made of cheese.", "assistant", rank=1, review=False),
                    msg("rev1b", "The Moon takes about 27 days to orbit the Earth.", "assistant", rank=0, quality=q()),
                ],
            ),
        )
    )
    out.append(
        tree(
            "syn1",
            msg(
                "syn1",
                "What is the largest ocean?",
                "prompter",
                synthetic=True,
                replies=[msg("syn1a", "The Pacific Ocean is the largest ocean.", "assistant", rank=0, synthetic=True)],
            ),
        )
    )
    out.append(
        tree(
            "prof1",
            msg(
                "prof1",
                "Why did my cake sink in the middle?",
                "prompter",
                replies=[
                    msg(
                        "prof1a",
                        "Damn, that happens. Usually the oven door was opened too early or there was too much baking powder.",
                        "assistant",
                        rank=0,
                        quality=0.6,
                    )
                ],
            ),
        )
    )
    out.append(
        tree(
            "low1",
            msg(
                "low1",
                "What is the tallest mountain on Earth?",
                "prompter",
                replies=[msg("low1a", "Mountains are tall.", "assistant", rank=0, quality=0.1)],
            ),
        )
    )
    out.append(tree("open1", msg("open1", "Write a poem about the sea.", "prompter"), state="growing"))
    out.append(
        tree(
            "dup1",
            msg(
                "dup1",
                "What is the capital of France?",
                "prompter",
                replies=[msg("dup1a", "The capital of France is Paris.", "assistant", rank=0, quality=0.8)],
            ),
        )
    )
    return out


def main() -> None:
    rows = trees()
    with open(OUT, "w", encoding="utf-8") as f:
        for t in rows:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} trees to {OUT}")


if __name__ == "__main__":
    main()
