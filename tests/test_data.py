"""Data loading, formatting, truncation, masks and their errors."""
import json

import pytest
import torch

from mops_fast.train.data import Formatter, collate, load_records, per_category, select_categories
from tests.conftest import DOLLY, CharTok


def write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def rec(**kw):
    r = {"instruction": "Say hi", "context": "", "response": "hi", "category": "a"}
    r.update(kw)
    return r


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="holds no records"):
        load_records(write(tmp_path, [""]))
    with pytest.raises(ValueError, match=r"d.jsonl:2: malformed JSON"):
        load_records(write(tmp_path, [json.dumps(rec()), "{oops"]))
    r = rec()
    del r["response"]
    with pytest.raises(ValueError, match=r"d.jsonl:1: missing field\(s\) \['response'\]"):
        load_records(write(tmp_path, [json.dumps(r)]))
    with pytest.raises(ValueError, match="must be strings"):
        load_records(write(tmp_path, [json.dumps(rec(context=3))]))


def test_unknown_category_is_an_error():
    with pytest.raises(ValueError, match=r"unknown categor.*\['zzz'\]"):
        select_categories([rec()], ["a", "zzz"])
    assert len(select_categories([rec(), rec(category="b")], ["b"])) == 1


def test_formatter_masks_and_truncation():
    tok = CharTok()
    tok.model_max_length = 64
    f = Formatter(tok, max_length=40)
    e = f(rec(instruction="abc", response="xyz"))
    b = collate([e, f(rec(instruction="a much longer instruction", response="r"))], 0, ["a"])
    assert b["gate_mask"][0].sum() == e.n_prompt
    lab = b["labels"][0]
    assert (lab[: e.n_prompt] == -100).all() and (lab[e.n_prompt: len(e.input_ids)] != -100).all()
    assert (b["attention_mask"].sum(1) == torch.tensor([len(e.input_ids), b["input_ids"].shape[1]])).all()
    long = f(rec(instruction="i" * 100, context="c" * 100, response="r" * 100))
    assert len(long.input_ids) == 40 and long.n_prompt >= 20 and long.n_prompt < 40
    # the end of the prompt (the response header in a chat template) survives truncation
    full = Formatter(tok, max_length=1000)(rec(instruction="i" * 100, context="c" * 100, response="r"))
    assert long.input_ids[long.n_prompt - 8: long.n_prompt] == full.input_ids[full.n_prompt - 8: full.n_prompt]
    strict = Formatter(tok, max_length=40, truncate=False)
    with pytest.raises(ValueError, match="exceeds the limit 64 and truncation is off"):
        strict(rec(instruction="i" * 100))


@pytest.mark.skipif(not DOLLY.is_dir(), reason="shared data not present")
def test_real_data_loads_with_all_categories():
    recs = load_records(DOLLY / "test.jsonl")
    assert len(recs) == 480
    sub = per_category(recs, 5)
    cats = {r["category"] for r in sub}
    assert len(cats) == 8 and len(sub) == 40
