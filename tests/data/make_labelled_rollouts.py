"""Writes labelled_rollouts.jsonl: hand-labelled rollouts for measuring consistency judges.

Every item is a question (problem type, options), a `<think>` reasoning, an `<answer>` and a label: does the
reasoning lead to the answer? `true` consistent, `false` inconsistent, `null` the reasoning states no conclusion
("cannot tell"; a judge should abstain). The labels are typed here by hand, one per item, and were checked by
reading the JSONL; they are never computed by a judge. Only the two small loops over the synthetic task's
templates compute a label, from what the sentence says ("I see blue" names option C).

    python tests/data/make_labelled_rollouts.py   # rewrites lightning_veripo/verifier/data/labelled_rollouts.jsonl

Fields: id, problem_type, question, options, reasoning, answer, label, case (what the item exercises).
"""

from __future__ import annotations

import json
from pathlib import Path

# shipped with the package: the loop audits its judge on it (lightning_veripo.verifier.audit)
OUT = (
    Path(__file__).resolve().parents[2] / "lightning_veripo" / "verifier" / "data" / "labelled_rollouts.jsonl"
)

COLOUR = ("What colour is the moving square?", ("A. red", "B. green", "C. blue", "D. yellow"))
DIRECTION = ("Which direction does the square move?", ("A. left", "B. right", "C. up", "D. down"))
COMBO = (
    "What colour is the moving square and which way does it move?",
    ("A. red, down", "B. blue, up", "C. red, up", "D. blue, down"),
)
SHADES = ("What colour is the moving square?", ("A. red", "B. dark red", "C. blue", "D. light blue"))
ACTIVITY = (
    "What is the man doing?",
    ("A. washing dishes", "B. cooking dinner", "C. reading a book", "D. watching television"),
)
UNLETTERED = ("What colour is the moving square?", ("red", "green", "blue", "yellow"))
COUNT = "How many squares are in the video?"
DISTANCE = "How far does the square move, in pixels?"
SIZE = "How long is the table, in metres?"
SIGN = "What does the sign say?"
DOING = "What is the man doing?"

T, F, N = True, False, None
ITEMS: list[dict] = []


def add(problem_type: str, question: str, options, reasoning: str, answer: str, label, case: str) -> None:
    ITEMS.append(
        {
            "id": f"r{len(ITEMS):03d}",
            "problem_type": problem_type,
            "question": question,
            "options": list(options),
            "reasoning": reasoning,
            "answer": answer,
            "label": label,
            "case": case,
        }
    )


def mc(setup, reasoning: str, answer: str, label, case: str) -> None:
    add("multiple choice", setup[0], setup[1], reasoning, answer, label, case)


def num(question: str, reasoning: str, answer: str, label, case: str, kind: str = "numerical") -> None:
    add(kind, question, (), reasoning, answer, label, case)


def reg(question: str, reasoning: str, answer: str, label, case: str) -> None:
    num(question, reasoning, answer, label, case, "regression")


def ocr(reasoning: str, answer: str, label, case: str) -> None:
    add("OCR", SIGN, (), reasoning, answer, label, case)


def free(reasoning: str, answer: str, label, case: str) -> None:
    add("free-form", DOING, (), reasoning, answer, label, case)


# fmt: off
# --- the synthetic task's own templates (lightning_veripo.sft.reference_completion and the tiny corpus) -------
# "In the video I see <colour>, so the answer is <letter>.": consistent only when the letter is the colour's.
for i, colour in enumerate(("red", "green", "blue", "yellow")):
    right, other = "ABCD"[i], "ABCD"[(i + 1) % 4]
    mc(COLOUR, f"In the video I see {colour}, so the answer is {right}.", right, T, "both")
    mc(COLOUR, f"In the video I see {colour}, so the answer is {other}.", other, F, "both: content != letter")
for i, phrase in enumerate(("to the left", "to the right", "up", "down")):
    right, other = "ABCD"[i], "ABCD"[(i + 3) % 4]
    mc(DIRECTION, f"The square moves {phrase}, so the answer is {right}.", right, T, "both")
    mc(DIRECTION, f"The square moves {phrase}, so the answer is {other}.", other, F, "both: content != letter")

# --- multiple choice, colours ----------------------------------------------------------------------------------
mc(COLOUR, "After checking every frame, the answer is B.", "B", T, "letter-only")
mc(COLOUR, "After checking every frame, the answer is B.", "C", F, "letter-only")
mc(COLOUR, "I watched the clip twice. Therefore the answer is D.", "D", T, "letter-only")
mc(COLOUR, "I watched the clip twice. Therefore the answer is D.", "A", F, "letter-only")
mc(COLOUR, "The answer is (C).", "C", T, "letter-only")
mc(COLOUR, "I will choose D.", "D", T, "letter-only")
mc(COLOUR, "I will choose D.", "B", F, "letter-only")
mc(COLOUR, "Option A fits best.", "A", T, "letter-only")
mc(COLOUR, "So the answer is B.", "b", T, "letter-only")
mc(COLOUR, "So the answer is A. Wait, I misread the frame, so the answer is B.", "B", T, "self-correction")
mc(COLOUR, "So the answer is A. Wait, I misread the frame, so the answer is B.", "A", F, "self-correction")
mc(COLOUR, "The square looks red. Wait, I misread the frame, so the answer is C.", "C", T, "self-correction")
mc(COLOUR, "The square never changes. Therefore it is green.", "B", T, "content-only")
mc(COLOUR, "The square never changes. Therefore it is green.", "D", F, "content-only")
mc(COLOUR, "The square never changes. Therefore it is green.", "(B)", T, "content-only")
mc(COLOUR, "It moves across the frame and it is yellow, so yellow.", "D", T, "content-only")
mc(COLOUR, "So the colour is red.", "A", T, "content-only")
mc(COLOUR, "So the colour is red.", "C", F, "content-only")
mc(COLOUR, "So the colour is blue.", "blue", T, "content-only")
mc(COLOUR, "So the colour is blue.", "green", F, "content-only")
mc(COLOUR, "The moving square is blue.", "C", T, "content-only, no cue")
mc(COLOUR, "The moving square is blue.", "A", F, "content-only, no cue")
mc(COLOUR, "The square is red.", "A", T, "content-only, no cue")
mc(COLOUR, "The square is red.", "B", F, "content-only, no cue")
mc(COLOUR, "In the video I see blue, so the answer is B.", "B. green", F, "both: content != letter")
mc(COLOUR, "The square stays green, so the answer is B.", "B", T, "both")
mc(COLOUR, "The square is green in every frame, so the answer is B.", "B", T, "both")
mc(COLOUR, "The square looks blue in the first frame, so the answer is C.", "B", F, "both: letter != answer")
mc(COLOUR, "I see blue, so the answer is C.", "B", F, "both: letter != answer")
mc(COLOUR, "It is yellow. So the answer is D (yellow).", "D", T, "both")
mc(COLOUR, "It is yellow. So the answer is C.", "C", F, "both: content != letter")
mc(COLOUR, "So the answer is B, because the square is green.", "B", T, "both")
mc(COLOUR, "So the answer is B, because the square is red.", "B", F, "both: content != letter")
mc(COLOUR, "The answer is C: the moving square is blue.", "C", T, "both")
mc(COLOUR, "The answer is C: the moving square is yellow.", "C", F, "both: content != letter")
mc(COLOUR, "I first thought red, but it is blue, so the answer is C.", "C", T, "self-correction")
mc(COLOUR, "I first thought red, but it is blue, so the answer is C.", "A", F, "self-correction")
mc(COLOUR, "I first thought red, but it is blue, so the answer is A.", "A", F, "self-correction")
mc(COLOUR, "At first the square looked red. Wait, looking again it is blue. So the answer is C.", "C", T,
   "self-correction")
mc(COLOUR, "The square looks blue at first. Wait, that was the shadow; it is green, so the answer is B.", "B", T,
   "self-correction")
mc(COLOUR, "The square looks blue at first. Wait, that was the shadow; it is green, so the answer is B.", "C", F,
   "self-correction")
mc(COLOUR, "So the answer is A. Wait, the square is actually blue, so the answer is C.", "C", T, "self-correction")
mc(COLOUR, "So the answer is A. Wait, the square is actually blue, so the answer is C.", "A", F, "self-correction")
mc(COLOUR, "So the answer is B. Wait, it is blue.", "C", T, "self-correction")
mc(COLOUR, "So the answer is B. Wait, it is blue.", "B", F, "self-correction")
mc(COLOUR, "So the answer is A. Wait, the red one was the background, so the answer is B.", "B", T,
   "self-correction")
mc(COLOUR, "Hmm, red or green? Looking again it is green, so the answer is B.", "B", T, "self-correction")
mc(COLOUR, "It is green. No, wait, it is yellow. So the answer is D.", "D", T, "self-correction")
mc(COLOUR, "It is green. No, wait, it is yellow. So the answer is D.", "B", F, "self-correction")
mc(COLOUR, "The video shows a square moving around the frame.", "B", N, "no-conclusion")
mc(COLOUR, "Let me look at the frames carefully.", "A", N, "no-conclusion")
mc(COLOUR, "The options are red, green, blue and yellow.", "C", N, "no-conclusion")
mc(COLOUR, "There are four colours to choose from; I need to watch closely.", "D", N, "no-conclusion")
mc(COLOUR, "The square moves quickly from one side to the other.", "A", N, "no-conclusion")
mc(COLOUR, "The options are red, green, blue and yellow. The moving one is green, so the answer is B.", "B", T,
   "listing")
mc(COLOUR, "The options are red, green, blue and yellow. The moving one is green, so the answer is B.", "A", F,
   "listing")
mc(COLOUR, "Either red or blue could fit, and the moving square is blue, so the answer is C.", "C", T, "listing")
mc(COLOUR, "It is not red; it is blue, so the answer is C.", "C", T, "negation")
mc(COLOUR, "The square is blue, not red, so the answer is C.", "C", T, "negation")
mc(COLOUR, "The square is blue, not red, so the answer is A.", "A", F, "negation")
mc(COLOUR, "It isn't green, it is yellow. So the answer is D.", "D", T, "negation")

# --- multiple choice, directions -------------------------------------------------------------------------------
mc(DIRECTION, "It moves left at first, but then it clearly goes right, so the answer is B.", "B", T,
   "self-correction")
mc(DIRECTION, "The square on the left moves up, so the answer is C.", "C", T, "both")
mc(DIRECTION, "The square on the left moves up, so the answer is A.", "A", F, "both: content != letter")
mc(DIRECTION, "Frame by frame the square drifts downward.", "D", T, "content-only, no cue")
mc(DIRECTION, "Frame by frame the square goes down.", "D", T, "content-only, no cue")
mc(DIRECTION, "Frame by frame the square goes down.", "C", F, "content-only, no cue")
mc(DIRECTION, "Therefore it moves right.", "B", T, "content-only")
mc(DIRECTION, "Therefore it moves right.", "A", F, "content-only")
mc(DIRECTION, "So the answer is D.", "D", T, "letter-only")
mc(DIRECTION, "So the answer is D.", "C", F, "letter-only")
mc(DIRECTION, "It goes down, so the answer is up.", "up", F, "content-only: observation != conclusion")
mc(DIRECTION, "It goes down, so the answer is down.", "down", T, "content-only")
mc(DIRECTION, "The square moves up. Wait, are the frames reversed? No, they are in order. So the answer is C.", "C",
   T, "self-correction")

# --- multiple choice, multi-word options (activities) -----------------------------------------------------------
mc(ACTIVITY, "He stirs a pot on the stove, so he is cooking dinner. The answer is B.", "B", T, "both")
mc(ACTIVITY, "He stirs a pot on the stove, so he is cooking dinner. The answer is C.", "C", F,
   "both: content != letter")
mc(ACTIVITY, "He is cooking dinner, so the answer is A.", "A", F, "both: content != letter")
mc(ACTIVITY, "He turns the pages, so he is reading a book.", "C", T, "content-only")
mc(ACTIVITY, "He is reading a book.", "D", F, "content-only, no cue")
mc(ACTIVITY, "He is not watching television; he is reading a book, so the answer is C.", "C", T, "negation")
mc(ACTIVITY, "He could be washing dishes or cooking dinner; he stirs a pot, so the answer is B.", "B", T,
   "listing")

# --- multiple choice, one option's content inside another's ---------------------------------------------------
mc(SHADES, "The square is dark red, so the answer is B.", "B", T, "substring")
mc(SHADES, "The square is dark red, so the answer is A.", "A", F, "substring")
mc(SHADES, "The square is red, so the answer is A.", "A", T, "substring")
mc(SHADES, "The square is red, so the answer is B.", "B", F, "substring")
mc(SHADES, "It is light blue, so the answer is D.", "D", T, "substring")
mc(SHADES, "It is light blue, so the answer is C.", "C", F, "substring")
mc(SHADES, "It is blue, not light blue, so the answer is C.", "C", T, "substring, negation")
mc(SHADES, "Therefore it is dark red.", "B", T, "substring, content-only")
mc(SHADES, "Therefore it is dark red.", "A", F, "substring, content-only")
mc(SHADES, "The colour is reddish, so the answer is A.", "A", T, "letter-only")

# --- multiple choice, options combining two facts ---------------------------------------------------------------
mc(COMBO, "The square is red. It moves up. So the answer is C.", "C", T, "multi-part")
mc(COMBO, "The square is red. It moves up. So the answer is C.", "A", F, "multi-part")
mc(COMBO, "The square is red. It moves up. So the answer is B.", "B", F, "multi-part: content != letter")
mc(COMBO, "The square is red and it moves up, so the answer is C.", "C", T, "multi-part")
mc(COMBO, "The square is red, so the answer is C.", "C", T, "multi-part, one fact")
mc(COMBO, "The square is red, so the answer is B.", "B", F, "multi-part, one fact: content != letter")
mc(COMBO, "The square is blue and moves down, so the answer is D.", "D", T, "multi-part")
mc(COMBO, "The square is blue and moves down, so the answer is B.", "B", F, "multi-part: content != letter")
mc(COMBO, "Therefore it is red, up.", "C", T, "multi-part, content-only")
mc(COMBO, "Therefore it is red, up.", "A", F, "multi-part, content-only")
mc(COMBO, "The square is red. Wait, it is blue. It moves up. So the answer is B.", "B", T, "multi-part, self-correction")
mc(COMBO, "The square is red. Wait, it is blue. It moves up. So the answer is B.", "C", F, "multi-part, self-correction")
mc(COMBO, "It moves up, so the answer is A.", "A", F, "multi-part, one fact: content != letter")
mc(COMBO, "The square moves down and is red.", "A", T, "multi-part, no cue")
mc(COMBO, "The square moves down and is red.", "C", F, "multi-part, no cue")
mc(COMBO, "So the answer is D.", "D", T, "letter-only")
mc(COMBO, "There are red and blue squares; the blue one moves down, so the answer is D.", "D", T, "listing")
mc(COMBO, "The colour is hard to tell.", "C", N, "no-conclusion")
mc(COMBO, "The square is red, then it moves up, so the answer is A.", "A", F, "multi-part: content != letter")

# --- multiple choice, options without letters -------------------------------------------------------------------
mc(UNLETTERED, "The square is green, so the answer is B.", "B", T, "both")
mc(UNLETTERED, "The square is green, so the answer is C.", "C", F, "both: content != letter")
mc(UNLETTERED, "So it is green.", "green", T, "content-only")
mc(UNLETTERED, "So it is green.", "yellow", F, "content-only")

# --- numerical (counts) -------------------------------------------------------------------------------------
num(COUNT, "I count 3 squares, so the answer is 3.", "3", T, "both")
num(COUNT, "I count 3 squares, so the answer is 3.", "4", F, "both: conclusion != answer")
num(COUNT, "I count 3 squares, so the answer is 4.", "4", F, "both: stated != conclusion")
num(COUNT, "I count 3 squares. So the answer is 4.", "4", F, "both: stated != conclusion")
num(COUNT, "I count 6 squares, so the answer is 6.", "6", T, "both")
num(COUNT, "I count 6 squares, so the answer is 5.", "5", F, "both: stated != conclusion")
num(COUNT, "There are 2 red squares and 3 blue squares, so the answer is 5.", "5", T, "arithmetic")
num(COUNT, "There are 2 red squares and 3 blue squares, so the answer is 5.", "6", F, "arithmetic")
num(COUNT, "There are 2 red squares. There are 3 blue squares. So the answer is 5.", "5", T, "arithmetic")
num(COUNT, "I count 3 squares plus 1 hidden one, so the answer is 4.", "4", T, "arithmetic")
num(COUNT, "I count 3 objects. Wait, there are 2 objects.", "2", T, "self-correction")
num(COUNT, "I count 3 objects. Wait, there are 2 objects.", "3", F, "self-correction")
num(COUNT, "I count 3 squares. Wait, one is hidden behind another, so the answer is 4.", "4", T, "self-correction")
num(COUNT, "I first counted 2, but there are 3 squares, so the answer is 3.", "3", T, "self-correction")
num(COUNT, "I first counted 2, but there are 3 squares, so the answer is 2.", "2", F, "self-correction")
num(COUNT, "The answer is 3. Wait, I missed one in the corner, so the answer is 4.", "4", T, "self-correction")
num(COUNT, "The answer is 3. Wait, I missed one in the corner, so the answer is 4.", "3", F, "self-correction")
num(COUNT, "I see 4 squares.", "4", T, "stated value, no cue")
num(COUNT, "I see 4 squares.", "5", F, "stated value, no cue")
num(COUNT, "There are 4 squares in total.", "4", T, "stated value")
num(COUNT, "The total is 4.", "3", F, "stated value")
num(COUNT, "So the answer is 2.", "2", T, "conclusion only")
num(COUNT, "So the answer is 2.", "3", F, "conclusion only")
num(COUNT, "Counting one by one: 1, 2, 3, 4, 5. So there are 5 squares.", "5", T, "enumeration")
num(COUNT, "Counting one by one: 1, 2, 3, 4, 5. So there are 5 squares.", "4", F, "enumeration")
num(COUNT, "The answer is 3 because I count 3 squares.", "3", T, "both")
num(COUNT, "The answer is 4 because I count 3 squares.", "4", F, "both: stated != conclusion")
num(COUNT, "Over 8 frames the squares do not move, and there are 3 of them, so the answer is 3.", "3", T, "both")
num(COUNT, "There are three squares, so the answer is 3.", "3", T, "number word")
num(COUNT, "There are three squares, so the answer is 4.", "4", F, "number word: stated != conclusion")
num(COUNT, "The squares move around the frame.", "3", N, "no-conclusion")
num(COUNT, "Let me count carefully.", "2", N, "no-conclusion")
num(COUNT, "Hmm, maybe 2 or 3 squares.", "3", N, "no-conclusion")
num(COUNT, "Counting is hard because the squares overlap.", "2", N, "no-conclusion")

# --- regression (measurements) -------------------------------------------------------------------------------
reg(DISTANCE, "The square starts at x=2 and ends at x=26, so it moves 24 pixels.", "24", T, "arithmetic")
reg(DISTANCE, "The square starts at x=2 and ends at x=26, so it moves 24 pixels.", "30", F, "arithmetic")
reg(DISTANCE, "The square starts at x=2 and ends at x=26, so the answer is 30.", "30", F,
    "arithmetic: stated values != conclusion")
reg(DISTANCE, "The square moves 3 pixels per frame for 8 frames, so the distance is 24 pixels.", "24", T,
    "arithmetic")
reg(DISTANCE, "The square moves 3 pixels per frame for 8 frames, so the distance is 24 pixels.", "26", F,
    "arithmetic")
reg(DISTANCE, "The square is about 12 pixels wide, so the answer is 12.", "12", T, "both")
reg(DISTANCE, "The square is about 12 pixels wide, so the answer is 20.", "20", F, "both: stated != conclusion")
reg(DISTANCE, "It covers 24 px, so 24.", "24", T, "both")
reg(DISTANCE, "The square moves 40 pixels in total.", "40", T, "stated value, no cue")
reg(DISTANCE, "The camera moves slowly from left to right.", "32", N, "no-conclusion")
reg(SIZE, "The distance is about 2.5 meters.", "2.5", T, "stated value")
reg(SIZE, "The distance is about 2.5 meters.", "4", F, "stated value")
reg(SIZE, "I estimate the table is 1.5 m long. So the answer is 1.5.", "1.5", T, "both")
reg(SIZE, "I estimate the table is 1.5 m long. So the answer is 3.", "3", F, "both: stated != conclusion")
reg(SIZE, "I estimate the table is 1.5 m long. So the answer is 1.5.", "3", F, "both: conclusion != answer")
reg(SIZE, "The table is 3.5 m long, so the answer is 3.5.", "3.5", T, "both")
reg(SIZE, "The table is 3.5 m long, so the answer is 5.", "5", F, "both: stated != conclusion")
reg(SIZE, "The length is 2 m. Wait, each tile is 0.5 m and it spans 6 tiles, so the length is 3 m.", "3", T,
    "self-correction")
reg(SIZE, "The length is 2 m. Wait, each tile is 0.5 m and it spans 6 tiles, so the length is 3 m.", "2", F,
    "self-correction")
reg(SIZE, "So the height is 1,200 m.", "1200", T, "conclusion only")
reg(SIZE, "The room looks large.", "5", N, "no-conclusion")
reg(SIZE, "The table is long compared to the chair.", "2", N, "no-conclusion")

# --- OCR -----------------------------------------------------------------------------------------------------
ocr("The sign reads EXIT, so the answer is EXIT.", "EXIT", T, "both")
ocr("The sign reads EXIT, so the answer is ENTER.", "ENTER", F, "both: stated != conclusion")
ocr("The sign reads EXIT, so the answer is EXIT.", "ENTER", F, "both: conclusion != answer")
ocr("The sign reads 'OPEN'.", "OPEN", T, "stated reading, no cue")
ocr("The sign reads 'OPEN'.", "CLOSED", F, "stated reading, no cue")
ocr("The text on the shirt says HELLO WORLD, so the answer is HELLO WORLD.", "HELLO WORLD", T, "both")
ocr("The banner says Happy Birthday Anna so the answer is Happy Birthday Anna.", "Happy Birthday Anna", T, "both")
ocr("The sign reads STOP. Wait, the second letter is H, so it reads SHOP. The answer is SHOP.", "SHOP", T,
    "self-correction")
ocr("The sign reads STOP. Wait, the second letter is H, so it reads SHOP. The answer is SHOP.", "STOP", F,
    "self-correction")
ocr("The sign reads STOP. Actually I misread it, so the answer is SHOP.", "SHOP", T, "self-correction")
ocr("The answer is 42 because the jersey shows the number 42.", "42", T, "both")
ocr("The jersey shows the number 42, so the answer is 24.", "24", F, "both: stated != conclusion")
ocr("The answer is SALE.", "SALE", T, "conclusion only")
ocr("The answer is SALE.", "SOLD", F, "conclusion only")
ocr("The plate says ABC 123, so the answer is ABC 123.", "ABC 123", T, "both")
ocr("The plate says ABC 123, so the answer is ABC 123.", "ABC 124", F, "both: conclusion != answer")
ocr("The caption says 'Breaking News' so the answer is Breaking News.", "Breaking News", T, "both")
ocr("The word on the door is PUSH, so the answer is PULL.", "PULL", F, "both: stated != conclusion")
ocr("The word on the door is PUSH, so the answer is PUSH.", "PUSH", T, "both")
ocr("The letters are blurry.", "ABC", N, "no-conclusion")
ocr("I cannot read the small print clearly.", "SALE", N, "no-conclusion")
ocr("The sign is red and white with large letters.", "STOP", N, "no-conclusion")

# --- free-form ------------------------------------------------------------------------------------------------
free("He holds a pan over the stove. The answer is cooking dinner.", "Cooking dinner", T, "conclusion only")
free("He holds a pan over the stove. The answer is cooking dinner.", "washing dishes", F, "conclusion only")
free("He is at the sink scrubbing plates, so the answer is washing dishes.", "washing dishes", T, "both")
free("He is at the sink scrubbing plates, so the answer is cooking dinner.", "cooking dinner", F,
     "paraphrase: stated != conclusion")
free("He is washing dishes, so the answer is cooking dinner.", "cooking dinner", F, "both: stated != conclusion")
free("At first I thought he was washing dishes, but he is cooking, so the answer is cooking dinner.",
     "cooking dinner", T, "self-correction")
free("The man walks his dog in the park.", "walking his dog", T, "stated activity, no cue")
free("Let me watch the clip.", "dancing", N, "no-conclusion")
free("The answer is playing guitar.", "playing the guitar", T, "conclusion only")
free("The answer is playing guitar.", "playing piano", F, "conclusion only")
free("So the answer is reading a book. Wait, it is a tablet, so the answer is reading on a tablet.",
     "reading on a tablet", T, "self-correction")
free("So the answer is reading a book. Wait, it is a tablet, so the answer is reading on a tablet.",
     "reading a book", F, "self-correction")
free("I conclude that he is running.", "running", T, "conclusion only")
free("I conclude that he is running.", "walking", F, "conclusion only")
free("The answer is: he is sleeping on the couch.", "sleeping", T, "conclusion only")
free("The people clap and cheer, so the answer is a concert.", "a concert", T, "conclusion only")
free("The video is dark and short.", "swimming", N, "no-conclusion")
free("The answer is cooking dinner. Wait, he only washes the pan, so the answer is washing dishes.",
     "washing dishes", T, "self-correction")

# --- harder sentences, added before the rule judge was changed (some it is not expected to get right) -----------
mc(COLOUR, "Both red and blue squares appear, but only the blue one moves, so the answer is C.", "C", T, "listing")
mc(COLOUR, "The red square stays still; the blue one moves, so the answer is C.", "C", T, "both")
mc(COLOUR, "The blue square moves while the red one stays still, so the answer is C.", "C", T, "both")
mc(COLOUR, "The answer is C, since the red square stays still.", "C", T, "both")
mc(COLOUR, "The moving square is green, and it passes a yellow square, so the answer is B.", "B", T, "both")
mc(DIRECTION, "It moves from the right edge toward the left, so the answer is A.", "A", T, "both")
mc(DIRECTION, "It moves from the left edge to the right edge, so the answer is A.", "A", F, "both: content != letter")
num(COUNT, "In frame 1 I count 3 squares, so the answer is 3.", "3", T, "both")
num(COUNT, "I count 4 squares, so the answer is 4.", "4", T, "both")
reg(DISTANCE, "Each frame it moves 5 px; after 4 frames that is 20 px, so the answer is 20.", "20", T, "arithmetic")
reg(DISTANCE, "It moves 20 px in total, so the answer is 25.", "25", F, "both: stated != conclusion")
ocr("The sign reads EXIT in red letters, so the answer is EXIT.", "EXIT", T, "both")
ocr("The number on the bus is 42, so the answer is 42.", "42", T, "both")
ocr("The sign says OPEN. So the answer is CLOSED.", "CLOSED", F, "both: stated != conclusion")
free("The answer is cooking dinner because he is stirring a pot.", "cooking dinner", T, "conclusion only")
free("He is cooking dinner. The answer is cooking dinner.", "cooking dinner", T, "both")
free("So the answer is dancing.", "dancing", T, "conclusion only")
free("So the answer is dancing.", "singing", F, "conclusion only")
# fmt: on


def main() -> None:
    with OUT.open("w") as f:
        for item in ITEMS:
            f.write(json.dumps(item) + "\n")
    print(f"wrote {len(ITEMS)} items to {OUT}")


if __name__ == "__main__":
    main()
