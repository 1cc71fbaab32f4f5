"""Expert arguments in one spelling: the only place that decides when two are the same.

An expert argument is what a call carries between its parentheses, `<VISTA3D(hepatic tumor)>`:
a label group, a structure name, or a comma list of names or label ids (`lung, fat`). A
manifest's tasks and a template's declaration give them, the runners read them, the findings
cache keys by them, the call text the model learns writes them, and the evaluation compares
the model's calls with them. All of these take the argument as `canonical_arg` spells it, so
`Hepatic  Tumor`, `'hepatic tumor'` and `hepatic tumor` are one argument (one cache entry,
one call text, one vocabulary), and so are `fat, lung` and `Lung ,fat`.

What an argument means stays with its expert: that "" is everything for VISTA3D, that
`hepatoma` names the same tumours as `hepatic tumor`, that `lungs` is ct_tissue's `lung`.
"""

from __future__ import annotations

QUOTES = "'\""


def canonical_arg(arg: str) -> str:
    """The argument's one spelling: lower case, blanks collapsed to one space, surrounding
    quotes dropped, and, for a comma list, its distinct parts in sorted order, joined by ", "
    (every built-in runner takes a list as a set: the order never changed a finding).

    >>> canonical_arg("  Hepatic\\tTumor "), canonical_arg("'organs'"), canonical_arg("")
    ('hepatic tumor', 'organs', '')
    >>> canonical_arg("Lung ,fat,, LUNG")
    'fat, lung'
    """
    parts = {" ".join(p.strip().strip(QUOTES).lower().split()) for p in str(arg).strip().strip(QUOTES).split(",")}
    return ", ".join(sorted(parts - {""}))


def arg_parts(arg: str) -> list[str]:
    """The names a (comma-list) argument lists, canonical; none for "".

    >>> arg_parts("Spleen, liver"), arg_parts("hepatic tumor"), arg_parts(" ")
    (['liver', 'spleen'], ['hepatic tumor'], [])
    """
    text = canonical_arg(arg)
    return text.split(", ") if text else []
