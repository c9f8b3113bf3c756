"""A synthetic stand-in for the SMS Spam Collection, used only when ../shared/data is absent.

Same layout as the original zip (``SMSSpamCollection`` + ``readme``), same counts (4,827 ham, 747 spam),
and a few lines that start with a double quote, so pandas' default quoting trap shows up too.
"""
from __future__ import annotations

import io
import json
import random
import zipfile

HAM_WORDS = "ok see you later home now going lunch tonight love call me when free good morning sorry".split()
SPAM_WORDS = "WIN FREE prize claim now txt STOP cash urgent award call 08712345678 reply winner".split()


def synthetic_sms_lines(n_ham: int = 4827, n_spam: int = 747, seed: int = 0) -> list[str]:
    """``label<TAB>text`` lines; some ham lines open a quote that a later line closes."""
    rng = random.Random(seed)
    lines = [f"ham\t{' '.join(rng.choices(HAM_WORDS, k=rng.randint(2, 25)))}" for _ in range(n_ham)]
    lines += [f"spam\t{' '.join(rng.choices(SPAM_WORDS, k=rng.randint(8, 30)))}" for _ in range(n_spam)]
    rng.shuffle(lines)
    for i in (280, 615, 5080):  # an opening quote here, a closing one two lines later
        label, text = lines[i].split("\t")
        lines[i] = f'{label}\t"{text}'
        label, text = lines[i + 2].split("\t")
        lines[i + 2] = f'{label}\t{text}" bye'
    return lines


def synthetic_sms_zip() -> tuple[bytes, bytes]:
    """(zip bytes, the ``SMSSpamCollection`` member bytes)."""
    member = ("\n".join(synthetic_sms_lines()) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("SMSSpamCollection", member)
        archive.writestr("readme", "Synthetic stand-in for the SMS Spam Collection (tests only).\r\n")
    return buffer.getvalue(), member


def synthetic_instruction_data(n: int = 1100, seed: int = 0) -> bytes:
    """A stand-in for ``instruction-data.json``: a JSON list of ``n`` instruction / input / output objects,
    about 70 % with an empty input like the original."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        word = rng.choice(HAM_WORDS)
        has_input = rng.random() < 0.3
        records.append({"instruction": f"Rewrite the word in capitals ({i})." if has_input else f"Say '{word}' ({i}).",
                        "input": word if has_input else "",
                        "output": word.upper() if has_input else f"{word.capitalize()}."})
    return json.dumps(records, indent=4).encode()
