"""`bgjax serve`: a web page over `BackgroundPipeline` for people who do not code (Gradio).

A product photo (its mask from a mask file, from brush strokes, or from its own alpha channel) or an RGBA
cut-out placed on a new canvas; a category from the model's vocabulary; an optional style reference;
guidance, steps, lambda_cg, lambda_pg, seed, images and aspect ratio; a gallery of results to download.
The model is loaded and its default program compiled once, before the page opens; one queue feeds the
accelerator one job at a time. Bad input is a message in the page (`gr.Error`), never a traceback.

Uploads and results live only in a temporary folder that is removed when the server stops (and files older
than an hour are deleted while it runs); analytics are off. Only `--share` sends traffic off the machine,
through Gradio's share tunnel, and only when asked for.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bgjax.data.images import Rejected, load_image, load_mask
from bgjax.sampling.pipeline import BackgroundPipeline

MAX_FILE_SIZE = "25mb"  # larger uploads are refused by Gradio with a message in the page
CACHE_LIFETIME = 3600  # seconds: uploads and results older than this are deleted while the server runs
CUTOUT_SCALE = 0.6  # a cut-out fits in this fraction of the canvas, centred
ASPECTS = {"as uploaded": None, "1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "16:9": (16, 9), "9:16": (9, 16)}
PHOTO, CUTOUT = "photo: keep it, mask from a mask file, the brush or its alpha", "cut-out: place it on a new canvas"


@dataclasses.dataclass(frozen=True)
class Defaults:
    """What the page starts with, and what is compiled before it opens."""

    steps: int = 20
    num_images: int = 4
    guidance: float = 7.5
    seed: int = 0
    # The product's own latents in the cells it covers (`BackgroundPipeline`'s keep_product): fewer halos.
    keep_product: bool = True
    # The latents at its edge refilled from the background before decoding (`edge_fill`): no rim of its colour.
    edge_fill: bool = True


class BadInput(ValueError):
    """An input the page explains to the user instead of generating."""


def _image(path: str | None, what: str) -> Image.Image:
    """An uploaded file as a PIL image (alpha kept), checked by bgjax's loader (bombs, truncation, EXIF)."""
    if not path:
        raise BadInput(f"{what}: nothing uploaded")
    try:
        return load_image(Path(path), what)[1]
    except Rejected as e:
        raise BadInput(str(e).replace(str(path), Path(path).name)) from None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def _brush_mask(editor: dict | None, size: tuple[int, int]) -> np.ndarray | None:
    """The union of the painted strokes, at the photo's size (W, H); None when nothing was painted."""
    layers = [layer for layer in (editor or {}).get("layers") or [] if layer is not None]
    painted = [np.asarray(layer.convert("RGBA"))[..., 3] > 0 for layer in layers]
    if not any(p.any() for p in painted):
        return None
    union = np.logical_or.reduce(painted).astype(np.uint8) * 255
    return np.asarray(Image.fromarray(union).resize(size, Image.Resampling.NEAREST))


def _pad(photo: np.ndarray, mask: np.ndarray, aspect: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The photo centred on a white canvas of `aspect` (W:H) that contains it; the margin is background."""
    h, w = mask.shape
    width, height = max(w, round(h * aspect[0] / aspect[1])), max(h, round(w * aspect[1] / aspect[0]))
    canvas, canvas_mask = np.full((height, width, 3), 255, np.uint8), np.zeros((height, width), np.uint8)
    top, left = (height - h) // 2, (width - w) // 2
    canvas[top:top + h, left:left + w], canvas_mask[top:top + h, left:left + w] = photo, mask
    return canvas, canvas_mask


def _place(cutout: Image.Image, side: int, aspect: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A cut-out fitted into CUTOUT_SCALE of a white canvas of `aspect` whose longer side is `side`, centred;
    its alpha is the mask."""
    width, height = (side, round(side * aspect[1] / aspect[0])) if aspect[0] >= aspect[1] else \
        (round(side * aspect[0] / aspect[1]), side)
    scale = CUTOUT_SCALE * min(width / cutout.width, height / cutout.height)
    size = (max(1, round(cutout.width * scale)), max(1, round(cutout.height * scale)))
    placed = cutout.convert("RGBA").resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (width, height), (255, 255, 255, 0))
    canvas.paste(placed, ((width - size[0]) // 2, (height - size[1]) // 2))
    white = Image.new("RGBA", canvas.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, canvas).convert("RGB")), np.asarray(canvas.getchannel("A"))


def product_inputs(product: str | None, kind: str, mask_file: str | None, editor: dict | None, aspect: str,
                   side: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB photo, mask) for the pipeline from what the page holds; raises BadInput saying what is missing."""
    image = _image(product, "product")
    if kind == CUTOUT:
        if not _has_alpha(image):
            raise BadInput("product: a cut-out needs an alpha channel that marks the product (a PNG with "
                           "transparency); for a photo choose 'photo' and give its mask")
        return _place(image, side, ASPECTS[aspect] or (1, 1))
    photo = load_image(image, "product")[0]
    size = (photo.shape[1], photo.shape[0])
    if mask_file:
        source = _image(mask_file, "mask")
    elif (brushed := _brush_mask(editor, size)) is not None:
        source = brushed
    elif _has_alpha(image):
        source = image
    else:
        raise BadInput("no mask: upload a mask file, paint the product with the brush, or upload a photo whose "
                       "alpha channel marks the product (or choose 'cut-out')")
    try:
        mask = load_mask(source if not isinstance(source, np.ndarray) else Image.fromarray(source),
                         photo.shape[:2], "mask")
    except Rejected as e:
        raise BadInput(str(e)) from None
    return (photo, mask) if ASPECTS[aspect] is None else _pad(photo, mask, ASPECTS[aspect])


class App:
    """The page's handlers around one pipeline."""

    def __init__(self, pipe: BackgroundPipeline, defaults: Defaults):
        self.pipe, self.defaults = pipe, defaults
        self.categories = pipe.vocabulary.names if pipe.vocabulary is not None else []

    def warm_up(self) -> None:
        """Compile the program the default settings use, before anyone waits for it."""
        photo = np.full((self.pipe.resolution, self.pipe.resolution, 3), 255, np.uint8)
        mask = np.zeros(photo.shape[:2], np.uint8)
        mask[photo.shape[0] // 4:-photo.shape[0] // 4, photo.shape[1] // 4:-photo.shape[1] // 4] = 255
        d = self.defaults
        self.pipe(product=photo, mask=mask, category=self.categories[0] if self.categories else "product",
                  num_images=d.num_images, seed=d.seed, steps=d.steps, guidance=d.guidance, keep_product=d.keep_product,
                  edge_fill=d.edge_fill)

    def generate(self, product, kind, mask_file, editor, category, reference, reference_mask, aspect, guidance,
                 steps, lambda_cg, lambda_pg, seed, num_images, keep_product,
                 edge_fill) -> list[tuple[Image.Image, str]]:
        import gradio as gr

        try:
            if self.categories and category not in self.categories:
                raise BadInput(f"category {category!r}: this model knows {', '.join(self.categories)}")
            photo, mask = product_inputs(product, kind, mask_file, editor, aspect, self.pipe.resolution)
            ref = ref_mask = None
            if reference:
                ref = _image(reference, "reference")
                ref_mask = _image(reference_mask, "reference mask") if reference_mask else None
            images = self.pipe(product=photo, mask=mask, category=category, reference=ref, reference_mask=ref_mask,
                               num_images=int(num_images), seed=int(seed), steps=int(steps), guidance=float(guidance),
                               lambda_cg=float(lambda_cg), lambda_pg=float(lambda_pg) if ref is not None else None,
                               keep_product=bool(keep_product), edge_fill=bool(edge_fill))
        except (BadInput, ValueError) as e:  # the pipeline's ValueErrors name the input and the problem
            raise gr.Error(str(e), print_exception=False) from None
        return [(image, f"{category}, seed {int(seed)}, image {k}") for k, image in enumerate(images)]


def _editor_background(product: str | None):
    """Show an uploaded product in the brush editor (or say why it cannot be read)."""
    import gradio as gr

    if not product:
        return None
    try:
        return _image(product, "product")
    except BadInput as e:
        gr.Warning(str(e))
        return None


def build_page(app: App):
    import gradio as gr

    pipe, d = app.pipe, app.defaults
    with gr.Blocks(title="bgjax: product backgrounds", analytics_enabled=False,
                   delete_cache=(CACHE_LIFETIME, CACHE_LIFETIME)) as page:
        gr.Markdown("# Product backgrounds\nUpload a product photo with its mask (or a cut-out), pick its category, "
                    "and generate ad images; the product's own pixels are kept.")
        with gr.Row():
            with gr.Column():
                product = gr.File(label="Product photo or cut-out", file_types=["image"], type="filepath",
                                  elem_id="product")
                kind = gr.Radio([PHOTO, CUTOUT], value=PHOTO, label="The upload is", elem_id="kind")
                with gr.Accordion("Mask: a file, or paint the product", open=False):
                    mask_file = gr.File(label="Mask file (white or opaque = product)", file_types=["image"],
                                        type="filepath", elem_id="mask")
                    editor = gr.ImageEditor(label="Paint over the product", type="pil", image_mode="RGBA",
                                            sources=[], layers=False, transforms=[], buttons=[],
                                            brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"),
                                            elem_id="editor")
                category = gr.Dropdown(app.categories, value=app.categories[0] if app.categories else None,
                                       allow_custom_value=not app.categories, label="Category", elem_id="category")
                with gr.Accordion("Style reference (optional)", open=False, visible=pipe.has_pg):
                    reference = gr.File(label="Reference ad (with an alpha channel, or give its mask)",
                                        file_types=["image"], type="filepath", elem_id="reference")
                    reference_mask = gr.File(label="Reference mask", file_types=["image"], type="filepath",
                                             elem_id="reference_mask")
                with gr.Accordion("Settings", open=True):
                    aspect = gr.Radio(list(ASPECTS), value="as uploaded", label="Aspect ratio", elem_id="aspect")
                    guidance = gr.Slider(1.0, 15.0, value=d.guidance, step=0.5, label="Guidance", elem_id="guidance")
                    steps = gr.Slider(2, 60, value=d.steps, step=1, label="Steps", elem_id="steps")
                    lambda_cg = gr.Slider(0.0, 2.0, value=pipe.config.lambda_cg, step=0.05, label="lambda_cg "
                                          "(category branch)", elem_id="lambda_cg")
                    lambda_pg = gr.Slider(0.0, 2.0, value=pipe.config.lambda_pg, step=0.05, label="lambda_pg "
                                          "(reference style)", visible=pipe.has_pg, elem_id="lambda_pg")
                    seed = gr.Slider(0, 2**31 - 1, value=d.seed, step=1, label="Seed", elem_id="seed")
                    num_images = gr.Slider(1, 8, value=d.num_images, step=1, label="Images", elem_id="num_images")
                    keep_product = gr.Checkbox(value=d.keep_product, label="Keep the product's own latents "
                                               "(fewer halos at its edge)", elem_id="keep_product")
                    edge_fill = gr.Checkbox(value=d.edge_fill, label="Refill the background at the product's edge "
                                            "(no rim of its colour)", elem_id="edge_fill")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Results", format="png", columns=2, buttons=["download", "fullscreen"],
                                     elem_id="results")
        product.change(_editor_background, product, editor)
        run.click(app.generate, [product, kind, mask_file, editor, category, reference, reference_mask, aspect,
                                 guidance, steps, lambda_cg, lambda_pg, seed, num_images, keep_product,
                                 edge_fill], gallery)
    return page


def serve(model: Path, port: int = 7860, host: str = "127.0.0.1", share: bool = False,
          defaults: Defaults = Defaults(), dtype: str | None = None) -> None:
    """Load `model`, compile, and serve the page until Ctrl-C (or SIGTERM); the temporary folder goes with it."""
    import jax
    import jax.numpy as jnp

    dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    with tempfile.TemporaryDirectory(prefix="bgjax-serve-") as tmp:
        # Gradio keeps uploads and results in GRADIO_TEMP_DIR, read when the page's components are made.
        os.environ["GRADIO_TEMP_DIR"] = tmp
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
        print(f"loading {model} ({dtype}) and compiling the default settings ...", flush=True)
        app = App(BackgroundPipeline.from_pretrained(model, dtype=jnp.dtype(dtype)), defaults)
        app.warm_up()
        page = build_page(app)
        page.queue(default_concurrency_limit=1)  # one job at a time on the accelerator; the rest wait in line
        print(f"uploads and results are kept in {tmp} until the server stops", flush=True)
        page.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE, show_error=False,
                    footer_links=[])
