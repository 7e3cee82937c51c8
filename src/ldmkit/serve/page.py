"""The web page at /: Gradio Blocks in the same app, submitting to the server's own queue (Gradio's event
queue only carries the page's calls, without a concurrency limit, so it serialises nothing), with progress
from the pipeline's step callback. It works offline: system fonts instead of web fonts, no analytics, no
server-side rendering, nothing fetched from another host at page load (tests/test_serve_page.py checks)."""

from __future__ import annotations

import hmac

from ..pipelines.presets import SAMPLERS
from .errors import APIError
from .params import Fields, generation_spec

SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO_FONTS = ("ui-monospace", "Consolas", "monospace")
CSS = "#gallery img { image-rendering: pixelated; }"


def generate_fn(serve):
    """The page's generate call: one job in the shared queue, progress while it runs, the PNGs (with their
    replay metadata) in the gallery and as downloads."""
    import gradio as gr

    def generate(prompt, negative, seed, steps, guidance, sampler, count, upscale, key, progress=gr.Progress()):
        if serve.config.api_key and not hmac.compare_digest((key or "").encode(), serve.config.api_key.encode()):
            raise gr.Error("This server needs its API key: type it in the API key box.")
        if not serve.models.ready.is_set():
            raise gr.Error("The models are still loading; try again in a moment.")
        fields = {"prompt": prompt, "negative_prompt": negative or None, "seed": None if seed < 0 else int(seed),
                  "steps": int(steps), "guidance_scale": float(guidance), "n": int(count), "upscale": bool(upscale),
                  "scheduler": None if sampler == "preset" else sampler}
        try:
            job = serve.queue.submit(generation_spec(Fields(fields), serve.models, serve.config))
        except APIError as e:
            raise gr.Error(e.message) from None
        progress(0, desc="queued")
        while not job.done.wait(0.1):
            if job.state == "running":
                progress((job.step, job.total_steps), desc="denoising", unit="steps")
        if job.state != "succeeded":
            raise gr.Error(job.error.message if job.error else f"job {job.state}")
        paths = [str(serve.queue.output / r.name) for r in job.results]
        gallery = [(p, f"seed {r.seed}") for p, r in zip(paths, job.results)]
        return gallery, paths, f"job `{job.id}`: seeds {', '.join(str(s) for s in job.spec.seeds)}"

    return generate


def build_page(serve):
    import gradio as gr

    models = serve.config.models
    with gr.Blocks(title="ldmkit", analytics_enabled=False) as demo:
        gr.Markdown(f"## ldmkit\nLatent diffusion on this machine: {', '.join(models)}. The same queue serves the "
                    "OpenAI-compatible API at `/v1`.")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", placeholder="red apple", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                with gr.Row():
                    seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0, elem_id="seed")
                    count = gr.Slider(1, serve.config.max_n, value=1, step=1, label="Images", elem_id="count")
                with gr.Row():
                    steps = gr.Slider(1, serve.config.max_steps, value=20, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(0, 15, value=3.0, step=0.5, label="Guidance", elem_id="guidance")
                sampler = gr.Dropdown(["preset", *sorted(SAMPLERS)], value="preset", label="Sampler")
                upscale = gr.Checkbox(label="Upscale 4x", value=False, elem_id="upscale")
                key = gr.Textbox(label="API key", type="password", visible=bool(serve.config.api_key), elem_id="key")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Results", elem_id="gallery", columns=4, object_fit="contain")
                files = gr.File(label="PNG files (with replay metadata)", file_count="multiple", elem_id="files")
                status = gr.Markdown(elem_id="status")
        inputs = [prompt, negative, seed, steps, guidance, sampler, count, upscale, key]
        for trigger in (button.click, prompt.submit):
            trigger(generate_fn(serve), inputs, [gallery, files, status], concurrency_limit=None)
    return demo


def mount_page(app, serve):
    """Mount the page at / (after the API routes, which it must not shadow)."""
    import gradio as gr

    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)
    return gr.mount_gradio_app(app, build_page(serve), path="/", allowed_paths=[str(serve.config.output.resolve())],
                               ssr_mode=False, theme=theme, css=CSS, footer_links=[], pwa=False,
                               enable_monitoring=False, mcp_server=False)
