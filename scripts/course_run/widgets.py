"""Plain text for Jupyter widgets, from the state the kernel sent (``ipywidgets`` models).

Two users: the progress line shows a notebook's tqdm bar (a widget: HBox of HTML, FloatProgress, HTML) as
one line of text, and the course report replaces every widget by this text, because a page that opens
without a network cannot load the widget JavaScript from a CDN.
"""
from __future__ import annotations

import html
import re
from typing import Any

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"  # an output that displays a widget
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"  # notebook metadata: every widget's last state
MODEL_PREFIX = "IPY_MODEL_"  # how a widget refers to its children

States = dict[str, dict[str, Any]]  # model id -> state (``_model_name``, ``value``, ``children``, ...)


def plain(value: Any) -> str:
    """HTML widget text as plain text (tqdm pads with figure spaces U+2007 and escapes ``<``)."""
    text = re.sub(r"<[^>]+>", "", str(value))
    return html.unescape(text).replace("\u2007", " ").replace("\xa0", " ").strip()


def text_bar(fraction: float, width: int = 10) -> str:
    """A bar like ``█████▌    `` for 0 <= fraction <= 1."""
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = round(fraction * width * 8)
    full, rest = divmod(eighths, 8)
    partial = " ▏▎▍▌▋▊▉"[rest] if full < width else ""
    return ("█" * full + partial).ljust(width)


def _children(state: dict[str, Any]) -> list[str]:
    return [str(child).removeprefix(MODEL_PREFIX) for child in state.get("children") or []]


def _output_text(outputs: list[dict[str, Any]]) -> str:
    """The text of an Output widget's captured outputs."""
    parts = []
    for output in outputs:
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        else:
            data = output.get("data", {})
            parts.append(data.get("text/plain", "") if isinstance(data, dict) else "")
    return "".join("".join(part) if isinstance(part, list) else part for part in parts).strip()


def widget_text(states: States, model_id: str) -> str:
    """What a widget shows, as text: boxes join their children, a progress bar becomes ``█████``."""
    state = states.get(model_id.removeprefix(MODEL_PREFIX)) or {}
    name = str(state.get("_model_name", ""))
    if "children" in state:
        separator = "\n" if name.startswith(("VBox", "GridBox", "Accordion", "Tab")) else " "
        return separator.join(t for t in (widget_text(states, c) for c in _children(state)) if t)
    if "Progress" in name:
        low, high = float(state.get("min", 0)), float(state.get("max", 100))
        value = float(state.get("value", low))
        return text_bar((value - low) / (high - low) if high > low else 1.0)
    if name == "ButtonModel":
        return f"[ {state.get('description', '')} ]"
    if name == "OutputModel":
        return _output_text(state.get("outputs") or [])
    value = state.get("value")
    parts = [plain(state.get("description") or ""), plain(value) if value not in (None, "") else ""]
    return " ".join(part for part in parts if part)


def is_progress_bar(states: States, model_id: str) -> bool:
    """True for a box holding a progress model (how tqdm.notebook draws a bar)."""
    state = states.get(model_id) or {}
    return any("Progress" in str(states.get(child, {}).get("_model_name", "")) for child in _children(state))


def progress_bar_text(states: States, model_id: str) -> str | None:
    """The text of the tqdm bar that ``model_id`` belongs to (the bar itself or one of its parts)."""
    if is_progress_bar(states, model_id):
        return widget_text(states, model_id)
    for parent_id, state in states.items():
        if model_id in _children(state) and is_progress_bar(states, parent_id):
            return widget_text(states, parent_id)
    return None


def notebook_widget_states(notebook: dict[str, Any]) -> States:
    """Every widget's last state, from an executed notebook's metadata (empty when it has none)."""
    saved = notebook.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    return {model_id: entry.get("state", {}) for model_id, entry in saved.items()}


def replace_widgets_by_text(notebook: dict[str, Any]) -> int:
    """Turn every widget output into its text (from the widget's last state); return how many.

    Drops the widget metadata too, so nbconvert writes no widget-manager script for the page.
    """
    states = notebook_widget_states(notebook)
    replaced = 0
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            if view is None:
                continue
            text = widget_text(states, view.get("model_id", "")) or output["data"].get("text/plain", "")
            output["data"]["text/plain"] = "".join(text) if isinstance(text, list) else text
            del output["data"][WIDGET_VIEW]
            replaced += 1
    notebook.get("metadata", {}).pop("widgets", None)
    return replaced
