"""What a caption states, as checkable facts: the input of the faithfulness evaluation.

A dataset that knows the program behind its captions (the scenes) states every fact exactly through its
`caption_facts` hook: the classes it names, "two" as two, absolute positions, relations and colours. Any
other dataset gets the general form, `named_class_facts`: each class whose name (or phrase) the caption
contains should be in the image. `sdsup.evaluation.faithfulness` checks facts against a label map (and the
image, for colours).
"""

import dataclasses
import re
from typing import Dict, List, Sequence, Tuple

KINDS = ("object", "count", "position", "relation", "colour")
RELATIONS = ("left of", "right of", "above", "below")
WHERE = ("left", "center", "right", "bottom")


@dataclasses.dataclass(frozen=True)
class Fact:
    """One statement of a caption about its image.

    kind      object (cls is present), count (cls as `count` instances; stated only for counts above one),
              position (cls's centre in `where`: the left, centre or right third, or the bottom third),
              relation (cls `relation` other, by centres), colour (cls painted `colour`, the nearest of
              `colour_choices` to its median pixel).
    count, size  what the caption gives the class, on every kind: the checker's calibration reads them
              (the scenes' "small"/"large"; "" where a caption does not say).
    """

    kind: str
    text: str
    cls: str
    count: int = 1
    size: str = ""
    where: str = ""
    relation: str = ""
    other: str = ""
    colour: str = ""
    colour_choices: Tuple[Tuple[str, Tuple[int, int, int]], ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown fact kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "relation" and (self.relation not in RELATIONS or not self.other):
            raise ValueError(f"relation fact {self.text!r} needs a relation in {RELATIONS} and another class")
        if self.kind == "position" and self.where not in WHERE:
            raise ValueError(f"position fact {self.text!r} needs `where` in {WHERE}")
        if self.kind == "colour" and self.colour not in dict(self.colour_choices):
            raise ValueError(f"colour fact {self.text!r}: {self.colour!r} is not among its colour choices")


def _phrase_pattern(phrase: str) -> "re.Pattern":
    # Whole words; a plural "s"/"es" still names the class ("two cars", "buildings").
    words = r"\s+".join(re.escape(w) for w in phrase.lower().split())
    return re.compile(rf"\b{words}(?:s|es)?\b")


def named_class_facts(caption: str, class_names: Sequence[str], phrases: Sequence[str] = ()) -> List[Fact]:
    """The general form for any dataset: an object fact for each class the caption names.

    A class is named when its phrase (`phrases`, else its name; ADE20K-style names "a, b, c" offer each
    comma-separated synonym) occurs as whole words, case-insensitively.
    """
    text = caption.lower()
    out = []
    for i, name in enumerate(class_names):
        phrase = phrases[i] if i < len(phrases) and phrases[i] else name
        synonyms = [s.strip() for s in phrase.split(",") if s.strip()]
        if any(_phrase_pattern(s).search(text) for s in synonyms):
            out.append(Fact("object", f"a {name}", name))
    return out


def kinds_count(facts: Sequence[Fact]) -> Dict[str, int]:
    return {k: sum(f.kind == k for f in facts) for k in KINDS}
