"""The HTTP API's request and response models (pydantic), for /openapi.json and /docs.

JSON request bodies are validated against these models (strictly: no coercion, so what the schema says is what
is accepted) by engine.serving.payloads, which then refuses what it still cannot use with a 400 naming the field;
FastAPI does not parse the bodies itself, as one endpoint takes JSON or multipart and every error must be a 400
`{"error": ...}`. Responses go out through the models (`response_model`), so they never drift from the schema.
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Sequence, Type, Union

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_TOP_K = 5

_IMAGE = "A base64 image (JPEG, PNG, ...) or a base64 data URI (data:image/jpeg;base64,...)."
# A 2x2 red PNG: the examples' image (served in /docs, and what schema-driven clients try first).
_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8ISfHwMDAxMDAwMDAAAANBAEIfXHKZgAAAABJRU5ErkJggg=="


def _example(**fields: Any) -> ConfigDict:
    return ConfigDict(extra="allow", strict=True, json_schema_extra={"examples": [fields]})


class _Open(BaseModel):
    # Clients (OpenAI's among them) send fields of their own: accepted and ignored.
    model_config = ConfigDict(extra="allow", strict=True)


class ErrorBody(BaseModel):
    error: str = Field(description="What was wrong, naming the field.")


class HealthBody(BaseModel):
    status: Literal["ok", "loading"]


class CalibrationCard(BaseModel):
    file: str = Field(description="The --calibration file's name.")
    samples: int = Field(description="Samples the model ran to calibrate.")
    keys_sha256: str = Field(description="A hash of their keys (question ids, ...) in order.")


class Int8VariantCard(BaseModel):
    smoothing: Optional[bool] = Field(None, description="false with VLMO_INT8_SMOOTHING=0; null: the default (on).")
    float_layers: Optional[int] = Field(None, description="The first N encoder layers int8 keeps in fp32 "
                                                          "(VLMO_INT8_FLOAT_LAYERS); null: the default.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    family: Literal["vlmo", "beit3"]
    tasks: List[str]
    tp: int
    dtype: Optional[str] = Field(description="Known once the model is loaded.")
    image_size: int
    max_text_len: int
    answers: Optional[int] = Field(description="Entries of the answer table (VQA checkpoints).")
    calibration: Optional[CalibrationCard] = Field(
        None, description="int8's --calibration samples, once the model is loaded; null without one.")
    int8_variant: Optional[Int8VariantCard] = Field(
        None, description="int8's settings from the server's environment that are not the defaults, once the model "
                          "is loaded; null for the default int8 and for other dtypes.")


class ModelList(BaseModel):
    object: Literal["list"]
    data: List[ModelCard]


class Timing(BaseModel):
    latency_ms: float = Field(description="The request's time in the server.")
    forward_ms: float = Field(description="Its batch's time on the tensor-parallel group.")
    batch_size: int = Field(description="Requests that shared the batch.")
    truncated: bool = Field(description="A text was longer than the model's window and was cut as in evaluation.")
    warning: Optional[str] = None


class VQARequest(_Open):
    model_config = _example(image=_PNG, question="what color is it?", top_k=3)
    image: str = Field(description=_IMAGE)
    question: str
    top_k: Optional[int] = Field(DEFAULT_TOP_K, ge=1, description="Answers to return (at most the answer table's).")


class VQAForm(BaseModel):
    image: bytes = Field(json_schema_extra={"format": "binary"})
    question: str
    top_k: Optional[int] = Field(DEFAULT_TOP_K, ge=1)


class RankedAnswer(BaseModel):
    answer: str
    label: int
    probability: float


class VQAResponse(Timing):
    answer: str
    label: int
    top_k: List[RankedAnswer]


class NLVR2Request(_Open):
    model_config = _example(images=[_PNG, _PNG], sentence="Both images are red.")
    images: Optional[List[str]] = Field(None, min_length=2, max_length=2,
                                        description=f"Left and right image (or image_0 and image_1). {_IMAGE}")
    image_0: Optional[str] = None
    image_1: Optional[str] = None
    sentence: str


class NLVR2Form(BaseModel):
    image_0: bytes = Field(json_schema_extra={"format": "binary"})
    image_1: bytes = Field(json_schema_extra={"format": "binary"})
    sentence: str


class NLVR2Probabilities(BaseModel):
    False_: float = Field(alias="False")
    True_: float = Field(alias="True")


class NLVR2Response(Timing):
    label: Literal["True", "False"]
    probabilities: NLVR2Probabilities


class ImageURL(_Open):
    url: str = Field(description="A data URI: the server fetches nothing.")


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]


class ChatMessage(_Open):
    role: str
    content: Union[str, List[Union[TextPart, ImagePart]]]


class ChatRequest(_Open):
    model_config = _example(model="vlmo", messages=[{"role": "user", "content": [
        {"type": "text", "text": "what color is it?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_PNG}"}}]}])
    model: Optional[str] = None
    messages: List[ChatMessage] = Field(description="The last user message holds one image_url part and the text.")
    stream: Optional[bool] = Field(False, description="Streaming is not supported.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: str


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: List[ChatChoice]
    usage: ChatUsage
    vlmo: Timing


class TextInput(_Open):
    text: str


class ImageInput(_Open):
    image: str = Field(description=_IMAGE)


class ImageURLInput(_Open):
    image_url: Union[ImageURL, str]


EmbeddingItem = Union[str, TextInput, ImageInput, ImageURLInput]


class EmbeddingsRequest(_Open):
    model_config = _example(input=["a red square", {"image": f"data:image/png;base64,{_PNG}"}])
    input: Optional[Union[EmbeddingItem, List[EmbeddingItem]]] = Field(
        None, description="Texts, or images as data URIs or image objects; send this or `images`.")
    images: Optional[Union[str, List[str]]] = Field(None, description=_IMAGE)
    encoding_format: Literal["float", "base64"] = "float"
    model: Optional[str] = None


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: Union[List[float], str] = Field(description="Unit norm; base64: little-endian float32.")


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"]
    model: str
    data: List[Embedding]
    usage: EmbeddingsUsage
    vlmo: Timing


class SearchRequest(_Open):
    model_config = _example(text="a red square", top_k=3)
    text: Optional[str] = Field(None, description="A query text; send this or `image`.")
    image: Optional[str] = Field(None, description=_IMAGE)
    top_k: Optional[int] = Field(None, ge=1, description="Images to return [default: 10].")


class SearchHit(BaseModel):
    id: int
    path: str
    score: float = Field(description="Inner product of the unit-norm embeddings.")


class SearchResponse(Timing):
    results: List[SearchHit]


def errors(*statuses: int) -> Dict[Union[int, str], Dict[str, Any]]:
    """The `responses` of an endpoint's refusals: each status with the error body."""
    why = {400: "Malformed request (the error names the field).", 404: "This checkpoint has no such head.",
           405: "Method not allowed (see the Allow header).", 413: "Body, image or pixels over the server's bounds.",
           503: "Queue full, loading, failed or shutting down (Retry-After: 1)."}
    # The body named outright: FastAPI would file a `model` under the route's own media type (text/html, images).
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    return {status: {"description": why[status], "content": body} for status in statuses}


def request_body(json_model: Type[BaseModel], form_model: Optional[Type[BaseModel]] = None) -> Dict[str, Any]:
    """`openapi_extra` declaring the request body (JSON, and multipart where the endpoint takes it)."""
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}}}
    if form_model is not None:
        content["multipart/form-data"] = {"schema": {"$ref": f"#/components/schemas/{form_model.__name__}"}}
    return {"requestBody": {"required": True, "content": content}}


def request_schemas(models: Sequence[Type[BaseModel]]) -> Dict[str, Any]:
    """The JSON schemas of `models` and of every model they use, keyed by name (OpenAPI components)."""
    schemas: Dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


# The models the schema names that FastAPI does not see itself: the request bodies, and the error body.
REQUEST_MODELS = (VQARequest, VQAForm, NLVR2Request, NLVR2Form, ChatRequest, EmbeddingsRequest, SearchRequest,
                  ErrorBody)
