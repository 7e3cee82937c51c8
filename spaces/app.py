"""The ldmkit demo as a Hugging Face Space (SDK "gradio" or "docker"): the same server as `ldmkit serve`, the
page at / and the OpenAI-compatible API at /v1, with the bundled offline models.

Space settings: app_file: spaces/app.py (or copy it to the Space's root with requirements.txt). A Space is
public, so set the secret LDMKIT_API_KEY to require a key for the API and the page.
"""

from __future__ import annotations

import logging
import os

from ldmkit.serve.config import ServeConfig, api_key_from_env
from ldmkit.serve.server import serve_forever

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    config = ServeConfig(host="0.0.0.0", port=int(os.environ.get("PORT", "7860")), api_key=api_key_from_env(None),
                         output=os.environ.get("LDMKIT_OUTPUT", "/tmp/ldmkit-outputs"))
    raise SystemExit(serve_forever(config.check()))
