"""The documentation names real tests: every `test_...` a Markdown file cites is a test function in tests/."""

import re

from helpers import ROOT

DOCS = ("README.md", "QUICK_START.md", "CHECKPOINTING_GUIDE.md")


def test_every_test_the_docs_cite_exists():
    defined = {m.group(1) for path in (ROOT / "tests").glob("test_*.py")
               for m in re.finditer(r"^def (test_\w+)\(", path.read_text(), re.MULTILINE)}
    cited = {(doc, name) for doc in DOCS
             for name in re.findall(r"`(test_\w+)`", (ROOT / doc).read_text())}
    assert len(cited) > 50  # the guide cites its tests throughout: a pattern that found none would prove nothing
    missing = sorted(f"{doc}: {name}" for doc, name in cited if name not in defined)
    assert not missing, "\n".join(missing)
