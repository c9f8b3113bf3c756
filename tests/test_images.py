"""scripts/make_images.py draws every diagram; the images the course links to exist."""
from __future__ import annotations

import importlib.util
import re
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
EXPECTED = {"pretraining_vs_finetuning.png", "course_roadmap.png", "classification_head.png", "lora.png",
            "padding_and_causal_mask.png", "sequence_packing.png"}


def load_script():
    spec = importlib.util.spec_from_file_location("make_images", ROOT / "scripts" / "make_images.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


make_images = load_script()


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from the PNG header."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("images")
    return {path.name: path for path in make_images.main(out)}


def test_script_writes_every_figure(drawn):
    assert set(drawn) == EXPECTED
    for name, path in drawn.items():
        width, height = png_size(path)
        assert 600 <= width <= 1400 and 300 <= height <= 1200, f"{name}: {width}x{height} px"
        assert path.stat().st_size > 20_000, f"{name} is suspiciously small"


def test_committed_images_are_the_scripts(drawn):
    """images/ holds exactly the script's figures, at the same pixel size (regenerate with `make images`)."""
    screenshots = {"jupyterlab_classifier.png"}  # taken by the browser test (`make screenshot`), not drawn
    committed = {p.name for p in IMAGES.glob("*.png")} - screenshots
    assert committed == set(drawn), "run `make images` and commit images/"
    for name, path in drawn.items():
        assert png_size(IMAGES / name) == png_size(path), f"images/{name} is out of date: run `make images`"


def test_drawing_is_deterministic(tmp_path):
    drawings = []
    for folder in (tmp_path / "first", tmp_path / "second"):
        folder.mkdir()
        drawings.append(make_images.lora(folder).read_bytes())
    assert drawings[0] == drawings[1]


def test_images_referenced_by_the_course_exist():
    sources = sorted((ROOT / "notebooks").glob("*.ipynb")) + [ROOT / "README.md", ROOT / "GLOSSARY.md"]
    referenced = {name for src in sources if src.is_file()
                  for name in re.findall(r"images/([\w.-]+\.(?:png|jpg|svg|gif))", src.read_text(encoding="utf-8"))}
    assert referenced, "no notebook links an image any more?"
    missing = sorted(name for name in referenced if not (IMAGES / name).is_file())
    assert not missing, f"referenced but missing in images/: {missing}"


def test_box_text_that_overflows_is_refused(tmp_path):
    canvas = make_images.Canvas(3, 2, "overflow")
    canvas.box(0.5, 0.5, 0.6, 0.3, "this label is far too long for its box")
    with pytest.raises(ValueError, match="does not fit"):
        canvas.save(tmp_path, "overflow.png")
    assert not (tmp_path / "overflow.png").exists()


def test_arrows_end_on_box_edges():
    box = make_images.Rect(0, 0, 2, 1)
    assert box.edge_toward((5, 0.5)) == (2, 0.5)  # straight right: the middle of the right edge
    assert box.edge_toward((1, -3)) == (1, 0)  # straight down: the middle of the bottom edge
    assert box.edge_toward((4, 1.0)) == pytest.approx((2, 2 / 3))  # shallow diagonal: leaves through the right
    assert box.edge_toward((4, 2.5)) == pytest.approx((1.75, 1))  # steep diagonal: leaves through the top


@pytest.mark.needs_tokenizer
def test_example_tokens_are_gpt2s():
    """The token pieces and ids drawn in the token figures are what GPT-2's tokenizer gives."""
    import tiktoken

    encoding = tiktoken.get_encoding("gpt2")
    assert make_images.PAD_ID == encoding.eot_token
    assert encoding.decode([make_images.PAD_ID]) == make_images.PAD_TOKEN
    for example in make_images.EXAMPLES:
        ids = encoding.encode_ordinary(example.text)
        assert [i for _, i in example.tokens] == ids, example.text
        assert [piece for piece, _ in example.tokens] == [encoding.decode([i]) for i in ids], example.text
