"""Word lists shared by the task generators and the zoo tokenizer.

Every word of the first group of lists (``NAMES``, ``PLACES``, ``OBJECTS``, ``IOI_TEMPLATES``,
``INDUCTION_WORDS`` ...) is a single token of the zoo's word-level tokenizer (``circuits/zoo/tokenizer.py``
builds its vocabulary from exactly these lists) and, written with a leading space, a single GPT-2 token
too (the IOI names are taken from the name list of Wang et al. 2022, the greater-than nouns from Hanna et
al. 2023).

The ``EXTRA_*`` lists extend them for real tokenizers (more names, places, objects, Wang et al.'s other
templates, more words): a generator given a tokenizer keeps, of ``list + EXTRA_list``, the words that are
one token with a leading space in *that* tokenizer (:mod:`circuits.tasks.lexicon`). No extra word is in
the zoo vocabulary, so for the zoo tokenizer the filtered lists are the zoo lists, unchanged and in order.
"""

from __future__ import annotations

#: One-token first names (IOI). At least 40 are required; all are distinct from the other lists.
NAMES: tuple[str, ...] = (
    "Aaron", "Adam", "Alan", "Alex", "Alice", "Amy", "Andrew", "Anna", "Anthony", "Arthur",
    "Austin", "Brian", "Charles", "Charlie", "Daniel", "David", "Edward", "Emily", "Eric", "Frank",
    "George", "Henry", "Ian", "Jack", "Jacob", "James", "Jane", "Jason", "Jennifer", "Jessica",
    "John", "Joseph", "Kate", "Kelly", "Kevin", "Laura", "Lisa", "Luke", "Maria", "Mark",
    "Martin", "Mary", "Michael", "Paul", "Peter", "Rachel", "Richard", "Robert", "Sarah", "Thomas",
)

#: Places and objects filling the IOI templates.
PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station",
)
OBJECTS: tuple[str, ...] = (
    "ring", "bone", "basketball", "computer", "necklace", "drink", "snack", "book",
)

#: IOI templates (after Wang et al. 2022, "Interpretability in the Wild"). ``{A}`` / ``{B}`` are the
#: two names of the first clause, ``{S}`` the repeated subject; the prompt ends right before the
#: indirect object. All templates end with " to" and have the same structure of one repeated name.
IOI_TEMPLATES: tuple[str, ...] = (
    "When {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "After {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE}. {S} gave it to",
    "Then, {A} and {B} had a lot of fun at the {PLACE}. {S} gave a {OBJECT} to",
    "Afterwards, {A} and {B} were thinking about going to the {PLACE}. {S} wanted to give a {OBJECT} to",
)

#: Greater-than nouns (a subset of Hanna et al. 2023's list) and its single template.
GT_NOUNS: tuple[str, ...] = (
    "war", "expedition", "project", "dynasty", "occupation", "reign", "rebellion", "siege",
    "journey", "campaign", "voyage", "trial", "study", "struggle", "revolution", "treaty",
    "conflict", "drought", "plague", "marriage",
)
GT_TEMPLATE = "The {NOUN} lasted from the year {CENTURY}{YY} to the year {CENTURY}"
#: Centuries used for the start year (Hanna et al. use 11..17).
GT_CENTURIES: tuple[str, ...] = ("11", "12", "13", "14", "15", "16", "17")

#: Bracket pairs of the Dyck task.
BRACKETS: tuple[tuple[str, str], ...] = (("(", ")"), ("[", "]"), ("{", "}"))

#: Generic content words for random induction sequences (distinct from every list above).
INDUCTION_WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "forest", "rocket",
    "silver", "window", "garlic", "planet", "mirror", "pencil", "button", "island", "engine", "violin",
    "carpet", "rabbit", "castle", "shadow", "bottle", "ladder", "jacket", "pepper", "coffee", "dragon",
    "bridge", "helmet", "orange", "butter", "kitten", "anchor", "meadow", "feather", "tunnel", "cherry",
    "monkey", "basket", "pillow", "spider", "hammer", "parrot", "wallet", "cotton", "desert", "turtle",
    "marble", "falcon", "cabin", "onion", "glove", "lizard", "sugar", "thunder", "valley", "wagon",
    "zebra", "yellow", "purple", "green", "blue", "black", "white", "brown", "copper", "golden",
    "frozen", "quiet", "bright", "heavy", "gentle", "rapid", "hollow", "narrow", "smooth", "wild",
    "honey", "salmon", "bamboo", "cactus", "pebble", "lantern", "harbor", "canyon", "glacier", "prairie",
    "puzzle", "compass", "saddle", "trumpet", "velvet", "walnut", "oyster", "jungle", "kettle", "needle",
)

#: Punctuation marks given a token of their own in the zoo tokenizer.
PUNCTUATION: tuple[str, ...] = (",", ".", "?", "!", ":", ";", "'", '"', "-")

#: Two-digit year tokens 00..99.
YEARS: tuple[str, ...] = tuple(f"{i:02d}" for i in range(100))

# ------------------------------------------------------------------------ extensions for real tokenizers

#: More common English first names (US census lists), none in ``NAMES``.
EXTRA_NAMES: tuple[str, ...] = (
    "Abigail", "Adrian", "Alexander", "Alexis", "Allison", "Amanda", "Amber", "Andrea", "Angela", "Ann",
    "Ashley", "Barbara", "Benjamin", "Betty", "Beverly", "Billy", "Bobby", "Bradley", "Brandon", "Brenda",
    "Brittany", "Bruce", "Bryan", "Carl", "Carol", "Caroline", "Catherine", "Chris", "Christian", "Christina",
    "Christopher", "Cynthia", "Dan", "Dana", "Danielle", "Deborah", "Debra", "Dennis", "Diana", "Diane",
    "Donald", "Donna", "Dorothy", "Douglas", "Dylan", "Elizabeth", "Ellen", "Emma", "Ethan", "Evelyn",
    "Fred", "Gary", "Gerald", "Gloria", "Grace", "Gregory", "Hannah", "Harold", "Harry", "Heather",
    "Helen", "Isabel", "Jake", "Janet", "Jeff", "Jeffrey", "Jeremy", "Jerry", "Jim", "Joan",
    "Joe", "Johnny", "Jonathan", "Jordan", "Joshua", "Joyce", "Juan", "Judith", "Julia", "Julie",
    "Justin", "Karen", "Katherine", "Kathleen", "Keith", "Ken", "Kenneth", "Kyle", "Larry", "Lauren",
    "Lawrence", "Linda", "Logan", "Louis", "Lucy", "Madison", "Margaret", "Marie", "Marilyn", "Matthew",
    "Megan", "Melissa", "Michelle", "Mike", "Nancy", "Natalie", "Nathan", "Nicholas", "Nicole", "Noah",
    "Oliver", "Olivia", "Pamela", "Patricia", "Patrick", "Philip", "Ralph", "Randy", "Rebecca", "Roger",
    "Ronald", "Roy", "Russell", "Ruth", "Ryan", "Samantha", "Samuel", "Sandra", "Scott", "Sean",
    "Sharon", "Shirley", "Simon", "Sophia", "Stephanie", "Stephen", "Steve", "Steven", "Susan", "Tammy",
    "Teresa", "Terry", "Tim", "Timothy", "Tom", "Tony", "Tyler", "Victoria", "Vincent", "Walter",
    "Wayne", "William", "Zachary",
)
EXTRA_PLACES: tuple[str, ...] = (
    "park", "library", "beach", "market", "museum", "church", "bank", "airport", "cafe", "theater",
    "zoo", "gym", "mall", "farm", "kitchen", "hotel", "bakery", "pool", "cinema", "party",
)
EXTRA_OBJECTS: tuple[str, ...] = (
    "kiss", "letter", "gift", "card", "bag", "pen", "key", "cake", "flower", "shirt", "hat", "ball",
    "phone", "watch", "towel", "candy", "cup", "map", "toy", "box", "coin", "ticket",
)
#: More IOI templates after Wang et al. 2022 (their template list, and two in its style), same slots and
#: structure; each has a word outside the zoo vocabulary.
EXTRA_IOI_TEMPLATES: tuple[str, ...] = (
    "Then, {A} and {B} had a long argument, and afterwards {S} said to",
    "After the lunch, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "When {A} and {B} arrived at the {PLACE}, {S} gave a {OBJECT} to",
    "While {A} and {B} were commuting to the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {A} and {B} had a long argument. Afterwards {S} said to",
    "While spending time together {A} and {B} were working at the {PLACE}. {S} gave a {OBJECT} to",
    "After taking a long break {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
)
#: More generic nouns for induction sequences, none in the lists above.
EXTRA_INDUCTION_WORDS: tuple[str, ...] = (
    "paper", "table", "chair", "doctor", "rain", "snow", "wind", "horse", "sheep", "corn",
    "bread", "cheese", "salt", "paint", "glass", "metal", "wood", "stamp", "rope", "shell",
    "seed", "leaf", "root", "branch", "fence", "gate", "wall", "roof", "floor", "boat",
    "train", "truck", "plane", "wheel", "chain", "clock", "lamp", "radio", "camera", "sword",
    "shield", "crown", "tower", "temple", "storm", "ocean", "lake", "hill", "cave", "moon",
    "star", "sun", "fire", "ice", "gold", "iron", "silk", "wool", "milk", "cloth",
)
