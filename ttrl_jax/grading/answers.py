"""Final answers in response text, and their canonical strings: pure string functions, no sympy.

`extract_answer` finds a response's final answer: the last answer statement in the text (a
`\\boxed{..}`, or a phrase such as "the final answer is $..$"), else the math span that closes
the response. `canonical_answer` rewrites an answer so that equal canonical strings are answers
math-verify also calls equal (`025` / `25`, `\\dfrac12` / `\\frac{1}{2}`, `28 percent` / `28\\%`);
it never merges forms that math-verify tells apart, so anything it leaves different goes to
math-verify (verifier.py).

Every scan is a single linear pass (str.rfind, str.find, regexes without nested quantifiers),
so a megabyte response, unmatched braces and stray dollar signs included, costs under a second.
"""

from __future__ import annotations

import functools
import itertools
import re
import typing
from typing import Literal

# What a final answer is: a math expression ("math") or a multiple-choice letter ("choice").
AnswerMode = Literal["math", "choice"]
ANSWER_MODES: tuple[str, ...] = typing.get_args(AnswerMode)

# Longer extracted answers count as no answer: no benchmark answer is near this, garbage is.
MAX_ANSWER_CHARS = 1000

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# `\\` (a LaTeX line break) and escaped braces are consumed whole so they never count as braces.
_BRACE_TOKEN_RE = re.compile(r"\\\\|\\[{}]|[{}]")
_BOX_ARGUMENT_RE = re.compile(r"[ \t]*([^\s$]+)")
_ANSWER_PHRASE_RE = re.compile(r"answer\s{0,4}(?:is\b\s{0,4}:?|:)", re.IGNORECASE)
_SKIP_MARKUP_RE = re.compile(r"[\s*]*")
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")
_IS_RE = re.compile(r"\bis\b\s*")
# A stated value holds no words: "So the answer is 12 cm." restates a box rather than replacing
# it, "x = 4" or "\\frac{1}{2}" may replace it.
_WORD_RE = re.compile(r"(?<!\\)(?<![A-Za-z])[A-Za-z]{2,}")
_NUMBER_RE = re.compile(r"(?<![\w./])-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:/\d+)?")
# Math delimiters: `\\` and `\$` first, so a line break or a dollar sign never opens a span.
_MATH_TOKEN_RE = re.compile(r"\\\\|\\\$|\$\$|\$|\\\[|\\\]|\\\(|\\\)|\n")
_CLOSER = {"$$": "$$", "$": "$", "\\[": "\\]", "\\(": "\\)"}
_INLINE = ("$", "\\(")  # inline spans end at a line break, as in LaTeX
# A response's last math span is its answer only when nothing after it could hold another:
# a closing phrase ("$x \\geq 5$ is the solution.") without digits or more math.
_CLOSING_TAIL_RE = re.compile(r"[^\d$\\]{0,80}")
# Several answers in one statement ("\\boxed{1} and \\boxed{-2}", "$1$, $2$ or $3$") are one list
# answer, as math-verify reads them; only separators may stand between them.
_SEPARATOR = (
    r"\s|[,;&]|\\q?quad(?![a-zA-Z])|\\[,;: ]|(?<![A-Za-z])(?:and|or)(?![A-Za-z])"
    r"|\\text\{\s*(?:,|and|or)?\s*\}"
)
_SPAN_SEPARATOR_RE = re.compile(f"(?:{_SEPARATOR})*")
_BOX_SEPARATOR_RE = re.compile(rf"(?:{_SEPARATOR}|\$|\\[()\[\]]|\\\\)*")
_MAX_LISTED = 8
_CHOICE_PHRASE_RE = re.compile(
    r"(?i:answer|option|choice)\s{0,4}(?:(?i:is)\b)?\s{0,4}:?[\s*$({\[]{0,8}"
    r"(?:\\(?:text|textbf|mathrm|mathbf)\{)?\(?([A-D])\)?(?![A-Za-z])"
)
_CHOICE_LETTER_RE = re.compile(r"\W{0,8}(?:\\[a-z]{1,8}\{)?\W{0,8}([A-Da-d])(?![A-Za-z])")


def _last_match(pattern: re.Pattern, text: str, pos: int = 0, endpos: int | None = None):
    last = None
    end = len(text) if endpos is None else endpos
    for last in pattern.finditer(text, pos, end):  # noqa: B007 - only the last match is wanted
        pass
    return last


def _matching_brace(text: str, open_idx: int) -> int:
    """Index of the `}` closing the `{` at `open_idx`, or -1 when unclosed."""
    depth = 0
    for token in _BRACE_TOKEN_RE.finditer(text, open_idx):
        char = token.group()
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return token.start()
    return -1


def _box_at(text: str, start: int, command: str) -> tuple[int, int, str | None]:
    """(start, end, content) of the box command at `start`; content None if empty or unclosed."""
    pos = start + len(command)
    if text.startswith("{", pos):
        close = _matching_brace(text, pos)
        if close < 0:
            return start, len(text), None
        return start, close + 1, text[pos + 1 : close].strip() or None
    if pos < len(text) and text[pos] in " \t":
        match = _BOX_ARGUMENT_RE.match(text, pos)
        if match:
            return start, match.end(), match.group(1)
    return start, pos, None


def _box_before(text: str, end: int) -> tuple[int, int, str | None] | None:
    """The last `\\boxed{..}` / `\\fbox{..}` / `\\boxed x` starting before `end`, or None."""
    start, command = max((text.rfind(cmd, 0, end), cmd) for cmd in _BOX_COMMANDS)
    return None if start < 0 else _box_at(text, start, command)


def _listed(contents: list[str]) -> str:
    """Several answers of one statement as one list answer (repeats dropped)."""
    return ", ".join(dict.fromkeys(contents))


def _last_boxed(text: str) -> tuple[int, int, str | None] | None:
    """(start, end, content) of the last box, or of the boxes listed last; None without one."""
    # "\\boxed{1} and \\boxed{2}" -> "1, 2". An empty or unclosed last box has no content: a
    # truncated response has no answer.
    box = _box_before(text, len(text))
    if box is None or box[2] is None:
        return box
    start, end, contents = box[0], box[1], [box[2]]
    while len(contents) < _MAX_LISTED:
        before = _box_before(text, start)
        if before is None or before[2] is None or before[1] > start:
            break
        if not _BOX_SEPARATOR_RE.fullmatch(text, before[1], start):
            break
        start = before[0]
        contents.insert(0, before[2])
    return start, end, _listed(contents)


def _span_from(text: str, opening: re.Match) -> tuple[str | None, int]:
    """(content, end) of the span `opening` starts; content None when it never closes."""
    open_ = opening.group()
    close, inline = _CLOSER[open_], open_ in _INLINE
    for token in _MATH_TOKEN_RE.finditer(text, opening.end()):
        tok = token.group()
        if tok == "\n" and inline:
            break
        if tok == close or (close == "$" and tok == "$$"):
            content = text[opening.end() : token.start()].strip() or None
            return content, token.start() + len(close)
    return None, len(text)


def _math_span_at(text: str, pos: int) -> tuple[str | None, int] | None:
    """(content, end) of the math span opening at `pos`, None if none opens there."""
    for token in _MATH_TOKEN_RE.finditer(text, pos):
        if token.start() != pos or token.group() not in _CLOSER:
            return None
        return _span_from(text, token)
    return None


def _spans_listed_from(text: str, pos: int) -> tuple[str | None, int] | None:
    """The span at `pos` and the spans listed right after it ("$1$, $2$ or $3$" -> "1, 2, 3")."""
    span = _math_span_at(text, pos)
    if span is None or span[0] is None:
        return span
    contents, end = [span[0]], span[1]
    while len(contents) < _MAX_LISTED:
        following = _math_span_at(text, _SPAN_SEPARATOR_RE.match(text, end).end())
        if following is None or following[0] is None:
            break
        contents.append(following[0])
        end = following[1]
    return _listed(contents), end


def _last_math_spans(text: str) -> tuple[str, int] | None:
    """(content, end) of the last closed, non-empty math span (and those listed before it)."""
    # One pass, pairing each opener with its closer. A display opener that never closes is
    # ignored rather than swallowing the spans after it; an inline one ends at its line.
    spans: list[tuple[str, int, int]] = []  # (content, opener start, end), the last few only
    open_, opened_at, start = None, 0, 0
    last_close = {close: text.rfind(close) for close in ("$$", "\\]")}
    for token in _MATH_TOKEN_RE.finditer(text):
        tok = token.group()
        if open_ is None:
            if tok in _CLOSER and (tok in _INLINE or last_close[_CLOSER[tok]] >= token.end()):
                open_, opened_at, start = tok, token.start(), token.end()
        elif tok == "\n":
            open_ = None if open_ in _INLINE else open_
        elif tok == _CLOSER[open_] or (open_ == "$" and tok == "$$"):
            content = text[start : token.start()].strip()
            if content:
                spans = spans[1 - _MAX_LISTED :] + [
                    (content, opened_at, token.start() + len(_CLOSER[open_]))
                ]
            # `$a$$b$`: the second dollar of `$$` opens the next inline span.
            reopen = open_ == "$" and tok == "$$"
            open_, opened_at, start = (
                ("$", token.start() + 1, token.end()) if reopen else (None, 0, 0)
            )
    if not spans:
        return None
    k = len(spans) - 1
    while k > 0 and _SPAN_SEPARATOR_RE.fullmatch(text, spans[k - 1][2], spans[k][1]):
        k -= 1
    return _listed([content for content, _, _ in spans[k:]]), spans[-1][2]


def _stated_answer(text: str, pos: int) -> tuple[str | None, bool]:
    """The answer stated at `pos` after an answer phrase, and whether it reads as a value."""
    # Math spans (`$..$`, `\\(..\\)`, `\\[..\\]`, `$$..$$`) or the rest of the sentence. A
    # sentence that names what it gives states the value after its last "is" ("The largest $n$
    # is 34."), or else its only number ("Jane started growing Sphere 3 hours ago.").
    pos = _SKIP_MARKUP_RE.match(text, pos).end()
    span = _spans_listed_from(text, pos)
    if span is not None:
        return span[0], span[0] is not None
    line_end = text.find("\n", pos)
    line_end = len(text) if line_end < 0 else line_end
    sentence_end = _SENTENCE_END_RE.search(text, pos, line_end)
    end = sentence_end.start() if sentence_end else line_end
    if pos < end and text[pos].isalpha():
        last_is = _last_match(_IS_RE, text, pos, end)
        if last_is is not None:
            return _stated_answer(text, last_is.end())
        sentence = text[pos:end]
        numbers = list(itertools.islice(_NUMBER_RE.finditer(text, pos, end), 2))
        if len(numbers) == 1 and "$" not in sentence and _WORD_RE.search(sentence):
            return numbers[0].group(), True
    answer = text[pos:end].strip().strip("*").strip().rstrip(".").strip() or None
    return answer, answer is not None and not _WORD_RE.search(answer)


def _last_number(text: str) -> str | None:
    last = _last_match(_NUMBER_RE, text)
    return None if last is None else last.group()


def _math_answer(text: str, last_number_fallback: bool) -> str | None:
    box = _last_boxed(text)
    phrase = _last_match(_ANSWER_PHRASE_RE, text)
    stated = None if phrase is None else _stated_answer(text, phrase.end())
    if box is not None:
        # The last answer statement wins: the box, unless a later phrase states a value.
        later = phrase is not None and phrase.start() >= box[1] and stated[1]
        return stated[0] if later else box[2]
    if stated is not None and stated[0] is not None:
        return stated[0]
    spans = _last_math_spans(text)
    if spans is not None and _CLOSING_TAIL_RE.fullmatch(text, spans[1]):
        return spans[0]
    return _last_number(text) if last_number_fallback else None


def _choice_letter(answer: str) -> str | None:
    """`C`, `(C)`, `\\text{(C)}`, `C: 4.2 m/s` -> "C"; anything else -> None."""
    match = _CHOICE_LETTER_RE.match(answer[:64])
    return match.group(1).upper() if match else None


def _choice_answer(text: str) -> str | None:
    box = _box_before(text, len(text))
    if box is not None:
        return None if box[2] is None else _choice_letter(box[2])
    last = _last_match(_CHOICE_PHRASE_RE, text)
    if last is not None:
        return last.group(1)
    stripped = text.strip()
    # A bare "C" or "(C)." response.
    return _choice_letter(stripped) if 0 < len(stripped) <= 8 else None


def extract_answer(text: str, mode: str = "math", last_number_fallback: bool = False) -> str | None:
    """Extracts a response's final answer.

    Args:
      text: the decoded response.
      mode: "math": the last answer statement in the text: the content of the last
        `\\boxed{...}` / `\\fbox{...}` (brace-matched; `\\boxed 5` also works), or the answer after
        a later "the answer is" / "final answer:" / "answer:" when that one states a value (a
        `$...$` span, or words-free text such as "4" or "x = 4"). Without a box, the answer
        after the last such phrase (in "The largest $n$ is 34." the value after "is"); without
        either, the response's last math span when only a closing phrase follows it. Several
        boxes or spans listed together ("\\boxed{1} and \\boxed{-2}") are one answer, "1, -2".
        "choice": a multiple-choice letter A-D from a box, "answer is (C)", "Answer: C" or a
        bare "C".
      last_number_fallback: in "math" mode, fall back to the last number (or a/b) in the text.

    Returns:
      The answer string (an uppercase letter in "choice" mode), or None when there is none.
      An unclosed last box (a truncated response) is no answer.
    """
    if mode == "choice":
        return _choice_answer(text)
    if mode not in ANSWER_MODES:
        raise ValueError(f"extract_answer: unknown mode {mode!r}; use one of {ANSWER_MODES}.")
    return _math_answer(text, last_number_fallback)


# ---------------------------------------------------------------------------------------------
# Canonical strings: equal canonical strings are equivalent answers, no sympy needed.

_SURROUNDING_DELIMITERS = (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_TRAILING_UNIT_RE = re.compile(r"(?<=\S)\s*\\(?:text|mbox|mathrm)\{[^{}]*\}(?:\^\{?\d\}?)?$")
_WHOLE_TEXT_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_PERCENT_WORD_RE = re.compile(
    r"\s*(?:\\(?:text|mbox|mathrm)\{\s*(?:percent(?:age)?|pct)\s*\}"
    r"|(?<![A-Za-z])(?:percent(?:age)?|pct)(?![A-Za-z]))"
)
# A thousands separator: a bare comma, `{,}` or `,\!` before each group of three digits.
_THOUSANDS_RE = re.compile(r"-?[1-9]\d{0,2}(?:(?:,|\{,\}|,\\!\s*)\d{3})+(?:\.\d+)?")
_GROUP_SEPARATOR_RE = re.compile(r"\{,\}|,\\!\s*|,")
# `\\` (a matrix row break) is matched first and kept, so `\\ ` is not read as `\ `.
_DROP_RE = re.compile(
    r"(\\\\)|\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\displaystyle(?![a-zA-Z])"
    r"|\\[!,;: ]|\\q?quad(?![a-zA-Z])|~|\\\$|\^\{?\\circ\}?|°"
)
_PERCENT_RE = re.compile(r"\\?%")
# Text inside `\\text{..}` keeps its words apart: "-1 \\text{ and } p" must not become "-1andp".
_TEXT_GROUP_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{[^{}]*\}")
_WHITESPACE_RE = re.compile(r"\s+")
_FRAC_RE = re.compile(r"\\[dtc]frac(?![a-zA-Z])")
_FRAC_ARGS_RE = re.compile(r"\\frac([0-9a-zA-Z])")
_FRAC_SECOND_RE = re.compile(r"\\frac(\{[^{}]*\})([0-9a-zA-Z])")
_SQRT_RE = re.compile(r"\\sqrt([0-9a-zA-Z])")
_INTEGER_PERCENT_RE = re.compile(r"(-?\d+)\\%")
_DECIMAL_RE = re.compile(r"([+-]?)(\d*)(?:\.(\d*))?")
_ASSIGNMENT_RE = re.compile(r"[a-zA-Z]=([^=<>,;]+)")
# What a numeric value may contain besides digits and operators.
_NUMERIC_COMMAND_RE = re.compile(r"\\(?:frac|sqrt|pi|cdot|times)(?![a-zA-Z])")
_PAREN_LETTER_RE = re.compile(r"\(([A-Za-z])\)")


def _drop_space(match: re.Match) -> str:
    """Deletes whitespace, except where it separates two numbers ("137 1/2", "32, 349")."""
    text, start, end = match.string, match.start(), match.end()
    if start == 0 or end == len(text) or not text[end].isdigit():
        return ""
    before = text[start - 1]
    if before.isdigit():
        return " "
    after_comma = before == "," and start >= 2 and text[start - 2].isdigit()
    return " " if after_comma and re.match(r"\d{3}(?!\d)", text[end:]) else ""


def _collapse_space(text: str) -> str:
    """Deletes layout whitespace outside `\\text{..}` groups; normalises it inside them."""
    pieces, pos = [], 0
    for group in _TEXT_GROUP_RE.finditer(text):
        pieces.append(_WHITESPACE_RE.sub(_drop_space, text[pos : group.start()]))
        command, _, content = group.group()[:-1].partition("{")
        pieces.append(command + "{" + " ".join(content.split()) + "}")
        pos = group.end()
    pieces.append(_WHITESPACE_RE.sub(_drop_space, text[pos:]))
    return "".join(pieces)


def strip_delimiters(text: str) -> str:
    """The answer without surrounding whitespace and `$..$`, `\\(..\\)`, `\\[..\\]` pairs."""
    changed = True
    while changed:
        changed = False
        text = text.strip()
        for open_, close in _SURROUNDING_DELIMITERS:
            long_enough = len(text) >= len(open_) + len(close)
            if long_enough and text.startswith(open_) and text.endswith(close):
                text, changed = text[len(open_) : len(text) - len(close)], True
    return text


_WORDS_RE = re.compile(r"[A-Za-z]{2,}(?:\s+[A-Za-z]+)*")


def verifier_text(answer: str) -> str:
    """The answer as math-verify should read it: as written, without surrounding delimiters."""
    # A bare word becomes `\\text{..}`, which math-verify reads as the word it is (compared
    # regardless of case) rather than as a product of one-letter symbols.
    text = strip_delimiters(answer)
    return f"\\text{{{text}}}" if _WORDS_RE.fullmatch(text) else text


def _canonical_number(text: str) -> str:
    """Canonical decimals ("025" -> "25", "142.0" -> "142", ".5" -> "0.5"); other text as is."""
    match = _DECIMAL_RE.fullmatch(text)
    if not match or not (match.group(2) or match.group(3)):
        return text
    sign, whole, frac = match.group(1), match.group(2).lstrip("0") or "0", (match.group(3) or "")
    frac = frac.rstrip("0")
    number = f"{whole}.{frac}" if frac else whole
    return number if sign != "-" or number == "0" else "-" + number


def _numeric(text: str) -> bool:
    """Whether `text` is a numeric value: no variables, no commands but fractions, roots and pi."""
    return not re.search(r"[a-zA-Z\\]", _NUMERIC_COMMAND_RE.sub("", text))


@functools.lru_cache(maxsize=1 << 14)
def _canonical_math(answer: str) -> str | None:
    text = strip_delimiters(answer)
    text = _PERCENT_WORD_RE.sub(r"\\%", text)
    text = _TRAILING_UNIT_RE.sub("", text)
    whole_text = _WHOLE_TEXT_RE.fullmatch(text)
    if whole_text:  # `\\text{Evelyn}` is the word Evelyn, as math-verify reads it
        text = whole_text.group(1).strip()
    if _THOUSANDS_RE.fullmatch(text.strip()):
        text = _GROUP_SEPARATOR_RE.sub("", text)
    text = _DROP_RE.sub(lambda m: m.group(1) or "", text)
    text = _PERCENT_RE.sub(r"\\%", text)
    text = _collapse_space(text).rstrip(".")
    text = _FRAC_ARGS_RE.sub(r"\\frac{\1}", _FRAC_RE.sub(r"\\frac", text))
    text = _SQRT_RE.sub(r"\\sqrt{\1}", _FRAC_SECOND_RE.sub(r"\\frac\1{\2}", text))
    # math-verify equates 28% with 28 (and with 0.28), but 12.5% only with 0.125.
    integer_percent = _INTEGER_PERCENT_RE.fullmatch(text)
    if integer_percent:
        text = integer_percent.group(1)
    # A lone variable given a numeric value is that value ("x = 5" is 5 to math-verify); with
    # variables on the right ("y = 2x+3") the name matters, and math-verify decides.
    assignment = _ASSIGNMENT_RE.fullmatch(text)
    if assignment and _numeric(assignment.group(1)):
        text = assignment.group(1)
    letter = _PAREN_LETTER_RE.fullmatch(text)
    if letter:
        text = letter.group(1)
    return _canonical_number(text) or None


def canonical_answer(answer: str | None, mode: str = "math") -> str | None:
    """Cheap canonical form of an extracted answer; None for no answer or an over-long one."""
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return None
    if mode == "choice":
        return _choice_letter(answer)
    if mode not in ANSWER_MODES:
        raise ValueError(f"canonical_answer: unknown mode {mode!r}; use one of {ANSWER_MODES}.")
    return _canonical_math(answer)
