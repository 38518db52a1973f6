"""The golden VQAv2 val questions (../shared/golden/vqav2_raw) as requests to engine.serve, in each request format."""
from __future__ import annotations

import base64
import json
from typing import Any, Dict, List

from _paths import GOLDEN
from _serve import Server

RAW = GOLDEN / "vqav2_raw"
ANSWERS = GOLDEN / "vqav2_arrow_published" / "answer2label_recovered.txt"


def val_questions() -> List[Dict[str, Any]]:
    """Every val question, with its image's bytes under "bytes"; [] when the data is absent (the tests skip)."""
    if not RAW.exists():
        return []
    questions = json.loads((RAW / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    for q in questions:
        q["bytes"] = (RAW / "val2014" / f"COCO_val2014_{q['image_id']:012d}.jpg").read_bytes()
    return questions


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def ask_json(server: Server, q: Dict[str, Any], **extra: Any):
    return server.post_json("/v1/vqa", {"image": b64(q["bytes"]), "question": q["question"], **extra})


def ask_form(server: Server, q: Dict[str, Any]):
    return server.post_form("/v1/vqa", {"question": q["question"], "top_k": "3"}, {"image": q["bytes"]})


def ask_chat(server: Server, q: Dict[str, Any]):
    return server.post_json("/v1/chat/completions", {"model": "any", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64(q["bytes"])}},
        {"type": "text", "text": q["question"]}]}]})
