"""Draw the course's diagrams into images/ (original figures; run `make images` to regenerate)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

IMAGES = Path(__file__).resolve().parents[1] / "images"
Box = tuple[float, float, float, float, str, str]  # x, y, width, height, text, colour


def draw(boxes: list[Box], arrows: list[tuple[int, int]], size: tuple[float, float], title: str, name: str) -> Path:
    """Rounded boxes with centred text, joined by arrows (box index -> box index); saved as PNG."""
    fig, ax = plt.subplots(figsize=size)
    ax.set_xlim(0, size[0]), ax.set_ylim(0, size[1]), ax.axis("off")
    for x, y, w, h, text, colour in boxes:
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=colour, ec="#333333", lw=1.2))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9, wrap=True)
    for a, b in arrows:
        (xa, ya, wa, ha, *_), (xb, yb, wb, hb, *_) = boxes[a], boxes[b]
        start, end = _edge((xa, ya, wa, ha), (xb + wb / 2, yb + hb / 2)), _edge((xb, yb, wb, hb), (xa + wa / 2, ya + ha / 2))
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.3, color="#333333"))
    ax.set_title(title, fontsize=11, fontweight="bold")
    path = IMAGES / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _edge(box: tuple[float, float, float, float], toward: tuple[float, float]) -> tuple[float, float]:
    """The point on a box's border in the direction of ``toward``."""
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    dx, dy = toward[0] - cx, toward[1] - cy
    scale = min(w / 2 / abs(dx) if dx else float("inf"), h / 2 / abs(dy) if dy else float("inf"))
    return cx + dx * scale * 1.08, cy + dy * scale * 1.08


def pretraining_vs_finetuning() -> Path:
    boxes: list[Box] = [
        (0.2, 2.2, 2.2, 1.0, "Huge unlabeled text\n(web pages, books)", "#dbe9f6"),
        (3.0, 2.2, 2.2, 1.0, "Pretraining:\npredict the next token\n(weeks on many GPUs)", "#f6e3c6"),
        (5.8, 2.2, 2.0, 1.0, "Foundation model\n(e.g. GPT-2)", "#d5efd5"),
        (8.5, 3.6, 2.6, 1.0, "Instruction fine-tuning\nbroad tasks, answers in text\n(bigger data, more compute)", "#f3d6e4"),
        (8.5, 0.8, 2.6, 1.0, "Classification fine-tuning\nfixed label set\n(spam / not spam)", "#f3d6e4"),
        (8.6, 2.35, 2.4, 0.7, "your own labelled data", "#ffffff"),
    ]
    return draw(boxes, [(0, 1), (1, 2), (2, 3), (2, 4)], (11.4, 4.9), "Pretraining vs fine-tuning",
                "pretraining_vs_finetuning.png")


def roadmap() -> Path:
    steps = ["01 Concepts", "02 Download\n& balance", "03 Split &\ndata loaders", "04 Pretrained\nGPT-2 + new head",
             "05 Fine-tune", "06 Evaluate\n& use it", "07 LoRA /\nQLoRA", "08 SmolLM2\nfrom PyPI"]
    boxes: list[Box] = [(0.2 + 1.6 * i, 0.5, 1.4, 1.0, s, "#dbe9f6" if i < 3 else "#d5efd5" if i < 6 else "#f6e3c6")
                        for i, s in enumerate(steps)]
    return draw(boxes, [(i, i + 1) for i in range(len(steps) - 1)], (13.0, 2.0),
                "Course roadmap: data -> model -> training -> evaluation -> efficient fine-tuning", "course_roadmap.png")


def classification_head() -> Path:
    boxes: list[Box] = [
        (0.3, 0.3, 2.4, 0.7, "token + position\nembeddings (frozen)", "#e6e6e6"),
        (0.3, 1.3, 2.4, 0.7, "blocks 1..11 (frozen)", "#e6e6e6"),
        (0.3, 2.3, 2.4, 0.7, "block 12 (trainable)", "#d5efd5"),
        (0.3, 3.3, 2.4, 0.7, "final LayerNorm (trainable)", "#d5efd5"),
        (3.6, 4.2, 2.6, 0.7, "old head: 768 -> 50,257\nnext-token logits", "#f3d6e4"),
        (3.6, 2.9, 2.6, 0.7, "new head: 768 -> 2\nham / spam logits", "#f6e3c6"),
    ]
    return draw(boxes, [(0, 1), (1, 2), (2, 3), (3, 5)], (6.6, 5.2),
                "Replacing the output head (read at the last real token)", "classification_head.png")


def lora() -> Path:
    boxes: list[Box] = [
        (0.3, 1.4, 1.4, 0.8, "input x\n(d_in)", "#dbe9f6"),
        (2.3, 2.4, 2.2, 1.0, "pretrained W\nd_out x d_in\nfrozen (fp32 or 4-bit NF4)", "#e6e6e6"),
        (2.3, 0.2, 1.0, 1.0, "A\nr x d_in", "#d5efd5"),
        (3.6, 0.2, 1.0, 1.0, "B\nd_out x r\n(starts at 0)", "#d5efd5"),
        (5.3, 1.4, 1.8, 0.8, "W x + (alpha/r) B A x", "#f6e3c6"),
    ]
    return draw(boxes, [(0, 1), (0, 2), (2, 3), (1, 4), (3, 4)], (7.4, 3.7),
                "LoRA: train a low-rank update, keep W frozen", "lora.png")


if __name__ == "__main__":
    IMAGES.mkdir(exist_ok=True)
    for make in (pretraining_vs_finetuning, roadmap, classification_head, lora):
        print("wrote", make().relative_to(IMAGES.parent))
