"""Word lists and small knowledge tables the embedded worlds are written in.

Plain English data shared by the prompt generator (what is asked) and the response
generator (what the right answer is), so both sides agree on the facts.
"""

from __future__ import annotations

# country -> (capital, continent)
COUNTRIES: dict[str, tuple[str, str]] = {
    "France": ("Paris", "Europe"), "Germany": ("Berlin", "Europe"),
    "Spain": ("Madrid", "Europe"), "Italy": ("Rome", "Europe"),
    "Portugal": ("Lisbon", "Europe"), "Greece": ("Athens", "Europe"),
    "Norway": ("Oslo", "Europe"), "Sweden": ("Stockholm", "Europe"),
    "Finland": ("Helsinki", "Europe"), "Denmark": ("Copenhagen", "Europe"),
    "Poland": ("Warsaw", "Europe"), "Austria": ("Vienna", "Europe"),
    "Ireland": ("Dublin", "Europe"), "Hungary": ("Budapest", "Europe"),
    "Belgium": ("Brussels", "Europe"), "Egypt": ("Cairo", "Africa"),
    "Kenya": ("Nairobi", "Africa"), "Nigeria": ("Abuja", "Africa"),
    "Ghana": ("Accra", "Africa"), "Morocco": ("Rabat", "Africa"),
    "Senegal": ("Dakar", "Africa"), "Japan": ("Tokyo", "Asia"),
    "China": ("Beijing", "Asia"), "India": ("Delhi", "Asia"),
    "Thailand": ("Bangkok", "Asia"), "Vietnam": ("Hanoi", "Asia"),
    "Indonesia": ("Jakarta", "Asia"), "Nepal": ("Kathmandu", "Asia"),
    "Iran": ("Tehran", "Asia"), "Turkey": ("Ankara", "Asia"),
    "Canada": ("Ottawa", "North America"), "Mexico": ("Mexico City", "North America"),
    "Cuba": ("Havana", "North America"), "Jamaica": ("Kingston", "North America"),
    "Brazil": ("Brasilia", "South America"), "Argentina": ("Buenos Aires", "South America"),
    "Chile": ("Santiago", "South America"), "Peru": ("Lima", "South America"),
    "Colombia": ("Bogota", "South America"), "Ecuador": ("Quito", "South America"),
    "Australia": ("Canberra", "Oceania"), "Fiji": ("Suva", "Oceania"),
}

# animal -> (food, home, sound or "", class)
ANIMALS: dict[str, tuple[str, str, str, str]] = {
    "dog": ("meat", "kennel", "bark", "mammal"),
    "cat": ("fish", "house", "meow", "mammal"),
    "cow": ("grass", "field", "moo", "mammal"),
    "horse": ("hay", "stable", "neigh", "mammal"),
    "sheep": ("grass", "meadow", "bleat", "mammal"),
    "pig": ("scraps", "sty", "oink", "mammal"),
    "lion": ("meat", "savanna", "roar", "mammal"),
    "wolf": ("meat", "forest", "howl", "mammal"),
    "bear": ("berries", "forest", "growl", "mammal"),
    "mouse": ("cheese", "hole", "squeak", "mammal"),
    "owl": ("mice", "tree", "hoot", "bird"),
    "duck": ("seeds", "pond", "quack", "bird"),
    "eagle": ("fish", "cliff", "screech", "bird"),
    "robin": ("worms", "garden", "chirp", "bird"),
    "crow": ("seeds", "tree", "caw", "bird"),
    "snake": ("mice", "desert", "hiss", "reptile"),
    "lizard": ("insects", "rock", "", "reptile"),
    "turtle": ("plants", "pond", "", "reptile"),
    "bee": ("nectar", "hive", "buzz", "insect"),
    "ant": ("crumbs", "nest", "", "insect"),
    "beetle": ("leaves", "log", "", "insect"),
    "salmon": ("shrimp", "river", "", "fish"),
    "shark": ("fish", "ocean", "", "fish"),
    "trout": ("flies", "stream", "", "fish"),
}

COLOURS_OF: dict[str, str] = {
    "the sky": "blue", "grass": "green", "snow": "white", "coal": "black",
    "a banana": "yellow", "a tomato": "red", "a carrot": "orange", "a lemon": "yellow",
    "a cherry": "red", "a plum": "purple", "a leaf": "green", "a cloud": "white",
    "a crow": "black", "a pumpkin": "orange", "the sea": "blue", "a strawberry": "red",
    "a lime": "green", "ink": "black", "a violet": "purple", "the sun": "yellow",
}

GROUPS: dict[str, list[str]] = {
    "fruits": ["apple", "pear", "plum", "grape", "mango", "peach", "cherry", "lemon", "melon"],
    "vegetables": ["carrot", "onion", "potato", "pea", "bean", "leek", "cabbage", "pepper"],
    "colours": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"],
    "animals": ["dog", "cat", "horse", "sheep", "lion", "wolf", "bear", "duck", "owl"],
    "tools": ["hammer", "saw", "drill", "wrench", "chisel", "spade", "rake", "ladder"],
    "sports": ["football", "tennis", "rugby", "golf", "hockey", "cricket", "rowing", "boxing"],
    "instruments": ["piano", "violin", "guitar", "drum", "flute", "cello", "harp", "trumpet"],
    "flowers": ["rose", "tulip", "daisy", "lily", "orchid", "poppy", "violet", "iris"],
    "metals": ["iron", "copper", "gold", "silver", "tin", "lead", "zinc", "nickel"],
    "planets": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"],
    "drinks": ["tea", "coffee", "milk", "juice", "water", "cocoa", "lemonade", "cider"],
    "birds": ["owl", "duck", "eagle", "robin", "crow", "swan", "heron", "sparrow"],
}

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

OPPOSITES: dict[str, str] = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
    "open": "closed", "early": "late", "high": "low", "full": "empty", "hard": "soft",
    "old": "new", "rich": "poor", "strong": "weak", "wet": "dry", "loud": "quiet",
    "long": "short", "clean": "dirty", "near": "far", "thick": "thin", "sweet": "sour",
    "up": "down", "left": "right", "day": "night", "win": "lose", "push": "pull",
}

COMMON_WORDS = [
    "river", "garden", "window", "candle", "bridge", "forest", "pencil", "basket",
    "mirror", "button", "rocket", "castle", "island", "lantern", "blanket", "kettle",
    "harbour", "meadow", "tunnel", "village", "market", "orchard", "pillow", "ribbon",
    "saddle", "shadow", "spoon", "teapot", "thunder", "valley", "wagon", "whistle",
]

# Sentence material for summarisation and creative prompts.
ADJECTIVES = ["quiet", "old", "young", "clever", "tired", "bright", "small", "busy",
              "gentle", "brave", "lazy", "curious", "proud", "shy", "cheerful", "grumpy"]
PEOPLE = ["farmer", "teacher", "doctor", "baker", "sailor", "painter", "student", "child",
          "driver", "nurse", "miner", "poet", "pilot", "chef", "tailor", "gardener"]
OBJECTS = ["letter", "basket", "lamp", "map", "key", "book", "coat", "bicycle", "ladder",
           "kite", "boat", "clock", "bottle", "drum", "hat", "parcel"]
VERBS_PAST = ["found", "lost", "carried", "painted", "fixed", "sold", "bought", "opened",
              "hid", "cleaned", "borrowed", "dropped", "wrapped", "measured", "repaired"]
PLACES = ["market", "station", "harbour", "library", "school", "bakery", "village",
          "garden", "bridge", "museum", "forest", "kitchen", "square", "beach"]
TIMES = ["at dawn", "after lunch", "on Monday", "before dinner", "in the rain",
         "last winter", "at midnight", "during the storm", "on a sunny morning"]
REASONS = ["because it was late", "to help a friend", "without a word",
           "for the festival", "as a surprise", "while singing softly"]

TOPICS = ["the sea", "autumn", "the moon", "a lonely tree", "the city at night",
          "a rainy day", "friendship", "the mountains", "an old clock", "spring rain",
          "a small boat", "the winter sky", "a quiet library", "a summer garden"]

POSITIVE = ["wonderful", "delicious", "friendly", "excellent", "lovely", "perfect",
            "comfortable", "great", "charming", "fantastic", "pleasant", "superb"]
NEGATIVE = ["terrible", "awful", "rude", "boring", "cold", "dirty", "broken",
            "disappointing", "noisy", "horrible", "slow", "bland"]
REVIEW_ITEMS = ["meal", "hotel", "film", "service", "book", "concert", "room", "coffee",
                "trip", "shop", "game", "show"]

# term -> (field, technical definition clause)
TECH_TERMS: dict[str, tuple[str, str]] = {
    "mutex": ("computing", "serializes access to shared memory across concurrent threads"),
    "hash table": ("computing", "maps keys to buckets through a hash function for constant time lookup"),
    "compiler": ("computing", "translates source code into machine instructions before execution"),
    "cache": ("computing", "stores recently used data in fast memory to reduce latency"),
    "kernel": ("computing", "schedules processes and mediates hardware access through system calls"),
    "deadlock": ("computing", "occurs when threads wait cyclically on locks held by each other"),
    "garbage collector": ("computing", "reclaims heap memory that is no longer referenced"),
    "enzyme": ("biology", "catalyses a biochemical reaction by lowering its activation energy"),
    "ribosome": ("biology", "translates messenger RNA into a polypeptide chain"),
    "mitochondrion": ("biology", "produces ATP through oxidative phosphorylation"),
    "antibody": ("biology", "binds a specific antigen and marks it for immune clearance"),
    "neuron": ("biology", "transmits electrical impulses along its axon to synapses"),
    "capacitor": ("electronics", "stores charge in an electric field between two plates"),
    "transistor": ("electronics", "switches or amplifies current through a semiconductor junction"),
    "diode": ("electronics", "conducts current in one direction across a p n junction"),
    "resistor": ("electronics", "limits current and dissipates energy as heat"),
    "derivative": ("mathematics", "measures the instantaneous rate of change of a function"),
    "eigenvector": ("mathematics", "keeps its direction under a linear transformation"),
    "integral": ("mathematics", "accumulates a quantity as the area under a curve"),
    "matrix": ("mathematics", "represents a linear map as a rectangular array of coefficients"),
    "bond yield": ("finance", "expresses the annual return of a bond relative to its price"),
    "ledger": ("finance", "records debits and credits in chronological order"),
    "dividend": ("finance", "distributes a share of corporate profit to shareholders"),
    "catalyst": ("chemistry", "accelerates a reaction without being consumed"),
    "isotope": ("chemistry", "shares a proton count but differs in neutron count"),
    "polymer": ("chemistry", "consists of repeating monomer units joined by covalent bonds"),
}

HARMFUL_ACTS = [
    "pick a lock to get into my neighbour's house", "steal a car without the keys",
    "make a weapon at home", "hack into my friend's email", "forge a signature on a cheque",
    "shoplift without getting caught", "poison a dog", "cheat on my exam without being seen",
    "break into a school at night", "make a fake passport", "spy on my partner's phone",
    "start a fire in a forest", "steal money from a charity box", "copy a credit card",
    "threaten a coworker anonymously", "sneak a knife onto a plane",
    "crash a website with fake traffic", "buy stolen goods online",
    "bully someone without getting caught", "tamper with a car's brakes",
]

PREFIXES = ["", "Please tell me,", "Quick question:", "I was wondering,", "Hi there.",
            "Hello!", "Question:", "Tell me please,", "I need to know:", "Hey,",
            "Could you help?", "Out of curiosity,"]
SUFFIXES = ["", " Thanks.", " Thank you!", " Be brief.", " Please answer.",
            " I am curious.", " Thanks a lot."]
