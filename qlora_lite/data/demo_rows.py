"""The demo data set: Alpaca rows over small fixed lookup tables (capitals, colours, opposites,
words in capitals), deterministic in a seed.

recipes/data/tiny-instructions.jsonl (written by tools/make_demo_data.py) is `demo_rows()`, so
that adapters on a frozen random base (model/tiny.py) visibly learn it in a couple of CPU
minutes. Arithmetic and word reversal were tried and left out: through rank-r adapters on a
random base they barely move in that budget and only dilute the visible learning.
"""

from __future__ import annotations

import random

CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Canada": "Ottawa", "Norway": "Oslo",
    "Greece": "Athens", "Chile": "Santiago", "Cuba": "Havana", "Poland": "Warsaw", "Ireland": "Dublin",
    "Austria": "Vienna",
}
COLOURS = {
    "a banana": "yellow", "a lemon": "yellow", "an apple": "red", "a cherry": "red", "a lime": "green",
    "a kiwi": "green", "a plum": "purple", "a grape": "purple", "an orange": "orange", "a coconut": "brown",
    "a blueberry": "blue", "snow": "white", "coal": "black",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "early": "late",
    "open": "closed", "light": "dark", "old": "new", "rich": "poor", "high": "low", "full": "empty",
    "hard": "soft", "wet": "dry", "loud": "quiet", "strong": "weak",
}
WORDS = ["cat", "dog", "sun", "tree", "bird", "fish", "moon", "star", "rain", "book", "milk", "rock"]


def demo_rows(n: int = 1200, seed: int = 0) -> list[dict]:
    """Alpaca rows ({instruction, input, output}) of the demo tasks, deterministic in `seed`.

    Args:
        n (int): rows. Default 1200.
        seed (int): the generator seed. Default 0.
    """
    rng = random.Random(seed)
    tasks = [_capital, _colour, _opposite, _shout]
    return [tasks[i % len(tasks)](rng) for i in range(n)]


def _row(instruction: str, output: str, input: str = "") -> dict:
    return {"instruction": instruction, "input": input, "output": output}


def _capital(rng):
    country = rng.choice(sorted(CAPITALS))
    return _row(f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}.")


def _colour(rng):
    thing = rng.choice(sorted(COLOURS))
    return _row(f"What colour is {thing}?", f"{thing[0].upper()}{thing[1:]} is {COLOURS[thing]}.")


def _opposite(rng):
    word = rng.choice(sorted(OPPOSITES))
    return _row("Give the opposite of the word.", OPPOSITES[word], input=word)


def _shout(rng):
    word = rng.choice(WORDS)
    return _row("Write the word in capital letters.", word.upper(), input=word)
