"""The Gradio page: images (uploads or samples), a vocabulary (typed or built-in), a threshold
-> pictures with boxes and masks, a table, a JSON download and the time taken."""

import contextlib
import json
import os
import uuid
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from .service import MODEL_VOCABULARY, BadInput, DetectionService

__all__ = ["build_page", "upload_folder", "TYPED"]

# Gradio's cache (uploads, drawn pictures, the JSON downloads): every 10 minutes, its files
# older than an hour are deleted, and all of them when the server stops.
DELETE_CACHE = (600, 3600)

TYPED = "typed names"  # the vocabulary choice "use the names in the text box"
TABLE_HEADERS = ["image", "class", "novel", "score", "box (x, y, w, h)"]


def _label(service: DetectionService, builtin: str) -> str:
    if builtin == MODEL_VOCABULARY:
        return f"the model's own ({len(service.info()['model_vocabulary'])} classes)"
    return builtin


def upload_folder() -> str:
    """Gradio's upload folder (``GRADIO_TEMP_DIR``, else ``<tmp>/gradio``): the only files the
    page reads besides the server's own samples."""
    return os.path.realpath(get_upload_folder())


def open_upload(path: str):
    """An uploaded file, opened for reading: only inside gradio's upload folder (what the page
    uploaded), whatever path a client sends (vild_d2.serve.guard refuses others first)."""
    real, root = os.path.realpath(path), upload_folder()
    if os.path.commonpath([real, root]) != root:
        raise BadInput(f"{Path(path).name}: not a file uploaded to this server", 403)
    try:
        return open(real, "rb")
    except FileNotFoundError:  # gradio's cache is emptied after an hour
        raise BadInput(f"{Path(path).name}: no longer on the server: upload it again") from None


def build_page(service: DetectionService) -> gr.Blocks:
    """The page; its JSON downloads go to a folder of ``service`` in gradio's cache (served as
    they are, removed with the cache and when the server stops)."""
    os.makedirs(upload_folder(), exist_ok=True)
    json_dir = Path(service.temporary_folder("vild_d2_json_", upload_folder()))
    choices = [(TYPED, TYPED)] + [(_label(service, b), b) for b in service.builtins]

    def run(uploads, samples, source, names, threshold):
        try:
            with contextlib.ExitStack() as stack:
                files = [(Path(p).name, stack.enter_context(open_upload(p))) for p in uploads or []]
                files += service.read_samples(samples or [])
                if source == TYPED:
                    result = service.detect(files, names=names, threshold=threshold)
                else:
                    result = service.detect(files, builtin=source, threshold=threshold)
        except BadInput as e:
            return f"**Error:** {e}", None, None, None
        answer = result.to_json()
        path = json_dir / f"detections-{uuid.uuid4().hex[:8]}.json"
        path.write_text(json.dumps(answer))
        novel = set(answer["novel_classes"])
        rows = [
            [
                image["file_name"],
                d["category_name"],
                "yes" if d["category_name"] in novel else "",
                d["score"],
                ", ".join(f"{v:.1f}" for v in d["bbox"]),
            ]
            for image in answer["images"]
            for d in image["detections"]
        ]
        t = result.timing_ms
        status = (
            f"**{len(rows)} detections** in {len(files)} image(s), {len(result.vocabulary)} "
            f"classes, threshold {result.threshold:g}: **{t['total']:.0f} ms** (decode "
            f"{t['decode']:.0f}, vocabulary {t['vocabulary']:.0f}, detection "
            f"{t['detection']:.0f}). `*` / magenta = novel class (never seen with a box)."
        )
        return status, result.pictures(), rows or None, str(path)

    info = service.info()
    with gr.Blocks(
        title="vild_d2: open-vocabulary detection",
        analytics_enabled=False,
        delete_cache=DELETE_CACHE,
    ) as page:
        gr.Markdown(
            f"## vild_d2: detect any vocabulary\nModel: `{info['model']}`. Type class names "
            "(or pick a vocabulary), add images, press **Detect**. "
            "API: `POST /api/detect` (see `/api/info`)."
        )
        with gr.Row():
            with gr.Column():
                uploads = gr.File(
                    label="Images", file_count="multiple", file_types=["image"], elem_id="images"
                )
                samples = gr.Dropdown(
                    choices=list(service.samples),
                    multiselect=True,
                    label="Or samples",
                    elem_id="samples",
                )
                source = gr.Dropdown(
                    choices=choices, value=TYPED, label="Vocabulary", elem_id="source"
                )
                names = gr.Textbox(
                    label="Class names, comma-separated",
                    placeholder="red star, blue cross, green square",
                    elem_id="names",
                )
                threshold = gr.Slider(
                    0.0,
                    1.0,
                    value=service.threshold,
                    step=0.01,
                    label="Score threshold",
                    elem_id="threshold",
                )
                button = gr.Button("Detect", variant="primary", elem_id="detect")
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                pictures = gr.Gallery(
                    label="Detections",
                    columns=1,
                    object_fit="contain",
                    elem_id="pictures",
                )
                table = gr.Dataframe(
                    headers=TABLE_HEADERS, label="Detections", interactive=False, elem_id="table"
                )
                download = gr.File(label="JSON", elem_id="json")
        # Requests run side by side (decoding, drawing); the predictor's lock orders the
        # forwards, each with its own vocabulary.
        button.click(
            run,
            [uploads, samples, source, names, threshold],
            [status, pictures, table, download],
            concurrency_limit=4,
        )
    page.json_dir = str(json_dir)
    return page
