"""Draw the course's diagrams (original figures) into ``images/``.

Run ``make images`` or ``python scripts/make_images.py [OUTPUT_DIR]``. Headless (Agg) and deterministic: the
same matplotlib version writes the same bytes. Every figure uses one style: the colours below, DejaVu Sans,
boxes drawn by ``Canvas.box`` (whose text must fit inside, checked when saving) and arrows that end on box edges.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402
from matplotlib.text import Text  # noqa: E402

IMAGES = Path(__file__).resolve().parents[1] / "images"
DPI = 110

# --- Style: one palette for every figure ---------------------------------------------------------------
INK, MUTED, ACCENT = "#333333", "#8a8a8a", "#c0392b"  # text and lines; notes; "read here"
DATA, MODEL, TRAIN, INSTRUCT = "#dbe9f6", "#d5efd5", "#f6e3c6", "#f3d6e4"  # pipeline stages
FROZEN, PAD, WHITE = "#e6e6e6", "#e3e3e3", "#ffffff"
TEXT_COLOURS = ("#f7c8a0", "#b9d5f0", "#c4e6c4")  # one colour per example text (token figures)
plt.rcParams.update({"font.family": "DejaVu Sans", "font.size": 9, "hatch.color": "#c4c4c4"})


# --- The example batch: three short SMS as GPT-2 tokens ------------------------------------------------
PAD_TOKEN, PAD_ID = "<|endoftext|>", 50256  # GPT-2's end-of-text token doubles as padding


@dataclass(frozen=True)
class Example:
    """One SMS, its label and its GPT-2 tokens as (text piece, id); checked against tiktoken in the tests."""

    label: str
    text: str
    tokens: tuple[tuple[str, int], ...]


EXAMPLES = (
    Example("spam", "Claim your FREE prize now!",
            (("Claim", 44819), (" your", 534), (" FREE", 17189), (" prize", 11596), (" now", 783), ("!", 0))),
    Example("ham", "I'm home.", (("I", 40), ("'m", 1101), (" home", 1363), (".", 13))),
    Example("ham", "Thank u!", (("Thank", 10449), (" u", 334), ("!", 0))),
)


@dataclass(frozen=True)
class Token:
    """One cell of a token strip: what it shows, its colour, and whether it is padding / the position read."""

    piece: str
    token_id: int
    colour: str
    is_pad: bool = False
    read: bool = False


def shown(piece: str) -> str:
    """A token's text with its leading space made visible (GPT-2 tokens carry the space before a word)."""
    return piece.replace(" ", "\u2423")


def padded_row(example: Example, colour: str, width: int) -> list[Token]:
    """``example`` right-padded with ``<|endoftext|>`` to ``width``; its last real token is the one read."""
    n = len(example.tokens)
    real = [Token(p, i, colour, read=k == n - 1) for k, (p, i) in enumerate(example.tokens)]
    return real + [Token(PAD_TOKEN, PAD_ID, PAD, is_pad=True) for _ in range(width - n)]


# --- Canvas: a figure whose data coordinates are inches -------------------------------------------------
@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2

    def edge_toward(self, point: tuple[float, float]) -> tuple[float, float]:
        """Where the line from the centre toward ``point`` leaves this rectangle."""
        (cx, cy), (px, py) = self.centre, point
        dx, dy = px - cx, py - cy
        scale = min(self.w / 2 / abs(dx) if dx else float("inf"), self.h / 2 / abs(dy) if dy else float("inf"))
        return cx + dx * scale, cy + dy * scale


@dataclass
class Canvas:
    """A ``width`` x ``height`` inch drawing; ``box`` texts are checked to fit inside their boxes on ``save``."""

    width: float
    height: float
    title: str
    boxed: list[tuple[Text, Rect]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fig = plt.figure(figsize=(self.width, self.height))
        self.ax = self.fig.add_axes((0, 0, 1, 1))
        self.ax.set_xlim(0, self.width), self.ax.set_ylim(0, self.height), self.ax.axis("off")
        self.text(self.width / 2, self.height - 0.25, self.title, size=12, weight="bold")

    def text(self, x: float, y: float, s: str, **kw) -> Text:
        """Free text (notes, labels), centred unless told otherwise."""
        kw = {"ha": "center", "va": "center", "color": INK, **kw}
        return self.ax.text(x, y, s, **kw)

    def note(self, x: float, y: float, s: str, **kw) -> Text:
        """A muted remark beside the drawing."""
        return self.text(x, y, s, **{"size": 8.5, "color": MUTED, **kw})

    def heading(self, y: float, s: str) -> Text:
        """A numbered step of a figure, flush left."""
        return self.text(0.1, y, s, ha="left", size=9.5, weight="bold")

    def box(self, x: float, y: float, w: float, h: float, text: str = "", colour: str = WHITE, *,
            size: float = 9, dashed: bool = False, edge: str = INK, lw: float = 1.2, hatch: str | None = None,
            rounded: bool = True, **text_kw) -> Rect:
        """A (rounded) box with centred text; the patch covers exactly x..x+w, y..y+h so arrows meet its edge."""
        style = f"round,pad=0,rounding_size={min(0.08, w / 4, h / 4)}" if rounded else "square,pad=0"
        self.ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, fc=colour, ec=edge, lw=lw,
                                         ls="--" if dashed else "-", hatch=hatch))
        rect = Rect(x, y, w, h)
        if text:
            self.boxed.append((self.text(x + w / 2, y + h / 2, text, size=size, **text_kw), rect))
        return rect

    def arrow(self, a: Rect | tuple[float, float], b: Rect | tuple[float, float], colour: str = INK) -> None:
        """An arrow from box (or point) ``a`` to box (or point) ``b``, starting and ending on the box edges."""
        pa = a.centre if isinstance(a, Rect) else a
        pb = b.centre if isinstance(b, Rect) else b
        start = a.edge_toward(pb) if isinstance(a, Rect) else a
        end = b.edge_toward(pa) if isinstance(b, Rect) else b
        self.ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=13, lw=1.3,
                                          color=colour, shrinkA=0, shrinkB=0))

    def path_arrow(self, points: list[tuple[float, float]]) -> None:
        """A polyline whose last segment ends in an arrowhead (for elbow connections)."""
        xs, ys = zip(*points[:-1])
        self.ax.plot(xs, ys, color=INK, lw=1.3, solid_capstyle="projecting")
        self.arrow(points[-2], points[-1])

    def cross_out(self, r: Rect, colour: str = ACCENT) -> None:
        """Two diagonal strokes across a box: "not used"."""
        for (x0, y0), (x1, y1) in (((r.x, r.y), (r.x + r.w, r.y + r.h)), ((r.x, r.y + r.h), (r.x + r.w, r.y))):
            self.ax.plot([x0, x1], [y0, y1], color=colour, lw=1.1)

    def outline(self, r: Rect, colour: str = ACCENT, pad: float = 0.04) -> None:
        """A thick frame around a box: "this is the one"."""
        self.ax.add_patch(Rectangle((r.x - pad, r.y - pad), r.w + 2 * pad, r.h + 2 * pad, fill=False,
                                    ec=colour, lw=2.4))

    def legend(self, x: float, y: float, entries: list[tuple[str, dict]], step: float = 0.3) -> None:
        """Swatches (``Rectangle`` keyword arguments) with a label each, one under the other from (x, y)."""
        for k, (label, style) in enumerate(entries):
            top = y - k * step
            self.ax.add_patch(Rectangle((x, top - 0.09), 0.28, 0.18, **{"ec": INK, "lw": 0.8, **style}))
            self.text(x + 0.4, top, label, ha="left", size=8.5)

    def save(self, out_dir: Path, name: str) -> Path:
        """Check every box text fits its box, then write ``out_dir/name`` as PNG."""
        self.fig.canvas.draw()
        to_pixels = self.ax.transData.transform
        for text, r in self.boxed:
            tb = text.get_window_extent()
            (x0, y0), (x1, y1) = to_pixels((r.x, r.y)), to_pixels((r.x + r.w, r.y + r.h))
            if tb.x0 < x0 - 0.5 or tb.x1 > x1 + 0.5 or tb.y0 < y0 - 0.5 or tb.y1 > y1 + 0.5:
                plt.close(self.fig)
                raise ValueError(f"{name}: the text {text.get_text()!r} does not fit inside its box")
        path = Path(out_dir) / name
        self.fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.08, facecolor=WHITE,
                         metadata={"Software": None})
        plt.close(self.fig)
        return path

    # --- token-level pieces shared by the token figures ---
    def token_strip(self, x: float, y: float, tokens: list[Token], cell: tuple[float, float],
                    ids: bool = True) -> list[Rect]:
        """One row of token cells from (x, y): the token's text, and its id underneath."""
        (w, h), rects = cell, []
        for k, t in enumerate(tokens):
            label = shown(t.piece) + (f"\n{t.token_id}" if ids else "")
            rects.append(self.box(x + k * w, y, w, h, label, t.colour, size=8 if t.is_pad else 9, rounded=False,
                                  lw=0.8, hatch="//" if t.is_pad else None,
                                  color="#555555" if t.is_pad else INK))
            if t.read:
                self.outline(rects[-1])
        return rects

    def mask_grid(self, x: float, top: float, cell: float, tokens: list[Token],
                  allowed: Callable[[int, int], bool]) -> Rect:
        """The attention mask as a grid: row i (query) may look at column j (key) where ``allowed(i, j)``.

        Allowed cells take the query token's colour (padding rows grey); masked cells stay white. Rows are
        labelled with their token and slot number, columns with the slot number; a row that is read by the
        classifier gets a red frame around the cells it may attend to.
        """
        n = len(tokens)
        for i, q in enumerate(tokens):
            y = top - (i + 1) * cell
            self.text(x - 0.08, y + cell / 2, f"{shown(q.piece)}  {i}", ha="right", size=8,
                      color=MUTED if q.is_pad else INK)
            for j in range(n):
                fill = (PAD if q.is_pad else q.colour) if allowed(i, j) else WHITE
                self.ax.add_patch(Rectangle((x + j * cell, y), cell, cell, fc=fill, ec="#bbbbbb", lw=0.6,
                                            hatch="//" if allowed(i, j) and q.is_pad else None))
            if q.read:
                seen = [j for j in range(n) if allowed(i, j)]
                self.outline(Rect(x + seen[0] * cell, y, (seen[-1] - seen[0] + 1) * cell, cell), pad=0)
        for j in range(n):
            self.text(x + (j + 0.5) * cell, top + 0.12, str(j), size=8)
        grid = Rect(x, top - n * cell, n * cell, n * cell)
        self.ax.add_patch(Rectangle((grid.x, grid.y), grid.w, grid.h, fill=False, ec=INK, lw=1.0))
        self.note(grid.x + grid.w / 2, top + 0.35, "key j (slot in the row): the token looked at")
        self.note(grid.x - 1.45, grid.y + grid.h / 2, "query i: the token looking", rotation=90)
        return grid


def mask_legend(c: Canvas, x: float, y: float, padding: bool) -> None:
    """The key shared by the two mask figures (the padding swatch only where there is padding)."""
    entries = [("may attend (coloured)", {"fc": TEXT_COLOURS[1]}),
               ("masked: score set to \u2212\u221e,\nsoftmax weight 0", {"fc": WHITE}),
               (f"padding ({PAD_TOKEN}, id {PAD_ID})", {"fc": PAD, "hatch": "//"}),
               ("position read by the classifier", {"fc": WHITE, "ec": ACCENT, "lw": 2.4})]
    c.legend(x, y, entries if padding else entries[:2] + entries[3:], step=0.36)


# --- The figures ---------------------------------------------------------------------------------------
def pretraining_vs_finetuning(out_dir: Path) -> Path:
    """Two stages: pretraining makes a foundation model; fine-tuning adapts it with your own, smaller data."""
    c = Canvas(10.6, 5.2, "Pretraining vs fine-tuning")
    web = c.box(0.1, 2.15, 1.9, 0.9, "Huge unlabelled text\n(web pages, books)", DATA)
    pre = c.box(2.5, 2.15, 2.0, 0.9, "Pretraining:\npredict the next token\n(weeks on many GPUs)", TRAIN)
    base = c.box(5.0, 2.15, 1.7, 0.9, "Foundation model\n(e.g. GPT-2,\nSmolLM2)", MODEL)
    inst = c.box(7.2, 3.3, 1.8, 0.75, "Instruction\nfine-tuning", TRAIN)
    clf = c.box(7.2, 1.15, 1.8, 0.75, "Classification\nfine-tuning", TRAIN)
    inst_data = c.box(7.0, 4.3, 2.2, 0.55, "instruction \u2192 response pairs", DATA, size=8.5)
    clf_data = c.box(7.0, 0.35, 2.2, 0.55, "labelled SMS: ham / spam", DATA, size=8.5)
    chat = c.box(9.4, 3.3, 1.15, 0.75, "assistant\n(notebooks\n10\u201311)", INSTRUCT, size=8.5)
    spam = c.box(9.4, 1.15, 1.15, 0.75, "spam filter\n(notebooks\n02\u201309)", INSTRUCT, size=8.5)
    for a, b in ((web, pre), (pre, base), (base, inst), (base, clf), (inst_data, inst), (clf_data, clf),
                 (inst, chat), (clf, spam)):
        c.arrow(a, b)
    c.note(2.3, 3.35, "pretraining: done once, by a lab", style="italic")
    c.note(4.75, 0.62, "fine-tuning: you, with your own (much smaller)\nlabelled data; hours on a laptop",
           style="italic")
    return c.save(out_dir, "pretraining_vs_finetuning.png")


ROADMAP = (  # (notebook, what it does, stage colour)
    ("01", "Ideas: what\nfine-tuning is", DATA), ("02", "Download\n& balance", DATA),
    ("03", "Split &\ndata loaders", DATA), ("04", "Pretrained GPT-2\n+ new head", MODEL),
    ("05", "Fine-tune", MODEL), ("06", "Evaluate\n& use it", MODEL),
    ("07", "LoRA &\nQLoRA", TRAIN), ("08", "SmolLM2", TRAIN), ("09", "What matters:\nexperiments table", TRAIN),
    ("10", "Instruction fine-tuning:\nSMS task as an instruction,\ngeneral instructions", INSTRUCT),
    ("11", "Your own instruction\ndata: support\ntickets as JSON", INSTRUCT),
)


def roadmap(out_dir: Path) -> Path:
    """The eleven notebooks in order, in two rows joined by an elbow arrow; stage colours with captions."""
    c = Canvas(10.6, 4.6, "Course roadmap")
    w, h, gap, right = 1.45, 1.0, 0.3, 10.35
    wide = (right - (0.15 + 3 * (w + gap)) - gap) / 2  # notebooks 10 and 11 share the rest of row 2
    boxes: list[Rect] = []
    for k, (number, what, colour) in enumerate(ROADMAP):
        row, col = divmod(k, 6)
        x = 0.15 + col * (w + gap) if k < 9 else boxes[-1].x + boxes[-1].w + gap
        boxes.append(c.box(x, 2.75 - row * 1.85, w if k < 9 else wide, h, f"{number}\n{what}", colour, size=8.5))
    for a, b in zip(boxes, boxes[1:]):
        if a.y == b.y:
            c.arrow(a, b)
    last, first = boxes[5], boxes[6]  # row 1's end joins row 2's start
    mid = last.y - 0.2
    c.path_arrow([(last.centre[0], last.y), (last.centre[0], mid), (first.centre[0], mid),
                  (first.centre[0], first.y + first.h)])
    for (start, stop), caption in (((0, 2), "the idea and the data"), ((3, 5), "a GPT-2 spam classifier"),
                                   ((6, 8), "cheaper training, another model"), ((9, 10), "instruction fine-tuning")):
        a, b = boxes[start], boxes[stop]
        c.note((a.x + b.x + b.w) / 2, a.y + h + 0.15, caption, style="italic")
    c.box(0.15, 0.1, 10.3, 0.45, "every notebook: exercises + solutions     \u00b7     helpers/finetune: "
          "the same recipe on the command line (torchrun for several processes)", WHITE, dashed=True, size=8.5,
          edge=MUTED)
    return c.save(out_dir, "course_roadmap.png")


def classification_head(out_dir: Path) -> Path:
    """A padded SMS through GPT-2; the new 2-class head reads the output at the last real token."""
    example, width = EXAMPLES[0], 8
    tokens = padded_row(example, TEXT_COLOURS[0], width)
    c = Canvas(9.6, 6.6, "Classification head: read the output at the last real token")
    x0, cw = 1.1, 0.95
    strip = c.token_strip(x0, 0.35, tokens, (cw, 0.55))
    c.note(x0 - 0.1, 0.62, "tokens\n(ids)", ha="right")
    c.note(x0 + width * cw / 2, 0.12, f"\"{example.text}\": {len(example.tokens)} real tokens, right-padded to "
           f"the batch's longest ({width}); \u2423 = the space that belongs to a token")
    layers = [("token + position embeddings (frozen)", FROZEN), ("blocks 1\u201311 (frozen)", FROZEN),
              ("block 12 (trainable)", MODEL), ("final LayerNorm (trainable)", MODEL)]
    for k, (name, colour) in enumerate(layers):
        c.box(x0, 1.3 + k * 0.5, width * cw, 0.4, name, colour, rounded=False)
    for r in strip:
        c.arrow((r.centre[0], r.y + r.h), (r.centre[0], 1.3))
    c.note(x0 - 0.1, 2.2, "GPT-2\n(causal:\nposition k\nsees tokens\n0 to k)", ha="right")
    outputs = []
    for k, t in enumerate(tokens):
        x = x0 + k * cw + 0.15
        outputs.append(c.box(x, 3.55, cw - 0.3, 0.45, f"h{k}", PAD if t.is_pad else WHITE, size=8.5,
                             color=MUTED if t.is_pad else INK))
        c.arrow((outputs[-1].centre[0], 3.3), outputs[-1])
    c.note(x0 - 0.1, 3.78, "768 numbers\nper position", ha="right")
    read = len(example.tokens) - 1
    c.outline(outputs[read])
    c.cross_out(outputs[-1], MUTED)
    c.note(outputs[-1].centre[0], 4.35, "last position\n= padding:\nnot read", size=8)
    head = c.box(outputs[read].centre[0] - 1.1, 4.7, 2.2, 0.55, "new head: 768 \u2192 2 (trainable)", TRAIN)
    c.arrow(outputs[read], head)
    c.text(outputs[read].centre[0] - 1.25, 4.25, f"read at index = length \u2212 1 = {read}", ha="right",
           size=8.5, color=ACCENT)
    logits = c.box(head.centre[0] - 0.9, 5.6, 1.8, 0.45, "2 logits: ham, spam", INSTRUCT)
    c.arrow(head, logits)
    old = c.box(0.25, 4.75, 2.6, 0.5, "old head: 768 \u2192 50,257\nnext-token logits", WHITE, size=8.5,
                color=MUTED, edge=MUTED, dashed=True)
    c.note(old.centre[0], old.y - 0.15, "removed: replaced by the new head", size=8)
    return c.save(out_dir, "classification_head.png")


def lora(out_dir: Path) -> Path:
    """h = W x + (alpha / r) B A x, with matrices drawn to their shapes: W frozen, A and B small and trainable."""
    c = Canvas(7.8, 5.8, "LoRA: train a low-rank update, keep W frozen")
    x_in = c.box(0.2, 1.5, 0.5, 2.2, "x\n\nd_in", DATA)
    w = c.box(1.4, 2.4, 2.0, 1.9, "W\nd_out \u00d7 d_in\n\nfrozen\n(fp32, or 4-bit\nNF4 in QLoRA)", FROZEN)
    a = c.box(1.4, 0.85, 2.0, 0.55, "A   r \u00d7 d_in", MODEL)
    b = c.box(4.1, 0.175, 0.55, 1.9, "B", MODEL)
    scale = c.box(5.3, 0.85, 0.9, 0.55, "\u00d7 alpha / r", TRAIN, size=8.5)
    plus = c.box(5.525, 3.125, 0.45, 0.45, "+", WHITE, size=12)
    h_out = c.box(6.6, 2.25, 0.5, 2.2, "h\n\nd_out", INSTRUCT)
    for p, q in ((x_in, w), (x_in, a), (a, b), (b, scale), (scale, plus), (w, plus), (plus, h_out)):
        c.arrow(p, q)
    c.text(b.x + b.w + 0.1, 1.85, "d_out \u00d7 r\nstarts at 0", ha="left", size=8.5)
    c.note(2.4, 0.55, "random at start; r is small (e.g. 16)")
    c.text(3.9, 4.5, "h = W x + (alpha / r) \u00b7 B A x\n"
                       "\u0394W = (alpha / r) \u00b7 B A has rank \u2264 r; B = 0 at the start,\n"
                       "so training starts exactly from the pretrained model.\n"
                       "Trains r\u00b7(d_in + d_out) numbers instead of d_in\u00b7d_out.", size=8.5, va="bottom")
    c.legend(6.5, 0.75, [("trainable", {"fc": MODEL}), ("frozen", {"fc": FROZEN})], step=0.28)
    return c.save(out_dir, "lora.png")


def padding_and_causal_mask(out_dir: Path) -> Path:
    """A right-padded batch of three SMS, and the causal mask of the padded one: no real token sees padding."""
    width = max(len(e.tokens) for e in EXAMPLES)
    rows = [padded_row(e, colour, width) for e, colour in zip(EXAMPLES, TEXT_COLOURS)]
    c = Canvas(9.8, 7.9, "Padding and the causal mask")
    x0, cw, ch = 1.5, 0.95, 0.55
    c.heading(7.3, f"1. A batch must be a rectangle: each text is right-padded with {PAD_TOKEN} (id {PAD_ID}) "
           "to the batch's longest.")
    for k, (example, row) in enumerate(zip(EXAMPLES, rows)):
        y = 6.45 - k * (ch + 0.12)
        c.token_strip(x0, y, row, (cw, ch))
        c.text(x0 - 0.1, y + ch / 2, f"{example.label}\nlength {len(example.tokens)}", ha="right", size=8.5)
    n_pad = sum(t.is_pad for row in rows for t in row)
    c.note(x0 + width * cw + 0.15, 5.9, f"{len(rows)} \u00d7 {width} = {len(rows) * width} slots,\n"
           f"{n_pad} of them padding", ha="left")
    c.note(x0, 4.9, "Each cell: the token (\u2423 = the space that belongs to it) and its id.", ha="left")
    c.text(x0, 4.62, "The classifier reads each row at index length \u2212 1 (red frame), never at the last column.",
           ha="left", size=8.5, color=ACCENT)

    example, tokens = EXAMPLES[1], rows[1]
    c.heading(4.2, f"2. The causal mask of the row \"{example.text}\" (query rows \u00d7 key columns)")
    grid = c.mask_grid(2.6, 3.35, 0.5, tokens, lambda i, j: j <= i)
    last = len(example.tokens) - 1
    notes = ("Row i may look at columns 0..i (the lower triangle):\na token sees itself and the tokens before it.\n\n"
             "Padding sits on the RIGHT of every real token, so\nit is always in the masked upper triangle:\n"
             "a real token never attends to padding.\n\n"
             f"Row {last} (\"{shown(example.tokens[-1][0])}\") has seen all {len(example.tokens)} real tokens "
             "and no\npadding: that is the row we read. Padding rows\nare computed but never read.")
    c.text(grid.x + grid.w + 0.35, grid.y + grid.h, notes, ha="left", va="top", size=8.5)
    mask_legend(c, grid.x + grid.w + 0.4, grid.y + 1.05, padding=True)
    return c.save(out_dir, "padding_and_causal_mask.png")


def sequence_packing(out_dir: Path) -> Path:
    """The same three SMS packed into one row: block-diagonal causal mask, positions restart, no padding."""
    tokens = [Token(p, i, colour, read=k == len(e.tokens) - 1)
              for e, colour in zip(EXAMPLES, TEXT_COLOURS) for k, (p, i) in enumerate(e.tokens)]
    owner = [n for n, e in enumerate(EXAMPLES) for _ in e.tokens]  # which text each packed token comes from
    positions = [k for e in EXAMPLES for k in range(len(e.tokens))]
    n, width = len(tokens), max(len(e.tokens) for e in EXAMPLES)
    c = Canvas(10.2, 8.9, "Sequence packing: the same batch without padding")
    x0, cw, ch = 1.5, 0.62, 0.55
    c.heading(8.3, "1. The texts of a batch are concatenated into one row; nothing is padded.")
    strip = c.token_strip(x0, 7.45, tokens, (cw, ch))
    c.text(x0 - 0.1, 7.45 + ch / 2, "tokens\n(ids)", ha="right", size=8.5)
    for r, p in zip(strip, positions):
        c.box(r.x, 7.1, r.w, 0.3, str(p), WHITE, rounded=False, lw=0.6, size=8.5)
    c.text(x0 - 0.1, 7.25, "position", ha="right", size=8.5)
    c.note(x0, 6.8, f"Positions restart at 0 for every text. 1 \u00d7 {n} = {n} slots, 0 padding "
           f"(padded, the same batch takes {len(EXAMPLES)} \u00d7 {width} = {len(EXAMPLES) * width}).", ha="left")
    c.text(x0, 6.52, "The classifier reads the last token of each text (red frames).", ha="left", size=8.5,
           color=ACCENT)

    c.heading(5.95, "2. A block-diagonal causal mask (query rows \u00d7 key columns)")
    grid = c.mask_grid(2.6, 5.2, 0.36, tokens, lambda i, j: owner[i] == owner[j] and j <= i)
    notes = ("Each text keeps its own lower triangle: one\nblock per text on the diagonal. Everything\n"
             "off the blocks is masked: a token never sees\nanother text.\n\n"
             "With positions restarting at 0, each text is\ncomputed as if it were alone in the batch\n"
             "(the same result up to rounding), and no\ncompute is spent on padding.")
    c.text(grid.x + grid.w + 0.35, grid.y + grid.h, notes, ha="left", va="top", size=8.5)
    mask_legend(c, grid.x + grid.w + 0.4, grid.y + 0.7, padding=False)
    return c.save(out_dir, "sequence_packing.png")


FIGURES = (pretraining_vs_finetuning, roadmap, classification_head, lora, padding_and_causal_mask,
           sequence_packing)


def main(out_dir: Path = IMAGES) -> list[Path]:
    """Draw every figure into ``out_dir`` (created if missing); returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [figure(out_dir) for figure in FIGURES]


if __name__ == "__main__":
    for written in main(Path(sys.argv[1]) if len(sys.argv) > 1 else IMAGES):
        print("wrote", written)
