"""Request bodies → prepared jobs, and model outputs → response bodies, one pair per endpoint.

Everything here is plain CPU work (JSON, base64, image decoding and resizing, tokenising): the app runs it in
a thread pool, off the event loop. Field errors are RequestError (400, or 413 for sizes) naming the field.
"""
from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

import torch

from ..models import ModelConfig
from ..tasks.tokenizers import Tokenizer
from .preprocess import Limits, RequestError, TextPreprocessor, image_bytes_from_text, image_tensor
from ..models.tasks import IMAGE_EMBEDDING, NLVR2, NLVR2_LABELS, TEXT_EMBEDDING, VQA

DEFAULT_TOP_K = 5


@dataclass
class Prepared:
    """One job's model inputs, its prompt length, and what the response should say about truncation."""
    kind: str
    inputs: Dict[str, torch.Tensor]
    tokens: int = 0
    notes: List[str] = field(default_factory=list)
    options: Dict[str, Any] = field(default_factory=dict)  # request options besides the inputs (top_k)


def parse_json(body: bytes) -> Dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"malformed JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError("the JSON body must be an object")
    return data


def required(data: Dict[str, Any], name: str) -> Any:
    if data.get(name) is None:
        raise RequestError(f"missing field {name!r}")
    return data[name]


def top_k_of(value: Any, labels: int) -> int:
    if value is None or value == "":
        return min(DEFAULT_TOP_K, labels)
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise RequestError(f"top_k: expected an integer, got {value!r}") from None
    if isinstance(value, bool) or k < 1 or str(k) != str(value).strip():
        raise RequestError(f"top_k: expected a positive integer, got {value!r}")
    return min(k, labels)


class Preprocessor:
    """Model inputs for each kind of job, made as evaluation makes them."""

    def __init__(self, cfg: ModelConfig, tokenizer: Tokenizer, limits: Limits) -> None:
        self.text = TextPreprocessor(tokenizer)
        self.image_size = cfg.image_size
        self.limits = limits

    def image(self, data: bytes, name: str) -> torch.Tensor:
        return image_tensor(data, name, self.image_size, self.limits)

    def encoded_image(self, value: Any, name: str) -> torch.Tensor:
        return self.image(image_bytes_from_text(value, name, self.limits), name)

    def _text(self, text: Any, name: str) -> Tuple[Dict[str, torch.Tensor], int, List[str]]:
        tokens = self.text(text, name)
        note = self.text.note(tokens)
        return tokens.tensors, tokens.tokens, [f"{name}: {note}"] if note else []

    def vqa(self, image: torch.Tensor, question: Any) -> Prepared:
        text, tokens, notes = self._text(question, "question")
        return Prepared(VQA, {**text, "image": image}, tokens, notes)

    def nlvr2(self, image_0: torch.Tensor, image_1: torch.Tensor, sentence: Any) -> Prepared:
        text, tokens, notes = self._text(sentence, "sentence")
        return Prepared(NLVR2, {**text, "image_0": image_0, "image_1": image_1}, tokens, notes)

    def vqa_json(self, body: bytes) -> Prepared:
        """POST /v1/vqa as JSON; top_k as sent (the caller checks it against the answer table)."""
        data = parse_json(body)
        question = required(data, "question")
        prepared = self.vqa(self.encoded_image(required(data, "image"), "image"), question)
        prepared.options["top_k"] = data.get("top_k")
        return prepared

    def nlvr2_json(self, body: bytes) -> Prepared:
        data = parse_json(body)
        images = data.get("images")
        if images is None:
            images = [required(data, "image_0"), required(data, "image_1")]
        if not isinstance(images, list) or len(images) != 2:
            raise RequestError("images: expected a list of two images")
        sentence = required(data, "sentence")
        return self.nlvr2(*(self.encoded_image(v, f"images[{i}]") for i, v in enumerate(images)), sentence)

    def chat_json(self, body: bytes) -> Prepared:
        """An OpenAI chat request: its last user message's image_url (data URI) and text parts."""
        data = parse_json(body)
        if data.get("stream"):
            raise RequestError("stream: streaming responses are not supported; send stream: false")
        messages = required(data, "messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise RequestError("messages: expected a list of message objects")
        user = [m for m in messages if m.get("role") == "user"]
        if not user:
            raise RequestError("messages: no message with role 'user'")
        image, question = _chat_parts(user[-1].get("content"))
        return self.vqa(self.encoded_image(image, "image_url"), question)

    def embeddings_json(self, body: bytes, max_items: int) -> Tuple[List[Prepared], Dict[str, Any]]:
        """One job per input: `input` texts, `images` (base64 or data URIs), or `input` items that are images
        (a data URI string, {"image": ...}, {"image_url": {"url": ...}}) or {"text": ...}."""
        data = parse_json(body)
        texts, images = data.get("input"), data.get("images")
        if (texts is None) == (images is None):
            raise RequestError("send either 'input' (texts) or 'images' (base64 images or data URIs)")
        field_name = "input" if texts is not None else "images"
        items = texts if texts is not None else images
        if isinstance(items, (str, dict)):
            items = [items]
        if not isinstance(items, list) or not items:
            raise RequestError(f"{field_name}: expected a non-empty list")
        if len(items) > max_items:
            raise RequestError(f"at most {max_items} inputs per request, got {len(items)}", 413)
        if data.get("encoding_format", "float") not in ("float", "base64"):
            raise RequestError("encoding_format: expected 'float' or 'base64'")
        jobs = []
        for i, item in enumerate(items):
            name = f"{field_name}[{i}]"
            kind, value = (IMAGE_EMBEDDING, item) if images is not None else _embedding_input(item, name)
            if kind == IMAGE_EMBEDDING:
                jobs.append(Prepared(IMAGE_EMBEDDING, {"image": self.encoded_image(value, name)}))
            else:
                tensors, tokens, notes = self._text(value, name)
                jobs.append(Prepared(TEXT_EMBEDDING, tensors, tokens, notes))
        return jobs, data


def _embedding_input(item: Any, name: str) -> Tuple[str, Any]:
    """(kind, value) of one `input` item: a text, or an image given as a data URI or an image object."""
    if isinstance(item, str):
        return (IMAGE_EMBEDDING, item) if item.lower().startswith("data:image/") else (TEXT_EMBEDDING, item)
    if isinstance(item, dict):
        if "text" in item:
            return TEXT_EMBEDDING, item["text"]
        image = item.get("image", item.get("image_url"))
        if isinstance(image, dict):
            image = image.get("url")
        if image is not None:
            return IMAGE_EMBEDDING, image
    raise RequestError(f"{name}: expected a text, a data URI, or an object with 'text', 'image' or 'image_url'")


def _chat_parts(content: Any) -> Tuple[str, str]:
    if isinstance(content, str) or not isinstance(content, list):
        raise RequestError("messages: the user message needs a list of parts, one image_url (a data URI) "
                           "and text")
    images, texts = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(part.get("text"))
        elif kind == "image_url":
            url = part.get("image_url")
            images.append(url.get("url") if isinstance(url, dict) else url)
        else:
            raise RequestError(f"messages: unsupported content part {kind!r} (use 'text' and 'image_url')")
    if len(images) != 1:
        raise RequestError(f"messages: expected exactly one image_url part, got {len(images)}")
    if not texts or not all(isinstance(t, str) for t in texts):
        raise RequestError("messages: missing the text part (the question)")
    return images[0], " ".join(texts)


# ---------------------------------------------------------------- responses


def vqa_response(logits: torch.Tensor, answers: Sequence[str], top_k: int) -> Dict[str, Any]:
    """Top-k answers; the first is evaluation's argmax (a stable sort keeps the lowest label among ties)."""
    probabilities = logits.softmax(-1)
    order = torch.sort(logits, descending=True, stable=True).indices[:top_k].tolist()
    top = [{"answer": answers[i], "label": i, "probability": float(probabilities[i])} for i in order]
    return {"answer": top[0]["answer"], "label": top[0]["label"], "top_k": top}


def nlvr2_response(logits: torch.Tensor) -> Dict[str, Any]:
    probabilities = logits.softmax(-1).tolist()
    return {"label": NLVR2_LABELS[int(logits.argmax())],
            "probabilities": dict(zip(NLVR2_LABELS, probabilities))}


def chat_response(answer: str, model: str, prompt_tokens: int) -> Dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1},
    }


def embeddings_response(rows: Sequence[torch.Tensor], model: str, encoding: str, tokens: int) -> Dict[str, Any]:
    def encode(row: torch.Tensor) -> Any:
        if encoding == "base64":  # what OpenAI clients ask for by default: little-endian float32
            return base64.b64encode(row.numpy().astype("<f4").tobytes()).decode("ascii")
        return row.tolist()

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(row)} for i, row in enumerate(rows)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

