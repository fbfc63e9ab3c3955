"""A small knowledge base where each question's answer is in exactly one document."""

from __future__ import annotations

from pathlib import Path

TAXES = """# Paying taxes in Texas

Texas has no state personal income tax, so residents only file a federal return with the
IRS, normally by April 15.

## Property tax

Property taxes are billed each October by the county tax assessor-collector. The payment
for property taxes is due by January 31 of the following year; unpaid property taxes
accrue penalties and interest from February 1.

## Sales tax

The state sales tax rate is 6.25 percent, and cities, counties and transit authorities may
add up to 2 percent more.
"""

SOURDOUGH = """Baking sourdough bread at home

Feed the starter the evening before baking so that it is bubbly in the morning. Mix flour,
water and salt with the levain, then stretch and fold the dough every thirty minutes for
two hours. Shape a boule, proof it overnight in the refrigerator, and bake it in a covered
Dutch oven at 250 degrees Celsius for twenty minutes, then uncovered until deep brown.
"""

GARDEN = """# Growing tomatoes

Tomatoes need at least eight hours of direct sun. Plant seedlings deep, up to the first
leaves, after the last frost. Water the soil rather than the leaves, and stake or cage the
plants early. Pinch suckers on indeterminate varieties to get larger fruit.
"""

PACKAGING = """Publishing a Python package

Describe the project in pyproject.toml, build a wheel and a source distribution with the
build frontend, check them with twine, and upload them to the package index. Use trusted
publishing from continuous integration instead of long-lived tokens.
"""

DOCUMENTS = {
    "texas-taxes.md": TAXES,
    "sourdough.txt": SOURDOUGH,
    "tomatoes.md": GARDEN,
    "packaging.txt": PACKAGING,
}

QUESTION = "When is the payment for property taxes due in Texas?"
ANSWER = "January 31"


def write_documents(folder: Path) -> list[Path]:
    """Write the documents into `folder` and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in DOCUMENTS.items():
        path = folder / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths
