"""helpers.checkpoints: classifiers and LoRA adapters round-trip; a bad file never half-changes a model and
always raises ``CheckpointError`` before memory is allocated for it."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import checkpoints, evaluate
from helpers.lora import apply_lora, lora_layers
from helpers.models.base import CheckpointError, add_classifier_head, last_token_logits, set_seed
from helpers.models.gpt2 import GPT2Config, GPT2Model, gpt2_tokenizer

pytestmark = pytest.mark.needs_tokenizer
CFG = GPT2Config(vocab_size=50257, context_length=256, emb_dim=32, n_heads=2, n_layers=3)
IDS = torch.tensor([[10, 20, 30, 40]])


def pretrained(seed: int = 0) -> GPT2Model:
    """A "freshly loaded" model: LM head tied to the embedding, tokenizer attached."""
    set_seed(seed)
    model = GPT2Model(CFG).eval()
    model.tokenizer = gpt2_tokenizer()
    return model


@pytest.fixture
def saved(tmp_path):
    """A classifier saved with max_length 12 and its own label names, and its path."""
    model = add_classifier_head(pretrained(), trainable_blocks=1)
    path = checkpoints.save_classifier(model, tmp_path / "clf.pt", max_length=12, labels={"ok": 0, "junk": 1})
    return model, path


def test_classifier_round_trip(saved):
    model, path = saved
    loaded = checkpoints.load_classifier(path, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(last_token_logits(loaded, IDS, [4]), last_token_logits(model, IDS, [4]),
                                   atol=0, rtol=0)
    assert loaded.labels == {"ok": 0, "junk": 1} and loaded.max_length == 12 and not loaded.training
    assert [p.name for p in path.parent.iterdir()] == ["clf.pt"]  # no temporary file left behind


def test_classify_uses_the_stored_length_and_label_names(saved):
    loaded = checkpoints.load_classifier(saved[1])
    result = evaluate.classify(loaded, "win cash " * 50)
    assert result.truncated and result.tokens_used == 12
    assert result.label in {"ok", "junk"} and set(result.probabilities) == {"ok", "junk"}
    assert evaluate.classify(loaded, "win cash " * 50, max_length=20).tokens_used == 20


def test_save_classifier_needs_the_training_length(tmp_path):
    with pytest.raises(ValueError, match="max_length="):
        checkpoints.save_classifier(add_classifier_head(pretrained()), tmp_path / "x.pt")


def rewrite(path, tmp_path, edit) -> object:
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, tmp_path / "edited.pt")
    return tmp_path / "edited.pt"


def test_unreadable_or_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint"):
        checkpoints.load_classifier(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoints.load_classifier(tmp_path / "bad.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a course classifier"):
        checkpoints.load_classifier(tmp_path / "other.pt")


@pytest.mark.parametrize("key", ["state_dict", "config", "max_length", "architecture"])
def test_a_missing_key_is_a_checkpoint_error(saved, tmp_path, key):
    edited = rewrite(saved[1], tmp_path, lambda c: c.pop(key))
    with pytest.raises(CheckpointError, match=rf"incomplete \(missing \['{key}'\]"):
        checkpoints.load_classifier(edited)


def test_missing_or_misshapen_tensors_are_named(saved, tmp_path):
    edited = rewrite(saved[1], tmp_path, lambda c: c["state_dict"].pop("blocks.2.ff.fc.bias"))
    with pytest.raises(CheckpointError, match=r"missing \['blocks.2.ff.fc.bias'\]"):
        checkpoints.load_classifier(edited)
    edited = rewrite(saved[1], tmp_path, lambda c: c["state_dict"].update({"out_head.weight": torch.zeros(3, 32)}))
    with pytest.raises(CheckpointError, match=r"out_head.weight: file \(3, 32\) vs model \(2, 32\)"):
        checkpoints.load_classifier(edited)


def test_a_huge_config_is_refused_before_allocating(saved, tmp_path):
    edited = rewrite(saved[1], tmp_path, lambda c: c["config"].update(emb_dim=4_000_000, n_heads=1))
    with pytest.raises(CheckpointError, match="more than any course model"):
        checkpoints.load_classifier(edited)
    edited = rewrite(saved[1], tmp_path, lambda c: c["config"].update(n_layers=30))  # fits memory, not the file
    with pytest.raises(CheckpointError, match=r"missing \['blocks.10"):
        checkpoints.load_classifier(edited)


def test_non_finite_classifier_weights_are_rejected(saved, tmp_path):
    edited = rewrite(saved[1], tmp_path, lambda c: c["state_dict"]["out_head.weight"].fill_(float("nan")))
    with pytest.raises(CheckpointError, match=r"NaN or inf values, e.g. \['out_head.weight'\]"):
        checkpoints.load_classifier(edited)


# ----------------------------------------------------------------------------- adapters
@pytest.fixture
def adapters(tmp_path):
    """A LoRA classifier (rank 4) with non-zero B, saved; returns (model, path)."""
    model = apply_lora(add_classifier_head(pretrained(), trainable_blocks=0), rank=4, alpha=8)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.B.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "adapters.safetensors"
    checkpoints.save_adapters(model, path)
    return model, path


def edited_adapters(path, tmp_path, edit_tensors=lambda t: t, edit_meta=lambda m: m):
    """A copy of the adapter file at ``path`` with its tensors and metadata edited, under a new name."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    out = tmp_path / f"edited-{len(list(tmp_path.iterdir()))}.safetensors"
    save_file(edit_tensors(tensors), str(out), metadata=edit_meta(meta))
    return out


def assert_untouched(model: GPT2Model) -> None:
    assert not lora_layers(model) and not hasattr(model, "lora_config")
    assert model.out_head.weight is model.tok_emb.weight  # still the pretrained LM head


def test_adapters_round_trip(adapters):
    model, path = adapters
    reloaded = checkpoints.load_adapters(pretrained(), path)
    with torch.no_grad():
        torch.testing.assert_close(last_token_logits(reloaded, IDS, [4]), last_token_logits(model, IDS, [4]),
                                   atol=0, rtol=0)
    assert [p.name for p in path.parent.iterdir()] == ["adapters.safetensors"]  # written atomically


def test_a_wrong_rank_file_leaves_the_model_untouched(adapters, tmp_path):
    _, path = adapters
    wrong = edited_adapters(path, tmp_path, edit_meta=lambda m: m | {"rank": "8"})
    model = pretrained()
    with pytest.raises(CheckpointError, match=r"wrong shapes \['blocks.0.attn.W_query.A: file \(4, 32\) vs model \(8, 32\)"):
        checkpoints.load_adapters(model, wrong)
    assert_untouched(model)
    checkpoints.load_adapters(model, path)  # the retry with the right file works
    assert len(lora_layers(model)) == 3 * 6


def test_bad_adapter_files_leave_the_model_untouched(adapters, tmp_path):
    _, path = adapters
    cases = {
        "missing tensor": (edited_adapters(path, tmp_path, lambda t: {k: v for k, v in t.items()
                                                                      if k != "blocks.1.ff.proj.B"}),
                           r"missing \['blocks.1.ff.proj.B'\]"),
        "nan": (edited_adapters(path, tmp_path, lambda t: t | {"out_head.bias": torch.tensor([0.0, float("inf")])}),
                r"NaN or inf values, e.g. \['out_head.bias'\]"),
        "unknown target": (edited_adapters(path, tmp_path, edit_meta=lambda m: m | {"targets": '["q_proj"]'}),
                           "matches no nn.Linear"),
        "huge rank": (edited_adapters(path, tmp_path, edit_meta=lambda m: m | {"rank": str(10**12)}),
                      "wrong shapes"),
        "bad metadata": (edited_adapters(path, tmp_path, edit_meta=lambda m: m | {"rank": "four"}),
                         "unreadable adapter metadata"),
    }
    for name, (file, message) in cases.items():
        model = pretrained()
        with pytest.raises(CheckpointError, match=message):
            checkpoints.load_adapters(model, file)
        assert_untouched(model)
