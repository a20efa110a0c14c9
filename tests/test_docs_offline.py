"""The docs build and render offline: nothing fetched from a CDN, and the build steps are stated."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_no_diagram_or_script_from_a_cdn() -> None:
    for page in PAGES:
        text = page.read_text()
        assert not re.search(r"<script[^>]+src=[\"']?https?://", text), page.name
    config = (ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^  font: false$", config, re.M), "Material would load Google Fonts"
    # Material fetches mermaid.js from a CDN for ```mermaid blocks unless a `mermaid` global
    # exists: the bundled copy is loaded first, from the site itself.
    assert re.search(r"^extra_javascript:\n  - assets/mermaid\.min\.js$", config, re.M)
    bundled = (ROOT / "docs" / "assets" / "mermaid.min.js").read_text()
    assert bundled.rstrip().endswith(
        'globalThis["mermaid"] = globalThis.__esbuild_esm_mermaid_nm["mermaid"].default;'
    )
    assert not re.search(r"^extra_javascript:(\n  - .*https?://.*)", config, re.M)


def test_readme_installs_the_docs_extra_before_building() -> None:
    text = (ROOT / "README.md").read_text()
    install = text.index('pip install -e ".[docs]"')
    build = text.index("mkdocs build")
    assert install < build
    assert "NO_MKDOCS_2_WARNING=1 mkdocs build" in text  # no end-of-life notice in the output


def test_every_page_is_in_the_nav_and_the_demo_chart_is_shown() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f": {page.name}" in config, f"{page.name} is not in mkdocs.yml's nav"
    assert (ROOT / "docs" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](docs/demo.png)" in (ROOT / "README.md").read_text()
    assert "](demo.png)" in (ROOT / "docs" / "index.md").read_text()
