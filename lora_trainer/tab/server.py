"""A UI reload while a job holds the host's queue: the page's server closes without waiting for what queued behind.

The WebUI's Reload UI interrupts the running job and closes the gradio server, whose uvicorn waits for every open
request to finish first. Generations queued behind the job (a txt2img pressed during training) then run one after
the other before the server can close, minutes each on a slow machine, while the WebUI answers nothing. A job
that ends while its server is closing lets the server go at once: those generations still run, in their own
threads and in queue order, while the UI reloads.
"""

from __future__ import annotations


def release_closing_server(server) -> bool:
    """If `server` (a gradio app's uvicorn server, or None) is closing, stop it waiting for open requests.

    Returns whether it was closing.
    """
    if server is None or not getattr(server, "should_exit", False):
        return False
    server.force_exit = True
    return True
