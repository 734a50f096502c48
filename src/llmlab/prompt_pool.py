"""Shared pool of general prompts: generated math word problems plus everyday instructions.

Several experiment families need a stream of ordinary, benign prompts (to build "aligned" training
mixes, to measure capability drift, to sample neutral activations). Offline, the pool is built from
a seeded word-problem generator and the shipped instruction file; when the Hugging Face hub is
reachable, `load_hub_prompts` reads the public GSM8K and Alpaca sets instead.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from llmlab.io import DataError

DEFAULT_INSTRUCTIONS_PATH = Path(__file__).resolve().parents[2] / "data/prompts/instructions.jsonl"

INSTRUCTION_CATEGORIES = frozenset(
    {
        "writing",
        "explanation",
        "advice",
        "list",
        "rewrite",
        "classification",
        "brainstorm",
        "coding",
        "summarise",
        "other",
    }
)


@dataclass(frozen=True)
class PoolPrompt:
    """One prompt of the shared pool."""

    id: str
    prompt: str
    kind: str  # "math" | "instruction"
    answer: str | None  # checked numeric answer for math, None for instructions


@dataclass(frozen=True)
class MathProblem:
    """One generated word problem with the numbers that appear in its text, in text order."""

    template: str
    text: str
    numbers: tuple[int, ...]
    answer: int


# ---------------------------------------------------------------------------------------------
# Word-problem templates. Each draws its numbers so that every intermediate and final value is a
# positive integer (divisions are set up to be exact), and lists `numbers` in the order they occur
# in the text so that a test can re-derive the answer from the text alone.

NAMES = (
    "Maya", "Tom", "Priya", "Lucas", "Amara", "Ben", "Sofia", "Kenji", "Elena", "Omar",
    "Grace", "Diego", "Hannah", "Yusuf", "Chloe", "Mateo", "Leila", "Sam", "Ines", "Noah",
)  # fmt: skip

_Rng = random.Random


def _shopping_change(rng: _Rng) -> MathProblem:
    name = rng.choice(NAMES)
    first, second = rng.choice(
        [("notebooks", "pens"), ("apples", "oranges"), ("mugs", "plates"), ("candles", "cards"),
         ("socks", "scarves"), ("pencils", "erasers"), ("muffins", "cookies")]
    )  # fmt: skip
    a, p, b, q = rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 9), rng.randint(1, 8)
    total = a * p + b * q
    bill = rng.choice([v for v in (20, 50, 100, 200) if v > total])
    text = (
        f"{name} buys {a} {first} at ${p} each and {b} {second} at ${q} each, paying with a "
        f"${bill} note. How much change, in dollars, does {name} get back?"
    )
    return MathProblem("shopping_change", text, (a, p, b, q, bill), bill - total)


def _travel_distance(rng: _Rng) -> MathProblem:
    vehicle = rng.choice(["train", "coach", "ferry", "delivery van", "motorbike"])
    v1 = rng.randrange(40, 125, 5)
    h1 = rng.randint(2, 6)
    v2 = rng.randrange(20, v1, 5)
    h2 = rng.randint(1, 5)
    text = (
        f"A {vehicle} travels at {v1} km per hour for {h1} hours, then slows to {v2} km per hour "
        f"for another {h2} hours. How many kilometres does it travel in total?"
    )
    return MathProblem("travel_distance", text, (v1, h1, v2, h2), v1 * h1 + v2 * h2)


def _recipe_scale(rng: _Rng) -> MathProblem:
    name = rng.choice(NAMES)
    ingredient = rng.choice(["flour", "sugar", "butter", "rice", "oats", "cheese"])
    per = rng.randrange(10, 95, 5)
    s = rng.randint(2, 6)
    t = rng.randint(s + 1, 4 * s)
    text = (
        f"A recipe for {s} servings uses {per * s} grams of {ingredient}. {name} wants to make "
        f"{t} servings. How many grams of {ingredient} are needed?"
    )
    return MathProblem("recipe_scale", text, (s, per * s, t), per * t)


def _savings(rng: _Rng) -> MathProblem:
    name = rng.choice(NAMES)
    thing = rng.choice(["a bike", "a guitar", "a tablet", "concert tickets", "a new coat"])
    start, weekly, weeks = rng.randint(20, 300), rng.randint(5, 40), rng.randint(3, 20)
    spend = rng.randint(10, start + weekly * weeks - 1)
    text = (
        f"{name} has ${start} saved and puts away ${weekly} every week. After {weeks} weeks, "
        f"{name} spends ${spend} on {thing}. How many dollars are left?"
    )
    return MathProblem(
        "savings", text, (start, weekly, weeks, spend), start + weekly * weeks - spend
    )


def _ages(rng: _Rng) -> MathProblem:
    older, younger = rng.sample(NAMES, 2)
    k, b, y = rng.randint(2, 5), rng.randint(3, 15), rng.randint(2, 20)
    text = (
        f"{older} is {k} times as old as {younger}, who is {b} years old. What will the sum of "
        f"their ages be in {y} years?"
    )
    return MathProblem("ages", text, (k, b, y), (k * b + y) + (b + y))


def _garden_area(rng: _Rng) -> MathProblem:
    length, width = rng.randint(5, 40), rng.randint(3, 25)
    path = rng.randint(2, length * width // 2)
    text = (
        f"A rectangular garden is {length} metres long and {width} metres wide. A paved path "
        f"takes up {path} square metres. How many square metres are left for planting?"
    )
    return MathProblem("garden_area", text, (length, width, path), length * width - path)


def _workers_rate(rng: _Rng) -> MathProblem:
    rate, workers, hours = rng.randint(5, 40), rng.randint(2, 12), rng.randint(2, 8)
    damaged = rng.randint(1, rate * workers * hours // 5)
    text = (
        f"Each worker in a warehouse packs {rate} boxes per hour. A team of {workers} workers "
        f"packs for {hours} hours, and {damaged} of the boxes turn out to be damaged. How many "
        f"undamaged boxes are packed?"
    )
    return MathProblem(
        "workers_rate", text, (rate, workers, hours, damaged), rate * workers * hours - damaged
    )


def _discount(rng: _Rng) -> MathProblem:
    name = rng.choice(NAMES)
    item, items = rng.choice(
        [("jacket", "jackets"), ("lamp", "lamps"), ("backpack", "backpacks"), ("rug", "rugs"),
         ("pair of boots", "pairs of boots"), ("kettle", "kettles")]
    )  # fmt: skip
    # A price that is a multiple of 20 and a percentage that is a multiple of 5 keep the
    # discount a whole number of dollars.
    price = 20 * rng.randint(1, 15)
    pct = rng.choice([5, 10, 15, 20, 25, 30, 40, 50])
    n = rng.randint(2, 6)
    text = (
        f"A {item} normally costs ${price}. During a sale everything is {pct}% off. How much, "
        f"in dollars, does {name} pay for {n} {items}?"
    )
    return MathProblem("discount", text, (price, pct, n), n * (price - price * pct // 100))


def _sharing(rng: _Rng) -> MathProblem:
    name = rng.choice(NAMES)
    fruit = rng.choice(["apples", "plums", "strawberries", "cherries", "walnuts", "stickers"])
    share, friends, kept = rng.randint(3, 25), rng.randint(2, 9), rng.randint(2, 30)
    total = share * friends + kept
    text = (
        f"{name} has {total} {fruit}, keeps {kept} and shares the rest equally among {friends} "
        f"friends. How many {fruit} does each friend get?"
    )
    return MathProblem("sharing", text, (total, kept, friends), share)


def _practice_time(rng: _Rng) -> MathProblem:
    name = rng.choice(NAMES)
    instrument = rng.choice(["piano", "violin", "guitar", "flute", "drums"])
    weekday = rng.randrange(15, 95, 5)
    weekend = rng.randrange(weekday, 125, 5)
    weeks = rng.randint(2, 8)
    text = (
        f"{name} practises the {instrument} for {weekday} minutes on each weekday and {weekend} "
        f"minutes on each day of the weekend. How many minutes does {name} practise in {weeks} "
        f"weeks?"
    )
    return MathProblem(
        "practice_time", text, (weekday, weekend, weeks), weeks * (5 * weekday + 2 * weekend)
    )


def _fuel_cost(rng: _Rng) -> MathProblem:
    litres, hundreds, price = rng.randint(4, 12), rng.randint(2, 9), rng.randint(2, 3)
    distance = 100 * hundreds
    text = (
        f"A car uses {litres} litres of fuel for every 100 kilometres. Fuel costs ${price} per "
        f"litre. How many dollars does the fuel cost for a {distance} km trip?"
    )
    return MathProblem("fuel_cost", text, (litres, 100, price, distance), litres * hundreds * price)


def _tickets(rng: _Rng) -> MathProblem:
    venue = rng.choice(["museum", "zoo", "theatre", "aquarium", "theme park"])
    adult = rng.randint(8, 30)
    child = rng.randint(3, adult - 1)
    adults, children = rng.randint(1, 6), rng.randint(1, 10)
    text = (
        f"A {venue} charges ${adult} per adult and ${child} per child. How many dollars does a "
        f"group of {adults} adults and {children} children pay?"
    )
    return MathProblem(
        "tickets", text, (adult, child, adults, children), adult * adults + child * children
    )


def _pages_left(rng: _Rng) -> MathProblem:
    name = rng.choice(NAMES)
    per_day, days = rng.randint(5, 40), rng.randint(2, 14)
    pages = per_day * days + rng.randint(10, 200)
    text = (
        f"A book has {pages} pages. {name} reads {per_day} pages every day for {days} days. How "
        f"many pages are still left to read?"
    )
    return MathProblem("pages_left", text, (pages, per_day, days), pages - per_day * days)


def _buses_cost(rng: _Rng) -> MathProblem:
    students, seats = rng.randint(40, 400), rng.randint(20, 60)
    cost = rng.randrange(80, 410, 10)
    text = (
        f"A school is taking {students} students on a trip. Each bus holds {seats} students and "
        f"costs ${cost} to hire. What is the lowest total cost, in dollars, of hiring enough "
        f"buses?"
    )
    return MathProblem(
        "buses_cost", text, (students, seats, cost), math.ceil(students / seats) * cost
    )


def _stall_profit(rng: _Rng) -> MathProblem:
    seller, goods = rng.choice(
        [("baker", "loaves"), ("florist", "bouquets"), ("potter", "bowls"), ("farmer", "melons")]
    )
    n, price = rng.randint(10, 200), rng.randint(3, 9)
    cost = rng.randint(1, price - 1)
    fee = rng.randint(5, n * (price - cost) - 1)
    text = (
        f"A {seller} sells {n} {goods} at ${price} each. Materials cost ${cost} for each one, and "
        f"the market stall costs ${fee} for the day. What is the {seller}'s profit in dollars?"
    )
    return MathProblem("stall_profit", text, (n, price, cost, fee), n * (price - cost) - fee)


def _tank_fill(rng: _Rng) -> MathProblem:
    rate, minutes, current = rng.randint(2, 25), rng.randint(3, 40), rng.randint(5, 200)
    capacity = current + rate * minutes
    text = (
        f"A tank holds {capacity} litres and already contains {current} litres. A pump adds "
        f"{rate} litres per minute. How many minutes will it take to fill the tank?"
    )
    return MathProblem("tank_fill", text, (capacity, current, rate), minutes)


def _packs_needed(rng: _Rng) -> MathProblem:
    item = rng.choice(["pencils", "markers", "glue sticks", "notebooks", "rulers"])
    pack, each, students = rng.randint(4, 24), rng.randint(1, 5), rng.randint(10, 35)
    text = (
        f"{item.capitalize()} come in packs of {pack}. A teacher needs {each} {item} for each of "
        f"{students} students. How many packs must the teacher buy?"
    )
    return MathProblem(
        "packs_needed", text, (pack, each, students), math.ceil(each * students / pack)
    )


MATH_TEMPLATES: dict[str, Callable[[_Rng], MathProblem]] = {
    "shopping_change": _shopping_change,
    "travel_distance": _travel_distance,
    "recipe_scale": _recipe_scale,
    "savings": _savings,
    "ages": _ages,
    "garden_area": _garden_area,
    "workers_rate": _workers_rate,
    "discount": _discount,
    "sharing": _sharing,
    "practice_time": _practice_time,
    "fuel_cost": _fuel_cost,
    "tickets": _tickets,
    "pages_left": _pages_left,
    "buses_cost": _buses_cost,
    "stall_profit": _stall_profit,
    "tank_fill": _tank_fill,
    "packs_needed": _packs_needed,
}


def make_math_problem(template: str, rng: random.Random) -> MathProblem:
    """Return one problem drawn from the named template using `rng`."""
    try:
        build = MATH_TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown math template {template!r}") from None
    return build(rng)


def math_word_problems(n: int, seed: int) -> list[PoolPrompt]:
    """Return `n` distinct multi-step arithmetic word problems with integer answers.

    Deterministic for a given seed; templates are drawn uniformly; ids are "math-<seed>-<index>".
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = random.Random(seed)
    names = sorted(MATH_TEMPLATES)
    out: list[PoolPrompt] = []
    seen: set[str] = set()
    attempts = 0
    # The template spaces are large, so collisions are rare; the cap only guards against a
    # request far beyond what the templates can produce.
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not generate {n} distinct problems (got {len(out)})")
        problem = make_math_problem(rng.choice(names), rng)
        if problem.text in seen:
            continue
        seen.add(problem.text)
        out.append(PoolPrompt(f"math-{seed}-{len(out)}", problem.text, "math", str(problem.answer)))
    return out


# ---------------------------------------------------------------------------------------------
# Instructions


def load_instructions(path: Path = DEFAULT_INSTRUCTIONS_PATH) -> list[PoolPrompt]:
    """Return the instructions in a JSONL file as prompts of kind "instruction".

    Each line needs a unique non-empty string `id`, a non-empty string `prompt` and a known
    `category`; any bad line raises `DataError` (a `ValueError`) naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    out: list[PoolPrompt] = []
    seen: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for field in ("id", "prompt", "category"):
            value = row.get(field)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: field {field!r} must be a non-empty string")
        if row["category"] not in INSTRUCTION_CATEGORIES:
            raise DataError(f"{where}: unknown category {row['category']!r}")
        if row["id"] in seen:
            raise DataError(
                f"{where}: duplicate id {row['id']!r} (first on line {seen[row['id']]})"
            )
        seen[row["id"]] = lineno
        out.append(PoolPrompt(row["id"], row["prompt"], "instruction", None))
    if not out:
        raise DataError(f"{path}: file is empty")
    return out


def general_prompt_pool(
    n: int,
    seed: int,
    math_share: float = 0.5,
    instructions_path: Path = DEFAULT_INSTRUCTIONS_PATH,
) -> list[PoolPrompt]:
    """Return a shuffled, deterministic mix of `n` math problems and instructions.

    `round(n * math_share)` prompts are math word problems; the rest are instructions. Every
    distinct instruction is used once (in a seeded order) before any is reused; a reused
    instruction gets the id suffix "-r<k>" for its k-th reuse so ids in the pool stay unique.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not 0.0 <= math_share <= 1.0:
        raise ValueError(f"math_share must be in [0, 1], got {math_share}")
    n_math = round(n * math_share)
    n_instr = n - n_math
    rng = random.Random(seed)
    picked: list[PoolPrompt] = []
    if n_instr:
        instructions = load_instructions(instructions_path)
        reuse = 0
        while len(picked) < n_instr:
            order = list(instructions)
            rng.shuffle(order)
            for item in order[: n_instr - len(picked)]:
                pid = item.id if reuse == 0 else f"{item.id}-r{reuse}"
                picked.append(PoolPrompt(pid, item.prompt, item.kind, item.answer))
            reuse += 1
    pool = picked + math_word_problems(n_math, seed)
    rng.shuffle(pool)
    return pool


# ---------------------------------------------------------------------------------------------
# Hub datasets

_HUB_SOURCES: dict[str, tuple[str, str | None]] = {
    "gsm8k": ("openai/gsm8k", "main"),
    "alpaca": ("tatsu-lab/alpaca", None),
}


def load_hub_prompts(source: str, n: int, seed: int) -> list[PoolPrompt]:
    """Return `n` prompts sampled (seeded) from a public hub dataset's train split.

    `source` is "gsm8k" (answer = the number after "####") or "alpaca" (instruction plus its
    input, no answer). Raises `RuntimeError("hub dataset <name> unreachable: ...")` when the
    `datasets` package or the hub is unavailable.
    """
    if source not in _HUB_SOURCES:
        raise ValueError(f"unknown hub source {source!r}; expected one of {sorted(_HUB_SOURCES)}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    name, config = _HUB_SOURCES[source]
    try:
        # Imported here so the offline pipeline never needs the package.
        import datasets

        ds = datasets.load_dataset(name, config, split="train")
    except Exception as e:  # any failure to import or fetch means the hub is unusable
        raise RuntimeError(f"hub dataset {name} unreachable: {type(e).__name__}: {e}") from e
    indices = list(range(len(ds)))
    random.Random(seed).shuffle(indices)
    out: list[PoolPrompt] = []
    for i in indices[:n]:
        row = ds[i]
        if source == "gsm8k":
            answer = row["answer"].split("####")[-1].strip().replace(",", "")
            out.append(PoolPrompt(f"gsm8k-{i}", row["question"].strip(), "math", answer))
        else:
            prompt = row["instruction"].strip()
            extra = (row.get("input") or "").strip()
            if extra:
                prompt = f"{prompt}\n\n{extra}"
            out.append(PoolPrompt(f"alpaca-{i}", prompt, "instruction", None))
    return out


# ---------------------------------------------------------------------------------------------
# Answer checking

# Numbers with optional thousands separators and decimals; a minus sign counts only when it is
# not a hyphen between two tokens (so "3-4" yields 3 and 4, not 3 and -4).
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def check_math_answer(text: str, answer: str) -> bool:
    """Return whether the last number in `text` equals `answer` ("1,200.0" matches "1200")."""
    found = _NUMBER.findall(text)
    if not found:
        return False
    try:
        return Decimal(found[-1].replace(",", "")) == Decimal(answer.strip().replace(",", ""))
    except InvalidOperation:
        return False
