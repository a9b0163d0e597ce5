"""A request's body as inputs and options: multipart ``file`` fields, or JSON with base64 strings.

Each input is a :class:`RawInput`: its name and bytes, or the text of a text input, or the error
that keeps it from being read (bad base64 goes to that input, not the whole request). Options
are checked here, in one place, with a 400 naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from navit.media.video import is_video_name
from navit.serve.limits import ServeLimits, bad_request, from_base64, too_large

PREDICT_FIELDS = ("inputs", "budget", "topk", "threshold", "model")
EMBEDDING_FIELDS = ("input", "model", "encoding_format", "budget", "user")


@dataclass
class RawInput:
    name: str
    data: bytes | None = None  # the file's bytes
    text: str | None = None  # a text input (embeddings of an image-text model)
    video: bool = False
    error: str | None = None


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        values = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise bad_request(f"the body is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise bad_request("the JSON body must be an object")
    return values


def check_fields(values: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise bad_request(f"unknown field(s) {unknown}; expected some of {list(allowed)}")


def count_inputs(count: int, limits: ServeLimits) -> None:
    if count == 0:
        raise bad_request("the request holds no inputs")
    if count > limits.max_images:
        raise too_large("max-images", f"the request holds {count} inputs")


def json_predict_inputs(values: dict[str, Any], limits: ServeLimits) -> list[RawInput]:
    """``{"inputs": [{"image": "<base64>"} or {"video": "<base64>"}, ...]}`` as inputs."""
    check_fields(values, PREDICT_FIELDS)
    inputs = values.get("inputs")
    if not isinstance(inputs, list):
        raise bad_request('"inputs" must be a list of {"image": "<base64>"} objects')
    count_inputs(len(inputs), limits)
    raws = []
    for i, item in enumerate(inputs):
        name = f"input {i}"
        if not isinstance(item, dict) or len({"image", "video"} & set(item)) != 1:
            raws.append(RawInput(name, error='each input is {"image": "<base64>"} (or "video")'))
            continue
        key = "image" if "image" in item else "video"
        name = str(item.get("name", name))
        try:
            raws.append(RawInput(name, from_base64(item[key], f"{name}'s {key}"), video=key == "video"))
        except ValueError as error:
            raws.append(RawInput(name, error=str(error)))
    return raws


def embedding_inputs(values: dict[str, Any], limits: ServeLimits, takes_text: bool) -> list[RawInput]:
    """The OpenAI shape: ``"input"`` is one string or a list; each string is a base64 image (a
    ``data:`` URL too) or, for an image-text model, a text. ``{"image": ...}`` / ``{"text": ...}``
    objects say which explicitly."""
    check_fields(values, EMBEDDING_FIELDS)
    if values.get("encoding_format", "float") != "float":
        raise bad_request('only "encoding_format": "float" is served')
    inputs = values.get("input")
    inputs = [inputs] if isinstance(inputs, (str, dict)) else inputs
    if not isinstance(inputs, list):
        raise bad_request('"input" must be a base64 image, a text or a list of them')
    count_inputs(len(inputs), limits)
    return [_embedding_input(item, f"input {i}", takes_text) for i, item in enumerate(inputs)]


def _embedding_input(item: Any, name: str, takes_text: bool) -> RawInput:
    if isinstance(item, dict) and set(item) == {"text"} and isinstance(item["text"], str):
        return RawInput(name, text=item["text"]) if takes_text else RawInput(name, error="the model has no text tower")
    explicit = isinstance(item, dict) and set(item) == {"image"}
    text = item["image"] if explicit else item
    try:
        return RawInput(name, from_base64(text, name))
    except ValueError as error:
        if takes_text and isinstance(item, str) and not item.startswith("data:"):
            return RawInput(name, text=item)
        return RawInput(name, error=str(error))


def multipart_inputs(form: Any, limits: ServeLimits) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """The ``file`` fields (name, upload) of a parsed form, and its other fields as options."""
    uploads = [(getattr(f, "filename", None) or f"file {i}", f) for i, f in enumerate(form.getlist("file"))]
    if any(isinstance(upload, str) for _, upload in uploads):
        raise bad_request('"file" fields must be files (curl -F file=@photo.jpg)')
    count_inputs(len(uploads), limits)
    options = {key: value for key, value in form.multi_items() if key != "file"}
    check_fields(options, PREDICT_FIELDS)
    return uploads, options


def upload_input(name: str, data: bytes) -> RawInput:
    return RawInput(name, data, video=is_video_name(name))


def integer(values: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    """Option ``key`` as an integer in ``low..high`` (a string from a form too), or a 400."""
    value = values.get(key, default)
    if value is None:
        return None
    try:
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or not low <= number <= high:
        raise bad_request(f'"{key}" must be an integer in {low}..{high}, got {value!r}')
    return number


def number(values: dict[str, Any], key: str) -> float | None:
    value = values.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise bad_request(f'"{key}" must be a number, got {value!r}') from None


def predict_options(values: dict[str, Any], accepted: tuple[str, ...], default_budget: int | None,
                    max_tokens: int) -> tuple[int | None, tuple[tuple[str, Any], ...]]:  # fmt: skip
    """(tokens per input, the task's options) from a request's fields."""
    budget = integer(values, "budget", default_budget, 1, max_tokens)
    options: dict[str, Any] = {"topk": integer(values, "topk", 5, 1, 1000)}
    threshold = number(values, "threshold")
    if threshold is not None:
        if "threshold" not in accepted:
            raise bad_request('"threshold" is not an option of this model\'s task')
        options["threshold"] = threshold
    return budget, tuple(sorted(options.items()))

