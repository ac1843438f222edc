"""GPTSAN's clean-text rules: URLs, e-mail addresses, phone numbers, Japanese dates and prices become tag
tokens, and runs of box-drawing characters become one `<BLOCK>`. The patterns are the original ones
(tanreinama/Japanese-BPEEncoder_V2, as kept by the Hugging Face port), applied in the same order."""

from __future__ import annotations

import re

_WEEKDAYS = r"\(日\)|\(月\)|\(火\)|\(水\)|\(木\)|\(金\)|\(土\)|㈰|㈪|㈫|㈬|㈭|㈮|㈯"
_NUMBER = r"(0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)"
_RULES = [
    (re.compile(r"(https?|ftp)(:\/\/[-_\.!~*\'()a-zA-Z0-9;\/?:\@&=\+$,%#]+)"), "<URL>"),
    (re.compile(r"[A-Za-z0-9\._+]*@[\-_0-9A-Za-z]+(\.[A-Za-z]+)*"), "<EMAIL>"),
    (re.compile(r"[\(]{0,1}[0-9]{2,4}[\)\-\(]{0,1}[0-9]{2,4}[\)\-]{0,1}[0-9]{3,4}"), "<TEL>"),
    (
        re.compile(
            r"([12]\d{3}[/\-年])*(0?[1-9]|1[0-2])[/\-月]((0?[1-9]|[12][0-9]|3[01])日?)*"
            rf"(\d{{1,2}}|:|\d{{1,2}}時|\d{{1,2}}分|{_WEEKDAYS})*"
        ),
        "<DATE>",
    ),
    (
        re.compile(
            r"(明治|大正|昭和|平成|令和|㍾|㍽|㍼|㍻|\u32ff)\d{1,2}年(0?[1-9]|1[0-2])月(0?[1-9]|[12][0-9]|3[01])日"
            rf"(\d{{1,2}}|:|\d{{1,2}}時|\d{{1,2}}分|{_WEEKDAYS})*"
        ),
        "<DATE>",
    ),
    (
        re.compile(
            rf"({_NUMBER}*億)*({_NUMBER}*万)*({_NUMBER}*千)*{_NUMBER}*"
            r"(千円|万円|千万円|円|千ドル|万ドル|千万ドル|ドル|千ユーロ|万ユーロ|千万ユーロ|ユーロ)+"
            r"(\(税込\)|\(税抜\)|\+tax)*"
        ),
        "<PRICE>",
    ),
]
_BOX_DRAWING = (
    "─━│┃┄┅┆┇┈┉┊┋┌┍┎┏┐┑┒┓└┕┖┗┘┙┚┛├┝┞┟┠┡┢┣┤┥┦┧┨┩┪┫┬┭┮┯┰┱┲┳┴┵┶┷┸┹┺┻┼┽┾┿╀╁╂╃╄╅╆╇╈╉╊╋╌╍╎╏═║╒╓╔╕╖╗╘╙╚╛╜╝╞╟"
    "╠╡╢╣╤╥╦╧╨╩╪╫╬╭╮╯╰╱╲╳╴╵╶╷╸╹╺╻╼╽╾╿"
    "▀▁▂▃▄▅▆▇█▉▊▋▌▍▎▏▐░▒▓▔▕▖▗▘▙▚▛▜▝▞▟"
)
_TO_BLOCK = str.maketrans({ch: "<BLOCK>" for ch in _BOX_DRAWING})
_BLOCK_RUN = re.compile(r"(?:<BLOCK>)+")


# A rule can only match where its trigger is found (and no rule's tag contains a trigger), so most lines
# skip most patterns: URL needs "://", e-mail "@", phone and dates an ASCII digit, prices a currency word.
_TRIGGERS = [
    re.compile(r"://"),
    re.compile(r"@"),
    re.compile(r"[0-9]"),
    re.compile(r"[0-9]"),
    re.compile(r"[0-9]"),
    re.compile(r"円|ドル|ユーロ"),
]


def clean_text(text: str) -> str:
    for (pattern, tag), trigger in zip(_RULES, _TRIGGERS, strict=True):
        if trigger.search(text):
            text = pattern.sub(tag, text)
    return blocks_to_tag(text)


def clean_text_unguarded(text: str) -> str:
    """The same rules tried on every text, as the original does (the reference for tests)."""
    for pattern, tag in _RULES:
        text = pattern.sub(tag, text)
    return blocks_to_tag(text)


def blocks_to_tag(text: str) -> str:
    return _BLOCK_RUN.sub("<BLOCK>", text.translate(_TO_BLOCK))
