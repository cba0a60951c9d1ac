"""Word lists shared by the task generators and the zoo tokenizer.

Every word here is a single token of the zoo's word-level tokenizer (``circuits/zoo/tokenizer.py``
builds its vocabulary from these lists) and, written with a leading space, a single GPT-2 token too
(the IOI names are taken from the name list of Wang et al. 2022, the greater-than nouns from Hanna et
al. 2023), so the generated prompts also work on hub models such as ``gpt2``.
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
