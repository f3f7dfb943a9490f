"""A local web demo of Dimple: ask about an image and watch the answer being unmasked.

    pip install -r requirements-demo.txt
    dimple-web-demo                                  # the shipped tiny-dimple/, on http://127.0.0.1:7860
    dimple-web-demo --model path/or/hub-id --port 8000 --save-trajectory trajectory.png

Upload an image, type a question, pick the decoding settings (algorithm, confidence threshold, steps,
answer length, prefilling) and press "Ask". The answer canvas starts as `max_new_tokens` masks (░) and
fills in live: every decoding step (one forward pass) commits some masks, which a streamer sends to the
page. At the end the page shows the answer, the number of forward passes and the time, and the decoding
trajectory (which token was committed at which step; see dimple_tools/demos/trajectory.py). `--save-trajectory PATH`
also writes that picture for each generation (`{n}` in PATH numbers the files, otherwise PATH is
overwritten).

The server binds 127.0.0.1 unless `--host` says otherwise. Bad input (no image, an empty question, a file
that is not an image, settings out of range, and through the API values of the wrong type, e.g. the string
"false" for use_cache) is reported on the page, naming the field; the server keeps serving. The question is
read as plain text: `<|im_end|>`, `<|mask|>` and other special-token strings typed in it are their characters,
not special tokens (the processor's `split_special_tokens=True`).
"""

from __future__ import annotations

import argparse
import html
import io
import itertools
import math
import numbers
import os
import pathlib
import queue
import sys
import threading
import traceback

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local demo phones nobody

try:
    import gradio as gr  # noqa: E402
except ImportError as _error:  # the `demo` extra is missing: main() says what to install (no traceback)
    GRADIO_MISSING = (f"dimple-web-demo needs gradio, the `demo` extra: make web-demo, or pip install -e '.[demo]' "
                      f"(or pip install -r requirements-demo.txt); {_error}")

    class _Missing:
        def __getattr__(self, name):
            raise ImportError(GRADIO_MISSING)

    gr = _Missing()
else:
    GRADIO_MISSING = None
from PIL import Image  # noqa: E402

from dimple_tools.paths import REPOSITORY_ROOT  # noqa: E402
ROOT = REPOSITORY_ROOT  # the repository (tiny-dimple/ and the assets)

from dimple.generation_utils import OPEN_ENDED_BLOCK_LENGTH  # noqa: E402
from dimple_tools.demos import cli as demo  # noqa: E402  (`answer` asks one question: the same code path as the CLI demo)
from dimple_tools.demos.trajectory import CanvasRecorder, load, plot_trajectory  # noqa: E402

ALGORITHMS = ("origin", "origin-ratio", "autoregressive", "maskgit_plus", "topk_margin", "entropy")
MAX_ANSWER_LENGTH = 512
MAX_STEPS = 512
MAX_QUESTION_LENGTH = 1000
MASK_GLYPH = "░"
END_GLYPH = "·"
QUESTION_PLACEHOLDER = "Describe the image."

CSS = """
#canvas .canvas {font-family: ui-monospace, monospace; font-size: 1.15em; line-height: 1.9; white-space: pre-wrap;}
#canvas .mask {color: #9aa0a6;}
#canvas .end {color: #c0c4c8;}
#canvas .new {background: #ffe08a; border-radius: 3px;}
.dimple-error {border: 1px solid #e0a800; background: #fff8e1; color: #5d4200; padding: 0.6em 0.9em;
  border-radius: 6px; font-weight: 600;}
#answer {font-size: 1.3em;}
"""


# --------------------------------------------------------------------------------------------------
# Streaming the canvas
# --------------------------------------------------------------------------------------------------


class QueueStreamer(CanvasRecorder):
    """`diffusion_generate` streamer: keeps every answer canvas (row 0, for the trajectory) and hands
    them to the page through a queue; iterating yields `(step, canvas)` until `end()`."""

    _END = object()

    def __init__(self, timeout: float = 600.0):
        super().__init__()
        self.queue = queue.Queue()
        self.timeout = timeout  # seconds without a step before the page gives up (a lost decode never hangs it)

    def _next(self):
        try:
            return self.queue.get(timeout=self.timeout)
        except queue.Empty:
            raise TimeoutError(f"no decoding step arrived within {self.timeout:g} s") from None

    def put(self, value):
        super().put(value)
        self.queue.put((len(self.canvases), self.canvases[-1]))

    def end(self):
        super().end()
        self.queue.put(self._END)

    def __iter__(self):
        """The newest canvas each time the page asks: canvases that arrived while the page was updating are
        skipped (all stay in `canvases`), so a page slower than the decode shows where it is, not behind it."""
        while (item := self._next()) is not self._END:
            while True:
                try:
                    newer = self.queue.get_nowait()
                except queue.Empty:
                    break
                if newer is self._END:
                    yield item
                    return
                item = newer
            yield item


def in_view(canvas, mask_token_id, block: int, end_ids=()) -> list:
    """The part of an open-ended canvas decoding has reached: up to its first end-of-text (the padding after it
    is not shown), else up to the block after the last committed token."""
    ended = [i for i, token in enumerate(canvas) if token in end_ids]
    if ended:
        return list(canvas[: ended[0] + 1])
    committed = [i for i, token in enumerate(canvas) if token != mask_token_id]
    end = (committed[-1] // block + 2) * block if committed else block
    return list(canvas[: min(len(canvas), end)])


def render_canvas(canvas, previous, tokenizer, mask_token_id) -> str:
    """The answer canvas as HTML: masks as ░, end-of-text as ·, tokens committed this step highlighted."""
    end_ids = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    spans = []
    for position, token in enumerate(canvas):
        if token == mask_token_id:
            spans.append(f'<span class="mask">{MASK_GLYPH}</span>')
            continue
        new = previous is not None and (position >= len(previous) or previous[position] == mask_token_id)
        if token in end_ids:
            text, css = END_GLYPH, "end"
        else:
            text, css = html.escape(tokenizer.decode([token], skip_special_tokens=False)), "tok"
        spans.append(f'<span class="{css}{" new" if new else ""}">{text}</span>')
    return f'<div class="canvas">{"".join(spans)}</div>'


def error_box(message: str) -> str:
    return f'<div class="dimple-error" role="alert">⚠ {html.escape(message)}</div>'


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


class UnreadableImage:
    """What the image input passes on when the upload is not an image it can read."""

    def __init__(self, reason: str):
        self.reason = reason


def image_input(**kwargs) -> gr.Image:
    """A `gr.Image` whose unreadable uploads (a text file named .png, a truncated picture, ...) reach the
    handler as an `UnreadableImage`, so that the page gets a readable message instead of a failure inside
    gradio. (The instance's `preprocess` is wrapped: subclassing a gradio component writes a .pyi file.)"""
    image = gr.Image(**kwargs)
    plain = image.preprocess

    def preprocess(payload):
        try:
            return plain(payload)
        except Exception as error:  # noqa: BLE001  (PIL raises several kinds)
            name = getattr(payload, "orig_name", None) or "the upload"
            return UnreadableImage(f"{name}: {type(error).__name__}")

    image.preprocess = preprocess
    return image


def _got(value):
    """`value` and its type for a message: `'false', a str`."""
    return f"{value!r}, a {type(value).__name__}"


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # True is an int to Python, not to us


def _as_int(value, name, low, high):
    if not _is_number(value):  # a string such as "8" from an API caller is refused, not parsed
        return None, f"{name} must be a whole number from {low} to {high} (got {_got(value)})."
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not number.is_integer() or not low <= number <= high:  # nan and inf included
        return None, f"{name} must be a whole number from {low} to {high} (got {number:g})."
    return int(number), None


def check_request(image, question, alg, threshold, steps, max_new_tokens, use_cache=False, open_ended=False):
    """A readable message for the first problem with the request, or None; also the cleaned settings. Every
    value's type is checked (the API passes what its caller sent): each message names its field."""
    if image is None:
        return "Please upload an image: this model answers questions about an image (or click an example below).", None
    if isinstance(image, UnreadableImage):
        return f"The uploaded file is not an image that can be read ({image.reason}); upload a PNG, JPEG or WebP picture.", None
    if not isinstance(image, Image.Image):
        return f"The image input must be a picture, got {type(image).__name__}.", None
    if question is not None and not isinstance(question, str):
        return f"Question must be text (got {_got(question)}).", None
    if question is None or not question.strip():
        return "Please type a question about the image.", None
    if len(question) > MAX_QUESTION_LENGTH:  # a long text would pass the model's position range and hold the lock
        return f"Please keep the question under {MAX_QUESTION_LENGTH} characters (got {len(question)}).", None
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        return f"Algorithm must be one of {', '.join(ALGORITHMS)} (got {alg!r}).", None
    if not _is_number(threshold):
        return f"Confidence threshold must be a number from 0 to 1 (got {_got(threshold)}).", None
    try:
        threshold = float(threshold)
    except OverflowError:  # an int beyond floats
        return "Confidence threshold must be from 0 to 1 (got a number beyond the float range).", None
    if not 0 <= threshold <= 1:  # nan included
        return f"Confidence threshold must be from 0 to 1 (got {threshold:g}).", None
    steps, problem = _as_int(steps, "Steps", 1, MAX_STEPS)
    if problem:
        return problem, None
    max_new_tokens, problem = _as_int(max_new_tokens, "Answer length", 1, MAX_ANSWER_LENGTH)
    if problem:
        return problem, None
    if not isinstance(use_cache, bool):  # bool("false") is True: a string is refused, not converted
        return f"Prefilling (use_cache) must be true or false (got {_got(use_cache)}).", None
    if not isinstance(open_ended, bool):
        return f"Open-ended must be true or false (got {_got(open_ended)}).", None
    settings = dict(alg=alg, alg_p_threshold=threshold, steps=steps, max_new_tokens=max_new_tokens, use_cache=use_cache)
    if open_ended:  # the answer length is then the bound
        settings["open_ended"] = True
    return None, settings


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------


def save_trajectory(canvases, mask_token_id, processor, path, title=None):
    """Write the trajectory picture of one generation (its streamed answer canvases) as a PNG at `path`."""
    return plot_trajectory(canvases, 0, mask_token_id, processor, path, title=title)


class DimpleDemo:
    """The model, its processor and the request handler (`ask`, a generator of page updates)."""

    def __init__(self, model, processor, save_trajectory_to=None, step_timeout: float = 600.0):
        self.model, self.processor = model, processor
        self.step_timeout = step_timeout  # seconds the page waits for a decoding step before giving up
        self.mask_token_id = model.config.mask_token_id
        self.save_trajectory_to = save_trajectory_to
        self.counter = itertools.count(1)
        self.lock = threading.Lock()  # one generation at a time on the shared model
        # The page starts from the checkpoint's generation_config.json (only the fields it sets: transformers'
        # GenerationConfig defaults, e.g. use_cache=True, are not Dimple's).
        config = getattr(model, "generation_config", None)
        config = config.to_diff_dict() if config is not None else {}
        length = min(int(config.get("max_new_tokens") or 64), MAX_ANSWER_LENGTH)
        self.defaults = dict(
            alg=config.get("alg") if config.get("alg") in ALGORITHMS else "maskgit_plus",
            alg_p_threshold=float(config.get("alg_p_threshold") or 0.0),
            steps=min(int(config.get("steps") or length), MAX_STEPS),
            max_new_tokens=length,
            use_cache=bool(config.get("use_cache", False)),
        )

    def ask(self, image, question, alg, threshold, steps, max_new_tokens, use_cache, open_ended=False):
        """Yields (message, canvas, answer, stats, trajectory) page updates for one question."""
        problem, settings = check_request(image, question, alg, threshold, steps, max_new_tokens, use_cache, open_ended)
        if problem:
            gr.Warning(problem)
            yield error_box(problem), "", "", "", None
            return
        tokenizer = self.processor.tokenizer
        # Open-ended: the canvas on the page grows as decoding reaches it (`in_view`).
        blank = [self.mask_token_id] * (min(settings["max_new_tokens"], OPEN_ENDED_BLOCK_LENGTH)
                                        if open_ended else settings["max_new_tokens"])
        yield "", render_canvas(blank, None, tokenizer, self.mask_token_id), "", "decoding…", None

        streamer = QueueStreamer(timeout=self.step_timeout)
        result = {}
        # Set when the page goes away (the browser cancels or leaves: gradio closes this generator); the decoder
        # checks it after every step, so the next request does not wait behind a dead one.
        cancelled = threading.Event()

        def work():
            try:
                with self.lock:
                    # The question is plain text: special-token strings in it cannot end its turn or fill the canvas.
                    result["answer"] = demo.answer(
                        self.model, self.processor, image.convert("RGB"), question.strip(),
                        split_special_tokens=True, streamer=streamer,
                        stopping_criteria=lambda sequences, scores: cancelled.is_set(), **settings,
                    )
            except Exception as error:  # noqa: BLE001  (reported on the page, logged here)
                if isinstance(error, ValueError):  # bad input the processor / decoder explained
                    print(f"request refused: {error}", file=sys.stderr, flush=True)
                else:
                    traceback.print_exc()
                result["error"] = error
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        previous = blank
        try:
            for step, canvas in streamer:
                if open_ended:
                    canvas = in_view(canvas, self.mask_token_id, OPEN_ENDED_BLOCK_LENGTH,
                                     {tokenizer.pad_token_id, tokenizer.eos_token_id} - {None})
                left = sum(token == self.mask_token_id for token in canvas)
                html_canvas = render_canvas(canvas, previous, tokenizer, self.mask_token_id)
                yield gr.skip(), html_canvas, gr.skip(), f"step {step}: {left} masks left", gr.skip()
                previous = canvas
        finally:  # also when the page closed this generator mid-decode
            if thread.is_alive():
                cancelled.set()
        thread.join()

        if "error" in result:
            message = f"Could not answer: {result['error']}"
            gr.Warning(message)
            yield error_box(message), gr.skip(), "", "", None
            return
        text, passes, seconds = result["answer"]
        stats = (
            f"**{passes} forward pass{'es' if passes != 1 else ''}** · {seconds * 1000:.0f} ms · {settings['alg']}, threshold "
            f"{settings['alg_p_threshold']:g}, ≤ {settings['steps']} steps, {settings['max_new_tokens']} tokens"
            f"{', prefilling' if settings['use_cache'] else ''}{', open-ended' if open_ended else ''}"
        )
        picture = self.trajectory_picture(streamer.canvases, f"Q: {question.strip()}   A: {text}")
        yield "", gr.skip(), text if text.strip() else "(empty answer)", stats, picture

    def trajectory_picture(self, canvases, title):
        """The trajectory as a PIL image for the page (and saved when `--save-trajectory` was given)."""
        try:
            figure = plot_trajectory(canvases, 0, self.mask_token_id, self.processor, None, title=title)
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png")
        except Exception:  # noqa: BLE001  (the answer is already on the page; the picture is extra)
            traceback.print_exc()
            return None
        if self.save_trajectory_to:
            path = str(self.save_trajectory_to).replace("{n}", str(next(self.counter)))
            try:  # a failed save is logged; the page still gets the picture
                pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
                pathlib.Path(path).write_bytes(buffer.getvalue())
                print(f"trajectory saved to {path}", flush=True)
            except OSError as error:
                print(f"could not save the trajectory to {path}: {error}", file=sys.stderr, flush=True)
        buffer.seek(0)
        return Image.open(buffer)


def passes_raw_values(component):
    """`component` handing what the page or an API caller sent to the handler as it is: gradio would turn a
    Textbox's 123 into "123" and fail on a Slider's "8" with a TypeError; `check_request` names the field."""
    component.preprocess = lambda payload: payload
    return component


def build_app(model, processor, save_trajectory_to=None, model_name="") -> gr.Blocks:
    """The gradio Blocks of the demo for a loaded model and processor."""
    dimple = DimpleDemo(model, processor, save_trajectory_to)
    defaults = dimple.defaults
    with gr.Blocks(title="Dimple demo") as app:
        gr.Markdown(
            "# Dimple: discrete-diffusion answers about an image\n"
            f"Model: `{model_name}`. The answer starts as masks ({MASK_GLYPH}); every decoding step (one forward "
            "pass) commits some of them — newly committed tokens are highlighted, end-of-text shows as "
            f"{END_GLYPH}."
        )
        with gr.Row():
            with gr.Column():
                image = image_input(label="Image", type="pil", sources=["upload", "clipboard"], elem_id="image", height=260)
                question = passes_raw_values(gr.Textbox(
                    label="Question", placeholder=QUESTION_PLACEHOLDER, elem_id="question", lines=1,
                    max_length=MAX_QUESTION_LENGTH,
                ))
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                with gr.Accordion("Decoding settings", open=True):
                    alg = passes_raw_values(
                        gr.Dropdown(list(ALGORITHMS), value=defaults["alg"], label="Algorithm (alg)", elem_id="alg")
                    )
                    threshold = passes_raw_values(gr.Slider(
                        0, 1, value=defaults["alg_p_threshold"], step=0.01, elem_id="threshold",
                        label="Confidence threshold (alg_p_threshold; 0 = off)",
                    ))
                    steps = passes_raw_values(
                        gr.Slider(1, MAX_STEPS, value=defaults["steps"], step=1, label="Steps (most forward passes)", elem_id="steps")
                    )
                    length = passes_raw_values(gr.Slider(
                        1, MAX_ANSWER_LENGTH, value=defaults["max_new_tokens"], step=1, elem_id="length",
                        label="Answer length (max_new_tokens)",
                    ))
                    use_cache = passes_raw_values(
                        gr.Checkbox(value=defaults["use_cache"], label="Prefilling (use_cache)", elem_id="use_cache")
                    )
                    open_ended = passes_raw_values(gr.Checkbox(
                        value=False, elem_id="open_ended",
                        label="Open-ended (open_ended): the canvas grows until the answer ends; the length is a bound",
                    ))
            with gr.Column():
                message = gr.HTML(elem_id="message")
                gr.Markdown("**Answer canvas** (live)")
                blank = [dimple.mask_token_id] * defaults["max_new_tokens"]
                canvas = gr.HTML(render_canvas(blank, None, processor.tokenizer, dimple.mask_token_id), elem_id="canvas")
                answer = gr.Textbox(label="Answer", elem_id="answer", interactive=False)
                stats = gr.Markdown(elem_id="stats")
                trajectory = gr.Image(label="Decoding trajectory", type="pil", interactive=False, elem_id="trajectory")
        gr.Examples(
            examples=[[demo.sample_image(), q] for q in demo.DEFAULT_QUESTIONS],
            inputs=[image, question],
            label="Example: the sample scene (four shapes on a 3 x 3 grid)",
        )
        inputs = [image, question, alg, threshold, steps, length, use_cache, open_ended]
        outputs = [message, canvas, answer, stats, trajectory]
        ask.click(dimple.ask, inputs, outputs, api_name="ask")
        question.submit(dimple.ask, inputs, outputs, api_visibility="private")
        image.upload(_warn_if_unreadable, [image], [message], api_visibility="private")
    app.queue(default_concurrency_limit=1)
    app.dimple = dimple
    return app


def _warn_if_unreadable(image):
    if isinstance(image, UnreadableImage):
        problem, _ = check_request(image, "", None, 0, 1, 1)  # the image's message comes first
        gr.Warning(problem)
        return error_box(problem)
    return ""


def main(argv=None):
    if GRADIO_MISSING is not None:
        sys.exit(GRADIO_MISSING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "tiny-dimple"), help="checkpoint folder or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--save-trajectory", default=None, metavar="PATH", help="write each generation's trajectory PNG")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be from 1 to 65535, got {args.port}")
    looks_like_a_path = args.model.startswith((".", "/", "~")) or args.model.count("/") > 1  # a hub id is owner/name
    if looks_like_a_path and not pathlib.Path(args.model).expanduser().is_dir():
        parser.error(f"--model {args.model} is not a checkpoint folder (nor a hub id such as owner/name)")

    model, processor = load(args.model)
    name = args.model
    if pathlib.Path(name).resolve().is_relative_to(ROOT):
        name = str(pathlib.Path(name).resolve().relative_to(ROOT))  # e.g. "tiny-dimple"
    app = build_app(model, processor, args.save_trajectory, model_name=name)
    print(f"Dimple demo: {args.model} on http://{args.host}:{args.port}", flush=True)
    app.launch(server_name=args.host, server_port=args.port, show_error=True, css=CSS)


if __name__ == "__main__":
    main()
