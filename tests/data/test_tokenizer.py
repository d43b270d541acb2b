"""The real Qwen3 vocabulary with Keye's tokens appended, and the Qwen3 chat template."""
import pytest

from keyetron.data.tokenizer import KEYE_ADDED_TOKENS, KeyeTokenizer, TokenizerError, bundled_tokenizer_dir, render_chat


@pytest.fixture(scope="module")
def tok():
    return KeyeTokenizer()


def test_qwen3_special_ids_and_keye_tokens_appended(tok):
    assert tok.token_id("<|image_pad|>") == 151655 and tok.token_id("<|video_pad|>") == 151656
    assert tok.token_id("<think>") == 151667 and tok.token_id("</think>") == 151668
    appended = [tok.token_id(t) for t in KEYE_ADDED_TOKENS]
    assert appended == list(range(151669, 151669 + len(KEYE_ADDED_TOKENS)))
    assert len(tok) == 151669 + len(KEYE_ADDED_TOKENS) <= 151936
    ids = tok.encode("<|frame|>12.5<|fast_start|><|video_pad|><|fast_end|>")
    assert ids[0] == tok.token_id("<|frame|>") and ids[-1] == tok.token_id("<|fast_end|>")
    assert tok.decode(ids) == "<|frame|>12.5<|fast_start|><|video_pad|><|fast_end|>"


def test_round_trip_of_ordinary_text(tok):
    text = "A red square and 3 blue circles; 你好, 12.5 s!"
    assert tok.decode(tok.encode(text)) == text


def test_a_folder_without_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json not found"):
        KeyeTokenizer(tmp_path)


CONVERSATIONS = [
    [{"role": "user", "content": "What is in the image?"}, {"role": "assistant", "content": "A cat."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>greet</think>Hello"},
     {"role": "user", "content": "Count to 2"}, {"role": "assistant", "content": "1 2", "reasoning_content": "easy"}],
    [{"role": "user", "content": "Only a question"}],
]


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen,think", [(False, True), (True, True), (True, False)])
def test_rendering_equals_the_tokenizers_own_jinja_template(conv, gen, think):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir()), local_files_only=True)
    expected = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, enable_thinking=think)
    assert "".join(s for s, _ in render_chat(conv, gen, think)) == expected


def test_assistant_mask_covers_replies_and_their_end_token_only(tok):
    conv = CONVERSATIONS[1]
    enc = tok.encode_chat(conv)
    trained = tok.decode([i for i, m in zip(enc.ids, enc.assistant_mask) if m])
    assert trained == "<think>\nadd them\n</think>\n\n4<|im_end|>"
    assert enc.ids == tok.encode(enc.text)


def test_bad_messages_are_rejected_with_the_index():
    with pytest.raises(ValueError, match="message 1: role 'bot'"):
        render_chat([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}])
