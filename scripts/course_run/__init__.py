"""The parts of ``make run`` (scripts/run_notebooks.py), one small module each.

* ``widgets``  — plain text for Jupyter widgets (tqdm bars, text boxes) from their saved state;
* ``kernel``   — execute one notebook headless: quiet kernel, live events, Ctrl-C that saves what ran;
* ``progress`` — the progress line (cell heading, cell bar, the notebook's own tqdm bar, time left);
* ``summary``  — the results table people read, from ``outputs/metrics.json``;
* ``report``   — ``outputs/index.html``: every executed notebook as HTML, metrics, figures, environment.
"""
