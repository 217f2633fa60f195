"""Job scripts: directives + wrapper (writes job.status) + the user's script."""

from .render import STATUS_FILE, render_job_script

__all__ = ["render_job_script", "STATUS_FILE"]
