"""OpenAI chat messages -> the processor's conversation: text parts and `image_url` images."""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Optional


from litserve.specs.openai import (
    ImageContent,
    TextContent,
)

from dimple_tools.serving.errors import RequestError


#: Largest image the server decodes (width x height, from the file's header): 4096 x 4096.
MAX_IMAGE_PIXELS = 4096 * 4096
#: Most images in one request.
MAX_IMAGES = 8


def _open_image_bytes(data: bytes, param: str, max_pixels: int = MAX_IMAGE_PIXELS):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:  # reads the header only: the size, no pixels yet
            width, height = opened.size
            if width * height > max_pixels:
                raise RequestError(
                    f"{param}: the image is {width} x {height} = {width * height} pixels, more than this server's "
                    f"limit of {max_pixels} (--max-image-pixels); send a smaller image", param, "image_too_large")
            image = ImageOps.exif_transpose(opened)
            image.load()
            return image.copy() if image is opened else image
    except RequestError:
        raise
    except UnidentifiedImageError as error:  # its message holds the repr of our buffer
        raise RequestError(f"{param}: the data is not an image in a format the server reads (PNG, JPEG, WebP, GIF, "
                           "BMP, ...)", param, "invalid_image") from error
    except Exception as error:  # noqa: BLE001 (PIL raises many kinds; errors.public_text drops any repr)
        raise RequestError(f"{param}: the image does not decode ({error})", param, "invalid_image") from error


def plain_text(text: str, param: str, what: str = "text") -> str:
    """`text`, refused unless it encodes as UTF-8: JSON may carry a lone surrogate (\\ud800), which the
    tokenizer (or the file system) cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(f"{param}: the {what} is not valid Unicode: a lone surrogate "
                           f"{text[error.start]!r} at character {error.start}", param, "invalid_value") from error
    return text


def load_image_url(url: str, param: str, image_folder: Optional[str], max_pixels: int = MAX_IMAGE_PIXELS):
    """A PIL image from an `image_url`: a base64 `data:` URL, or a local file under `image_folder` (a path or a
    `file://` URL). Remote URLs are refused: the server fetches nothing."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{param}: expected a data: URL or a file path", param, "invalid_image_url")
    if "\x00" in url:  # os.path raises on it
        raise RequestError(f"{param}: an image URL or path cannot contain a NUL character", param, "invalid_image_url")
    plain_text(url, param, "URL")
    lowered = url[:16].lower()
    if lowered.startswith(("http://", "https://", "ftp://")):
        raise RequestError(
            f"{param}: remote image URLs are not fetched by this server; send the image as a base64 "
            "data: URL (data:image/png;base64,...)", param, "remote_url_refused",
        )
    if lowered.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise RequestError(f"{param}: a data: URL must be base64 (data:image/png;base64,...)", param,
                               "invalid_image_url")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise RequestError(f"{param}: the data: URL is not valid base64 ({error})", param,
                               "invalid_image_url") from error
        return _open_image_bytes(data, param, max_pixels)
    if image_folder is None:
        raise RequestError(
            f"{param}: local image paths are not allowed by this server (start it with --image-folder); send "
            "the image as a base64 data: URL", param, "local_path_refused",
        )
    path = url[len("file://"):] if lowered.startswith("file://") else url
    if "://" in path:
        raise RequestError(f"{param}: unsupported URL scheme in {url[:40]!r}", param, "invalid_image_url")
    root = os.path.realpath(image_folder)
    resolved = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, resolved]) != root:
        raise RequestError(f"{param}: {path!r} is outside the server's image folder", param, "local_path_refused")
    if not os.path.isfile(resolved):
        raise RequestError(f"{param}: no image file {path!r} in the server's image folder", param, "invalid_image")
    with open(resolved, "rb") as file:
        return _open_image_bytes(file.read(), param, max_pixels)


def to_conversation(messages, image_folder: Optional[str], max_pixels: int = MAX_IMAGE_PIXELS,
                    max_images: int = MAX_IMAGES) -> list:
    """OpenAI messages -> the processor's conversation (images opened). Raises RequestError naming the part."""
    if not messages:
        raise RequestError("messages: at least one message is required", "messages", "invalid_value")
    images = sum(isinstance(part, ImageContent) for message in messages if not isinstance(message.content, (str, type(None)))
                 for part in message.content)
    if images > max_images:  # before any is decoded
        raise RequestError(f"messages: {images} images, more than this server's limit of {max_images} per request "
                           "(--max-images)", "messages", "too_many_images")
    conversation = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.role
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"{where}.role: must be 'system', 'user' or 'assistant', got {message.role!r}",
                               f"{where}.role", "invalid_value")
        if message.tool_calls or message.tool_call_id:
            raise RequestError(f"{where}: tool calls are not supported", f"{where}.tool_calls", "unsupported")
        content = message.content
        if content is None:
            raise RequestError(f"{where}.content: is required", f"{where}.content", "invalid_value")
        if isinstance(content, str):
            conversation.append({"role": role, "content": [{"type": "text",
                                                        "text": plain_text(content, f"{where}.content")}]})
            continue
        items = []
        for j, part in enumerate(content):
            param = f"{where}.content[{j}]"
            if isinstance(part, TextContent) and part.type == "text":
                items.append({"type": "text", "text": plain_text(part.text, f"{param}.text")})
            elif isinstance(part, ImageContent) and part.type == "image_url":
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                image = load_image_url(url, f"{param}.image_url", image_folder, max_pixels)
                items.append({"type": "image", "image": image})
            else:
                kind = getattr(part, "type", type(part).__name__)
                raise RequestError(f"{param}.type: must be 'text' or 'image_url', got {kind!r}", f"{param}.type",
                                   "invalid_value")
        conversation.append({"role": role, "content": items})
    return conversation
