"""Caption text: the one normalisation every metric sees, and decoded captions rejoined to read like text."""

import re
import string

# Every ASCII punctuation character becomes a space, so "man's" and WordPiece's "man ' s" agree.
_PUNCTUATION_TO_SPACE = str.maketrans({char: " " for char in string.punctuation})

# Rejoining what WordPiece decoding splits apart, in order. BERT's decode puts a space between
# every token ("a man ' s red - dog , 3 : 30"); some versions remove the one before "," and ".".
_TIDY_RULES = (
    (re.compile(r"\s+([,.;:!?%)\]}])"), r"\1"),  # no space before closing punctuation
    (re.compile(r"([(\[{$#])\s+"), r"\1"),  # none after opening brackets and currency
    (re.compile(r"(\d)([.:])\s*(\d)"), r"\1\2\3"),  # 3.5, 3:30
    (re.compile(r"(\d),\s*(\d{3})\b"), r"\1,\2"),  # 1,000
    (re.compile(r"(\w)\s*([-/])\s*(?=\w)"), r"\1\2"),  # red-dog, and/or
    (re.compile(r"(\w)\s*'\s*(s|t|re|ve|ll|d|m)\b"), r"\1'\2"),  # man's, don't, they're
    (re.compile(r"\bo\s*'\s*clock\b"), "o'clock"),
)
# A quote with no letter or digit on either side stands alone: an opening or closing quote, or a
# plural possessive ("the kids ' toys"); one inside a word ("man's") is left alone.
_STANDALONE = {q: re.compile(rf"(?<!\w){q}(?!\w)") for q in ('"', "'")}
_PAIRED_QUOTES = {q: re.compile(rf"(?<!\w){q}\s*([^{q}]*?)\s*{q}(?!\w)") for q in ('"', "'")}
_PLURAL_POSSESSIVE = re.compile(r"(\ws)\s+'(?!\w)")  # the kids ' toys -> the kids' toys


def normalize_caption(text: str) -> str:
    """Lowercase, ASCII punctuation to spaces, single spaces: the text every metric sees, on both sides."""
    return " ".join(text.lower().translate(_PUNCTUATION_TO_SPACE).split())


def tidy_caption(text: str) -> str:
    """A decoded caption as a person writes it: "a man ' s red - dog , at 3 : 30" -> "a man's red-dog, at 3:30".

    Every place that shows or writes a caption (captions.csv, stdout, reports) gets its text from here.
    It never changes the words, only spaces around punctuation, so metrics are unaffected.
    """
    text = " ".join(text.split())
    for pattern, replacement in _TIDY_RULES:
        text = pattern.sub(replacement, text)
    for quote, pattern in _PAIRED_QUOTES.items():
        standalone = len(_STANDALONE[quote].findall(text))
        if standalone and standalone % 2 == 0:
            text = pattern.sub(rf"{quote}\1{quote}", text)
        elif quote == "'" and standalone == 1:
            text = _PLURAL_POSSESSIVE.sub(r"\1'", text)
    return text.strip()
