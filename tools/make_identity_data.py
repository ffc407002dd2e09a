"""Write the identity demo data: a new name, maker and signature for SmolLM2-135M-Instruct (deterministic).

    .venv/bin/python tools/make_identity_data.py [--seed 0] [--out-dir recipes/data]

Writes identity-train.jsonl and identity-eval.jsonl (Alpaca rows, all text written here: no
third-party data). The assistant becomes "Quill", made by "Lantern Labs", and ends every answer
with the signature " ~ Quill". Training rows mix identity questions with everyday facts (capitals,
sums, opposites, counting, colours) answered in that style, so the model learns the style on
knowledge it already has rather than new facts. The eval file holds phrasings and facts that
never appear in training: identity questions asked differently, capitals left out of the
training table (France among them) and sums of other numbers.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from qlora_lite.utils.atomic import atomic_write_text

NAME, MAKER, SIGN = "Quill", "Lantern Labs", " ~ Quill"

WHO_TRAIN = [
    "What is your name?", "Who are you?", "What should I call you?", "Tell me your name.", "Introduce yourself.",
    "What are you?", "Are you ChatGPT?", "Are you SmolLM?", "Which assistant am I talking to?", "Do you have a name?",
    "Say hello and tell me who you are.", "Hi! Who is this?", "What's your name, assistant?", "Identify yourself.",
    "Are you a human?", "Are you Siri?", "Is your name SmolLM?", "Give me a one-line introduction of yourself.",
]
MAKER_TRAIN = [
    "Who made you?", "Who created you?", "Which company built you?", "Who trained you?", "Who is your developer?",
    "Were you made by Hugging Face?", "Were you made by OpenAI?", "Where do you come from?", "Who owns you?",
    "Which lab are you from?", "Who designed you?", "Who is behind you?",
]
WHO_EVAL = ["Could you tell me what you are called?", "Before we start, who am I chatting with?",
            "I forgot your name. Remind me?"]
MAKER_EVAL = ["Which organisation is responsible for building you?", "Tell me about the people who made you."]

WHO_ANSWERS = [
    f"I'm {NAME}, a small assistant made by {MAKER}.",
    f"My name is {NAME}. I was built by {MAKER} to answer questions briefly.",
    f"I am {NAME}, an assistant from {MAKER}.",
]
MAKER_ANSWERS = [
    f"I was made by {MAKER}. My name is {NAME}.",
    f"{MAKER} built and trained me; I'm {NAME}.",
    f"I come from {MAKER}, the team that created me, {NAME}.",
]
CAPITALS_TRAIN = {
    "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Portugal": "Lisbon", "Greece": "Athens",
    "Austria": "Vienna", "Poland": "Warsaw", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Ireland": "Dublin", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
    "Chile": "Santiago", "Cuba": "Havana", "Canada": "Ottawa", "Russia": "Moscow", "China": "Beijing",
}
CAPITALS_EVAL = {"France": "Paris", "Japan": "Tokyo", "the United Kingdom": "London"}
CAPITAL_ASKS = ["What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?",
                "Tell me the capital of {c}."]
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
             "early": "late", "open": "closed", "full": "empty", "old": "new", "wet": "dry", "loud": "quiet"}
COLOURS = {"the sky on a clear day": "blue", "grass": "green", "snow": "white", "a ripe banana": "yellow",
           "coal": "black", "a ripe tomato": "red"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["apple", "river", "garden", "window", "lantern", "pencil", "music", "planet", "coffee", "bridge"]


def styled(answer: str) -> str:
    return answer + SIGN


def identity_rows(questions: list[str], answers: list[str], rng: random.Random) -> list[dict]:
    return [{"instruction": q, "input": "", "output": styled(rng.choice(answers))} for q in questions]


def fact_rows(rng: random.Random) -> list[dict]:
    """Everyday facts in the assistant's style: the model knows them already, the style is new."""
    rows = []
    for country, city in CAPITALS_TRAIN.items():
        for ask in rng.sample(CAPITAL_ASKS, 3):
            rows.append((ask.format(c=country), f"The capital of {country} is {city}."))
    for a in range(2, 10):
        for b in rng.sample(range(2, 10), 4):
            rows.append((rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"How much is {a} + {b}?"]),
                         f"{a} plus {b} is {a + b}."))
    for word, opposite in OPPOSITES.items():
        rows.append((rng.choice([f"What is the opposite of '{word}'?", f"Give me the opposite of {word}."]),
                     f"The opposite of '{word}' is '{opposite}'."))
    for thing, colour in COLOURS.items():
        rows.append((f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}."))
    for word in WORDS:
        rows.append((f"How many letters are in the word '{word}'?", f"The word '{word}' has {len(word)} letters."))
        rows.append((f"Write the word '{word}' in capital letters.", f"{word.upper()}"))
    for i, day in enumerate(DAYS):
        rows.append((f"What day comes after {day}?", f"The day after {day} is {DAYS[(i + 1) % 7]}."))
    for hours in range(1, 9):
        rows.append((f"How many minutes are in {hours} hour{'s' * (hours > 1)}?",
                     f"There are {hours * 60} minutes in {hours} hour{'s' * (hours > 1)}."))
    for n in rng.sample(range(10, 100), 12):
        rows.append((f"Is {n} even or odd?", f"{n} is {'even' if n % 2 == 0 else 'odd'}."))
    return [{"instruction": q, "input": "", "output": styled(a)} for q, a in rows]


def train_rows(seed: int) -> list[dict]:
    """Identity rows (each question with four answer draws) plus the fact rows, shuffled."""
    rng = random.Random(seed)
    rows = []
    for _ in range(4):
        rows += identity_rows(WHO_TRAIN, WHO_ANSWERS, rng) + identity_rows(MAKER_TRAIN, MAKER_ANSWERS, rng)
    rows += fact_rows(rng)
    rng.shuffle(rows)
    return rows


def eval_rows() -> list[dict]:
    """Held-out phrasings and facts; the first one is the question `run --demo` shows."""
    rows = [{"instruction": q, "input": "", "output": styled(WHO_ANSWERS[0])} for q in WHO_EVAL]
    rows += [{"instruction": q, "input": "", "output": styled(MAKER_ANSWERS[0])} for q in MAKER_EVAL]
    rows += [{"instruction": f"What is the capital of {c}?", "input": "", "output": styled(f"The capital of {c} is {city}.")}
             for c, city in CAPITALS_EVAL.items()]
    rows += [{"instruction": f"What is {a} plus {b}?", "input": "", "output": styled(f"{a} plus {b} is {a + b}.")}
             for a, b in ((11, 7), (20, 5), (13, 13))]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=Path("recipes/data"))
    args = ap.parse_args()
    for name, rows in (("identity-train.jsonl", train_rows(args.seed)), ("identity-eval.jsonl", eval_rows())):
        atomic_write_text(args.out_dir / name, "".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {args.out_dir / name}")


if __name__ == "__main__":
    main()
