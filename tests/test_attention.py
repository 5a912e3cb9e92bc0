"""`gen attention`: the map is the model's own softmax (its weights times v, through wo, give the layer's
output), rows sum to 1, the future is zero; summaries against hand-made matrices; the CLI's forms."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_config
from typer.testing import CliRunner

from gen_cli.cli import app
from gen_cli.lab.attention import attention_map, head_summary, heatmap_lines, kv_groups, layer_attention
from gen_cli.model.transformer import Transformer

runner = CliRunner()


def _model(**changes) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_config(**changes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize(
    "changes",
    [{}, {"n_kv_head": 2}, {"n_kv_head": 1, "pos_encoding": "alibi"}, {"pos_encoding": "alibi", "n_kv_head": 2},
     {"pos_encoding": "learned", "qk_norm": True}, {"rope_scaling": {"type": "yarn", "factor": 4.0,
     "original_context_length": 8}}],
)  # fmt: skip
def test_weights_times_v_through_wo_reproduce_the_layer_output(changes):
    model = _model(**changes)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    for layer in range(model.config.n_layer):
        got = layer_attention(model, ids, layer)
        w, v = got.weights, got.v  # (B, H, T, T), (B, Hkv, T, hd)
        attn = model.layers[layer].attn
        v = v.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)  # (B, H, T, hd)
        y = (w @ v).transpose(1, 2).flatten(2)  # (B, T, H × hd)
        assert torch.allclose(attn.wo(y), got.output, atol=1e-5)
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-6)
        future = torch.ones(12, 12, dtype=torch.bool).triu(1)
        assert (w[..., future] == 0).all()


def test_summaries_of_hand_made_matrices():
    T = 4
    diagonal = torch.eye(T)
    s = head_summary(diagonal)
    assert s == {"mean_distance": 0.0, "first_token_share": 0.0, "entropy_bits": 0.0}
    sink = torch.zeros(T, T)
    sink[:, 0] = 1
    s = head_summary(sink)
    assert s["first_token_share"] == 1.0 and s["mean_distance"] == pytest.approx((0 + 1 + 2 + 3) / 4)
    uniform = torch.tril(torch.ones(T, T))
    uniform /= uniform.sum(-1, keepdim=True)
    s = head_summary(uniform)
    assert s["entropy_bits"] == pytest.approx(sum(math.log2(r + 1) for r in range(T)) / T)
    assert s["mean_distance"] == pytest.approx(sum(r / 2 for r in range(T)) / T)


def test_kv_groups_and_heatmap_text():
    assert kv_groups(4, 2) == [[0, 1], [2, 3]] and kv_groups(4, 1) == [[0, 1, 2, 3]]
    lines = heatmap_lines([[1.0, 0.0], [0.3, 0.7]], ["a b", "\n"], max_tokens=10)
    body = lines[-2:]
    assert body[0].endswith("██") and body[1].endswith("▓▓██")  # the future is blank, trailing blanks dropped
    assert "a·b" in body[0] and "↵" in body[1]


def test_map_data_and_range_errors(tokenizer):
    from gen_cli.errors import UsageError

    model = _model(n_kv_head=2, vocab_size=tokenizer.get_vocab_size())
    ids = tokenizer.encode("the cat sat").ids
    data = attention_map(model, tokenizer, ids, -1, None)
    assert data["layer"] == 1 and len(data["heads"]) == 4 and data["kv_groups"] == [[0, 1], [2, 3]]
    assert [h["kv_head"] for h in data["heads"]] == [0, 0, 1, 1]
    assert "".join(data["tokens"]) == "the cat sat"
    with pytest.raises(UsageError, match=r"layer must be in 0\.\.1"):
        attention_map(model, tokenizer, ids, 2, None)
    with pytest.raises(UsageError, match=r"head must be in 0\.\.3"):
        attention_map(model, tokenizer, ids, 0, 4)


def test_cli_text_json_and_png_hint(model_dir, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    text = runner.invoke(app, ["attention", "the cat sat on the mat", "--model", str(model_dir), "--layer", "0"])
    assert text.exit_code == 0, text.output
    assert "layer 0 of 2, mean of 4 heads" in text.stdout and "█" in text.stdout and "entropy" in text.stdout
    one = runner.invoke(app, ["attention", "the cat", "--model", str(model_dir), "--head", "2", "--json"])
    data = json.loads(one.stdout)
    assert [h["head"] for h in data["heads"]] == [2] and len(data["heads"][0]["weights"]) == len(data["ids"])
    bad = runner.invoke(app, ["attention", "the cat", "--model", str(model_dir), "--head", "9"])
    assert bad.exit_code == 2 and "--head must be in 0..3" in bad.stderr
    monkeypatch.setattr("gen_cli.lab.report.plot_available", lambda: False)
    png = runner.invoke(app, ["attention", "the cat", "--model", str(model_dir), "--png", "a.png"])
    assert png.exit_code == 2 and "--png needs matplotlib" in png.stderr


def test_png_files_when_matplotlib_is_installed(model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    from conftest import random_text

    png = tmp_path / "attention.png"
    made = runner.invoke(app, ["attention", "the cat sat", "--model", str(model_dir), "--png", str(png)])
    assert made.exit_code == 0, made.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(random_text(300), encoding="utf-8")
    sweep = tmp_path / "sweep.png"
    args = ["eval", str(model_dir), str(corpus), "--by-position", "--context", "96", "--max-tokens", "300"]
    made = runner.invoke(app, [*args, "--device", "cpu", "--png", str(sweep)])
    assert made.exit_code == 0, made.output
    assert sweep.read_bytes()[:4] == b"\x89PNG"


def test_eval_png_needs_by_position(model_dir):
    refused = runner.invoke(app, ["eval", str(model_dir), "--png", "x.png"])
    assert refused.exit_code == 2 and "--png goes with --by-position" in refused.stderr
