"""docs/algorithms.md shows the one-file example exactly as the suite runs it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_guide_shows_the_example_file_as_it_is() -> None:
    guide = (ROOT / "docs" / "algorithms.md").read_text()
    example = (ROOT / "examples" / "algorithms" / "norm_clip.py").read_text()
    assert f"```python\n{example}```" in guide
    assert len(example.splitlines()) < 60
