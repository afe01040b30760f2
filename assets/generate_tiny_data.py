"""Generate a tiny, fully synthetic instruction-tuning data set in Alpaca format.

Every row is built from templates and word tables written for this file, so the
data is license-clean and needs no download. It is the project's offline default
data set: small enough for a ~1M-parameter GPT-2 teacher to learn on a CPU, yet
regular enough that the loss drops far below uniform within minutes.

Each output line is a JSON object with exactly the keys "instruction", "input"
and "output". The same arguments always produce byte-identical output.

Usage (these are the defaults):
    python3 assets/generate_tiny_data.py --out assets/tiny/alpaca_tiny.jsonl --n 3000 --seed 0
"""

import argparse
import json
import os
import random
import re
import statistics
import sys

# ---------------------------------------------------------------------------
# Word tables. Kept small on purpose so the vocabulary stays around a thousand
# words and a 2048-token byte-level BPE covers it well.
# ---------------------------------------------------------------------------

ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen",
    "sixteen", "seventeen", "eighteen", "nineteen",
]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

NOUNS = [
    "apple", "river", "garden", "window", "candle", "basket", "mountain",
    "pencil", "bridge", "lantern", "forest", "kitten", "rocket", "blanket",
    "harbor", "meadow", "teapot", "violin", "ladder", "pebble", "island",
    "feather", "wagon", "cloud", "button", "orchard", "compass", "drum",
]

ADJECTIVES = [
    "quiet", "bright", "small", "green", "gentle", "brave", "proud", "shiny",
    "curious", "sleepy", "tall", "warm", "clever", "round", "soft", "busy",
]

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "brown", "white", "gray"]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad",
    "light": "dark", "early": "late", "open": "closed", "full": "empty",
    "hard": "soft", "high": "low", "long": "short", "loud": "quiet",
    "new": "old", "rich": "poor", "strong": "weak", "wet": "dry",
    "young": "old", "thick": "thin", "clean": "dirty", "heavy": "light",
    "near": "far", "first": "last", "true": "false", "up": "down",
    "inside": "outside", "above": "below", "win": "lose", "push": "pull",
    "give": "take", "begin": "end", "buy": "sell", "remember": "forget",
    "arrive": "leave", "laugh": "cry", "awake": "asleep", "brave": "afraid",
    "wide": "narrow", "deep": "shallow", "sweet": "sour", "smooth": "rough",
}

# Present -> past for the third person singular: mostly regular "-ed" verbs a
# tiny model can generalise over, plus a handful of common irregulars to memorise.
PAST_TENSE = {
    "walks": "walked", "jumps": "jumped", "plays": "played", "opens": "opened",
    "paints": "painted", "cleans": "cleaned", "watches": "watched",
    "visits": "visited", "cooks": "cooked", "climbs": "climbed",
    "carries": "carried", "finds": "found", "sees": "saw", "eats": "ate",
    "runs": "ran", "writes": "wrote", "makes": "made", "takes": "took",
    "gives": "gave", "sings": "sang", "builds": "built", "reads": "read",
    "brings": "brought", "buys": "bought", "draws": "drew", "holds": "held",
}

PEOPLE = [
    "Mira", "Tobin", "Lena", "Oskar", "Pia", "Ravi", "Nell", "Arlo", "Juno",
    "Ezra", "Tess", "Milo", "Ada", "Finn", "Ivy", "Bram", "Cora", "Dov",
]

TITLES = ["the baker", "the farmer", "the teacher", "the sailor", "the painter", "the old miner", "the young fox", "the little robot"]

PLACES = [
    "the market", "the hill", "the library", "the harbor", "the old mill",
    "the garden", "the station", "the bakery", "the lake", "the square",
]

SHOPPING_ITEMS = {
    "a picnic": ["loaves of bread", "pieces of cheese", "apples", "bunches of grapes", "bottles of lemonade", "packs of napkins", "cookies", "carrots"],
    "a birthday party": ["cakes", "boxes of candles", "balloons", "bottles of juice", "packs of paper plates", "cups", "ribbons", "cookies"],
    "a camping trip": ["tents", "lamps", "boxes of matches", "bags of rice", "cans of beans", "bottles of water", "ropes", "pairs of socks"],
    "breakfast": ["eggs", "bottles of milk", "loaves of bread", "blocks of butter", "bags of oats", "jars of honey", "bananas", "jars of jam"],
    "a soup dinner": ["onions", "carrots", "potatoes", "bags of salt", "cans of beans", "sticks of celery", "loaves of bread", "bulbs of garlic"],
    "a school week": ["pencils", "packs of paper", "erasers", "rulers", "sticks of glue", "boxes of crayons", "notebooks", "rolls of tape"],
    "a beach day": ["bottles of sun cream", "hats", "towels", "bottles of water", "sandwiches", "balls", "buckets", "pieces of fruit"],
}

EVENTS = ["a birthday party", "a picnic", "a music evening", "a garden lunch", "a games night", "a kite day", "a bake sale"]
# Only things a guest could carry, unlike the general NOUNS table.
BRING_ITEMS = ["blanket", "basket", "lantern", "drum", "violin", "teapot", "kite", "cake", "ball", "candle", "apple pie"]
NOTE_EXTRAS = [
    "There will be cake and lemonade for everyone.",
    "We will play games and sing songs.",
    "My grandmother is baking her famous apple pie.",
    "If it rains, we will move inside.",
    "You can bring your little brother too.",
    "We will fly kites if there is enough wind.",
]

# Fictional-entity attribute tables for the "describe" and "reading" families.
SYLLABLES = ["ka", "lo", "mi", "zu", "ren", "tor", "vel", "bri", "no", "sha", "qua", "dri", "pel", "um", "fy"]

ANIMAL_BODIES = ["a long tail", "six short legs", "soft blue fur", "large round eyes", "tiny wings", "a striped back", "a curly horn", "webbed feet"]
ANIMAL_HOMES = ["deep caves", "tall trees", "sandy dunes", "cold mountains", "warm swamps", "quiet meadows", "old ruins"]
ANIMAL_FOODS = ["berries", "small fish", "leaves", "seeds", "mushrooms", "roots", "insects", "moss"]
ANIMAL_HABITS = [
    "It sleeps during the day and hunts at night, when the air is cool.",
    "It sings a low song when it rains, and others answer from far away.",
    "It lives in groups of ten or more and shares its food with the young.",
    "It builds nests out of twigs and mud near running water.",
    "It can hold its breath for a long time and swims very well.",
    "It is shy and hides when people come near, so few have seen it.",
    "It rolls into a ball when it is afraid and waits until the danger is gone.",
    "It travels far every spring to find food and comes back in the autumn.",
]

TOWN_FEATURES = ["a stone bridge", "a clock tower", "a busy market", "a small harbor", "an old castle", "a green park", "a wooden mill", "a quiet library"]
TOWN_TRADES = ["fishing", "baking bread", "weaving cloth", "making pottery", "growing apples", "building boats", "keeping bees"]
TOWN_FACTS = [
    "Every summer the town holds a lantern festival, and people come from far away to see it.",
    "The streets are narrow and paved with gray stone, so carts move slowly.",
    "Most houses have red roofs and blue doors, and many have flowers in the windows.",
    "A river runs through the middle of the town and turns the wheel of the mill.",
    "The town is famous for its honey cakes, which are sold at the market every morning.",
    "Children learn to swim in the lake nearby as soon as the water is warm.",
    "Snow covers the town for half of the year, and everyone owns a sled.",
    "Travelers stop here to rest on their way north before they cross the hills.",
]

PLANET_SKIES = ["a pink sky", "a green sky", "a purple sky", "a pale yellow sky", "a dark blue sky"]
PLANET_SURFACES = ["red sand", "ice", "deep oceans", "glass hills", "thick forests", "black rock", "bright crystals"]
PLANET_FACTS = [
    "A day there lasts thirty hours, and a year lasts almost four hundred days.",
    "Strong winds blow across its plains and carry the sand for many miles.",
    "Its oceans glow faintly at night, so the dark side is never fully dark.",
    "No one has ever landed on its surface, but many ships have flown past it.",
    "Tall towers of stone rise from its deserts, shaped by wind and time.",
    "It has rings made of dust and ice that shine when the sun is low.",
    "Its nights are very long and very cold, and the air turns to frost.",
    "Small creatures live under its ice and feed on the warm water below.",
]

UNIT_CONVERSIONS = [
    # (from_unit, to_unit, factor) chosen so results stay whole numbers.
    ("meters", "centimeters", 100),
    ("kilometers", "meters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("years", "months", 12),
    ("dozens", "items", 12),
]

STORY_OPENINGS = [
    "Once upon a time, {hero} lived in a {adj} little house near {place}, with a {color} door and a garden full of flowers.",
    "One {adj} morning, {hero} woke up early, looked out of the window and saw a {color} sky above the quiet houses.",
    "Long ago, in a {adj} village between the hills and the sea, there lived {hero}, who knew every path and every stone.",
    "On a {adj} day in spring, {hero} packed a bag with bread and water and went for a long walk to {place}.",
]
STORY_MIDDLES = [
    "On the way, {hero} found a {adj} {noun} lying on the path, picked it up with great care and put it in a {color} bag.",
    "Soon {hero} met {friend}, who was looking everywhere for a lost {noun} and looked very worried about it.",
    "Then the sky turned {color}, the wind began to blow, and the tall trees bent low over the narrow road.",
    "{friend} said, \"Let us go to {place} together, because it is not safe to walk alone when it gets dark.\"",
    "They walked past a {adj} {noun} and stopped for a while to look at it, talk about it and rest their feet.",
    "{hero} was hungry after the long walk, so {friend} opened a basket and shared some bread and a piece of cheese.",
    "A {adj} bird sat on the {noun}, sang a short song about the weather, and then flew away over the roofs.",
    "Suddenly they heard a strange sound coming from {place}, and they both stood very still and listened.",
    "{hero} climbed up a {adj} ladder to see what was there, while {friend} held it steady with both hands.",
    "Behind the old {noun}, they found a small {color} door that nobody in the village had opened for many years.",
    "{friend} laughed out loud and said that it was only a {noun} moving in the wind, and there was nothing to fear.",
    "The path became steep and rocky, but they kept going and helped each other at every difficult step.",
    "It started to rain very hard, so they waited under a {adj} tree until the gray clouds moved away to the east.",
    "{hero} helped {friend} carry a heavy {noun} all the way to {place}, and it took them most of the afternoon.",
    "At noon they sat down by {place}, ate a few apples, and counted the boats that sailed slowly across the water.",
    "A {adj} kitten with {color} paws followed them all the way and would not go home, no matter what they said.",
    "Inside the door there was a {color} box, and inside the box there was a tiny {noun} wrapped in soft cloth.",
    "{hero} remembered an old song about a {noun}, and they sang it together as they walked along the river.",
    "When they reached {place}, an old man told them a story about a {adj} {noun} that could grant one small wish.",
    "{friend} drew a map of the way back on a piece of paper, so that they would not get lost later.",
]
STORY_ENDINGS = [
    "In the evening, {hero} went home tired and happy and told everyone at the table about the long and strange day.",
    "From that day on, {hero} and {friend} were the best of friends, and they met every week to walk to {place}.",
    "{hero} smiled before going to sleep, because it had been a wonderful day full of small surprises and kind people.",
    "And so the {noun} was safe again, everyone in the village cheered, and the baker gave each child a warm roll.",
    "At last they returned home under the first stars, and {hero} slept well and dreamed of {place} all night.",
]
STORY_EPILOGUES = [
    "Many years later, {hero} still kept the {noun} on a shelf by the window and smiled every time they saw it.",
    "The next spring, {hero} and {friend} went back to {place} again, but everything there was quiet and calm.",
    "People in the village still tell this story to their children on long winter evenings by the fire.",
]
STORY_MORALS = [
    "The lesson of the story is that friends make every road shorter, even when the road is long and steep.",
    "The lesson of the story is that it pays to be patient and kind, because good things often come slowly.",
    "The lesson of the story is that small things can matter a great deal to the people who need them.",
    "The lesson of the story is that courage grows when it is shared with a friend who walks beside you.",
]

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
        return ONES[value]
    if value < 100:
        tens, ones = divmod(value, 10)
        return TENS[tens] + ("-" + ONES[ones] if ones else "")
    hundreds, rest = divmod(value, 100)
    words = ONES[hundreds] + " hundred"
    return words + (" " + number_in_words(rest) if rest else "")


def fictional_name(rng, syllable_count):
    return "".join(rng.choice(SYLLABLES) for _ in range(syllable_count)).capitalize()


def simple_sentence(rng):
    """A short present-tense sentence whose verb is in PAST_TENSE."""
    subject = rng.choice(PEOPLE + [t.capitalize() for t in TITLES])
    verb = rng.choice(sorted(PAST_TENSE))
    obj = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    # Time phrases stay tense-neutral so the past-tense rewrite remains correct.
    tail = rng.choice(["", "", f" at {rng.choice(PLACES)}", " in the morning", " after lunch", " with a friend"])
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
        instruction = rng.choice([f"Multiply {a} by {b}.", f"What is {a} times {b}?", f"Find the product of {a} and {b}."])
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
    words = rng.sample(NOUNS + COLORS, rng.randint(3, 10))
    instruction = rng.choice(["Sort these words in alphabetical order.", "Put the following words in alphabetical order."])
    output = f"In alphabetical order, the words are: {', '.join(sorted(words))}."
    return make_row(instruction, ", ".join(words), output)


def task_reverse_words(rng):
    sentence = simple_sentence(rng).rstrip(".")
    words = sentence.split()
    instruction = rng.choice([
        "Reverse the order of the words in this sentence.",
        "Write the words of the sentence in reverse order.",
    ])
    return make_row(instruction, sentence, " ".join(reversed(words)))


def task_count(rng):
    if rng.random() < 0.5:
        text = " ".join(simple_sentence(rng) for _ in range(rng.randint(1, 3)))
        words = text.replace(".", "").split()
        numbered = ", ".join(f"{i} {w}" for i, w in enumerate(words, start=1))
        output = f"Counting them one by one: {numbered}. The text has {len(words)} words."
        return make_row("Count the words in the following text.", text, output)
    word = rng.choice(NOUNS + ADJECTIVES + COLORS)
    letter = rng.choice(sorted(set(word)) + ["e", "a", "o"])
    count = word.count(letter)
    instruction = f"How many times does the letter \"{letter}\" appear in the word \"{word}\"?"
    plural = "time" if count == 1 else "times"
    output = f"The word \"{word}\" is spelled {'-'.join(word)}. The letter \"{letter}\" appears {count} {plural}."
    return make_row(instruction, "", output)


def task_uppercase(rng):
    if rng.random() < 0.5:
        phrase = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} near {rng.choice(PLACES)}"
    else:
        phrase = simple_sentence(rng).lower()
    if rng.random() < 0.5:
        return make_row("Convert the following text to upper case.", phrase, phrase.upper())
    return make_row("Capitalize the first letter of every word.", phrase, phrase.title())


def task_antonym(rng):
    shape = rng.random()
    if shape < 0.3:
        word = rng.choice(sorted(ANTONYMS))
        opposite = ANTONYMS[word]
        instruction = rng.choice([f"What is the opposite of \"{word}\"?", f"Give an antonym for the word \"{word}\"."])
        output = (
            f"The opposite of \"{word}\" is \"{opposite}\". The two words mean contrary things, "
            f"so one cannot be both {word} and {opposite} at once."
        )
        return make_row(instruction, "", output)
    if shape < 0.6:
        first, second = rng.sample(sorted(ANTONYMS), 2)
        instruction = f"What are the opposites of \"{first}\" and \"{second}\"?"
        output = (
            f"The opposite of \"{first}\" is \"{ANTONYMS[first]}\", "
            f"and the opposite of \"{second}\" is \"{ANTONYMS[second]}\"."
        )
        return make_row(instruction, "", output)
    words = rng.sample(sorted(ANTONYMS), rng.randint(3, 8))
    lines = [f"{w} - {ANTONYMS[w]}" for w in words]
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
        body = rng.sample(ANIMAL_BODIES, 2)
        home, foods = rng.choice(ANIMAL_HOMES), join_with_and(rng.sample(ANIMAL_FOODS, 2))
        sentences = [
            f"The {animal} is a {rng.choice(ADJECTIVES)} animal with {body[0]} and {body[1]}.",
            f"It lives in {home} and eats {foods}.",
        ]
        sentences += rng.sample(ANIMAL_HABITS, extra_count)
        instruction = f"Describe the {animal}, a fictional animal."
        questions = [
            (f"Where does the {animal} live?", f"The {animal} lives in {home}."),
            (f"What does the {animal} eat?", f"The {animal} eats {foods}."),
        ]
    elif kind == "town":
        features, trade, people = join_with_and(rng.sample(TOWN_FEATURES, 2)), rng.choice(TOWN_TRADES), rng.randint(2, 90) * 100
        sentences = [
            f"{name} is a {rng.choice(ADJECTIVES)} town with {features}.",
            f"About {people} people live there, and most of them earn their living by {trade}.",
        ]
        sentences += rng.sample(TOWN_FACTS, extra_count)
        instruction = f"Write a short description of {name}, a fictional town."
        questions = [
            (f"How many people live in {name}?", f"About {people} people live in {name}."),
            (f"How do most people in {name} earn their living?", f"Most people in {name} earn their living by {trade}."),
        ]
    else:
        moons = rng.randint(0, 5)
        moon_text = "no moons" if moons == 0 else f"{ONES[moons]} moon" + ("s" if moons > 1 else "")
        surface = rng.choice(PLANET_SURFACES)
        sentences = [
            f"{name} is a {rng.choice(['small', 'large', 'distant', 'cold', 'hot'])} planet with {rng.choice(PLANET_SKIES)}.",
            f"Its surface is covered with {surface}, and it has {moon_text}.",
        ]
        sentences += rng.sample(PLANET_FACTS, extra_count)
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
    hero, friend = rng.sample(PEOPLE, 2)
    if rng.random() < 0.3:
        hero = rng.choice(TITLES)
    # Exponential draw: most stories are short, a few run to 12 sentences.
    middle_count = min(9, int(rng.expovariate(1 / 4.0)))
    slots = {"hero": hero, "friend": friend}

    def fill(template):
        text = template.format(
            place=rng.choice(PLACES), adj=rng.choice(ADJECTIVES), noun=rng.choice(NOUNS),
            color=rng.choice(COLORS), **slots,
        )
        return text[0].upper() + text[1:]

    sentences = [fill(rng.choice(STORY_OPENINGS))]
    sentences += [fill(t) for t in rng.sample(STORY_MIDDLES, middle_count)]
    sentences.append(fill(rng.choice(STORY_ENDINGS)))
    if middle_count >= 3 and rng.random() < 0.5:
        sentences.append(fill(rng.choice(STORY_EPILOGUES)))
    story = " ".join(sentences)
    if middle_count >= 3 and rng.random() < 0.6:
        # Longer stories sometimes get a title and a moral, as fables do.
        title = f"{hero} and the {rng.choice(ADJECTIVES).capitalize()} {rng.choice(NOUNS).capitalize()}"
        story = f"Title: {title[0].upper() + title[1:]}\n\n{story}\n\n{rng.choice(STORY_MORALS)}"
    topic = f"{hero} and a {rng.choice(NOUNS)}"
    if rng.random() < 0.4:
        return make_row("Write a short story about the given topic.", topic, story)
    return make_row(f"Tell a short story about {topic}.", "", story)


def task_unit_conversion(rng):
    from_unit, to_unit, factor = rng.choice(UNIT_CONVERSIONS)
    amount = rng.randint(2, 60)
    instruction = rng.choice([f"Convert {amount} {from_unit} to {to_unit}.", f"How many {to_unit} are in {amount} {from_unit}?"])
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
        rewritten.append(" ".join(PAST_TENSE.get(w, w) for w in words))
    instruction = rng.choice(["Rewrite the text in the past tense.", "Change the following text to the past tense."])
    return make_row(instruction, " ".join(sentences), " ".join(rewritten))


def task_shopping_list(rng):
    occasion = rng.choice(sorted(SHOPPING_ITEMS))
    items = rng.sample(SHOPPING_ITEMS[occasion], rng.randint(3, 8))
    quantities = [rng.randint(2, 6) for _ in items]
    lines = [f"{i}. {ONES[q]} {item}" for i, (q, item) in enumerate(zip(quantities, items), start=1)]
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
        output = f"The number {value} is written as \"{number_in_words(value)}\"."
        return make_row(f"Write the number {value} in words.", "", output)
    values = rng.sample(range(0, 1000), rng.randint(3, 6))
    return make_row(
        "Write each number in words, one per line.",
        ", ".join(map(str, values)),
        "\n".join(f"{v}: {number_in_words(v)}" for v in values),
    )


def task_invitation(rng):
    sender, guest = rng.sample(PEOPLE, 2)
    event, place, day = rng.choice(EVENTS), rng.choice(PLACES), rng.choice(DAYS)
    hour = rng.randint(1, 7)
    bring = rng.choice(BRING_ITEMS)
    extras = rng.sample(NOTE_EXTRAS, rng.randint(0, 3))
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
