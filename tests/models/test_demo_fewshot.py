"""The few-shot evaluation on the committed demo model, small: examples must lift what zero-shot cannot do."""

import pytest

pytest.importorskip("torch")


def test_examples_teach_made_up_words_and_keep_seen_compositions():
    from models.demo import fewshot
    from models.demo.config import ARTIFACTS_DIR
    from models.tokenizer import ClipTokenizer, open_clip_tokenizer_json
    from models.zoo import load_demo

    model = load_demo(ARTIFACTS_DIR)
    encode_images, encode_texts = model.numpy_encoders(ClipTokenizer.from_json(open_clip_tokenizer_json()))
    results = fewshot.evaluate_fewshot(encode_images, encode_texts, model.logit_scale, images_per_task=120, draws=1)
    assert list(results) == list(fewshot.EXAMPLE_COUNTS)
    assert results[0]["words"] < 0.3 and results[4]["words"] >= 0.95  # chance-level words, then learnt
    assert results[4]["seen"] >= 0.97 and results[4]["held_out"] >= results[0]["held_out"]
    report = fewshot.markdown_report(results, "# header", draws=1)
    assert "| zero-shot |" in report and "| 8 |" in report
