"""Generate a tiny, fully synthetic instruction-tuning data set in Alpaca format.

Every row is built from templates and word tables written for this file, so the
data is license-clean and needs no download. It is the project's offline default
data set: small enough for a ~1M-parameter GPT-2 teacher to learn on a CPU, yet
regular enough that the loss drops far below uniform within minutes.

Each output line is a JSON object with exactly the keys "instruction", "input"
and "output". The same arguments always produce byte-identical output.

Usage, from the repository root (these are the defaults):
    python3 -m assets.generate_tiny_data --out assets/tiny/alpaca_tiny.jsonl --n 3000 --seed 0
"""

import argparse
import json
import os
import random
import re
import statistics
import sys

from assets import tiny_words as tables

# ---------------------------------------------------------------------------
# Small helpers.
# ---------------------------------------------------------------------------


def join_with_and(items):
    """Return 'a', 'a and b', or 'a, b and c'."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def fix_articles(text):
    """Turn "a apple" into "an apple".

    Templates always write "a" before a slot; fixing it here keeps every
    template simple. No word in the tables starts with a vowel letter but a
    consonant sound (like "unit"), so the letter test is enough.
    """
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def make_row(instruction, input_text, output):
    return {
        "instruction": fix_articles(instruction),
        "input": fix_articles(input_text),
        "output": fix_articles(output),
    }


def number_in_words(value):
    """Spell out 0..999 the way a school book would ("three hundred forty-two")."""
    if value < 20:
        return tables.ONES[value]
    if value < 100:
        tens, ones = divmod(value, 10)
        return tables.TENS[tens] + ("-" + tables.ONES[ones] if ones else "")
    hundreds, rest = divmod(value, 100)
    words = tables.ONES[hundreds] + " hundred"
    return words + (" " + number_in_words(rest) if rest else "")


def fictional_name(rng, syllable_count):
    return "".join(rng.choice(tables.SYLLABLES) for _ in range(syllable_count)).capitalize()


def simple_sentence(rng):
    """A short present-tense sentence whose verb is in tables.PAST_TENSE."""
    subject = rng.choice(tables.PEOPLE + [t.capitalize() for t in tables.TITLES])
    verb = rng.choice(sorted(tables.PAST_TENSE))
    obj = f"the {rng.choice(tables.ADJECTIVES)} {rng.choice(tables.NOUNS)}"
    # Time phrases stay tense-neutral so the past-tense rewrite remains correct.
    tail = rng.choice(["", "", f" at {rng.choice(tables.PLACES)}", " in the morning", " after lunch", " with a friend"])
    return f"{subject} {verb} {obj}{tail}."


# ---------------------------------------------------------------------------
# Task families. Each takes the shared rng and returns one row.
# ---------------------------------------------------------------------------


def task_arithmetic(rng):
    operation = rng.choice(["add", "subtract", "multiply"])
    if operation == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        instruction = rng.choice([f"Add {a} and {b}.", f"What is {a} plus {b}?", f"Find the sum of {a} and {b}."])
        # Worked steps with a fixed shape give a tiny model structure to copy.
        tens, ones = (a // 10 + b // 10) * 10, a % 10 + b % 10
        output = (
            f"First add the tens: {a // 10 * 10} plus {b // 10 * 10} is {tens}. "
            f"Then add the ones: {a % 10} plus {b % 10} is {ones}. "
            f"Together that makes {tens} plus {ones}, which is {a + b}. So {a} plus {b} equals {a + b}."
        )
    elif operation == "subtract":
        a, b = sorted((rng.randint(1, 99), rng.randint(1, 99)), reverse=True)
        instruction = rng.choice([f"Subtract {b} from {a}.", f"What is {a} minus {b}?"])
        output = f"{a} minus {b} equals {a - b}. To check, add the answer back: {a - b} plus {b} is {a}."
    else:
        a, b = rng.randint(2, 20), rng.randint(2, 9)
        instruction = rng.choice(
            [f"Multiply {a} by {b}.", f"What is {a} times {b}?", f"Find the product of {a} and {b}."]
        )
        steps = ", ".join(str(a * k) for k in range(1, b + 1))
        output = f"Counting up in steps of {a}, {b} times, gives {steps}. So {a} times {b} equals {a * b}."
    return make_row(instruction, "", output)


def task_sort(rng):
    if rng.random() < 0.5:
        values = rng.sample(range(1, 200), rng.randint(3, 12))
        order = rng.choice(["ascending", "descending"])
        ordered = sorted(values, reverse=(order == "descending"))
        instruction = f"Sort the following numbers in {order} order."
        output = (
            f"Here are the numbers in {order} order: {', '.join(map(str, ordered))}. "
            f"The smallest number is {min(values)} and the largest is {max(values)}."
        )
        return make_row(instruction, ", ".join(map(str, values)), output)
    words = rng.sample(tables.NOUNS + tables.COLORS, rng.randint(3, 10))
    instruction = rng.choice(
        ["Sort these words in alphabetical order.", "Put the following words in alphabetical order."]
    )
    output = f"In alphabetical order, the words are: {', '.join(sorted(words))}."
    return make_row(instruction, ", ".join(words), output)


def task_reverse_words(rng):
    sentence = simple_sentence(rng).rstrip(".")
    words = sentence.split()
    instruction = rng.choice(
        [
            "Reverse the order of the words in this sentence.",
            "Write the words of the sentence in reverse order.",
        ]
    )
    return make_row(instruction, sentence, " ".join(reversed(words)))


def task_count(rng):
    if rng.random() < 0.5:
        text = " ".join(simple_sentence(rng) for _ in range(rng.randint(1, 3)))
        words = text.replace(".", "").split()
        numbered = ", ".join(f"{i} {w}" for i, w in enumerate(words, start=1))
        output = f"Counting them one by one: {numbered}. The text has {len(words)} words."
        return make_row("Count the words in the following text.", text, output)
    word = rng.choice(tables.NOUNS + tables.ADJECTIVES + tables.COLORS)
    letter = rng.choice(sorted(set(word)) + ["e", "a", "o"])
    count = word.count(letter)
    instruction = f'How many times does the letter "{letter}" appear in the word "{word}"?'
    plural = "time" if count == 1 else "times"
    output = f'The word "{word}" is spelled {"-".join(word)}. The letter "{letter}" appears {count} {plural}.'
    return make_row(instruction, "", output)


def task_uppercase(rng):
    if rng.random() < 0.5:
        phrase = f"the {rng.choice(tables.ADJECTIVES)} {rng.choice(tables.NOUNS)} near {rng.choice(tables.PLACES)}"
    else:
        phrase = simple_sentence(rng).lower()
    if rng.random() < 0.5:
        return make_row("Convert the following text to upper case.", phrase, phrase.upper())
    return make_row("Capitalize the first letter of every word.", phrase, phrase.title())


def task_antonym(rng):
    shape = rng.random()
    if shape < 0.3:
        word = rng.choice(sorted(tables.ANTONYMS))
        opposite = tables.ANTONYMS[word]
        instruction = rng.choice([f'What is the opposite of "{word}"?', f'Give an antonym for the word "{word}".'])
        output = (
            f'The opposite of "{word}" is "{opposite}". The two words mean contrary things, '
            f"so one cannot be both {word} and {opposite} at once."
        )
        return make_row(instruction, "", output)
    if shape < 0.6:
        first, second = rng.sample(sorted(tables.ANTONYMS), 2)
        instruction = f'What are the opposites of "{first}" and "{second}"?'
        output = (
            f'The opposite of "{first}" is "{tables.ANTONYMS[first]}", '
            f'and the opposite of "{second}" is "{tables.ANTONYMS[second]}".'
        )
        return make_row(instruction, "", output)
    words = rng.sample(sorted(tables.ANTONYMS), rng.randint(3, 8))
    lines = [f"{w} - {tables.ANTONYMS[w]}" for w in words]
    return make_row("Give the opposite of each word.", ", ".join(words), "\n".join(lines))


def describe_entity(rng):
    """Build a fictional animal, town or planet.

    Returns (instruction, sentences, questions) where questions are
    (question, answer) pairs answerable from the sentences, so the reading
    family can reuse the same text.
    """
    kind = rng.choice(["animal", "town", "planet"])
    name = fictional_name(rng, rng.randint(2, 3))
    extra_count = rng.randint(1, 7)
    if kind == "animal":
        animal = name.lower()
        body = rng.sample(tables.ANIMAL_BODIES, 2)
        home, foods = rng.choice(tables.ANIMAL_HOMES), join_with_and(rng.sample(tables.ANIMAL_FOODS, 2))
        sentences = [
            f"The {animal} is a {rng.choice(tables.ADJECTIVES)} animal with {body[0]} and {body[1]}.",
            f"It lives in {home} and eats {foods}.",
        ]
        sentences += rng.sample(tables.ANIMAL_HABITS, extra_count)
        instruction = f"Describe the {animal}, a fictional animal."
        questions = [
            (f"Where does the {animal} live?", f"The {animal} lives in {home}."),
            (f"What does the {animal} eat?", f"The {animal} eats {foods}."),
        ]
    elif kind == "town":
        features, trade, people = (
            join_with_and(rng.sample(tables.TOWN_FEATURES, 2)),
            rng.choice(tables.TOWN_TRADES),
            rng.randint(2, 90) * 100,
        )
        sentences = [
            f"{name} is a {rng.choice(tables.ADJECTIVES)} town with {features}.",
            f"About {people} people live there, and most of them earn their living by {trade}.",
        ]
        sentences += rng.sample(tables.TOWN_FACTS, extra_count)
        instruction = f"Write a short description of {name}, a fictional town."
        questions = [
            (f"How many people live in {name}?", f"About {people} people live in {name}."),
            (
                f"How do most people in {name} earn their living?",
                f"Most people in {name} earn their living by {trade}.",
            ),
        ]
    else:
        moons = rng.randint(0, 5)
        moon_text = "no moons" if moons == 0 else f"{tables.ONES[moons]} moon" + ("s" if moons > 1 else "")
        surface = rng.choice(tables.PLANET_SURFACES)
        sentences = [
            f"{name} is a {rng.choice(['small', 'large', 'distant', 'cold', 'hot'])} planet with {rng.choice(tables.PLANET_SKIES)}.",
            f"Its surface is covered with {surface}, and it has {moon_text}.",
        ]
        sentences += rng.sample(tables.PLANET_FACTS, extra_count)
        instruction = f"Describe the planet {name}."
        questions = [
            (f"How many moons does {name} have?", f"{name} has {moon_text}."),
            (f"What covers the surface of {name}?", f"The surface of {name} is covered with {surface}."),
        ]
    return instruction, sentences, questions


def task_describe(rng):
    instruction, sentences, _ = describe_entity(rng)
    return make_row(instruction, "", " ".join(sentences))


def task_reading(rng):
    _, sentences, questions = describe_entity(rng)
    question, answer = rng.choice(questions)
    instruction = f"Read the text and answer the question: {question}"
    return make_row(instruction, " ".join(sentences), answer)


def task_story(rng):
    hero, friend = rng.sample(tables.PEOPLE, 2)
    if rng.random() < 0.3:
        hero = rng.choice(tables.TITLES)
    # Exponential draw: most stories are short, a few run to 12 sentences.
    middle_count = min(9, int(rng.expovariate(1 / 4.0)))
    slots = {"hero": hero, "friend": friend}

    def fill(template):
        text = template.format(
            place=rng.choice(tables.PLACES),
            adj=rng.choice(tables.ADJECTIVES),
            noun=rng.choice(tables.NOUNS),
            color=rng.choice(tables.COLORS),
            **slots,
        )
        return text[0].upper() + text[1:]

    sentences = [fill(rng.choice(tables.STORY_OPENINGS))]
    sentences += [fill(t) for t in rng.sample(tables.STORY_MIDDLES, middle_count)]
    sentences.append(fill(rng.choice(tables.STORY_ENDINGS)))
    if middle_count >= 3 and rng.random() < 0.5:
        sentences.append(fill(rng.choice(tables.STORY_EPILOGUES)))
    story = " ".join(sentences)
    if middle_count >= 3 and rng.random() < 0.6:
        # Longer stories sometimes get a title and a moral, as fables do.
        title = f"{hero} and the {rng.choice(tables.ADJECTIVES).capitalize()} {rng.choice(tables.NOUNS).capitalize()}"
        story = f"Title: {title[0].upper() + title[1:]}\n\n{story}\n\n{rng.choice(tables.STORY_MORALS)}"
    topic = f"{hero} and a {rng.choice(tables.NOUNS)}"
    if rng.random() < 0.4:
        return make_row("Write a short story about the given topic.", topic, story)
    return make_row(f"Tell a short story about {topic}.", "", story)


def task_unit_conversion(rng):
    from_unit, to_unit, factor = rng.choice(tables.UNIT_CONVERSIONS)
    amount = rng.randint(2, 60)
    instruction = rng.choice(
        [f"Convert {amount} {from_unit} to {to_unit}.", f"How many {to_unit} are in {amount} {from_unit}?"]
    )
    output = (
        f"There are {factor} {to_unit} in one of the {from_unit}, so multiply {amount} by {factor}. "
        f"{amount} times {factor} is {amount * factor}. So {amount} {from_unit} is {amount * factor} {to_unit}."
    )
    return make_row(instruction, "", output)


def task_yes_no(rng):
    question = rng.choice(["even", "odd", "greater", "less"])
    a = rng.randint(1, 500)
    if question in ("even", "odd"):
        is_even = a % 2 == 0
        answer = "Yes" if is_even == (question == "even") else "No"
        reason = (
            f"A number is even when its last digit is 0, 2, 4, 6 or 8. The last digit of {a} is {a % 10}, "
            f"so {a} is {'even' if is_even else 'odd'}."
        )
        if rng.random() < 0.4:
            # Present the number as input, as Alpaca sometimes does.
            return make_row(f"Is the given number {question}? Answer yes or no.", str(a), f"{answer}. {reason}")
        return make_row(f"Is {a} an {question} number?", "", f"{answer}. {reason}")
    b = rng.randint(1, 500)
    if a == b:
        b += 1
    answer = "Yes" if (a > b) == (question == "greater") else "No"
    big, small = max(a, b), min(a, b)
    relation = "greater than" if a > b else "less than"
    output = f"{answer}. {a} is {relation} {b}, because {big} minus {small} is {big - small}, which is more than zero."
    return make_row(f"Is {a} {question} than {b}?", "", output)


def task_past_tense(rng):
    sentences = [simple_sentence(rng) for _ in range(rng.choice([1, 1, 1, 2, 3, 4]))]
    rewritten = []
    for sentence in sentences:
        words = sentence.split()
        rewritten.append(" ".join(tables.PAST_TENSE.get(w, w) for w in words))
    instruction = rng.choice(["Rewrite the text in the past tense.", "Change the following text to the past tense."])
    return make_row(instruction, " ".join(sentences), " ".join(rewritten))


def task_shopping_list(rng):
    occasion = rng.choice(sorted(tables.SHOPPING_ITEMS))
    items = rng.sample(tables.SHOPPING_ITEMS[occasion], rng.randint(3, 8))
    quantities = [rng.randint(2, 6) for _ in items]
    lines = [f"{i}. {tables.ONES[q]} {item}" for i, (q, item) in enumerate(zip(quantities, items), start=1)]
    instruction = rng.choice([f"Make a shopping list for {occasion}.", f"Write a short shopping list for {occasion}."])
    output = "\n".join(
        [f"Here is a shopping list for {occasion}:"]
        + lines
        + [f"That is {len(items)} kinds of things, {sum(quantities)} in all."]
    )
    return make_row(instruction, "", output)


def task_number_words(rng):
    if rng.random() < 0.6:
        value = rng.randint(0, 999)
        output = f'The number {value} is written as "{number_in_words(value)}".'
        return make_row(f"Write the number {value} in words.", "", output)
    values = rng.sample(range(0, 1000), rng.randint(3, 6))
    return make_row(
        "Write each number in words, one per line.",
        ", ".join(map(str, values)),
        "\n".join(f"{v}: {number_in_words(v)}" for v in values),
    )


def task_invitation(rng):
    sender, guest = rng.sample(tables.PEOPLE, 2)
    event, place, day = rng.choice(tables.EVENTS), rng.choice(tables.PLACES), rng.choice(tables.DAYS)
    hour = rng.randint(1, 7)
    bring = rng.choice(tables.BRING_ITEMS)
    extras = rng.sample(tables.NOTE_EXTRAS, rng.randint(0, 3))
    body = f"I would like to invite you to {event} at {place} on {day} at {hour} o'clock."
    if extras:
        body += " " + " ".join(extras)
    body += f" Please bring a {bring} if you can."
    output = f"Dear {guest},\n\n{body}\n\nSee you soon,\n{sender}"
    instruction = f"Write a short note from {sender} inviting {guest} to {event}."
    if rng.random() < 0.5:
        details = f"place: {place}, day: {day}, time: {hour} o'clock, bring: a {bring}"
        return make_row(instruction, details, output)
    return make_row(instruction + f" It is at {place} on {day} at {hour} o'clock.", "", output)


# Weights are tuned so that about 60% of rows have an empty input and the
# long tail of lengths comes mostly from stories, descriptions and reading.
TASK_FAMILIES = [
    (task_arithmetic, 10),
    (task_sort, 7),
    (task_reverse_words, 5),
    (task_count, 7),
    (task_uppercase, 4),
    (task_antonym, 6),
    (task_describe, 11),
    (task_reading, 6),
    (task_story, 18),
    (task_unit_conversion, 6),
    (task_yes_no, 7),
    (task_past_tense, 6),
    (task_shopping_list, 5),
    (task_number_words, 4),
    (task_invitation, 5),
]


def generate(n: int, seed: int) -> list[dict]:
    """Return n rows, each a dict with the keys instruction, input and output."""
    rng = random.Random(seed)
    tasks = [task for task, _ in TASK_FAMILIES]
    weights = [weight for _, weight in TASK_FAMILIES]
    return [rng.choices(tasks, weights=weights)[0](rng) for _ in range(n)]


def length_summary(rows):
    """One line with the row count, character-length percentiles and empty-input share."""
    lengths = sorted(len(r["instruction"]) + len(r["input"]) + len(r["output"]) for r in rows)
    p90 = lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))]
    empty_input = sum(1 for r in rows if not r["input"]) / len(rows)
    return (
        f"{len(rows)} rows, characters per row: median {statistics.median(lengths):.0f}, "
        f"p90 {p90}, max {lengths[-1]}; empty input {empty_input:.0%}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="assets/tiny/alpaca_tiny.jsonl", help="output JSON Lines path")
    parser.add_argument("--n", type=int, default=3000, help="number of rows")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")

    rows = generate(args.n, args.seed)
    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: {length_summary(rows)}", file=sys.stderr)


if __name__ == "__main__":
    main()
