"""The word tables of the synthetic demo data (assets/generate_tiny_data.py), written for this project.

Kept small on purpose so the vocabulary stays around a thousand words and a 2048-token byte-level BPE covers it
well. Changing any entry changes the shipped data set (tests/test_assets.py rebuilds it and compares).
"""

ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

NOUNS = [
    "apple",
    "river",
    "garden",
    "window",
    "candle",
    "basket",
    "mountain",
    "pencil",
    "bridge",
    "lantern",
    "forest",
    "kitten",
    "rocket",
    "blanket",
    "harbor",
    "meadow",
    "teapot",
    "violin",
    "ladder",
    "pebble",
    "island",
    "feather",
    "wagon",
    "cloud",
    "button",
    "orchard",
    "compass",
    "drum",
]

ADJECTIVES = [
    "quiet",
    "bright",
    "small",
    "green",
    "gentle",
    "brave",
    "proud",
    "shiny",
    "curious",
    "sleepy",
    "tall",
    "warm",
    "clever",
    "round",
    "soft",
    "busy",
]

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "brown", "white", "gray"]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "early": "late",
    "open": "closed",
    "full": "empty",
    "hard": "soft",
    "high": "low",
    "long": "short",
    "loud": "quiet",
    "new": "old",
    "rich": "poor",
    "strong": "weak",
    "wet": "dry",
    "young": "old",
    "thick": "thin",
    "clean": "dirty",
    "heavy": "light",
    "near": "far",
    "first": "last",
    "true": "false",
    "up": "down",
    "inside": "outside",
    "above": "below",
    "win": "lose",
    "push": "pull",
    "give": "take",
    "begin": "end",
    "buy": "sell",
    "remember": "forget",
    "arrive": "leave",
    "laugh": "cry",
    "awake": "asleep",
    "brave": "afraid",
    "wide": "narrow",
    "deep": "shallow",
    "sweet": "sour",
    "smooth": "rough",
}

# Present -> past for the third person singular: mostly regular "-ed" verbs a
# tiny model can generalise over, plus a handful of common irregulars to memorise.
PAST_TENSE = {
    "walks": "walked",
    "jumps": "jumped",
    "plays": "played",
    "opens": "opened",
    "paints": "painted",
    "cleans": "cleaned",
    "watches": "watched",
    "visits": "visited",
    "cooks": "cooked",
    "climbs": "climbed",
    "carries": "carried",
    "finds": "found",
    "sees": "saw",
    "eats": "ate",
    "runs": "ran",
    "writes": "wrote",
    "makes": "made",
    "takes": "took",
    "gives": "gave",
    "sings": "sang",
    "builds": "built",
    "reads": "read",
    "brings": "brought",
    "buys": "bought",
    "draws": "drew",
    "holds": "held",
}

PEOPLE = [
    "Mira",
    "Tobin",
    "Lena",
    "Oskar",
    "Pia",
    "Ravi",
    "Nell",
    "Arlo",
    "Juno",
    "Ezra",
    "Tess",
    "Milo",
    "Ada",
    "Finn",
    "Ivy",
    "Bram",
    "Cora",
    "Dov",
]

TITLES = [
    "the baker",
    "the farmer",
    "the teacher",
    "the sailor",
    "the painter",
    "the old miner",
    "the young fox",
    "the little robot",
]

PLACES = [
    "the market",
    "the hill",
    "the library",
    "the harbor",
    "the old mill",
    "the garden",
    "the station",
    "the bakery",
    "the lake",
    "the square",
]

SHOPPING_ITEMS = {
    "a picnic": [
        "loaves of bread",
        "pieces of cheese",
        "apples",
        "bunches of grapes",
        "bottles of lemonade",
        "packs of napkins",
        "cookies",
        "carrots",
    ],
    "a birthday party": [
        "cakes",
        "boxes of candles",
        "balloons",
        "bottles of juice",
        "packs of paper plates",
        "cups",
        "ribbons",
        "cookies",
    ],
    "a camping trip": [
        "tents",
        "lamps",
        "boxes of matches",
        "bags of rice",
        "cans of beans",
        "bottles of water",
        "ropes",
        "pairs of socks",
    ],
    "breakfast": [
        "eggs",
        "bottles of milk",
        "loaves of bread",
        "blocks of butter",
        "bags of oats",
        "jars of honey",
        "bananas",
        "jars of jam",
    ],
    "a soup dinner": [
        "onions",
        "carrots",
        "potatoes",
        "bags of salt",
        "cans of beans",
        "sticks of celery",
        "loaves of bread",
        "bulbs of garlic",
    ],
    "a school week": [
        "pencils",
        "packs of paper",
        "erasers",
        "rulers",
        "sticks of glue",
        "boxes of crayons",
        "notebooks",
        "rolls of tape",
    ],
    "a beach day": [
        "bottles of sun cream",
        "hats",
        "towels",
        "bottles of water",
        "sandwiches",
        "balls",
        "buckets",
        "pieces of fruit",
    ],
}

EVENTS = [
    "a birthday party",
    "a picnic",
    "a music evening",
    "a garden lunch",
    "a games night",
    "a kite day",
    "a bake sale",
]
# Only things a guest could carry, unlike the general NOUNS table.
BRING_ITEMS = [
    "blanket",
    "basket",
    "lantern",
    "drum",
    "violin",
    "teapot",
    "kite",
    "cake",
    "ball",
    "candle",
    "apple pie",
]
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

ANIMAL_BODIES = [
    "a long tail",
    "six short legs",
    "soft blue fur",
    "large round eyes",
    "tiny wings",
    "a striped back",
    "a curly horn",
    "webbed feet",
]
ANIMAL_HOMES = [
    "deep caves",
    "tall trees",
    "sandy dunes",
    "cold mountains",
    "warm swamps",
    "quiet meadows",
    "old ruins",
]
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

TOWN_FEATURES = [
    "a stone bridge",
    "a clock tower",
    "a busy market",
    "a small harbor",
    "an old castle",
    "a green park",
    "a wooden mill",
    "a quiet library",
]
TOWN_TRADES = [
    "fishing",
    "baking bread",
    "weaving cloth",
    "making pottery",
    "growing apples",
    "building boats",
    "keeping bees",
]
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
    '{friend} said, "Let us go to {place} together, because it is not safe to walk alone when it gets dark."',
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
